"""How full the job's ShareGPT batches are, by packing: tokens per batch / `batch_tokens`, greedy against best-fit.

The job's own batch source (`make_batch_source`: ShareGPT V3, Qwen's BPE, the job's shuffle buffer and seed), the
first `--batches` batches of each (max_length, batch_tokens). A fuller batch means fewer steps per epoch for the same
samples, and steps of one size across DDP ranks. Writes `benchmarks/results/packing_fill.json`.

    .venv/bin/python benchmarks/packing_fill.py          # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "packing_fill.json"
SETTINGS = [(2048, 8192), (4096, 16384), (8192, 32768)]


def fill(packing: str, max_length: int, batch_tokens: int, batches: int) -> dict[str, float]:
    from eagle_ray.job.config import DataConfig
    from eagle_ray.job.inputs import job_batch_source

    src = job_batch_source(
        DataConfig(),
        "qwen",
        max_length=max_length,
        batch_tokens=batch_tokens,
        packing=packing,
        workers=0,
        max_warnings=0,
    )
    it = src(0)
    fills = sorted(next(it).num_tokens / batch_tokens for _ in range(batches))
    return {"mean": statistics.mean(fills), "p10": fills[len(fills) // 10], "min": fills[0]}


def render(doc: dict[str, Any]) -> str:
    """The README's table of `doc` (this benchmark's JSON)."""
    lines = [
        "| max_length | batch_tokens | greedy: mean fill (p10) | best_fit: mean fill (p10) |",
        "|---|---|---|---|",
    ]
    for r in doc["rows"]:
        g, b = r["greedy"], r["best_fit"]
        lines.append(
            f"| {r['max_length']} | {r['batch_tokens']} | {g['mean']:.3f} ({g['p10']:.3f}) | "
            f"{b['mean']:.3f} ({b['p10']:.3f}) |"
        )
    return "\n".join(lines) + f"\n\n(first {doc['batches']} batches each; `{doc['command']}`)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    rows = []
    for max_length, batch_tokens in SETTINGS:
        row: dict[str, Any] = {"max_length": max_length, "batch_tokens": batch_tokens}
        for packing in ("greedy", "best_fit"):
            row[packing] = fill(packing, max_length, batch_tokens, a.batches)
        print(row, flush=True)
        rows.append(row)
    doc = {"command": "benchmarks/packing_fill.py", "batches": a.batches, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))
    return doc


if __name__ == "__main__":
    main()
