"""One block's work, as pure functions: read and encode its records, order and plan them, pack batches.

The driver (`source.ChatBatchSource`) and the Ray tasks (`parallel.py`) run exactly this code, so a batch
is the same wherever it was built. Nothing here logs: a skipped record is counted and kept as an event
(reason, where, detail) for the driver to warn about, or raise on, in block order (`Reporter.replay`).
"""

from __future__ import annotations

import bisect
import random
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from eagle_ray.contract import PackedBatch, plan_runs
from eagle_ray.data.encode import Sample, SampleEncoder
from eagle_ray.data.jsonstream import Position, read_records
from eagle_ray.data.stats import SKIP_REASONS, DataStats, Reporter

Event = tuple[str, str, str]  # a skipped record: (reason, file:line, detail)


@dataclass(frozen=True)
class Planner:
    """What a block's order and batches depend on besides its sample lengths."""

    shuffle: bool
    seed: int
    batch_tokens: int | None
    max_sequences: int | None
    packing: str = "greedy"  # one of PACKINGS

    def order(self, lengths: Sequence[int], epoch: int, block: int) -> list[int]:
        """The block's samples (record positions in the block) in training order."""
        order = list(range(len(lengths)))
        if self.shuffle:  # str seed: stable across processes and Python versions
            random.Random(f"eagle_ray.data/{self.seed}/{epoch}/{block}").shuffle(order)
        return [i for i in order if lengths[i]]

    def plan(self, lengths: Sequence[int], epoch: int, block: int) -> list[list[int]]:
        """The block's batches, each a list of record positions in the block."""
        order = self.order(lengths, epoch, block)
        sizes, budget = [lengths[i] for i in order], self.batch_tokens or sys.maxsize
        if self.packing == "best_fit":
            return [[order[j] for j in group] for group in best_fit(sizes, budget, self.max_sequences)]
        return [order[s:e] for s, e in plan_runs(sizes, budget, self.max_sequences)]


PACKINGS = ("greedy", "best_fit")


def best_fit(sizes: Sequence[int], budget: int, max_sequences: int | None = None) -> list[list[int]]:
    """Best-fit decreasing: each sequence, longest first, joins the fullest batch it still fits (at most
    `max_sequences` each; one longer than `budget` gets a batch of its own). Batches are then ordered by their
    first member, and members keep their order, so a shuffled order still decides what trains first."""
    groups: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, group), sorted: the tightest fit is a bisection away
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = bisect.bisect_left(room, (sizes[i], -1))
        if k < len(room):
            left, g = room.pop(k)
        else:
            left, g = budget, len(groups)
            groups.append([])
        groups[g].append(i)
        if max_sequences is None or len(groups[g]) < max_sequences:
            bisect.insort(room, (max(left - sizes[i], 0), g))
    return sorted(sorted(g) for g in groups)


@dataclass
class BlockRead:
    """What reading a block found. `samples` is None in a task's result (the batches travel instead)."""

    start: Position
    end: Position
    lengths: tuple[int, ...]  # per record read: tokens of its sample; 0 when skipped or not encoded
    stats: DataStats
    skips: int = 0  # skipped records, every reason
    events: list[Event] = field(default_factory=list)  # the first skips, in file order
    samples: list[Sample | None] | None = None


class _Collect(Reporter):
    """Counts skips and keeps the first `keep` as events, never logging; strict stops at the first."""

    def __init__(self, strict: bool, keep: int):
        super().__init__(strict=strict, max_warnings=0)
        self.keep, self.skips, self.events = keep, 0, []

    def skip(self, stats: DataStats, reason: str, where: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        stats.skipped[reason] += 1
        self.skips += 1
        if len(self.events) < self.keep:
            self.events.append((reason, where, detail))
        if self.strict:
            raise _Stop


class _Stop(Exception):
    pass


def read_block(
    paths: Sequence[str | Path],
    encoder: SampleEncoder,
    start: Position,
    count: int,
    needed: set[int] | frozenset[int] | None = None,
    *,
    strict: bool = False,
    keep: int = 0,
) -> BlockRead:
    """Up to `count` records from `start`, encoding those `needed` (None: all).

    `keep`: skip events to return (the driver warns about the first few of a pass). `strict` stops at the
    first skipped record: the driver raises on that event, so reading further would be wasted.
    """
    report, stats = _Collect(strict, keep), DataStats()
    samples: list[Sample | None] = []
    end = start
    try:
        for k, rec in enumerate(islice(read_records(paths, start), max(count, 0))):
            samples.append(encoder(rec, stats, report) if needed is None or k in needed else None)
            end = rec.after
    except _Stop:
        pass
    lengths = tuple(len(s.input_ids) if s else 0 for s in samples)
    return BlockRead(start, end, lengths, stats, report.skips, report.events, samples)


def scan_block(paths: Sequence[str | Path], start: Position, count: int) -> Position:
    """Where the block of `count` records from `start` ends (the next block's start), encoding nothing."""
    end = start
    for rec in islice(read_records(paths, start), max(count, 0)):
        end = rec.after
    return end


def pack(samples: Sequence[Sample]) -> PackedBatch:
    cu = torch.zeros(len(samples) + 1, dtype=torch.long)
    cu[1:] = torch.tensor([len(s.input_ids) for s in samples]).cumsum(0)
    ids, mask = array("i"), array("b")
    for s in samples:
        ids.extend(s.input_ids)
        mask.extend(s.loss_mask)
    as_long = lambda a, dtype: torch.frombuffer(a, dtype=dtype).long()  # noqa: E731  (copies: owns its memory)
    return PackedBatch(as_long(ids, torch.int32), as_long(mask, torch.int8), cu)
