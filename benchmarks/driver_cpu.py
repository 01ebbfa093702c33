"""The job driver's own CPU while training: what one driver process spends per step, and its share of a core.

Runs the real job (`jobs/train_eagle3.py`) as a child process on its own local Ray, with the HF engine and
small batches so that steps come fast (the driver's cost per batch shows, not the trainer's). Reads the
driver process's CPU time (all its threads: user + system, from /proc via psutil) when the first and the last
progress lines print, so start-up, the draft-vocabulary pass, evaluation and shutdown are left out.

    .venv/bin/python benchmarks/driver_cpu.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/driver_cpu.py --steps 100     # quicker, noisier

Prints one JSON line and writes `benchmarks/results/driver_cpu.json` (unless `--out ''`). Extra arguments after
`--` are passed to the job as overrides.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "driver_cpu.json"
STEP = re.compile(r"\[eagle_ray\] step (\d+)/(\d+)")


def settings(steps: int, workers: int, replicas: int, batch_tokens: int) -> list[str]:
    return [
        "target.engine=hf",
        f"target.replicas={replicas}",
        f"training.num_workers={workers}",
        f"training.max_steps={steps}",
        f"data.batch_tokens={batch_tokens}",
        f"data.max_length={batch_tokens}",
        "data.max_records=2000",
        "draft.vocab_batches=8",
        "checkpoint.every=100000",
        "logging.progress=lines",
        "logging.trackers=[]",
        "logging.plot=false",
        "eval.enabled=false",
    ]


def measure(overrides: list[str], timeout_s: float) -> dict:
    """Run the job; the driver's CPU seconds and wall seconds between its first and last progress lines."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "jobs/train_eagle3.py", f"checkpoint.storage_path={tmp}", *overrides]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        driver = psutil.Process(proc.pid)
        marks: list[tuple[int, float, float]] = []  # (step, cpu s, wall s) at each progress line
        tail: list[str] = []
        deadline = time.monotonic() + timeout_s
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            m = STEP.search(line)
            if m:
                t = driver.cpu_times()
                marks.append((int(m[1]), t.user + t.system, time.monotonic()))
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
    if proc.returncode != 0 or len(marks) < 2:
        raise RuntimeError(f"the job failed (exit {proc.returncode}, {len(marks)} progress lines):\n{''.join(tail)}")
    (s0, c0, w0), (s1, c1, w1) = marks[0], marks[-1]
    return {"steps": s1 - s0, "cpu_s": c1 - c0, "wall_s": w1 - w0}


def render(doc: dict) -> str:
    """docs/benchmarks.md's table of a before/after pair (`driver_cpu.json`): every key holding a run is a column."""
    runs = {k: v for k, v in doc.items() if isinstance(v, dict) and "cpu_s" in v}
    rows = [
        ("steps measured", "steps", "{:d}"),
        ("driver CPU s", "cpu_s", "{:.2f}"),
        ("wall s", "wall_s", "{:.1f}"),
        ("steps/s", "steps_per_s", "{:.2f}"),
        ("CPU ms / step", "cpu_ms_per_step", "{:.2f}"),
        ("CPU ms / batch", "cpu_ms_per_batch", "{:.2f}"),
        ("share of a core", "core_share", "{:.3f}"),
    ]
    lines = ["| | " + " | ".join(f"`{k}`" for k in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in runs.values()) + " |")
    s = next(iter(runs.values()))["settings"]
    foot = f"{s['workers']} workers, {s['replicas']} replicas, {s['batch_tokens']}-token batches"
    if "cpu_per_step_ratio_after_over_before" in doc:
        foot += f"; CPU per step after / before {doc['cpu_per_step_ratio_after_over_before']:.2f}"
    return "\n".join(lines) + f"\n\n({foot}. {doc['command']})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="more job overrides (after --)")
    a = p.parse_args(argv)
    run = measure(settings(a.steps, a.workers, a.replicas, a.batch_tokens) + a.overrides, a.timeout_s)
    batches = run["steps"] * a.workers
    out = {
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "timeout_s")},
        **run,
        "steps_per_s": run["steps"] / run["wall_s"],
        "cpu_ms_per_step": 1e3 * run["cpu_s"] / run["steps"],
        "cpu_ms_per_batch": 1e3 * run["cpu_s"] / batches,
        "core_share": run["cpu_s"] / run["wall_s"],
    }
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
