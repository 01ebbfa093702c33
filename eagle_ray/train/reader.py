"""A rank's data plane: its own batches' supervision, read ahead of it, in order, each exactly once.

`RankReader(supply, batches, start_step)` yields one `(step, Supervision, meta)` per step for the batches it is
given; a Ray Train rank's are `step * world + rank` (a pure function of the step), so it needs nobody to hand
them out. The supply is where the supervision comes from:
- `PoolSupply(client)`: the rank's own client of a `serve_pool` pool, which streams the batches straight to
  the replicas (dispatch, ledger, failover and byte budget all in this process);
- `DumpSupply(dump)`: an `eagle-ray dump` on shared storage, each batch's file read by the rank itself.
Nothing per batch touches the driver, so what one driver could serve never bounds the run.

A thread pulls the supply up to `depth` records ahead of the consumer. Bytes: a pool record's `ShardResult`s
stay alive until the consumer asks for the next step, so the client's byte budget counts supervision while it
waits here and while it trains on it. A batch whose objects were lost before they were read (their node died)
is served again from the batch itself, once. A poison batch (the pool quarantined one of its shards: it failed
`max_shard_failures` times) is skipped: its step comes with no supervision and `meta["skipped"]` saying why,
so every rank still takes the step; the training loop counts and bounds the skips.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ObjectLostError

from eagle_ray.contract import PackedBatch, Supervision
from eagle_ray.train.prefetch import hand

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One batch's supervision from a supply: `index` in the batches given; `held` keeps its bytes counted
    until the consumer is done with it; `error`: it could not be served (a poison batch), `sup` is None."""

    index: int
    batch: PackedBatch
    sup: Supervision | None
    held: Any = None
    error: str | None = None


def lookahead(client: Any, depth: int, world: int) -> int:
    """Shards a rank keeps dispatched ahead of its consumer: what it will read next (`depth`), plus its share of
    the replicas' queues (`max_inflight_per_replica` each, shared by the `world` ranks), so the replicas stay
    busy without a queue of every client's shards on every replica (a batch would wait behind all of them)."""
    per_replica = client.dispatch_settings()["max_inflight_per_replica"]
    return depth + 1 + -(-per_replica * max(len(client.replicas()), 1) // world)


class PoolSupply:
    """Supervision from a pool client (`connect_pool(name)`), streamed by this process. `node_id`: serve only
    from replicas on this node while it has any (`stream`'s rule), for colocated placement, where the rank's
    own node holds its replica and reads it zero-copy; None uses every replica."""

    def __init__(self, client: Any, *, node_id: str | None = None, timeout_s: float = 600.0):
        self.client, self.node_id, self.timeout_s = client, node_id, timeout_s
        self.reruns = 0  # batches served again because their objects were lost
        self.tokens = 0  # tokens the target computed for this supply (re-runs included)

    def serve(self, batches: Iterator[PackedBatch], depth: int, world: int) -> Iterator[Served]:
        kept: dict[int, PackedBatch] = {}  # until read: a lost batch is run again from it

        def source() -> Iterator[PackedBatch]:
            for i, b in enumerate(batches):
                kept[i] = b
                yield b

        parts: dict[int, list] = {}
        ahead = lookahead(self.client, depth, world)  # counted from the replicas when the stream starts
        stream = self.client.stream(source(), node_id=self.node_id, stall_timeout_s=self.timeout_s, ahead=ahead)
        try:
            for res in stream:
                parts.setdefault(res.batch_index, []).append(res)
                batch = kept[res.batch_index]
                if res.sequences[1] < batch.num_sequences:
                    continue  # more shards of this batch follow
                got = parts.pop(res.batch_index)
                del kept[res.batch_index]
                errors = [r.error for r in got if r.error]
                self.tokens += sum(r.num_tokens for r in got if not r.error)
                if errors:
                    yield Served(res.batch_index, batch, None, error=errors[0])
                    continue
                yield Served(res.batch_index, batch, self._read(batch, got), got)
                # handed over: only the record holds its results now, so the consumer's release frees them while
                # this thread waits for the next batch (which may be waiting for exactly that budget)
                res = got = None
        finally:
            stream.close()

    def _read(self, batch: PackedBatch, got: list) -> Supervision:
        try:
            return Supervision.concat(ray.get([r.ref for r in got]))
        except ObjectLostError as e:
            log.warning("supervision lost before it was read (%s); running the batch again", e)
            # the error's traceback and Ray's frames form a cycle that holds this frame, and with it `got`, until
            # a garbage collection: the results would stay in the budget after their consumer let them go
            e.__traceback__ = None
            self.reruns += 1
            again = list(self.client.stream([batch], count_held=False, stall_timeout_s=self.timeout_s))
            bad = [r.error for r in again if r.error]
            if bad:
                raise RuntimeError(f"a lost batch's re-run failed: {bad}") from e
            self.tokens += batch.num_tokens
            got[:] = again
            return Supervision.concat(ray.get([r.ref for r in again]))


class DumpSupply:
    """Supervision from a dump on shared storage (`eagle_ray.offline.OfflineSupervision`), read by this process."""

    def __init__(self, dump: Any):
        self.dump = dump
        self.reruns = self.tokens = 0  # a dump re-runs nothing, and no target computes here

    def serve(self, batches: Iterator[PackedBatch], depth: int, world: int) -> Iterator[Served]:
        for i, batch in enumerate(batches):
            yield Served(i, batch, self.dump.load(batch))


class RankReader:
    """Iterate `(step, Supervision | None, meta)` for `batches` (the ones for steps `start_step`, `start_step + 1`...).

    `depth`: records read ahead of the consumer. `rank`, `world`: a rank of a run whose global batch
    `step * world + rank` this is (`meta["batch"]`). A skipped (poison) batch's step has no supervision and
    `meta["skipped"]`, its cause; `skipped` lists `(batch, cause)` of every one.
    """

    def __init__(
        self,
        supply: PoolSupply | DumpSupply | Any,  # or an epoch cache's CachedSupply (epoch_cache.py)
        batches: Iterable[PackedBatch],
        start_step: int = 0,
        depth: int = 2,
        timeout_s: float = 600.0,
        rank: int = 0,
        world: int = 1,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.supply, self.batches, self.start_step = supply, batches, start_step
        self.depth, self.timeout_s = depth, timeout_s
        self.rank, self.world = rank, world
        self.incarnation = uuid.uuid4().hex  # names this reader in the sample log
        self.skipped: list[tuple[int, str]] = []

    @property
    def reruns(self) -> int:
        return self.supply.reruns

    def _serve(self, out: queue.Queue, stop: threading.Event) -> None:
        """Serving thread: pull the supply, hand each batch's record over in order."""
        served = self.supply.serve(iter(self.batches), self.depth, self.world)
        try:
            for s in served:
                step = self.start_step + s.index
                meta = {"step": step, "batch": step * self.world + self.rank}
                if s.error:
                    log.warning("skipping batch %d (step %d, rank %d): %s", meta["batch"], step, self.rank, s.error)
                    self.skipped.append((meta["batch"], s.error))
                    meta.update(tokens=0, sequences=0, skipped=s.error)
                else:
                    meta.update(tokens=s.batch.num_tokens, sequences=s.batch.num_sequences)
                if not hand(out, stop, ("item", step, s.sup, meta, s.held)):
                    return
                s = None  # only the record holds its results now: the consumer's release frees them
            hand(out, stop, ("end",))
        except BaseException as e:  # surfaced in the consumer, not lost in a thread
            hand(out, stop, ("error", e))
        finally:
            served.close()  # the pool stream stops dispatching

    def __iter__(self) -> Iterator[tuple[int, Supervision | None, dict[str, Any]]]:
        records: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._serve, args=(records, stop), name="eagle-ray-rank-reader", daemon=True)
        thread.start()
        record = held = sup = None
        try:
            while True:
                try:
                    record = records.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"no supervision within {self.timeout_s}s") from None
                if record[0] == "end":
                    return
                if record[0] == "error":
                    raise record[1]
                _, step, sup, meta, held = record
                yield step, sup, meta
                del held, sup, record  # the consumer is done with this step: its bytes leave the budget
        finally:
            stop.set()
            record = held = sup = None  # closed mid-step: release it, the serving thread may wait on its budget
            while thread.is_alive():  # unblock a hand-over nobody will take
                with contextlib.suppress(queue.Empty):
                    records.get(timeout=0.1)


def rank_source(data: Any) -> Any:
    """What each rank builds its own batches from (picklable): a `ChatBatchSource` (made ready for the ranks) or a
    list of packed batches (`CycledBatches`); either has `rank_batches(rank, world, step)`."""
    from eagle_ray.data.source import ChatBatchSource

    if isinstance(data, ChatBatchSource):
        return data.for_ranks()
    if callable(data) or isinstance(data, (str, bytes)):
        raise TypeError("training data is a list of packed batches or a ChatBatchSource")
    return CycledBatches(list(data))


class CycledBatches:
    """A list of batches as a rank source: global batch g is `batches[g % len]` (what `train_draft` makes of a
    list); picklable, so each rank builds its own stream."""

    def __init__(self, batches: list[PackedBatch]):
        if not batches:
            raise ValueError("no training batches")
        self.batches = list(batches)

    def epoch_origins(self, index: int) -> tuple[int, list[tuple[int, int]]]:
        """`ChatBatchSource.epoch_origins`: each epoch repeats the list, so batch g is batch `g % len` again."""
        n = len(self.batches)
        return index // n, [(index % n, k) for k in range(self.batches[index % n].num_sequences)]

    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def rank_batches(self, rank: int, world: int, step: int = 0) -> Iterator[PackedBatch]:
        g = step * world + rank
        while True:
            yield self.batches[g % len(self.batches)]
            g += world
