"""Chaos training: train a draft while replicas and a draft worker are killed; prove nothing was lost.

    python jobs/chaos_train.py                 # bounded: a tiny target, 2 SGLang TP-2 replicas, 2 workers

A fault-free run and a chaos run train on the same data with the same pool. During the chaos run a
`ChaosMonkey` kills replicas at random moments (`ray.kill`, SIGKILL of TP rank 0, SIGKILL of TP rank 1)
and one draft worker SIGKILLs itself at a chosen step (Ray Train restarts the group from the last
checkpoint). Each run's sample log (`train/sample_audit.py`) is audited: every committed step once,
in data order, and the chaos run's samples equal the fault-free run's and the data's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eagle_ray.testing.faults import FAIL_STARTS_FILE_ENV, FAULTS, plan_train_fault

# torch, Ray and Ray Train are imported where they are used: `eagle-ray chaos --help` comes without them
if TYPE_CHECKING:
    from eagle_ray.contract import PackedBatch


@dataclass
class ChaosSettings:
    steps: int = 80  # optimizer steps per run; each of the workers takes one batch a step
    workers: int = 2
    faults: int = 5  # faults, cycling through `kinds` (5: each kind once)
    kinds: tuple[str, ...] = FAULTS
    every_s: tuple[float, float] = (4.0, 10.0)  # a fault every this many seconds (uniform), once recovered
    kill_worker_at: int | None = 50  # a draft worker SIGKILLs itself at this step (None: no trainer fault)
    checkpoint_every: int = 20
    seed: int = 0
    start_failures: str | None = None  # the pool's EAGLE_RAY_FAIL_STARTS_FILE; None: no "start_failure" faults


def _train(pool: Any, batches: list[PackedBatch], s: ChaosSettings, storage: Path, name: str, fail: bool):
    from eagle_ray.train.loop import DraftTrainConfig
    from eagle_ray.train.trainer import train_draft

    cfg = DraftTrainConfig(
        max_steps=s.steps,
        lr=3e-3,
        warmup_steps=5,
        checkpoint_every=s.checkpoint_every,
        log_every=s.checkpoint_every,
    )
    if fail and s.kill_worker_at is not None:
        plan_train_fault(storage / name, s.kill_worker_at, "sigkill")
    return train_draft(
        pool,
        batches,
        cfg,
        storage_path=storage,
        name=name,
        num_workers=s.workers,
        backend="gloo",
        resources_per_worker={"CPU": 1},
        max_failures=2,
    )


def chaos_training(
    pool: Any,
    batches: list[PackedBatch],
    settings: ChaosSettings,
    storage: str | Path,
    baseline: dict[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """Run the chaos run (and, without `baseline`, a fault-free run first); audit both; return the report.

    `baseline`: a fault-free run's committed samples (`audit_run(...).samples`) to compare against.
    """
    from eagle_ray.pool.chaos import ChaosMonkey
    from eagle_ray.train.sample_audit import audit_run, expected_samples

    storage = Path(storage)
    s = settings
    want = expected_samples(batches[i % len(batches)] for i in range(s.steps * s.workers))
    report: dict[str, Any] = {"settings": asdict(s), "expected_samples": len(want)}
    if baseline is None:
        t0 = time.monotonic()
        _train(pool, batches, s, storage, "fault-free", fail=False)
        clean = audit_run(storage / "fault-free", s.workers)
        report["fault_free"] = {"seconds": time.monotonic() - t0, "problems": clean.problems}
        baseline = clean.samples
    replaced0 = pool.pool_stats()["replicas_replaced"]  # the owner's count: a shared pool's owner replaces them
    t0 = time.monotonic()
    kinds = tuple(k for k in s.kinds if k != "start_failure" or s.start_failures)
    with ChaosMonkey(pool, kinds, s.every_s, s.faults, s.seed, start_failures=s.start_failures) as monkey:
        result = _train(pool, batches, s, storage, "chaos", fail=True)
    faults = monkey.faults
    audit = audit_run(storage / "chaos", s.workers)
    problems = audit.problems + audit.compare(baseline) + audit.compare(want)
    if monkey.error is not None:
        problems.append(f"chaos monkey failed: {monkey.error!r}")
    report.update(
        seconds=time.monotonic() - t0,
        steps=result.steps,
        replica_faults=[asdict(f) for f in faults],
        replicas_replaced=pool.pool_stats()["replicas_replaced"] - replaced0,
        worker_restarts=audit.restarts,
        samples_checked=len(audit.samples),
        rolled_back_steps=audit.rolled_back,
        duplicates=audit.duplicates,
        losses=len(set(want) - set(audit.samples)),
        problems=problems,
        ok=not problems and result.steps == s.steps,
    )
    return report


def print_report(r: dict[str, Any]) -> None:
    kinds = ", ".join(f"{f['kind']}@{f['at_s']:.0f}s(replica {f['replica_id']})" for f in r["replica_faults"])
    print(f"[chaos] replica faults: {len(r['replica_faults'])} ({kinds}); replicas replaced {r['replicas_replaced']}")
    print(f"[chaos] draft-worker restarts: {r['worker_restarts']} (rolled back {r['rolled_back_steps']} step rows)")
    print(
        f"[chaos] steps {r['steps']}; samples checked {r['samples_checked']} of {r['expected_samples']}; "
        f"duplicates {r['duplicates']}; losses {r['losses']}; chaos run {r['seconds']:.0f}s"
    )
    for p in r["problems"]:
        print(f"[chaos] PROBLEM: {p}")
    print(f"[chaos] {'OK: every sample reached the trainer exactly once' if r['ok'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = ChaosSettings()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--faults", type=int, default=d.faults, help="replica faults to inject")
    p.add_argument("--kill-worker-at", type=int, default=d.kill_worker_at, help="step a draft worker dies at")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=2, help="SGLang TP size (2 makes the TP-rank fault possible)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="chaos_report.json", help="where the JSON report goes")
    a = p.parse_args(argv)

    import ray
    import torch

    from eagle_ray.pool import serve_pool
    from eagle_ray.ray_init import init_ray
    from eagle_ray.tiny import build_tiny_target, markov_batches

    torch.set_num_threads(1)
    kinds = FAULTS if a.tp_size > 1 else tuple(k for k in FAULTS if k != "sigkill_tp")
    s = ChaosSettings(a.steps, faults=a.faults, kinds=kinds, kill_worker_at=a.kill_worker_at, seed=a.seed)
    need = a.replicas * a.tp_size + s.workers + 1
    init_ray("local", num_cpus=need)  # logical CPUs: replicas and workers mostly wait on each other
    with tempfile.TemporaryDirectory(prefix="eagle_ray_chaos_") as tmp:
        target = str(build_tiny_target(Path(tmp) / "target", "llama"))
        shape = {"engine": "sglang", "replicas": a.replicas, "tp_size": a.tp_size, "cpus_per_replica": 1}
        s.start_failures = str(Path(tmp) / "fail_starts")  # "start_failure" faults: the replicas read the count here
        shape["runtime_env"] = {"env_vars": {FAIL_STARTS_FILE_ENV: s.start_failures}}
        with serve_pool(f"eagle-ray-chaos-{os.getpid()}", target, **shape) as pool:
            report = chaos_training(pool, markov_batches(40), s, Path(tmp) / "runs")
    ray.shutdown()
    print_report(report)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"[chaos] report: {a.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
