"""The epoch cache: each rank's first-epoch batches go through the pool as fast as it serves them, each written to
a file as it comes back (write-ahead); training reads every epoch's batches from those files, and epochs 2..E never
run the target again.

Where it lives: on shared storage, by default `<storage_path>/<name>/epoch_cache`, the run's own directory, which
every node of a Ray Train run must reach anyway. Not per-node local disk: every epoch reshuffles and repacks the
records within their blocks (`data/source.py`), so a rank's epoch-2 batch is made of sequences that any rank's
epoch-1 batches held, and a worker group restarted on other nodes must find them all. Not the object store's
spilling: an object dies with the process that owns it, so a restarted worker group, or a resumed run, would find
nothing; and the object store's memory is the pool's working space.

The format is the dump's (`eagle_ray/offline.py`, written by its own `write_shard`): one safetensors file per
first-epoch batch, named by the batch's global index, its header holding the batch's content hash; the driver
writes the target's files and the manifest (`init_epoch_cache`, `finish_epoch_cache`), so the cache is also a
dump that `OfflineSupervision` (and `offline.mode=from_dump`) reads.

Keyed per first-epoch batch: a later epoch's batch g is, sequence by sequence, a (first-epoch batch, position)
pair, a pure function of the data (`epoch_origins` of the data source); its supervision is read as row slices of
those files and checked token for token against the batch. So batch i stays a pure function of (data, seed,
epoch, i), wherever its supervision comes from, and a resumed run serves the same batches in any epoch: the first
epoch too is read back from the files, so a run resumed there reads what the stopped one wrote (and the pool
computes only what is not written yet).

Write-ahead: the pool's results of a rank's first epoch are on disk as soon as they arrive, so they leave the
client's byte budget at once and the pool runs at its own pace, not the trainer's (a sweep's trainer steps K drafts
a batch). When a rank's writer is through its first epoch it writes `done_rank{r}.json`: it asks the pool for
nothing more unless a file it needs is missing, and the driver's `release_after_cache` waits for every rank's.

Budget: `max_bytes` is split evenly between the ranks. Once a rank's share is full it writes `full_rank{r}.json`
(the first batch it did not cache), says so once, and caches nothing more: the rest of its first epoch goes
through memory as without a cache (the pool's results held, within the client's byte budget, until training
reads them), and a later batch that needs an uncached batch's sequences is served by the pool. A later batch whose
file another rank's writer has yet to write waits for it (that writer is computing it).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from eagle_ray.contract import PackedBatch, Supervision
from eagle_ray.offline import (
    SHARD_FIELDS,
    DumpMismatchError,
    content_hash,
    decoded,
    entries_matching_disk,
    init_or_check,
    read_manifest,
    shard_name,
    summarise,
    write_json,
    write_shard,
)
from eagle_ray.train.reader import PoolSupply, Served

log = logging.getLogger(__name__)

WAIT_S = 120.0  # how long a reader waits for a first-epoch file another rank's writer has yet to write


def marker(root: str | Path, kind: str, rank: int) -> Path:
    """Rank `rank`'s writer's marker: "done", it is through its first epoch (every batch of it is in the cache or
    past its full share); "full", its share is full from batch `first_uncached` on."""
    return Path(root) / f"{kind}_rank{rank}.json"


def _full_from(root: Path, rank: int) -> int | None:
    path = marker(root, "full", rank)
    return json.loads(path.read_text())["first_uncached"] if path.exists() else None


class EpochCache:
    """One rank's view of the cache directory: `put` a first-epoch batch's supervision, `get` any epoch's batch's."""

    def __init__(
        self,
        root: str | Path,
        epoch_batches: int,
        max_bytes: int | None,
        rank: int,
        world: int,
        wait_s: float = WAIT_S,
        fp8: bool = False,
    ):
        self.root, self.epoch_batches, self.rank, self.world = Path(root), epoch_batches, rank, world
        self.fp8 = fp8
        self.share = None if max_bytes is None else max_bytes // world
        self.wait_s = wait_s
        self.full_from = _full_from(self.root, rank)
        # what this rank's share holds already (a resumed run): its own batches' files
        self.used = sum(
            p.stat().st_size
            for p in self.root.glob("batch_*.safetensors")
            if int(p.name[6:14]) % world == rank and int(p.name[6:14]) < epoch_batches
        )

    def present(self, index: int, batch: PackedBatch) -> bool:
        """Whether first-epoch batch `index`'s file is there (a resumed run's: it must hold this very batch)."""
        path = self.root / shard_name(index)
        if not path.exists():
            return False
        with safe_open(path, "pt") as f:
            theirs = (f.metadata() or {}).get("content_hash")
        if theirs != content_hash(batch):
            raise DumpMismatchError(
                f"{path} holds another batch (content hash {str(theirs)[:12]} != {content_hash(batch)[:12]}): the "
                "epoch cache is from other data; give cache.dir another directory or delete it"
            )
        return True

    def put(self, index: int, batch: PackedBatch, sup: Supervision) -> bool:
        """Cache first-epoch batch `index` (unless its file is there, or the share is full); True if it is cached."""
        if self.present(index, batch):
            return True
        if self.full_from is not None and index >= self.full_from:
            return False
        if self.share is not None and self.used + sup.nbytes > self.share:
            self.full_from = index
            write_json(marker(self.root, "full", self.rank), {"first_uncached": index, "bytes": self.used}, False)
            log.warning(
                "epoch cache full: rank %d's share of cache.max_bytes (%d of %d bytes) is used; batch %d and this "
                "rank's later first-epoch batches are not cached: they go through memory, and later epochs read them "
                "from the pool",
                self.rank,
                self.used,
                self.share,
                index,
            )
            return False
        # no fsync: a cache, not a record; a file a crash tore is unreadable, so served by the pool (`get`)
        entry = write_shard(self.root, index, sup, content_hash(batch), fsync=False, fp8=self.fp8)
        self.used += entry["bytes"]
        return True

    def has(self, origins: list[tuple[int, int]]) -> bool:
        return all((self.root / shard_name(b)).exists() for b in {b for b, _ in origins})

    def get(self, batch: PackedBatch, origins: list[tuple[int, int]]) -> Supervision | None:
        """The supervision of `batch` (of any epoch), whose sequences are `origins` (first-epoch batch, position),
        from the cached files; None when one of them is not cached (the pool serves it)."""
        files = sorted({b for b, _ in origins})
        for b in files:
            if not self._wait_for(b):
                return None
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in SHARD_FIELDS if k != "cu_seqlens"}
        try:
            with ExitStack() as stack:
                opened = {b: stack.enter_context(safe_open(self.root / shard_name(b), "pt")) for b in files}
                cus = {b: f.get_tensor("cu_seqlens") for b, f in opened.items()}
                for b, pos in origins:
                    lo, hi = int(cus[b][pos]), int(cus[b][pos + 1])
                    f = opened[b]
                    rows = decoded({k: f.get_slice(k)[lo:hi] for k in f.keys() if k != "cu_seqlens"}, f.metadata())
                    for k in parts:
                        parts[k].append(rows[k])
        except Exception as e:  # a torn or unreadable file: the pool serves the batch
            log.warning("epoch cache: a file of batches %s is unreadable (%s); the pool serves this batch", files, e)
            return None
        sup = Supervision(
            **{k: torch.cat(v) for k, v in parts.items()}, cu_seqlens=batch.cu_seqlens.to(cus[files[0]].dtype)
        )
        if not (torch.equal(sup.input_ids.long(), batch.input_ids.long())) or not torch.equal(
            sup.loss_mask.long(), batch.loss_mask.long()
        ):
            raise DumpMismatchError(
                f"{self.root}: the cached sequences of batches {files} are not this batch's: the epoch cache is from "
                "other data; give cache.dir another directory or delete it"
            )
        return sup

    def mark_done(self) -> None:
        write_json(marker(self.root, "done", self.rank), {"rank": self.rank, "world": self.world}, False)

    def _wait_for(self, index: int) -> bool:
        """Whether first-epoch batch `index`'s file is there, waiting for one another rank's writer has yet to write."""
        path = self.root / shard_name(index)
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            full_from = _full_from(self.root, index % self.world)
            if full_from is not None and full_from <= index:
                return False  # its rank's share was full: never cached
            if marker(self.root, "done", index % self.world).exists():
                return path.exists()  # its rank's writer is through: written before the marker, or never
            if time.monotonic() > deadline:
                log.warning("epoch cache: %s did not appear within %.0f s; the pool serves it", path, self.wait_s)
                self.wait_s = 0.0  # waited once in vain: from now on a missing file goes to the pool at once
                return False
            time.sleep(0.1)
        return True


class CachedSupply:
    """A `PoolSupply` behind the epoch cache: the rank's first-epoch batches written ahead by a writer thread and
    read back from the cache; later epochs' batches from the cache, or from the pool when their first-epoch files
    are not there.

    `source`: the rank source (`epoch_origins`); `rank`, `world`, `start_step` number the batches it is given
    (global batch `(start_step + i) * world + rank`).

    Threads, one owner each: the writer thread owns the write-ahead's own pool stream (`ahead`), the cache's
    writing side (`put`) and the batches iterator until its first epoch is pulled; the serving thread (the
    `RankReader`'s) owns `pool`, `cached_tokens`, `missed` and the iterator after that. They meet in one queue."""

    def __init__(self, pool: PoolSupply, cache: EpochCache, source: Any, rank: int, world: int, start_step: int):
        self.pool, self.cache, self.source = pool, cache, source
        self.rank, self.world, self.start_step = rank, world, start_step
        self.ahead = PoolSupply(pool.client, node_id=pool.node_id, timeout_s=pool.timeout_s)
        self.cached_tokens = 0  # tokens served from the cache in epochs 2..E
        self.missed = 0  # later-epoch batches the pool served because the cache lacked them

    @property
    def reruns(self) -> int:
        return self.pool.reruns + self.ahead.reruns

    @property
    def tokens(self) -> int:
        return self.pool.tokens + self.ahead.tokens

    def _global(self, i: int) -> int:
        return (self.start_step + i) * self.world + self.rank

    def serve(self, batches: Iterator[PackedBatch], depth: int, world: int) -> Iterator[Served]:
        batches = iter(batches)
        # this rank's batches g = (start_step + i) * world + rank below epoch_batches: a prefix of what it is given
        first = max(-(-(self.cache.epoch_batches - self.rank) // self.world) - self.start_step, 0)
        if first:
            yield from self._first_epoch(batches, first, depth, world)
        else:
            self.cache.mark_done()  # its first epoch was written by the run this one resumes
        yield from self._later(enumerate(batches, first), depth, world)

    def _first_epoch(self, batches: Iterator[PackedBatch], n: int, depth: int, world: int) -> Iterator[Served]:
        # unbounded: a written batch's record holds its token ids, not its supervision; a held one (a full share)
        # is bounded by the client's byte budget, which counts it until training is done with it
        records: queue.Queue = queue.Queue()
        stop = threading.Event()
        writer = threading.Thread(
            target=self._write_ahead,
            args=(itertools.islice(batches, n), n, depth, world, records, stop),
            name="eagle-ray-epoch-cache-writer",
            daemon=True,
        )
        writer.start()
        arrived: dict[int, tuple] = {}  # records come in batch order, but for the files a resumed run finds first
        try:
            for i in range(n):
                while i not in arrived:
                    record = records.get()
                    if record[0] == "error":
                        raise record[1]
                    if record[0] == "end":
                        return  # the batches ran out before the epoch did (a run that stops in it)
                    arrived[record[1]] = record[2:]
                    record = None  # a held record's bytes must leave the budget when training drops them
                batch, served = arrived.pop(i)
                yield served if served is not None else self._read_back(i, batch, depth, world)
                served = None
        finally:
            stop.set()  # closed early: the writer stops at its next result

    def _write_ahead(
        self, batches: Iterator[PackedBatch], n: int, depth: int, world: int, out: queue.Queue, stop: threading.Event
    ) -> None:
        """Writer thread: stream the batches through the pool as fast as it serves them, writing each result to the
        cache as it arrives; hand each batch over as written (or, when its rank's share is full, with its results)."""
        todo: dict[int, tuple[int, PackedBatch]] = {}  # the stream's index -> (batch index, batch)
        pulled = sent = 0

        def feed() -> Iterator[PackedBatch]:
            nonlocal pulled, sent
            for i, batch in enumerate(batches):
                pulled += 1
                if self.cache.present(self._global(i), batch):  # written by the run this one resumes
                    out.put(("item", i, batch, None))
                    continue
                if stop.is_set():
                    return
                todo[sent], sent = (i, batch), sent + 1
                yield batch

        served = self.ahead.serve(feed(), depth, world)
        try:
            for s in served:
                i, batch = todo.pop(s.index)
                if s.error is None and self.cache.put(self._global(i), batch, s.sup):
                    s = None  # on disk: its bytes leave the budget now, not when training gets to it
                out.put(("item", i, batch, None if s is None else Served(i, batch, s.sup, s.held, s.error)))
                s = None
                if stop.is_set():
                    return
            if pulled == n:
                self.cache.mark_done()  # its stream is over: nothing of this rank's is in flight
            out.put(("end",))
        except BaseException as e:  # raised in the serving thread, at the batch it reached
            out.put(("error", e))
        finally:
            served.close()

    def _read_back(self, i: int, batch: PackedBatch, depth: int, world: int) -> Served:
        sup = self.cache.get(batch, [(self._global(i), k) for k in range(batch.num_sequences)])
        if sup is not None:
            return Served(i, batch, sup)
        served = self.pool.serve(iter([batch]), depth, world)  # an unreadable file: the pool serves it again
        try:
            s = next(served)
            return Served(i, batch, s.sup, s.held, s.error)
        finally:
            served.close()

    def _later(self, items: Iterator[tuple[int, PackedBatch]], depth: int, world: int) -> Iterator[Served]:
        """Epochs 2..E: each batch read from the cache; one whose first-epoch files are not all there goes to the
        pool, with the next ones of its kind in one run (ended by a batch the cache holds)."""
        pending: tuple | None = None  # an item taken from `items` by a pool run that ended before it
        while True:
            if pending is None:
                nxt = next(items, None)
                if nxt is None:
                    return
                pending = (*nxt, self.source.epoch_origins(self._global(nxt[0]))[1])
            i, batch, origins = pending
            pending = None
            sup = self.cache.get(batch, origins)
            if sup is not None:
                self.cached_tokens += batch.num_tokens
                yield Served(i, batch, sup)
                continue
            self.missed += 1
            run: dict[int, tuple[int, PackedBatch]] = {0: (i, batch)}

            def feed(first: PackedBatch = batch, run: dict = run) -> Iterator[PackedBatch]:
                nonlocal pending
                yield first
                for k, (j, b) in enumerate(items, start=1):  # k: the batch's index in this run's stream
                    origins = self.source.epoch_origins(self._global(j))[1]
                    if self.cache.has(origins):
                        pending = (j, b, origins)
                        return
                    self.missed += 1
                    run[k] = (j, b)
                    yield b

            for s in self.pool.serve(feed(), depth, world):
                j, b = run.pop(s.index)
                yield Served(j, s.batch, s.sup, s.held, s.error)
                s = None  # only the record holds its results now


# ------------------------------------------------------------------------------------------ the driver's side


def init_epoch_cache(root: str | Path, pool: Any) -> Path:
    """Make `root` a cache (a dump) of `pool`'s target, or check that the one there is; drop stale temp files (no
    rank is writing yet)."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    init_or_check(root, pool, fsync=True)
    return root


def finish_epoch_cache(root: str | Path, epoch_batches: int) -> dict[str, Any]:
    """Write the cache's manifest from its files (as a dump's) and return what it holds: batches, tokens, bytes,
    bytes per token, whether it has every first-epoch batch, and where a full share stopped caching."""
    root = Path(root)
    manifest = read_manifest(root)
    entries = entries_matching_disk(root, manifest, strict=False)
    summary = summarise(manifest, entries, epoch_batches, requested_batches=epoch_batches)
    write_json(root / "manifest.json", summary, True)
    full = sorted(json.loads(p.read_text())["first_uncached"] for p in root.glob("full_rank*.json"))
    return {
        "dir": str(root),
        "batches": summary["num_batches"],
        "epoch_batches": epoch_batches,
        "complete": summary["complete"],
        "tokens": summary["num_tokens"],
        "bytes": summary["bytes"],
        "bytes_per_token": summary["bytes"] / max(summary["num_tokens"], 1),
        "full_from_batch": full[0] if full else None,
    }
