"""The training job's batch source: `source(i)` yields PackedBatches from global batch i on.

Batch i is the same whatever index a run starts from, because every batch is a pure function of
(epoch, block, seed) and the block index (see `index.py`):

- records are cut into blocks of `block_records` (file order); with shuffling, a block is the
  shuffle buffer and its records are permuted by a generator seeded with (seed, epoch, block):
  a bounded, seekable shuffle (records never leave their block; each epoch reorders every block);
- each block is packed on its own, greedily in that order, by `batch_tokens` and/or
  `max_sequences` (`contract.plan_runs`): a sequence is never split, one longer than the budget
  gets a batch of its own, and a block's last batch may be short;
- epochs repeat the data (`epochs=None`: forever); batch numbering runs on across epochs.

Starting at batch i reads (tokenizes) only the block holding it once the blocks before it are
indexed: in this process, or in an earlier one when `index_path` is given.
"""

from __future__ import annotations

import logging
import random
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import torch

from eagle_ray.contract import PackedBatch, plan_runs
from eagle_ray.data.encode import Sample, SampleEncoder
from eagle_ray.data.index import Block, BlockIndex
from eagle_ray.data.jsonstream import read_records
from eagle_ray.data.stats import DataError, DataStats, Reporter

log = logging.getLogger("eagle_ray.data")


class ChatBatchSource:
    """A `train.feed.BatchSource` (callable: global batch index -> iterator of PackedBatch)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        encoder: SampleEncoder,
        *,
        batch_tokens: int | None,
        max_sequences: int | None,
        block_records: int,
        shuffle: bool,
        seed: int,
        epochs: int | None,
        reporter: Reporter,
        index: BlockIndex,
        max_records: int | None = None,
    ):
        if batch_tokens is None and max_sequences is None:
            raise ValueError("give batch_tokens and/or max_sequences")
        for name, v in (("batch_tokens", batch_tokens), ("max_sequences", max_sequences)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if block_records < 1:
            raise ValueError(f"block_records must be >= 1, got {block_records}")
        self.paths = [str(p) for p in paths]
        self.encoder, self.reporter, self.index = encoder, reporter, index
        self.batch_tokens, self.max_sequences = batch_tokens, max_sequences
        self.block_records, self.shuffle, self.seed, self.epochs = block_records, shuffle, seed, epochs
        self.max_records = max_records  # the data ends after this many records
        self._batch_counts: dict[tuple[int, int], int] = {}
        self._cache: tuple[int, list[Sample | None], set[int]] | None = None  # the last block read

    @property
    def stats(self) -> DataStats:
        """Live counts over the records read so far (each once); `complete` after a whole pass."""
        return self.index.stats

    def __call__(self, index: int) -> Iterator[PackedBatch]:
        return self.batches_from(index)

    def batches_from(self, index: int) -> Iterator[PackedBatch]:
        """Batches from global batch `index` on (across epochs)."""
        return self._walk(index, self._num_batches, self._batches)

    def samples_from(self, index: int) -> Iterator[Sample]:
        """Samples in training order from global sample `index` on (across epochs)."""
        return self._walk(index, lambda epoch, b: self._block(b).samples, self._samples)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches in one epoch (indexes the whole data once if not yet done)."""
        b, total = 0, 0
        while self._block(b) is not None:
            total += self._num_batches(epoch, b)
            b += 1
        self._check_nonempty()
        return total

    # ------------------------------------------------------------------------------- internals

    def _walk(self, index: int, count: Callable[[int, int], int], items: Callable) -> Iterator:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return self._walk_gen(index, count, items)

    def _walk_gen(self, index: int, count: Callable[[int, int], int], items: Callable) -> Iterator:
        epoch, b, skip = 0, 0, index
        while self.epochs is None or epoch < self.epochs:
            if self._block(b) is None:  # end of an epoch
                self._check_nonempty()
                epoch, b = epoch + 1, 0
                continue
            n = count(epoch, b)
            if skip >= n:  # seek: whole blocks are skipped by their counts, nothing is read
                skip -= n
            else:
                yield from items(epoch, b, skip)
                skip = 0
            b += 1

    def _batches(self, epoch: int, b: int, skip: int) -> Iterator[PackedBatch]:
        plan = self._plan(epoch, b)[skip:]
        samples = self._read(b, {i for run in plan for i in run})
        for run in plan:
            yield _pack([samples[i] for i in run])

    def _samples(self, epoch: int, b: int, skip: int) -> Iterator[Sample]:
        order = self._order(epoch, b)[skip:]
        samples = self._read(b, set(order))
        return (samples[i] for i in order)

    def _order(self, epoch: int, b: int) -> list[int]:
        """The block's samples (record positions in the block) in training order."""
        lengths = self._block(b).lengths
        order = list(range(len(lengths)))
        if self.shuffle:
            random.Random(f"eagle_ray.data/{self.seed}/{epoch}/{b}").shuffle(order)  # str seed: stable everywhere
        return [i for i in order if lengths[i]]

    def _plan(self, epoch: int, b: int) -> list[list[int]]:
        order, lengths = self._order(epoch, b), self._block(b).lengths
        budget = self.batch_tokens or sys.maxsize
        runs = plan_runs([lengths[i] for i in order], budget, self.max_sequences)
        return [order[s:e] for s, e in runs]

    def _num_batches(self, epoch: int, b: int) -> int:
        key = (epoch if self.shuffle else 0, b)
        if key not in self._batch_counts:
            self._batch_counts[key] = len(self._plan(epoch, b))
        return self._batch_counts[key]

    def _block(self, b: int) -> Block | None:
        """Block b, reading (and indexing) the blocks up to it first; None past the end."""
        while len(self.index.blocks) <= b and not self.index.complete:
            self._read(len(self.index.blocks))
        return self.index.blocks[b] if b < len(self.index.blocks) else None

    def _read(self, b: int, needed: set[int] | None = None) -> list[Sample | None]:
        """Block b's samples in file order (None: skipped, or not `needed`). Indexes a new block.

        An indexed block encodes only the `needed` records (default: all; a seek into the block's
        middle tokenizes just the rest of it) and reports nothing: its records were counted and
        warned about when it was indexed.
        """
        new = b == len(self.index.blocks)
        known = None if new else self.index.blocks[b].lengths
        if not new and needed is None:
            needed = {k for k, n in enumerate(known) if n}
        if self._cache is not None and self._cache[0] == b and needed <= self._cache[2]:
            return self._cache[1]
        start = self.index.next_start() if new else self.index.blocks[b].start
        stats, report = DataStats(), self.reporter if new else Reporter(max_warnings=0)
        count = self.block_records if self.max_records is None else self.max_records - b * self.block_records
        count = min(self.block_records, count) if new else len(known)
        samples, end = [], start
        for k, rec in enumerate(islice(read_records(self.paths, start), max(count, 0))):
            samples.append(self.encoder(rec, stats, report) if new or k in needed else None)
            end = rec.after
        lengths = tuple(len(s.input_ids) if s else 0 for s in samples)
        if new:
            needed = {k for k, n in enumerate(lengths) if n}
            if samples:
                self.index.add(Block(start, end, lengths, stats))
            if len(samples) < self.block_records:
                self.index.finish()
                log.info("data, one full pass: %s", self.index.stats.summary())
        elif len(lengths) != len(known) or any(lengths[k] != known[k] for k in needed):
            where = f"{self.paths[start.file]}:{start.line}"
            raise DataError("data_changed", where, f"block {b} reads differently than when it was indexed")
        self._cache = (b, samples, needed)
        return samples

    def _check_nonempty(self) -> None:
        if self.index.complete and self.index.stats.samples == 0:
            raise DataError("no_samples", ", ".join(self.paths), f"no usable sample ({self.index.stats.summary()})")


def _pack(samples: list[Sample]) -> PackedBatch:
    cu = torch.zeros(len(samples) + 1, dtype=torch.long)
    cu[1:] = torch.tensor([len(s.input_ids) for s in samples]).cumsum(0)
    ids, mask = array("i"), array("b")
    for s in samples:
        ids.extend(s.input_ids)
        mask.extend(s.loss_mask)
    as_long = lambda a, dtype: torch.frombuffer(a, dtype=dtype).long()  # noqa: E731  (copies: owns its memory)
    return PackedBatch(as_long(ids, torch.int32), as_long(mask, torch.int8), cu)
