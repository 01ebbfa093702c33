"""Long-run benchmark: does a pool's driver stay flat over a million shards? (a benchmark, not a test)

One driver-side `PooledTargetModel` of R SYNTHETIC replicas (`eagle_ray.testing.synthetic`: contract-shaped
supervision, no model, no sleep) streams N tiny batches (one shard each, or a few when a batch finds idle
replicas: the pool splits it over them; the figures count shards), and drops each result as it comes, the
way a consumer that is done with it does. Every `--every` shards it samples, from the pool's owner thread and
the driver process: live ledger records, refs in flight, held bytes, the driver's RSS and CPU seconds. What
would grow with the run's length (ledger records kept, refs never settled, results never released) shows as a
slope; the baseline is the first sample after warm-up, in the same run.

    .venv/bin/python benchmarks/long_run.py --shards 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

    from eagle_ray.pool import PooledTargetModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# psutil, ray, torch and eagle_ray are imported where used: `benchmarks/render.py` imports this module for `render`


def _batches(n: int, tokens: int, seqs: int):
    """`n` batches of `seqs` sequences, `tokens` tokens in all, cycled from a few (building them is not measured)."""
    import torch

    from eagle_ray.contract import PackedBatch

    base = [
        PackedBatch.from_sequences([torch.randint(1, 1000, (tokens // seqs,)) for _ in range(seqs)]) for _ in range(8)
    ]
    for i in range(n):
        yield base[i % len(base)]


def _sample(pool: PooledTargetModel, proc: psutil.Process, done: int, t0: float) -> dict:
    live = pool._owner.call(
        lambda: {
            "ledger_records": len(pool._ledger.records),
            "inflight_refs": len(pool._inflight),
            "retry": len(pool._retry),
            "streams": len(pool._streams),
            "held_bytes": pool._held_bytes,
        }
    )
    cpu = proc.cpu_times()
    return {
        "shards": done,
        "seconds": round(time.monotonic() - t0, 2),
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "driver_cpu_s": round(cpu.user + cpu.system, 2),
        **live,
    }


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def render(doc: dict) -> str:
    """docs/benchmarks.md's table: the baseline sample, every 250,000th shard, and the last."""
    samples = doc["samples"]
    keep = [s for i, s in enumerate(samples) if i in (0, len(samples) - 1) or s["shards"] % 250_000 == 0]
    lines = [
        "| shards | driver RSS | live ledger records | refs in flight | held bytes |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(keep):
        label = f"{s['shards']:,}" + (" (baseline)" if i == 0 else "")
        held = _kib(s["held_bytes"])
        lines.append(f"| {label} | {s['rss_mb']:.1f} MB | {s['ledger_records']} | {s['inflight_refs']} | {held} |")
    m = doc["summary"]
    return "\n".join(lines) + (
        f"\n\n{m['shards']:,} shards over {m['replicas']} replicas; RSS end / baseline {m['rss_end_over_baseline']}, "
        f"{m['rss_mb_per_100k_shards']:+} MB per 100,000 shards; at most {m['ledger_records_max']} ledger records and "
        f"{m['inflight_refs_max']} refs in flight; driver {m['driver_cpu_ms_per_shard']:.2f} ms CPU per shard at "
        f"{m['shards_per_s']:.0f} shards/s (`benchmarks/results/long_run.json`)"
    )


def main() -> None:
    import psutil
    import ray

    from eagle_ray.pool import PooledTargetModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1_000_000, help="batches to stream (shards: a few %% more)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--every", type=int, default=50_000, help="shards between samples")
    ap.add_argument("--warmup", type=int, default=20_000, help="shards before the baseline sample")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per batch (one shard each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "long_run.json"))
    args = ap.parse_args()

    store = 256 * 2**20
    ray.init(num_cpus=args.replicas + 1, object_store_memory=store, include_dashboard=False, logging_level="ERROR")
    proc = psutil.Process(os.getpid())
    pool = PooledTargetModel(
        "synthetic",
        engine="synthetic",
        replicas=args.replicas,
        use_gpu=False,
        cpus_per_replica=1,
        engine_kwargs={"tokens_per_s": float("inf"), "hidden": 16, "vocab_size": 1000},
    )
    samples, t0, done = [], time.monotonic(), 0
    try:
        for res in pool.stream(_batches(args.shards, args.tokens, 4)):
            done += 1
            if res.error is not None:
                raise RuntimeError(res.error)
            del res  # a consumer done with it: its bytes leave the budget
            if done == args.warmup or (done > args.warmup and done % args.every == 0) or done == args.shards:
                samples.append(_sample(pool, proc, done, t0))
                s = samples[-1]
                print(
                    f"{s['shards']:>9} shards {s['seconds']:>8.1f}s  rss {s['rss_mb']:>7.1f} MB  ledger "
                    f"{s['ledger_records']:>3}  in flight {s['inflight_refs']:>3}  held {s['held_bytes']:>6} B  "
                    f"cpu {s['driver_cpu_s']:.1f}s",
                    flush=True,
                )
        stats = pool.stats()
    finally:
        pool.shutdown()
        ray.shutdown()
    base, last = samples[0], samples[-1]
    n = last["shards"] - base["shards"]
    summary = {
        "shards": done,
        "replicas": args.replicas,
        "delivered": stats["shards_delivered"],
        "rss_mb_baseline": base["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_end_over_baseline": round(last["rss_mb"] / base["rss_mb"], 3),
        "rss_mb_per_100k_shards": round((last["rss_mb"] - base["rss_mb"]) / max(n, 1) * 1e5, 2),
        "ledger_records_max": max(s["ledger_records"] for s in samples),
        "inflight_refs_max": max(s["inflight_refs"] for s in samples),
        "driver_cpu_ms_per_shard": round((last["driver_cpu_s"] - base["driver_cpu_s"]) / max(n, 1) * 1e3, 3),
        "shards_per_s": round(n / max(last["seconds"] - base["seconds"], 1e-9), 1),
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
