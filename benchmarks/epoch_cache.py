"""What the epoch cache saves: target work for an E-epoch run with the cache against without, in one process.

Four runs of the same E-epoch training (real Ray Train, 2 draft workers, a real pool on a local Ray) on
pre-tokenized data that every epoch reshuffles and repacks:
  online   cache.mode=off: the target computes every epoch;
  cache    cache.mode=auto: epoch 1 from the pool, written ahead to the cache; every epoch read from it;
  fp8      the same cache, its hidden states stored as float8 with a per-token scale (cache.fp8): its bytes per
           token, and its loss curve against `cache`'s, step by step (every epoch, the first too, trains on the
           rounded values it reads back);
  release  the same as `cache`, and the pool scaled to 0 replicas once the cache is complete (release_after_cache):
           the step it was scaled down at.
Per run: target tokens computed (the workers' own count, summed over the steps), tokens trained on, tokens read
from the cache, the cache's bytes and bytes per token, and replica-seconds (live replicas sampled every 0.25 s
over the training call, a replica counted from its start until it is gone). Ratios are against `online`, measured
in the same run of this script.

    PYTHONPATH=. .venv/bin/python benchmarks/epoch_cache.py            # writes benchmarks/results/epoch_cache.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _data(path: Path, records: int) -> Path:
    from eagle_ray.tiny import markov_sequences

    with path.open("w") as f:
        for s in markov_sequences(records, (20, 60), seed=3):
            n = s.numel()
            f.write(json.dumps({"input_ids": s.tolist(), "loss_mask": [0] * 4 + [1] * (n - 4)}) + "\n")
    return path


WORKERS = 2


def setup(prefix: str, records: int, epochs: int) -> tuple:
    """What this benchmark and `fanout.py` share: the tiny target, the data's batch source (reshuffled and repacked
    every epoch), a local Ray, the E-epoch config and `train_draft`'s arguments. Returns (target path, source,
    batches per epoch, config, arguments)."""
    from eagle_ray.data import make_batch_source
    from eagle_ray.ray_init import init_ray
    from eagle_ray.tiny import build_tiny_target
    from eagle_ray.train import DraftTrainConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    target = str(build_tiny_target(tmp / "target", "llama"))
    data = _data(tmp / "data.jsonl", records)
    source = make_batch_source(
        "pretokenized", data, None, max_length=64, batch_tokens=256, shuffle_buffer=32, seed=0, workers=0
    )[0]
    init_ray("local", num_cpus=6, object_store_memory=256 * 2**20, dashboard=False)
    first = source.batches_per_epoch()
    steps = epochs * first // WORKERS
    config = DraftTrainConfig(max_steps=steps, lr=3e-3, warmup_steps=2, ttt_steps=3, checkpoint_every=steps)
    common = dict(
        storage_path=tmp / "runs", num_workers=WORKERS, backend="gloo", resources_per_worker={"CPU": 1},
        progress="off",
    )  # fmt: skip
    return target, source, first, config, common


def wait_ready(pool, replicas: int) -> None:
    while sum(r["state"] == "ready" for r in pool.stats()["replicas"]) < replicas:
        time.sleep(0.5)


class _ReplicaSeconds:
    """Live replicas (not dead) of the pool, integrated over time by a sampling thread."""

    def __init__(self, pool, every_s: float = 0.25):
        self.pool, self.every_s, self.total = pool, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _live(self) -> int:
        return sum(r["state"] != "dead" for r in self.pool.stats()["replicas"])

    def _run(self) -> None:
        last, live = time.monotonic(), self._live()
        while not self._stop.wait(self.every_s):
            now = time.monotonic()
            self.total += live * (now - last)
            last, live = now, self._live()
        self.total += live * (time.monotonic() - last)

    def __enter__(self) -> _ReplicaSeconds:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def render(doc: dict) -> str:
    """The docs' table of `doc` (this benchmark's JSON)."""
    st = doc["setup"]
    lines = [
        "| run | target tokens computed | vs online | replica-seconds | vs online | tokens from the cache |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        lines.append(
            f"| {r['name']} | {r['target_tokens']} | {r['target_tokens_ratio']:.3f} | {r['replica_seconds']:.0f} | "
            f"{r['replica_seconds_ratio']:.2f} | {r['cached_tokens']} |"
        )
    lines.append(
        f"\n({st['epochs']} epochs of {st['batches_per_epoch']} batches, {st['workers']} workers, "
        f"{st['replicas']} {st['engine']} replicas of a {st['target']}, {st['machine']}; the cache held "
        f"{doc['cache_bytes_per_token']:.0f} bytes per token; the release run scaled the pool down at step "
        f"{doc['runs'][-1]['cache'].get('released_at_step')} of {doc['runs'][-1]['steps']}; `{doc['command']}`)"
    )
    f = doc.get("fp8")
    if f:
        lines.append(
            f"\nStored as fp8 (`cache.fp8: true`), the cache held {f['bytes_per_token']:.0f} bytes per token "
            f"({f['bytes_ratio']:.2f} of the exact cache's). Over every step (every epoch reads those values back), "
            f"the loss differed from the exact cache's run by {f['loss_rel_gap_mean']:.1e} of itself on average "
            f"and {f['loss_rel_gap_max']:.1e} at most (last loss {f['loss_last'][0]:.4f} exact, "
            f"{f['loss_last'][1]:.4f} fp8)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--engine", default="hf", choices=["hf", "sglang"])
    p.add_argument("--out", default=str(HERE / "results" / "epoch_cache.json"))
    args = p.parse_args(argv)

    import ray

    from eagle_ray.pool import serve_pool
    from eagle_ray.train import EpochCacheConfig, train_draft

    target, source, first, config, common = setup("epoch_cache_bench_", args.records, args.epochs)
    rows = []
    try:
        with serve_pool("epoch-cache-bench", target, engine=args.engine, replicas=args.replicas) as pool:
            wait_ready(pool, args.replicas)
            runs = [("online", None, None), ("cache", EpochCacheConfig(), None)]
            runs += [("fp8", EpochCacheConfig(fp8=True), None), ("release", EpochCacheConfig(), 0)]
            for name, cache, release in runs:  # release last: it leaves the pool with no replica
                t0 = time.monotonic()
                with _ReplicaSeconds(pool) as rs:
                    result = train_draft(
                        pool, source, config, name=name, cache=cache, release_after_cache=release, **common
                    )
                h = result.history
                rows.append(
                    {
                        "name": name,
                        "steps": result.steps,
                        "trained_tokens": h[-1]["tokens"],
                        "target_tokens": sum(r["target_tokens"] for r in h),
                        "cached_tokens": sum(r.get("cached_tokens", 0) for r in h),
                        "replica_seconds": round(rs.total, 1),
                        "wall_s": round(time.monotonic() - t0, 1),
                        "loss_last": h[-1]["loss"],
                        "losses": [r["loss"] for r in h],
                        "cache": result.cache,
                    }
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("cache", "losses")}), flush=True)
    finally:
        ray.shutdown()
    base = rows[0]
    for r in rows:
        r["target_tokens_ratio"] = r["target_tokens"] / base["target_tokens"]
        r["replica_seconds_ratio"] = r["replica_seconds"] / base["replica_seconds"]
    cache = rows[1]["cache"]
    exact, fp8 = rows[1], rows[2]
    gaps = [abs(a - b) / b for a, b in zip(fp8["losses"], exact["losses"], strict=True)]
    out = {
        "benchmark": "epoch_cache",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/epoch_cache.py",
        "setup": {
            "epochs": args.epochs,
            "batches_per_epoch": first,
            "workers": WORKERS,
            "replicas": args.replicas,
            "engine": args.engine,
            "target": "tiny llama (H=64, fp32), random init",
            "machine": "2 shared CPU cores, no GPU",
        },
        "runs": rows,
        "cache_bytes": cache["bytes"],
        "cache_bytes_per_token": cache["bytes_per_token"],
        "expected_target_tokens_ratio": 1 / args.epochs,
        "fp8": {
            "bytes_per_token": fp8["cache"]["bytes_per_token"],
            "bytes_ratio": fp8["cache"]["bytes_per_token"] / cache["bytes_per_token"],
            "loss_rel_gap_max": max(gaps),
            "loss_rel_gap_mean": sum(gaps) / len(gaps),
            "loss_last": [exact["loss_last"], fp8["loss_last"]],
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
