"""The training job's batch source: `source(i)` yields PackedBatches from global batch i on.

Batch i is the same whatever index a run starts from, because every batch is a pure function of
(epoch, block, seed) and the block index (see `index.py`):

- records are cut into blocks of `block_records` (file order); with shuffling, a block is the
  shuffle buffer and its records are permuted by a generator seeded with (seed, epoch, block):
  a bounded, seekable shuffle (records never leave their block; each epoch reorders every block);
- each block is packed on its own by `batch_tokens` and/or `max_sequences`: greedily in that order
  (`contract.plan_runs`; a block's last batch may be short), or `packing="best_fit"` (longest first into
  the fullest batch it fits, `blocks.best_fit`: fuller batches, the order still shuffled); a sequence is
  never split, and one longer than the budget gets a batch of its own;
- epochs repeat the data (`epochs=None`: forever); batch numbering runs on across epochs.

Starting at batch i reads (tokenizes) only the block holding it once the blocks before it are
indexed: in this process, or in an earlier one when `index_path` is given.

Where the work runs: with Ray up (or `workers` > 0), blocks are read, encoded and packed in Ray tasks,
`workers` blocks ahead of the one being served (`parallel.py`); this process only takes their results
in block order: it keeps the index, logs the warnings and the counts line, and raises the `DataError`s.
Without Ray (or `workers=0`) it does the same work itself. Both run `blocks.py`: the same batches.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagle_ray.contract import PackedBatch
from eagle_ray.data.blocks import PACKINGS, BlockRead, Planner, pack, read_block
from eagle_ray.data.encode import Sample, SampleEncoder
from eagle_ray.data.index import Block, BlockIndex
from eagle_ray.data.stats import DataError, DataStats, Reporter

log = logging.getLogger("eagle_ray.data")

DEFAULT_WORKERS = 4  # blocks prepared at once in Ray tasks when `workers` is None and Ray is up


@dataclass
class _Job:
    """One block submitted to a Ray task (or nothing to submit: `ref` None), waiting to be taken in order."""

    key: tuple[int, int, int]  # (epoch, or 0 when unshuffled: the same batches every epoch; block; skip)
    block: int
    ref: Any  # ray.ObjectRef of a parallel.BlockResult; None: no task (no batches, or past max_records)
    new: bool  # the block was not indexed when submitted: its result indexes it
    skip: int = 0  # batches of a new block's result to drop (a stream starting inside it)
    needed: frozenset[int] | None = None  # an indexed block's records the task encoded
    last: bool = False  # a new block known to be the data's last (max_records): none is submitted after it


class ChatBatchSource:
    """Training batches by global batch index: `batches_from(i)` (callable too), `rank_batches(rank, world)`."""

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
        workers: int | None = None,
        packing: str = "greedy",
    ):
        if batch_tokens is None and max_sequences is None:
            raise ValueError("give batch_tokens and/or max_sequences")
        for name, v in (("batch_tokens", batch_tokens), ("max_sequences", max_sequences)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if block_records < 1:
            raise ValueError(f"block_records must be >= 1, got {block_records}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.paths = [str(p) for p in paths]
        self.encoder, self.reporter, self.index = encoder, reporter, index
        self.batch_tokens, self.max_sequences = batch_tokens, max_sequences
        self.block_records, self.shuffle, self.seed, self.epochs = block_records, shuffle, seed, epochs
        self.planner = Planner(shuffle, seed, batch_tokens, max_sequences, packing)
        self.max_records = max_records  # the data ends after this many records
        self.workers = workers  # Ray tasks in flight; None: DEFAULT_WORKERS when Ray is up, else 0
        self.task_pids: set[int] = set()  # the processes whose Ray tasks prepared blocks (diagnostics)
        self._batch_counts: dict[tuple[int, int], int] = {}
        self._cache: tuple[int, list[Sample | None], set[int]] | None = None  # the last block read here
        self._tasks: Any = None  # parallel.BlockTasks, made on first use
        self._scans: dict[int, Any] = {}  # block -> ref of its start, for blocks after the index
        self._ahead: deque[_Job] = deque()  # indexing-only jobs for the blocks after the index (seeks)
        self._spare: dict[tuple[int, int, int], _Job] = {}  # submitted, left by a closed stream: reused

    @property
    def stats(self) -> DataStats:
        """Live counts over the records read so far (each once); `complete` after a whole pass."""
        return self.index.stats

    def __call__(self, index: int) -> Iterator[PackedBatch]:
        return self.batches_from(index)

    def batches_from(self, index: int) -> Iterator[PackedBatch]:
        """Batches from global batch `index` on (across epochs)."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return self._batches_gen(index)

    def rank_batches(self, rank: int, world: int, step: int = 0) -> Iterator[PackedBatch]:
        """Rank `rank`'s batches in a run of `world` ranks, from `step` on: global batches `step * world + rank`,
        then every `world`-th, the same batches `batches_from` numbers. Read in this process (a rank's own data
        plane, `train/reader.py`): once a block is indexed only this rank's records in it are tokenized, so the
        ranks share the data work instead of each doing all of it. Index every block first (a pass such as
        `batches_per_epoch()` in one process, or a saved index) and give the ranks no `index_path` to write:
        a block read here before it is indexed is tokenized whole, and an index file has one writer."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._rank_gen(rank, world, step * world + rank)

    def for_ranks(self) -> ChatBatchSource:
        """A copy to send to the ranks (each calls `rank_batches` in its own process): the whole data indexed
        first (here, in Ray tasks when Ray is up), the index kept in memory only (one writer per index file),
        no Ray tasks of this process's, data read in the rank's process."""
        self.batches_per_epoch()  # indexes every block: no rank tokenizes a whole block to find its batches
        rank = copy.copy(self)
        rank.index = BlockIndex(self.index.fingerprint)
        rank.index.blocks, rank.index.complete = list(self.index.blocks), self.index.complete
        rank.index.stats = self.index.stats
        rank.workers, rank._tasks, rank._cache, rank.task_pids = 0, None, None, set()
        rank._batch_counts, rank._scans, rank._ahead, rank._spare = dict(self._batch_counts), {}, deque(), {}
        return rank

    def _rank_gen(self, rank: int, world: int, first: int) -> Iterator[PackedBatch]:
        base = 0  # the global index of block b's first batch
        for epoch, b in self._blocks():
            n = self._num_batches(epoch, b)
            lo = max(first, base)
            mine = range(lo + (rank - lo) % world - base, n, world)  # this rank's batches of the block
            if mine:
                plan = self._plan(epoch, b)
                runs = [plan[j] for j in mine]
                samples = self._read(b, {i for run in runs for i in run})
                for run in runs:
                    yield pack([samples[i] for i in run])
            base += n

    def epoch_origins(self, index: int) -> tuple[int, list[tuple[int, int]]]:
        """Where global batch `index`'s sequences were in the first epoch: `(epoch, [(batch, position), ...])`,
        the epoch it belongs to (0 = the first) and, per sequence in order, the global index of the first
        epoch's batch that holds the same record and its position there. Records never leave their block, so an
        epoch's reshuffled, repacked batch is made of pieces of the first epoch's batches of the same block (what
        the epoch cache, `train/epoch_cache.py`, reads). Needs the blocks indexed (`for_ranks()` did)."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        skip, base0 = index, 0  # base0: the global index of block b's first batch in epoch 0
        for epoch, b in self._blocks():
            base0 = 0 if b == 0 else base0
            n = self._num_batches(epoch, b)
            if skip < n:
                where = {r: (base0 + j, k) for j, run in enumerate(self._plan(0, b)) for k, r in enumerate(run)}
                return epoch, [where[r] for r in self._plan(epoch, b)[skip]]
            skip -= n
            base0 += self._num_batches(0, b)
        raise IndexError(f"batch {index} is past the data's {self.epochs} epoch(s)")

    def samples_from(self, index: int) -> Iterator[Sample]:
        """Samples in training order from global sample `index` on (across epochs); read in this process."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return self._walk_gen(index, lambda epoch, b: self._block(b).samples, self._samples)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches in one epoch (indexes the whole data once if not yet done; in Ray tasks when Ray is up)."""
        k = self._in_flight()
        b, total = 0, 0
        while (self._index_through(b, k) if k else self._block(b)) is not None:
            total += self._num_batches(epoch, b)
            b += 1
        self._check_nonempty()
        return total

    # ------------------------------------------------------------------------------- internals

    def _batches_gen(self, index: int) -> Iterator[PackedBatch]:
        k = self._in_flight()  # decided at the first batch: a source made before ray.init uses Ray once it is up
        if k:
            yield from self._walk_tasks(index, k)
        else:
            yield from self._walk_gen(index, self._num_batches, self._batches)

    def _blocks(self) -> Iterator[tuple[int, int]]:
        """(epoch, block) in training order, across epochs; each block is read (indexed) here as it comes."""
        epoch, b = 0, 0
        while self.epochs is None or epoch < self.epochs:
            if self._block(b) is None:  # end of an epoch
                self._check_nonempty()
                epoch, b = epoch + 1, 0
                continue
            yield epoch, b
            b += 1

    def _walk_gen(self, index: int, count: Callable[[int, int], int], items: Callable) -> Iterator:
        skip = index
        for epoch, b in self._blocks():
            n = count(epoch, b)
            if skip >= n:  # seek: whole blocks are skipped by their counts, nothing is read
                skip -= n
            else:
                yield from items(epoch, b, skip)
                skip = 0

    def _batches(self, epoch: int, b: int, skip: int) -> Iterator[PackedBatch]:
        plan = self._plan(epoch, b)[skip:]
        samples = self._read(b, {i for run in plan for i in run})
        for run in plan:
            yield pack([samples[i] for i in run])

    def _samples(self, epoch: int, b: int, skip: int) -> Iterator[Sample]:
        order = self._order(epoch, b)[skip:]
        samples = self._read(b, set(order))
        return (samples[i] for i in order)

    def _order(self, epoch: int, b: int) -> list[int]:
        return self.planner.order(self._block(b).lengths, epoch, b)

    def _plan(self, epoch: int, b: int) -> list[list[int]]:
        return self.planner.plan(self._block(b).lengths, epoch, b)

    def _num_batches(self, epoch: int, b: int) -> int:
        key = (epoch if self.shuffle else 0, b)
        if key not in self._batch_counts:
            self._batch_counts[key] = len(self._plan(epoch, b))
        return self._batch_counts[key]

    def _block(self, b: int) -> Block | None:
        """Block b, reading (and indexing) the blocks up to it first, here; None past the end."""
        while len(self.index.blocks) <= b and not self.index.complete:
            self._read(len(self.index.blocks))
        return self.index.blocks[b] if b < len(self.index.blocks) else None

    def _new_count(self, b: int) -> int:
        """Records to read for block b, not yet indexed (<= 0: max_records ended the data before it)."""
        left = self.block_records if self.max_records is None else self.max_records - b * self.block_records
        return min(self.block_records, left)

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
        if new:
            start = self.index.next_start()
            r = read_block(self.paths, self.encoder, start, self._new_count(b), None, **self._report_args())
            self._index_new(r)
            needed = {k for k, n in enumerate(r.lengths) if n}
        else:
            r = read_block(self.paths, self.encoder, self.index.blocks[b].start, len(known), needed)
            self._check_same(b, r.lengths, needed)
        self._cache = (b, r.samples, needed)
        return r.samples

    def _report_args(self) -> dict[str, Any]:
        """read_block's arguments for a new block: the skip events the reporter may show (strict: the first)."""
        return {"strict": self.reporter.strict, "keep": max(1, self.reporter.max_warnings)}

    def _index_new(self, r: BlockRead) -> None:
        """Record the block after the index: warn (strict: raise), index it, end the pass if it is short."""
        self.reporter.replay(r.skips, r.events)
        if r.lengths:
            self.index.add(Block(r.start, r.end, r.lengths, r.stats))
        self._scans = {j: ref for j, ref in self._scans.items() if j > len(self.index.blocks)}
        if len(r.lengths) < self.block_records:
            self._finish()

    def _finish(self) -> None:
        self.index.finish()
        self._scans.clear()
        log.info("data, one full pass: %s", self.index.stats.summary())

    def _check_same(self, b: int, lengths: tuple[int, ...], needed: set[int] | frozenset[int]) -> None:
        block = self.index.blocks[b]
        if len(lengths) != len(block.lengths) or any(lengths[k] != block.lengths[k] for k in needed):
            where = f"{self.paths[block.start.file]}:{block.start.line}"
            raise DataError("data_changed", where, f"block {b} reads differently than when it was indexed")

    def _check_nonempty(self) -> None:
        if self.index.complete and self.index.stats.samples == 0:
            raise DataError("no_samples", ", ".join(self.paths), f"no usable sample ({self.index.stats.summary()})")

    # ------------------------------------------------------------------------------- Ray tasks

    def _in_flight(self) -> int:
        """Blocks to prepare at once in Ray tasks; 0: in this process."""
        if self.workers == 0:
            return 0
        ray = sys.modules.get("ray")  # never imported: no Ray in this process
        if ray is None or not ray.is_initialized():
            if self.workers is None:
                return 0
            raise RuntimeError(f"workers={self.workers} prepares data in Ray tasks: ray.init() first, or workers=0")
        if self._tasks is None or not self._tasks.current():
            from eagle_ray.data.parallel import BlockTasks

            self._scans, self._ahead, self._spare = {}, deque(), {}  # refs of another Ray session
            try:
                self._tasks = BlockTasks(self.paths, self.encoder)
            except Exception as e:  # e.g. a tokenizer that does not pickle
                if self.workers is not None:
                    raise
                log.warning("data: preparing batches in this process: the encoder cannot go to Ray tasks (%s)", e)
                self.workers = 0
                return 0
        return self.workers or DEFAULT_WORKERS

    def _walk_tasks(self, index: int, k: int) -> Iterator[PackedBatch]:
        epoch, b, skip = 0, 0, index
        while skip and (self.epochs is None or epoch < self.epochs):  # seek, by the indexed counts
            if self._index_through(b, k) is None:
                self._check_nonempty()
                epoch, b = epoch + 1, 0
                continue
            n = self._num_batches(epoch, b)
            if skip < n:
                break
            skip -= n
            b += 1
        self._ahead.clear()  # indexing-only work past the target: the stream prepares those blocks with batches
        yield from self._stream(epoch, b, skip, k)

    def _stream(self, epoch: int, b: int, skip: int, k: int) -> Iterator[PackedBatch]:
        """Batches from batch `skip` of block b of `epoch` on, prepared in Ray tasks ahead of the one served.

        Up to `k` blocks ahead: two at first, one more each time the next block is not ready when its turn
        comes (supply behind demand). Prefetching is speculative, so a stream that stays ahead of a slow
        consumer wastes little when it is closed early.
        """
        pending: deque[_Job] = deque()
        window = min(2, k)
        current: _Job | None = None
        last_new = False  # the data's last block has been submitted: no new block after it

        def top_up() -> None:
            nonlocal epoch, b, skip, last_new
            while len(pending) < window and (self.epochs is None or epoch < self.epochs):
                beyond = b >= len(self.index.blocks)
                if beyond and self.index.complete:  # end of an epoch
                    self._check_nonempty()
                    epoch, b = epoch + 1, 0
                    continue
                if beyond and last_new:  # the epoch's end is known once the last block is taken
                    return
                job = self._job(epoch, b, skip)
                pending.append(job)
                last_new = last_new or job.last
                b, skip = b + 1, 0

        try:
            while True:
                top_up()
                if not pending:
                    return
                job = pending.popleft()
                if current is not None and window < k and job.ref is not None and not self._tasks.ready(job.ref):
                    window += 1
                    top_up()  # the next block starts while this one is awaited
                current = job
                batches = self._take(job)
                yield from batches[job.skip :] if job.new else batches
        finally:  # closed early (a rewind, a count of the first batches): what was submitted stays usable
            for job in [current, *pending] if current is not None else pending:
                self._spare[job.key] = job
            while len(self._spare) > k + 1:
                self._spare.pop(next(iter(self._spare)))

    def _job(self, epoch: int, b: int, skip: int) -> _Job:
        key = (epoch if self.shuffle else 0, b, skip)
        if key in self._spare:
            return self._spare.pop(key)
        if b < len(self.index.blocks):
            block = self.index.blocks[b]
            runs = self._plan(epoch, b)[skip:]
            needed = frozenset(i for run in runs for i in run)
            if not runs:
                return _Job(key, b, None, new=False, needed=needed)
            ref = self._tasks.encode(block.start, len(block.lengths), needed=needed, runs=runs, planner=self.planner)
            return _Job(key, b, ref, new=False, needed=needed)
        return self._new_job(key, epoch, b, skip, pack=True)

    def _new_job(self, key: tuple[int, int, int], epoch: int, b: int, skip: int, pack: bool) -> _Job:
        """Block b, after the index: it starts where the index ends, or where the scan of block b-1 says."""
        count = self._new_count(b)
        if count <= 0:
            return _Job(key, b, None, new=True, last=True)
        start = self.index.next_start() if b == len(self.index.blocks) else self._scans[b]
        if count == self.block_records and b + 1 not in self._scans:
            # submitted before the encode: the chain of starts keeps ahead of the encodes for a CPU
            self._scans[b + 1] = self._tasks.scan(start, count)
        planner = self.planner if pack else None
        ref = self._tasks.encode(start, count, planner=planner, epoch=epoch, block=b, **self._report_args())
        return _Job(key, b, ref, new=True, skip=skip, last=count < self.block_records)

    def _take(self, job: _Job) -> list[PackedBatch]:
        """A job's result, taken in block order: index a new block (warnings, counts line), check an old one."""
        frontier = job.block == len(self.index.blocks) and not self.index.complete
        if job.ref is None:
            if job.new and frontier:  # max_records ends the data here
                self._finish()
            return []
        res = self._tasks.get(job.ref)
        self.task_pids.add(res.pid)
        if job.new and frontier:
            self._index_new(res.read)
        elif job.block < len(self.index.blocks):  # indexed, maybe since it was submitted as new
            known = self.index.blocks[job.block].lengths
            needed = job.needed if job.needed is not None else {i for i, n in enumerate(known) if n}
            self._check_same(job.block, res.read.lengths, needed)
        else:  # past the end of the data: speculated before the end was known
            return []
        return res.batches or []

    def _index_through(self, b: int, k: int) -> Block | None:
        """`_block` in Ray tasks: index up to block b, `k` blocks in flight; what is left in flight stays
        for the next call (a seek or a count walks the blocks one by one)."""
        while len(self.index.blocks) <= b and not self.index.complete:
            nb = len(self.index.blocks)
            while self._ahead and self._ahead[0].block < nb:  # indexed meanwhile, by a stream
                self._ahead.popleft()
            if self._ahead and self._ahead[0].block != nb:
                self._ahead.clear()
            while len(self._ahead) < k and not (self._ahead and self._ahead[-1].last):
                nxt = nb + len(self._ahead)
                self._ahead.append(self._new_job((0, nxt, -1), 0, nxt, 0, pack=False))
            self._take(self._ahead.popleft())
        if self.index.complete:
            self._ahead.clear()
        return self.index.blocks[b] if b < len(self.index.blocks) else None
