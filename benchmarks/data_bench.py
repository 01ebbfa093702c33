"""Driver CPU per batch: data prepared in the driver vs in Ray tasks (`make_batch_source(workers=...)`).

The same batches (ShareGPT, Qwen's BPE, ChatML, `--batch-tokens` per batch) are served three ways, each by a
fresh source: in the driver (`workers=0`), in Ray tasks on a first pass (nothing indexed: the scan chain
finds block starts), and in Ray tasks again from the index the first pass left on disk (a restarted job).
Driver CPU is `time.process_time()` (every thread of the driver process, Ray's own included) and
`time.thread_time()` (the thread that iterates the source: what a feed thread spends on data). The Ray
workers are started and warmed on a small source first, so their imports are not in the wall times.

    .venv/bin/python benchmarks/data_bench.py --batches 200 --batch-tokens 16384
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import ray

from eagle_ray.data import make_batch_source
from eagle_ray.ray_init import init_ray


def _serve(batches: int, **kw) -> dict:
    src, stats = make_batch_source("sharegpt", [], "qwen", "chatml", **kw)
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    tokens = sum(b.num_tokens for b in islice(src(0), batches))
    return {
        "wall_s": time.perf_counter() - wall,
        "driver_cpu_s": time.process_time() - cpu,
        "thread_cpu_s": time.thread_time() - thread,
        "tokens": tokens,
        "records": stats.records,
        "tasks": len(src.task_pids),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--workers", type=int, default=4, help="Ray tasks in flight")
    p.add_argument("--num-cpus", type=int, default=None, help="the local Ray's CPUs (default: the machine's)")
    a = p.parse_args()
    kw = dict(batch_tokens=a.batch_tokens, max_length=a.max_length, max_warnings=0)
    init_ray("local", num_cpus=a.num_cpus, dashboard=False)
    try:
        _serve(4, workers=a.workers, max_records=64, block_records=16, **kw)  # start and warm the workers
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index.jsonl"
            tasks = dict(workers=a.workers, index_path=index, **kw)
            rows = {
                "driver (workers=0)": _serve(a.batches, workers=0, **kw),
                f"tasks, first pass (workers={a.workers})": _serve(a.batches, **tasks),
                f"tasks, indexed (workers={a.workers})": _serve(a.batches, **tasks),
            }
    finally:
        ray.shutdown()
    base = rows["driver (workers=0)"]
    print(f"{a.batches} batches of <= {a.batch_tokens} tokens (max_length {a.max_length}), ShareGPT, Qwen BPE")
    print(f"{'':38} {'wall s':>7} {'driver CPU ms/batch':>20} {'thread CPU ms/batch':>20} {'vs driver':>10}")
    for name, r in rows.items():
        assert r["tokens"] == base["tokens"], "the same batches every way"
        per, per_thread = 1e3 * r["driver_cpu_s"] / a.batches, 1e3 * r["thread_cpu_s"] / a.batches
        ratio = base["driver_cpu_s"] / max(r["driver_cpu_s"], 1e-9)
        print(f"{name:38} {r['wall_s']:7.2f} {per:20.2f} {per_thread:20.2f} {ratio:9.1f}x")
    print(f"tokens served: {base['tokens']}; records read on the first pass: {base['records']}")


if __name__ == "__main__":
    main()
