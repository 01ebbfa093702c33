"""A consumer's own data plane: it streams its batches to the pool's replicas itself, no driver between.

`RankReader(target, batches, start_step)` is `FeedReader`'s counterpart for a process that holds a pool
client (`PooledTargetModel.connect(name)`): a Ray Train worker whose batches are its own
(`step * world + rank`, a pure function of the step), a trainer that is not ours, a benchmark consumer.
A thread streams the batches through the client (dispatch, ledger, failover and byte budget all in
this process) and reads each batch's supervision ahead of the consumer; the consumer gets one record per
step, in order, each exactly once. Nothing per batch touches the driver or the pool's owner, so what
one driver could serve stops bounding the run.

Bytes: a record's `ShardResult`s stay alive until the consumer asks for the next step, so the client's
byte budget counts supervision while it waits here and while it trains on it. A batch whose objects were
lost before they were read (their node died) is served again from the batch itself, once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import ray
from ray.exceptions import ObjectLostError

from eagle_ray.contract import PackedBatch, Supervision

log = logging.getLogger(__name__)


class RankReader:
    """Iterate `(step, Supervision, meta)` for `batches` (the ones for steps `start_step`, `start_step + 1`, ...).

    `depth`: records read ahead of the consumer. `rank`, `world`: a rank of a run whose global batch `step * world +
    rank` this is (`meta["batch"]`). `node_id`: serve only from replicas on this node while it has
    any (`stream`'s rule), for colocated placement, where the consumer's own node holds its replica and reads
    it zero-copy. The default (None) uses every replica: with separate placement a node's one replica would
    otherwise cap its consumer at that replica's rate while the others idle.
    """

    def __init__(
        self,
        target: Any,
        batches: Iterable[PackedBatch],
        start_step: int = 0,
        depth: int = 2,
        timeout_s: float = 600.0,
        node_id: str | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        import uuid

        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.target, self.batches, self.start_step = target, batches, start_step
        self.depth, self.timeout_s = depth, timeout_s
        self.node_id = node_id
        self.rank, self.world = rank, world  # meta["batch"]: the global batch index, step * world + rank
        self.incarnation = uuid.uuid4().hex  # names this reader in the sample log, as FeedReader's does
        self.reruns = 0  # batches served again because their objects were lost

    def _serve(self, out: queue.Queue, stop: threading.Event) -> None:
        """Serving thread: stream the batches, gather each one's shards, read them, hand them over in order."""
        kept: dict[int, PackedBatch] = {}  # until read: a lost batch is run again from it

        def source() -> Iterator[PackedBatch]:
            for i, b in enumerate(self.batches):
                kept[i] = b
                yield b

        parts: dict[int, list] = {}
        stream = None
        try:
            stream = self.target.stream(
                source(), node_id=self.node_id, stall_timeout_s=self.timeout_s, ahead=self._ahead()
            )
            for res in stream:
                if res.error:
                    raise RuntimeError(f"step {self.start_step + res.batch_index} lost a shard: {res.error}")
                parts.setdefault(res.batch_index, []).append(res)
                batch = kept[res.batch_index]
                if res.sequences[1] < batch.num_sequences:
                    continue  # more shards of this batch follow
                step = self.start_step + res.batch_index
                got = parts.pop(res.batch_index)
                sup = self._read(step, batch, got)
                del kept[res.batch_index]
                meta = {
                    "step": step,
                    "batch": step * self.world + self.rank,
                    "tokens": batch.num_tokens,
                    "sequences": batch.num_sequences,
                }
                if not self._hand(out, stop, ("item", step, sup, meta, got)):
                    return
                # handed over: only the record holds its results now, so the consumer's release frees them while
                # this thread waits for the next batch (which may be waiting for exactly that budget)
                res = got = sup = None
            self._hand(out, stop, ("end",))
        except BaseException as e:  # surfaced in the consumer, not lost in a thread
            self._hand(out, stop, ("error", e))
        finally:
            if stream is not None:
                stream.close()

    def _ahead(self) -> int:
        """Shards this reader keeps dispatched ahead of its consumer: what it will read next, plus its share of
        the replicas' queues (`max_inflight_per_replica` each, shared by the `world` ranks), so the replicas stay
        busy without a queue of every client's shards on every replica (a batch would wait behind all of them).
        Counted from the replicas when the stream starts."""
        per_replica = self.target.dispatch_settings()["max_inflight_per_replica"]
        return self.depth + 1 + -(-per_replica * max(len(self.target.replicas()), 1) // self.world)

    def _read(self, step: int, batch: PackedBatch, got: list) -> Supervision:
        try:
            return Supervision.concat(ray.get([r.ref for r in got]))
        except ObjectLostError as e:
            log.warning("step %d: supervision lost before it was read (%s); running the batch again", step, e)
            # the error's traceback and Ray's frames form a cycle that holds this frame, and with it `got`, until
            # a garbage collection: the results would stay in the budget after their consumer let them go
            e.__traceback__ = None
            self.reruns += 1
            again = list(self.target.stream([batch], count_held=False, stall_timeout_s=self.timeout_s))
            bad = [r.error for r in again if r.error]
            if bad:
                raise RuntimeError(f"step {step} was lost and its re-run failed: {bad}") from e
            got[:] = again
            return Supervision.concat(ray.get([r.ref for r in again]))

    @staticmethod
    def _hand(out: queue.Queue, stop: threading.Event, record: tuple) -> bool:
        while not stop.is_set():
            try:
                out.put(record, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, Supervision, dict[str, Any]]]:
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
                try:
                    records.get(timeout=0.1)
                except queue.Empty:
                    pass


class CycledBatches:
    """A list of batches as a rank source: global batch g is `batches[g % len]` (what `train_draft` makes of a
    list); picklable, so each rank builds its own stream."""

    def __init__(self, batches: list[PackedBatch]):
        if not batches:
            raise ValueError("no training batches")
        self.batches = list(batches)

    def rank_batches(self, rank: int, world: int, step: int = 0) -> Iterator[PackedBatch]:
        g = step * world + rank
        while True:
            yield self.batches[g % len(self.batches)]
            g += world
