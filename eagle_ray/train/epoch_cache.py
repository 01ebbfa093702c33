"""The epoch cache: epoch 1 streams from the pool and each rank writes the supervision of its batches to files as
it trains; epochs 2..E read their batches from those files instead of running the target again.

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
epoch, i), wherever its supervision comes from, and a resumed run serves the same batches in any epoch.

Budget: `max_bytes` is split evenly between the ranks. Once a rank's share is full it writes `full_rank{r}.json`
(the first batch it did not cache), says so once, and caches nothing more; a later batch that needs an uncached
batch's sequences is served by the pool, as is one whose files another rank has not written yet (near the end of
epoch 1 a reader waits for them a little first).
"""

from __future__ import annotations

import json
import logging
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

WAIT_S = 30.0  # how long a reader waits for a first-epoch file another rank is about to write


def _full_marker(root: Path, rank: int) -> Path:
    return root / f"full_rank{rank}.json"


class EpochCache:
    """One rank's view of the cache directory: `put` a first-epoch batch's supervision, `get` a later one's."""

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
        marker = _full_marker(self.root, rank)
        self.full_from: int | None = json.loads(marker.read_text())["first_uncached"] if marker.exists() else None
        # what this rank's share holds already (a resumed run): its own batches' files
        self.used = sum(
            p.stat().st_size
            for p in self.root.glob("batch_*.safetensors")
            if int(p.name[6:14]) % world == rank and int(p.name[6:14]) < epoch_batches
        )
        self.written_bytes = self.written_tokens = 0

    def put(self, index: int, batch: PackedBatch, sup: Supervision) -> bool:
        """Cache first-epoch batch `index` (unless its file is there, or the share is full); True if it is cached."""
        path = self.root / shard_name(index)
        digest = content_hash(batch)
        if path.exists():  # a resumed run serves it again: the file from before holds the same batch
            with safe_open(path, "pt") as f:
                theirs = (f.metadata() or {}).get("content_hash")
            if theirs != digest:
                raise DumpMismatchError(
                    f"{path} holds another batch (content hash {str(theirs)[:12]} != {digest[:12]}): the epoch cache "
                    "is from other data; give cache.dir another directory or delete it"
                )
            return True
        if self.full_from is not None and index >= self.full_from:
            return False
        if self.share is not None and self.used + sup.nbytes > self.share:
            self.full_from = index
            write_json(_full_marker(self.root, self.rank), {"first_uncached": index, "bytes": self.used}, False)
            log.warning(
                "epoch cache full: rank %d's share of cache.max_bytes (%d of %d bytes) is used; batch %d and this "
                "rank's later first-epoch batches are not cached, and later epochs read them from the pool",
                self.rank,
                self.used,
                self.share,
                index,
            )
            return False
        # no fsync: a cache, not a record; a file a crash tore is unreadable, so served by the pool (`get`)
        entry = write_shard(self.root, index, sup, digest, fsync=False, fp8=self.fp8)
        self.used += entry["bytes"]
        self.written_bytes += entry["bytes"]
        self.written_tokens += batch.num_tokens
        return True

    def has(self, origins: list[tuple[int, int]]) -> bool:
        return all((self.root / shard_name(b)).exists() for b in {b for b, _ in origins})

    def get(self, batch: PackedBatch, origins: list[tuple[int, int]]) -> Supervision | None:
        """The supervision of a later epoch's `batch`, whose sequences are `origins` (first-epoch batch, position),
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

    def _wait_for(self, index: int) -> bool:
        """Whether first-epoch batch `index`'s file is there, waiting a little for one another rank is writing."""
        path = self.root / shard_name(index)
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            marker = _full_marker(self.root, index % self.world)
            if marker.exists() and json.loads(marker.read_text())["first_uncached"] <= index:
                return False  # its rank's share was full: never cached
            if time.monotonic() > deadline:
                log.warning("epoch cache: %s did not appear within %.0f s; the pool serves it", path, self.wait_s)
                self.wait_s = 0.0  # waited once in vain: from now on a missing file goes to the pool at once
                return False
            time.sleep(0.1)
        return True


class CachedSupply:
    """A `PoolSupply` behind the epoch cache: first-epoch batches from the pool, written to the cache as they are
    served; later epochs' batches from the cache, or from the pool when their first-epoch files are not there.

    `source`: the rank source (`epoch_origins`); `rank`, `world`, `start_step` number the batches it is given
    (global batch `(start_step + i) * world + rank`)."""

    def __init__(self, pool: PoolSupply, cache: EpochCache, source: Any, rank: int, world: int, start_step: int):
        self.pool, self.cache, self.source = pool, cache, source
        self.rank, self.world, self.start_step = rank, world, start_step
        self.cached_tokens = 0  # tokens served from the cache
        self.missed = 0  # later-epoch batches the pool served because the cache lacked them

    @property
    def reruns(self) -> int:
        return self.pool.reruns

    @property
    def tokens(self) -> int:
        return self.pool.tokens

    def _where(self, i: int) -> tuple[int, int, list[tuple[int, int]]]:
        g = (self.start_step + i) * self.world + self.rank
        epoch, origins = self.source.epoch_origins(g)
        return g, epoch, origins

    def serve(self, batches: Iterator[PackedBatch], depth: int, world: int) -> Iterator[Served]:
        items = enumerate(batches)
        pending: tuple | None = None  # an item taken from `batches` by a pool run that ended before it
        while True:
            if pending is None:
                nxt = next(items, None)
                if nxt is None:
                    return
                pending = (*nxt, *self._where(nxt[0]))
            i, batch, g, epoch, origins = pending
            pending = None
            if epoch > 0:
                sup = self.cache.get(batch, origins)
                if sup is not None:
                    self.cached_tokens += batch.num_tokens
                    yield Served(i, batch, sup)
                    continue
                self.missed += 1
            # a run of batches for the pool: this one and the next ones of its kind. The first epoch's run ends at
            # its last batch (later batches are looked up once it has been written); a later epoch's at a batch
            # the cache holds.
            run: dict[int, tuple[int, PackedBatch, int, bool]] = {0: (i, batch, g, epoch == 0)}

            def feed(
                first: PackedBatch = batch, first_epoch: bool = epoch == 0, run: dict = run
            ) -> Iterator[PackedBatch]:
                nonlocal pending
                yield first
                for k, (j, b) in enumerate(items, start=1):  # k: the batch's index in this run's stream
                    here = (j, b, *self._where(j))
                    if (here[3] == 0) != first_epoch or (here[3] > 0 and self.cache.has(here[4])):
                        pending = here
                        return
                    if not first_epoch:
                        self.missed += 1
                    run[k] = (j, b, here[2], first_epoch)
                    yield b

            for s in self.pool.serve(feed(), depth, world):
                j, b, gj, first_epoch = run.pop(s.index)
                if first_epoch and s.sup is not None:
                    self.cache.put(gj, b, s.sup)
                yield Served(j, s.batch, s.sup, s.held, s.error)
                s = None  # only the record holds its results now


# ------------------------------------------------------------------------------------------ the driver's side


def init_epoch_cache(root: str | Path, pool: Any) -> Path:
    """Make `root` a cache (a dump) of `pool`'s target, or check that the one there is; drop stale temp files."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("*.tmp"), *(root / "target").glob("*.tmp")]:  # no rank is writing yet
        stale.unlink()
    init_or_check(root, pool, fsync=True)
    return root


def finish_epoch_cache(root: str | Path, epoch_batches: int) -> dict[str, Any]:
    """Write the cache's manifest from its files (as a dump's) and return what it holds: batches, tokens, bytes,
    bytes per token, whether it has every first-epoch batch, and where a full share stopped caching."""
    root = Path(root)
    manifest = read_manifest(root)
    entries = entries_matching_disk(root, manifest, strict=False)
    complete = all(i in entries for i in range(epoch_batches))
    summary = summarise(manifest, entries, complete=complete, requested_batches=epoch_batches)
    write_json(root / "manifest.json", summary, True)
    full = sorted(json.loads(p.read_text())["first_uncached"] for p in root.glob("full_rank*.json"))
    return {
        "dir": str(root),
        "batches": summary["num_batches"],
        "epoch_batches": epoch_batches,
        "complete": complete,
        "tokens": summary["num_tokens"],
        "bytes": summary["bytes"],
        "bytes_per_token": summary["bytes"] / max(summary["num_tokens"], 1),
        "full_from_batch": full[0] if full else None,
    }
