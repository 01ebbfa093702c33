"""The sample log: which samples every draft-training step consumed, and the audit that proves a run
consumed each sample exactly once.

Each worker appends to `samples_rank{r}.jsonl` in the run dir: a `start` row when it (re)starts from a
step, then a `step` row after each optimizer step, with the global batch index and one fingerprint per
sequence of the supervision it trained on (a hash of the token ids and loss mask that came back from the
target), or, for a poison batch the pool gave up on, no fingerprints and the cause (`skipped`). A restart
from a checkpoint at step s rolls back that rank's rows for steps >= s: those updates died with the worker
and are trained again. What survives is the run's committed trajectory, which must hold every step once,
in data order, and nothing else.

The run dir is under `storage_path`, which Ray Train needs on shared storage for multi-node runs, so
every rank's file is readable from the driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eagle_ray.contract import PackedBatch


def fingerprints(input_ids: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> list[str]:
    """One short hash per packed sequence, of its token ids and loss mask."""
    ids, mask = input_ids.to(torch.int64).numpy(), loss_mask.to(torch.bool).numpy()
    cu = cu_seqlens.tolist()
    return [
        hashlib.blake2b(ids[a:b].tobytes() + mask[a:b].tobytes(), digest_size=8).hexdigest()
        for a, b in zip(cu[:-1], cu[1:], strict=True)
    ]


def batch_fingerprints(batch: PackedBatch) -> list[str]:
    return fingerprints(batch.input_ids, batch.loss_mask, batch.cu_seqlens)


class SampleLogWriter:
    """A worker's side: one append-only file per rank (a killed worker loses at most its last row)."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / f"samples_rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def start(self, step: int, incarnation: str) -> None:
        self._append({"event": "start", "step": step, "incarnation": incarnation})

    def step(self, step: int, batch: int, prints: list[str]) -> None:
        self._append({"event": "step", "step": step, "batch": batch, "samples": prints})

    def skip(self, step: int, batch: int, cause: str) -> None:
        self._append({"event": "step", "step": step, "batch": batch, "samples": [], "skipped": cause})


@dataclass
class Audit:
    """The committed trajectory of a run, and everything wrong with it."""

    world: int
    steps: int  # steps every rank committed
    samples: dict[tuple[int, int], str] = field(default_factory=dict)  # (global batch, sequence) -> fingerprint
    problems: list[str] = field(default_factory=list)  # duplicates, gaps, out-of-order data (must be empty)
    duplicates: int = 0  # samples committed more than once
    restarts: int = 0  # (re)starts after the first (a resumed run counts too)
    rolled_back: int = 0  # step rows discarded by restarts (trained again after the restart)
    skipped: dict[int, str] = field(default_factory=dict)  # global batch -> why it was skipped (a poison batch)

    @property
    def ok(self) -> bool:
        return not self.problems

    def compare(self, expected: dict[tuple[int, int], str]) -> list[str]:
        """What differs from `expected` (a fault-free run's samples, or the data's own fingerprints); the samples of
        skipped batches are accounted for (in `skipped`), not missing."""
        missing = sorted(k for k in set(expected) - set(self.samples) if k[0] not in self.skipped)
        extra = sorted(set(self.samples) - set(expected))
        changed = sorted(k for k in set(expected) & set(self.samples) if expected[k] != self.samples[k])
        found = (("missing", missing), ("unexpected", extra), ("different content", changed))
        return [f"{len(keys)} samples {name} (batch, sequence): {keys[:5]}" for name, keys in found if keys]


def audit_run(run_dir: str | Path, world: int) -> Audit:
    """Replay every rank's sample log with the restarts' roll-backs; check each step ran once, in data order."""
    audit = Audit(world, steps=0)
    committed_steps = []
    for rank in range(world):
        path = Path(run_dir) / f"samples_rank{rank}.jsonl"
        if not path.exists():
            audit.problems.append(f"rank {rank}: no sample log at {path}")
            committed_steps.append(0)
            continue
        committed: dict[int, dict[str, Any]] = {}
        starts = 0
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row["event"] == "start":
                starts += 1
                rolled = [s for s in committed if s >= row["step"]]
                audit.rolled_back += len(rolled)
                for s in rolled:
                    del committed[s]
                if len(committed) != row["step"]:
                    audit.problems.append(f"rank {rank} line {n}: restarts at step {row['step']} after a gap")
            elif row["step"] in committed:
                audit.duplicates += len(row["samples"])
                audit.problems.append(f"rank {rank} line {n}: step {row['step']} trained twice without a restart")
            else:
                committed[row["step"]] = row
        audit.restarts = max(audit.restarts, starts - 1)
        for s, row in committed.items():
            if row["batch"] != s * world + rank:
                audit.problems.append(f"rank {rank}: step {s} trained batch {row['batch']}, not {s * world + rank}")
            for i, fp in enumerate(row["samples"]):
                if (row["batch"], i) in audit.samples:
                    audit.duplicates += 1
                    audit.problems.append(f"rank {rank}: sample {(row['batch'], i)} committed twice")
                audit.samples[(row["batch"], i)] = fp
            if "skipped" in row:
                audit.skipped[row["batch"]] = row["skipped"]
        if sorted(committed) != list(range(len(committed))):
            audit.problems.append(f"rank {rank}: committed steps are not 0..{len(committed) - 1}")
        committed_steps.append(len(committed))
    audit.steps = min(committed_steps)
    if len(set(committed_steps)) != 1:
        audit.problems.append(f"ranks committed different step counts: {committed_steps}")
    return audit


def expected_samples(batches: Iterable[PackedBatch]) -> dict[tuple[int, int], str]:
    """The samples a run over `batches` (global batch index order) must consume."""
    return {(b, i): fp for b, batch in enumerate(batches) for i, fp in enumerate(batch_fingerprints(batch))}


def check_skip_budget(run_dir: str | Path, world: int, skipped: int, limit: int) -> None:
    """Fail a run that has skipped more poison batches than `training.max_skipped_batches`, naming each skipped
    batch and why the pool gave up on it (from the sample logs: every rank raises the same error)."""
    if skipped <= limit:
        return
    skips = audit_run(run_dir, world).skipped
    raise RuntimeError(
        f"{skipped} poison batches skipped, more than max_skipped_batches={limit}: "
        + "; ".join(f"batch {b}: {cause.splitlines()[0]}" for b, cause in sorted(skips.items()))
    )
