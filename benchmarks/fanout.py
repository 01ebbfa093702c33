"""What a sweep saves: target work for K drafts of E epochs trained as one sweep through the epoch cache, against
the same K drafts trained one after another without a cache, in one process.

On one pool (real HF replicas on a local Ray, 2 Ray Train draft workers, pre-tokenized data that every epoch
reshuffles and repacks):
  sequential  K runs of one draft each (arm k's config), cache.mode=off: the target computes every epoch of every
              draft, K x E passes over the data;
  sweep       one run of the K arms (`train_draft(..., sweep=...)`), the epoch cache on, the pool scaled to 0
              replicas once the cache holds epoch 1 (release_after_cache=0): one pass.
Per run: target tokens computed (the workers' own count), tokens trained on (per draft), replica-seconds (live
replicas sampled every 0.25 s over the training calls), and both per (draft, epoch); and the trainers' wait share in
epochs 2..E (the rows' `wait_s` over their `step_s`, as the progress line's `wait`). The issue's goals: the sweep's
replica-seconds per (draft, epoch) at most 1.1/(K·E) of the sequential runs', and its wait share in epochs 2..E at
most 1%. Each arm's last loss is reported next to the same config's sequential run (they train on the same batches
from the same seeds). The default `--records` gives epochs long enough that Ray Train's start-up (the same in every
run, and a larger share of the sweep's one run) does not set the ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/fanout.py            # writes benchmarks/results/fanout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from epoch_cache import WORKERS, _ReplicaSeconds, setup, wait_ready  # noqa: E402  (this folder is no package)

ARMS = [{"lr": 3e-3}, {"lr": 1e-2, "seed": 1}, {"lr": 1e-3, "seed": 2}]
RECORDS = 4096


def render(doc: dict) -> str:
    """The docs' table of `doc` (this benchmark's JSON)."""
    st, per, wait = doc["setup"], doc["per_draft_epoch"], doc["wait_share_later_epochs"]
    k, e = len(st["arms"]), st["epochs"]
    return "\n".join(
        [
            "| per (draft, epoch) | K runs one after another, no cache | one sweep, epoch cache, released | ratio |",
            "|---|---|---|---|",
            f"| target tokens computed | {per['sequential_target_tokens']:.0f} | {per['sweep_target_tokens']:.0f} | "
            f"{doc['target_tokens_ratio']:.3f} |",
            f"| replica-seconds | {per['sequential_replica_seconds']:.1f} | {per['sweep_replica_seconds']:.1f} | "
            f"{doc['replica_seconds_ratio']:.3f} |",
            f"| trainers' wait share, epochs 2..E | {100 * wait['sequential']:.1f}% | {100 * wait['sweep']:.1f}% | |",
            "",
            f"(K={k} arms, E={e} epochs of {st['batches_per_epoch']} batches, {st['workers']} workers, "
            f"{st['replicas']} {st['engine']} replicas of a {st['target']}, {st['machine']}. The ideal ratio is "
            f"1/(K·E) = {doc['ideal_ratio']:.3f}, the issue's goal {doc['goal_ratio']:.3f} (and a wait share of at "
            "most 1%); "
            f"the pool was released at step {doc['runs'][-1]['released_at_step']} of {doc['runs'][-1]['steps']} "
            f"({st['batches_per_epoch'] // st['workers']} steps an epoch). Each arm's losses equal "
            f"its sequential run's: {all(doc['same_losses_as_sequential'])}. `{doc['command'].strip()}`)",
            *_render_before(doc),
        ]
    )


def _render_before(doc: dict) -> list[str]:
    b = doc.get("before")
    if not b:
        return []
    return [
        "",
        f"Before the epoch cache wrote epoch 1 ahead (commit {b['commit']}, the same command in the same session): "
        f"replica-seconds ratio {b['replica_seconds_ratio']:.3f}, the pool released at step {b['released_at_step']}, "
        f"the sweep's wait share in epochs 2..E {100 * b['wait_share_later_epochs']['sweep']:.1f}% (sequential "
        f"{100 * b['wait_share_later_epochs']['sequential']:.1f}%).",
    ]


def _commit() -> str | None:
    import subprocess

    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return run.stdout.strip() or None
    except OSError:
        return None


def _shown(argv: list[str]) -> list[str]:
    """The arguments that shape the figures (not where they are written)."""
    out, skip = [], False
    for a in argv:
        if not skip and not a.startswith("--out"):
            out.append(a)
        skip = a == "--out"
    return out


def before(doc: dict) -> dict:
    """What the docs compare with, from a results file of the code before a change."""
    sweep = doc["runs"][-1]
    return {
        "commit": doc.get("commit"),
        "replica_seconds_ratio": doc["replica_seconds_ratio"],
        "wait_share_later_epochs": doc["wait_share_later_epochs"],
        "released_at_step": sweep["released_at_step"],
        "sweep_replica_seconds": sweep["replica_seconds"],
        "sequential_replica_seconds": doc["baseline_sequential_no_cache"]["replica_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", type=int, default=3, help="K: the first K of three learning-rate/seed arms")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--records", type=int, default=RECORDS, help="data records (about 5.8 per batch)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--sweep-replicas", type=int, default=None, help="scale the pool to this many for the sweep (default: the same)"
    )
    p.add_argument("--out", default=str(HERE / "results" / "fanout.json"))
    p.add_argument(
        "--before",
        default=None,
        help="this benchmark's results file from the code before a change (same settings, same session): its "
        "figures are kept under `before`",
    )
    args = p.parse_args(argv)
    arms = ARMS[: args.arms]

    import ray

    from eagle_ray.pool import serve_pool
    from eagle_ray.train import EpochCacheConfig, train_draft

    target, source, first, config, common = setup("fanout_bench_", args.records, args.epochs)
    rows = []
    try:
        with serve_pool("fanout-bench", target, engine="hf", replicas=args.replicas) as pool:
            wait_ready(pool, args.replicas)
            runs = [(f"sequential{k}", [arm], None, None) for k, arm in enumerate(arms)]
            runs.append(("sweep", arms, EpochCacheConfig(), 0))  # last: it leaves the pool with no replica
            for name, sweep, cache, release in runs:
                if name == "sweep" and args.sweep_replicas not in (None, args.replicas):
                    # a sweep consumes batches about K times slower: a pool sized to it needs fewer replicas
                    pool.scale(args.sweep_replicas)
                    deadline = time.monotonic() + 120
                    while sum(r["state"] != "dead" for r in pool.stats()["replicas"]) != args.sweep_replicas:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the pool did not scale to {args.sweep_replicas} replicas")
                        time.sleep(0.5)
                t0 = time.monotonic()
                with _ReplicaSeconds(pool) as rs:
                    result = train_draft(
                        pool, source, config, name=name, cache=cache, release_after_cache=release, sweep=sweep,
                        **common,
                    )  # fmt: skip
                h = result.history
                last = h[-1].get("arms") or [h[-1]]
                later = [r for r in h if r["step"] > -(-first // WORKERS)]  # the steps of epochs 2..E
                rows.append(
                    {
                        "name": name,
                        "drafts": len(sweep),
                        "steps": result.steps,
                        "trained_tokens_per_draft": h[-1]["tokens"],
                        "target_tokens": sum(r["target_tokens"] for r in h),
                        "cached_tokens": sum(r.get("cached_tokens", 0) for r in h),
                        "replica_seconds": round(rs.total, 1),
                        "wall_s": round(time.monotonic() - t0, 1),
                        "loss_last": [a["loss"] for a in last],
                        "released_at_step": (result.cache or {}).get("released_at_step"),
                        "later_wait_s": round(sum(r["wait_s"] for r in later), 2),
                        "later_step_s": round(sum(r["step_s"] for r in later), 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    k, e = len(arms), args.epochs
    seq = [r for r in rows if r["name"].startswith("sequential")]
    sweep = rows[-1]
    baseline = {
        "replica_seconds": sum(r["replica_seconds"] for r in seq),
        "target_tokens": sum(r["target_tokens"] for r in seq),
        "wall_s": sum(r["wall_s"] for r in seq),
    }
    per = lambda x: x / (k * e)  # noqa: E731  (per draft and epoch)
    out = {
        "benchmark": "fanout",
        "commit": _commit(),
        "command": " ".join(["PYTHONPATH=. .venv/bin/python benchmarks/fanout.py", *_shown(argv or sys.argv[1:])]),
        "setup": {
            "arms": arms,
            "epochs": e,
            "records": args.records,
            "batches_per_epoch": first,
            "workers": WORKERS,
            "replicas": args.replicas,
            "sweep_replicas": args.sweep_replicas or args.replicas,
            "engine": "hf",
            "target": "tiny llama (H=64, fp32), random init",
            "machine": "2 shared CPU cores, no GPU",
        },
        "runs": rows,
        "baseline_sequential_no_cache": baseline,
        "per_draft_epoch": {
            "sequential_replica_seconds": per(baseline["replica_seconds"]),
            "sweep_replica_seconds": per(sweep["replica_seconds"]),
            "sequential_target_tokens": per(baseline["target_tokens"]),
            "sweep_target_tokens": per(sweep["target_tokens"]),
        },
        "replica_seconds_ratio": sweep["replica_seconds"] / baseline["replica_seconds"],
        "target_tokens_ratio": sweep["target_tokens"] / baseline["target_tokens"],
        "wall_ratio": sweep["wall_s"] / baseline["wall_s"],
        "wait_share_later_epochs": {
            "sequential": sum(r["later_wait_s"] for r in seq) / max(sum(r["later_step_s"] for r in seq), 1e-9),
            "sweep": sweep["later_wait_s"] / max(sweep["later_step_s"], 1e-9),
        },
        "goal_ratio": 1.1 / (k * e),
        "ideal_ratio": 1 / (k * e),
        "same_losses_as_sequential": [
            abs(sweep["loss_last"][i] - seq[i]["loss_last"][0]) <= 1e-5 * abs(seq[i]["loss_last"][0]) for i in range(k)
        ],
    }
    if args.before:
        out["before"] = before(json.loads(Path(args.before).read_text()))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    keys = ("replica_seconds_ratio", "target_tokens_ratio", "goal_ratio", "wait_share_later_epochs")
    print(json.dumps({key: out[key] for key in keys}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
