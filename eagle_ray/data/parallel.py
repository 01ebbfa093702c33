"""Blocks prepared in Ray tasks: reading, templating, tokenizing and packing run on the cluster's CPUs.

`ChatBatchSource` submits one task per block, a few blocks ahead, and takes the results in block order:
the index, the warnings, the counts line and every `DataError` stay the driver's (see `source.py`). A
task runs `blocks.read_block` and `blocks.pack`, the code the driver itself runs without Ray, so both
serve the same batches.

The encoder (tokenizer + bound chat template, a few MB with Qwen's BPE ranks) goes to the object store
once per source; each worker process deserializes it on its first task and keeps it (`_encoder`).

Before a block is indexed its start is the previous block's end. A chain of `scan` tasks finds those
starts (JSON parsing only, a few % of encoding), so new blocks are encoded in parallel on the first
pass too; indexed blocks (this run's, or `index_path`'s) start where the index says. Data files must be
readable at the same path on every node that runs these tasks (shared storage, or the packaged ShareGPT).

Imported only once Ray is up: `eagle_ray.data` itself runs without Ray.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from eagle_ray.contract import PackedBatch
from eagle_ray.data.blocks import BlockRead, Planner, pack, read_block, scan_block
from eagle_ray.data.encode import SampleEncoder
from eagle_ray.data.jsonstream import Position
from eagle_ray.ray_init import quiet_known_warnings

_CACHED_ENCODERS = 4  # per worker process: sources of a few jobs or tests in turn


@dataclass
class BlockResult:
    read: BlockRead  # without samples: lengths, stats, skip events, where the block ends
    batches: list[PackedBatch] | None  # None: indexing only
    pid: int  # the process that did the work


_encoders: dict[str, SampleEncoder] = {}


def _encoder(holder: list[ray.ObjectRef]) -> SampleEncoder:
    """The encoder behind `holder`'s ref, deserialized once per process (the ref sits in a list so that
    Ray does not resolve it for every task)."""
    key = holder[0].hex()
    if key not in _encoders:
        while len(_encoders) >= _CACHED_ENCODERS:
            _encoders.pop(next(iter(_encoders)))
        _encoders[key] = ray.get(holder[0])
    return _encoders[key]


def encode_block(
    holder: list[ray.ObjectRef],
    paths: Sequence[str],
    start: Position,
    count: int,
    needed: frozenset[int] | None,
    runs: list[list[int]] | None,
    planner: Planner | None,
    epoch: int,
    block: int,
    strict: bool,
    keep: int,
) -> BlockResult:
    """One block, in a task: read and encode (`needed` records; None: all), then pack `runs` (None: the
    block's plan for `epoch`, from the lengths just found); no packing without a `planner`."""
    quiet_known_warnings()  # the zero-copy notices Ray gives for the batches' tensors, as the driver does
    r = read_block(paths, _encoder(holder), start, count, needed, strict=strict, keep=keep)
    batches = None
    if planner is not None:
        if runs is None:
            runs = planner.plan(r.lengths, epoch, block)
        samples = r.samples
        # the data changed since it was indexed, or strict mode met a bad record: the driver raises
        ok = not (strict and r.skips) and all(i < len(samples) and samples[i] is not None for run in runs for i in run)
        batches = [pack([samples[i] for i in run]) for run in runs] if ok else []
    r.samples = None  # the batches carry the tokens
    return BlockResult(r, batches, os.getpid())


class BlockTasks:
    """The driver's handle: the encoder in the object store, the two remote functions."""

    def __init__(self, paths: Sequence[str], encoder: SampleEncoder):
        self.paths = list(paths)
        self.job_id = ray.get_runtime_context().get_job_id()
        self._holder = [ray.put(encoder)]
        self._encode = ray.remote(num_cpus=1)(encode_block)
        # a CPU like the encodes: a 0-CPU task would need a worker process beyond the pool Ray keeps warm
        self._scan = ray.remote(num_cpus=1)(scan_block)

    def encode(
        self,
        start: Position | ray.ObjectRef,
        count: int,
        *,
        needed: frozenset[int] | None = None,
        runs: list[list[int]] | None = None,
        planner: Planner | None = None,
        epoch: int = 0,
        block: int = 0,
        strict: bool = False,
        keep: int = 0,
    ) -> ray.ObjectRef:
        """`start` may be a scan's ref: the task waits for it on the cluster, not the driver."""
        return self._encode.remote(
            self._holder, self.paths, start, count, needed, runs, planner, epoch, block, strict, keep
        )

    def scan(self, start: Position | ray.ObjectRef, count: int) -> ray.ObjectRef:
        return self._scan.remote(self.paths, start, count)

    @staticmethod
    def ready(ref: ray.ObjectRef) -> bool:
        return bool(ray.wait([ref], timeout=0, fetch_local=False)[0])

    @staticmethod
    def get(ref: ray.ObjectRef) -> BlockResult:
        return ray.get(ref)

    def current(self) -> bool:
        """Still the Ray session it was made in (a source can outlive a `ray.shutdown`)."""
        return ray.is_initialized() and ray.get_runtime_context().get_job_id() == self.job_id
