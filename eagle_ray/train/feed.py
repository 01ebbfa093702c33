"""Feed supervision refs from the driver's pool to each Ray Train worker, step by step.

The driver thread (`SupervisionFeed`) streams the pool in batch order; global batch
`step * world + rank` goes to rank `rank` as its batch for `step`, through that rank's queue (a
`ray.util.queue.Queue` actor, fed without a round trip). Items carry object refs only; workers
`ray.get` them zero-copy. Backpressure is the pool's byte budget plus at most `queue_depth` + 2
batches out per rank (queued, prefetched, in training).

Restarts: a worker announces the step it starts from (0, or its checkpoint's) on the control
queue. When all ranks of a (re)started group have announced, the feed rewinds the data to that
step, so batches consumed after the last checkpoint are served again and none is skipped.
Every item names the worker incarnation it was served to; a restarted worker drops what is left
in its queue for its predecessor.

Bytes: the feed keeps each batch's `ShardResult`s until its worker says it is done with that step
("done" on the control queue), so the pool's byte budget counts supervision while it waits in a
worker's queue and in its prefetch, not only until it is handed out. A worker that cannot read a
batch because its objects were lost (their node died between hand-out and read) says "lost": the
feed re-runs that batch (a pure function of its index) and serves it again, to that worker, once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ObjectLostError
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from eagle_ray.contract import PackedBatch, Supervision

log = logging.getLogger(__name__)

BatchSource = Callable[[int], Iterator[PackedBatch]]  # batches from a global batch index on


class _Stopped(Exception):
    pass


@dataclass
class FeedHandles:
    """What a worker needs to read its stream (picklable: queue actor handles)."""

    data: list[Queue]
    control: Queue


class SupervisionFeed:
    def __init__(
        self,
        pool: Any,
        source: BatchSource,
        world_size: int,
        max_steps: int,
        queue_depth: int = 2,
        stall_timeout_s: float = 600.0,
    ):
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        self.pool, self.source, self.world, self.max_steps = pool, source, world_size, max_steps
        self.ahead = queue_depth + 2  # a rank's batches out at once: queued, prefetched, in training
        self.stall_timeout_s = stall_timeout_s
        # on the driver's node: the feed's channels must not die with a node that serves or trains
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        opts = {"num_cpus": 0, "scheduling_strategy": here}
        self.handles = FeedHandles(
            [Queue(0, actor_options=opts) for _ in range(world_size)], Queue(0, actor_options=opts)
        )
        self.error: BaseException | None = None
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "restarts": 0, "wait_s": 0.0, "reruns": 0}
        self._served: set[str] = set()  # incarnations of the worker group being served
        self._serving: dict[int, str] = {}  # rank -> the incarnation served
        self._lost: deque[tuple[int, int]] = deque()  # (rank, step) to serve again
        self._stop = threading.Event()
        # the listener thread owns the control queue and `_held`; the feed thread hears from it through `_inbox`
        self._inbox: queue.Queue = queue.Queue()
        self._held: dict[tuple[str, int], list] = {}  # (incarnation, step) -> its ShardResults, until "done"
        self._out: dict[str, int] = {}  # incarnation -> its entries in `_held`
        self._held_cond = threading.Condition()  # the feed thread adds (and waits), the listener drops
        self._thread = threading.Thread(target=self._run, name="eagle-ray-feed", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="eagle-ray-feed-control", daemon=True)

    def start(self) -> SupervisionFeed:
        self._listener.start()
        self._thread.start()
        return self

    def held(self) -> int:
        """Batches handed out whose worker has not said it is done with them."""
        with self._held_cond:
            return len(self._held)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._listener.join(timeout=30)
        for q in [*self.handles.data, self.handles.control]:
            try:
                q.shutdown(force=True)
            except Exception:
                pass

    # -------------------------------------------------------------------------------- driver thread

    def _run(self) -> None:
        starts: dict[int, tuple[int, str]] = {}  # rank -> (start step, incarnation), latest announcement
        try:
            while not self._stop.is_set():
                step = self._await_group(starts)
                if step is None or not self._serve_from(step, starts):
                    return
                self.stats["restarts"] += 1
        except _Stopped:
            return
        except BaseException as e:  # tell the workers; fit() then fails with this error
            log.exception("supervision feed failed")
            self.error = e
            for q in self.handles.data:
                try:
                    q.put({"error": f"{type(e).__name__}: {e}"}, timeout=5)
                except Exception:
                    pass

    def _listen(self) -> None:
        """Listener thread: drain the control queue in few round trips; "done" frees a batch here, at once
        (the feed thread may be waiting on the byte budget it frees); the rest goes to the feed thread."""
        control = self.handles.control
        while not self._stop.is_set():
            try:
                msgs = [control.get(timeout=0.5)]
                n = control.size()  # only this thread takes from it: at least n are there
                msgs += control.get_nowait_batch(n) if n else []
            except Empty:
                continue
            except Exception:  # the queue actor is gone: the feed is closing
                if not self._stop.is_set():
                    log.exception("supervision feed: control queue failed")
                return
            for kind, rank, step, incarnation in msgs:
                if kind in ("done", "lost"):
                    with self._held_cond:
                        if self._held.pop((incarnation, step), None) is not None:
                            self._out[incarnation] -= 1
                            self._held_cond.notify_all()
                if kind != "done":
                    self._inbox.put((kind, rank, step, incarnation))

    def _control(self, starts: dict[int, tuple[int, str]], timeout: float | None) -> bool:
        """Read start announcements (waiting up to `timeout` for the first); True if a new worker announced.
        Lost batches are noted in `self._lost`, to be re-run by `_rerun_lost`."""
        new = False
        while True:
            try:
                msg = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            except queue.Empty:
                return new
            kind, rank, step, incarnation = msg
            timeout = None
            if kind == "lost":
                if self._serving.get(rank) == incarnation:
                    self._lost.append((rank, step))
                continue
            starts[rank] = (step, incarnation)
            new = new or incarnation not in self._served

    def _rerun_lost(self, starts: dict[int, tuple[int, str]]) -> bool:
        """Serve again each batch a worker could not read (its objects were lost). True on a restart."""
        while self._lost:
            rank, step = self._lost.popleft()
            g = step * self.world + rank
            batch = next(iter(self.source(g)))  # batch g is a pure function of g: the same batch again
            log.warning("batch %d (step %d, rank %d) was lost before its worker read it: re-running it", g, step, rank)
            # one batch, outside the byte budget: the worker waits on it, and what it holds counts already
            got = list(self.pool.stream([batch], stall_timeout_s=self.stall_timeout_s, count_held=False))
            if any(r.error for r in got):
                raise RuntimeError(f"batch {g} was lost and its re-run failed: {[r.error for r in got if r.error]}")
            item = self._item(g, got, batch.num_sequences)
            self.stats["reruns"] += 1
            if self._put(rank, item, starts, got):
                return True
        return False

    def _item(self, g: int, results: list, sequences: int) -> dict[str, Any]:
        return {
            "step": g // self.world,
            "batch": g,
            "refs": [r.ref for r in results],
            "tokens": sum(r.num_tokens for r in results),
            "sequences": sequences,
        }

    def _await_group(self, starts: dict[int, tuple[int, str]]) -> int | None:
        """Block until a whole new worker group has announced its start step; return it."""
        while not self._stop.is_set():
            self._control(starts, timeout=0.5)
            fresh = [(s, inc) for s, inc in starts.values() if inc not in self._served]
            if len(fresh) == self.world:
                steps = {s for s, _ in fresh}
                if len(steps) != 1:
                    raise RuntimeError(f"workers of one group start from different steps: {sorted(steps)}")
                self._served = {inc for _, inc in fresh}
                self._serving = {r: inc for r, (_, inc) in starts.items()}
                self._lost.clear()
                with self._held_cond:  # the previous group will never say it is done
                    self._held.clear()
                    self._out.clear()
                return steps.pop()
        return None

    def _serve_from(self, step: int, starts: dict[int, tuple[int, str]]) -> bool:
        """Serve steps [step, max_steps), then wait. True when a restarted group needs serving."""
        first = step * self.world
        sizes: dict[int, int] = {}

        def batches() -> Iterator[PackedBatch]:
            for i, b in enumerate(self.source(first)):
                if first + i >= self.max_steps * self.world:
                    return
                sizes[i] = b.num_sequences
                yield b

        parts: dict[int, list] = {}
        stream = self.pool.stream(batches(), ordered=True, stall_timeout_s=self.stall_timeout_s)
        try:
            for res in stream:
                if res.error:
                    raise RuntimeError(f"batch {first + res.batch_index} lost a shard: {res.error}")
                parts.setdefault(res.batch_index, []).append(res)
                if res.sequences[1] < sizes[res.batch_index]:
                    continue  # more shards of this batch follow
                got = parts.pop(res.batch_index)
                g = first + res.batch_index
                item = self._item(g, got, sizes.pop(res.batch_index))
                if self._put(g % self.world, item, starts, got) or self._rerun_lost(starts):
                    return True
                self.stats["batches"] += 1
                self.stats["sequences"] += item["sequences"]
                self.stats["tokens"] += item["tokens"]
        finally:
            stream.close()
        for rank in range(self.world):
            if self._put(rank, {"step": self.max_steps, "end": True}, starts):
                return True
        # stay for re-runs and restarts: a group may fail after the last batch, before its last checkpoint
        while not self._stop.is_set():
            if self._control(starts, timeout=0.5) or self._rerun_lost(starts):
                return True
        return False

    def _put(self, rank: int, item: dict[str, Any], starts: dict[int, tuple[int, str]], results=()) -> bool:
        """Hand `item` to `rank`'s queue without a round trip to the queue actor. A rank has at most `ahead`
        batches out (queued, prefetched, in training): past that, wait for its "done". `results` stay held,
        counted against the pool's byte budget, until the worker is done with the item's step. Gives way to a
        restart (returns True then) or to `close()`."""
        inc = self._serving[rank]
        item = {**item, "for": inc}  # the worker incarnation it is meant for
        t0 = time.monotonic()
        while results:
            if self._stop.is_set():
                raise _Stopped
            with self._held_cond:
                if self._out.get(inc, 0) >= self.ahead:
                    self._held_cond.wait(0.5)
                if self._out.get(inc, 0) < self.ahead:  # registered before the put: its "done" may come at once
                    self._held[(inc, item["step"])] = list(results)
                    self._out[inc] = self._out.get(inc, 0) + 1
                    break
            if self._control(starts, timeout=None):
                return True
        self.stats["wait_s"] += time.monotonic() - t0
        self.handles.data[rank].actor.put_nowait.remote(item)  # an actor's calls from one caller run in order
        return False


# -------------------------------------------------------------------------------- worker side


class FeedReader:
    """A worker's view: announce the start step, then one supervision record per step.

    A thread fetches the next record (queue actor round trip, `ray.get` of its refs) while the
    worker trains on the current one, so a step waits only when supply is really behind. After each
    step the reader tells the feed it is done with it (which frees its bytes in the pool's budget).
    A record whose objects were lost is asked for again; records that arrive meanwhile wait in order.
    """

    max_early = 256  # records of later steps kept while waiting for a re-run; more means the feed skipped one

    def __init__(self, handles: FeedHandles, rank: int, start_step: int, timeout_s: float = 600.0):
        import uuid

        self.queue, self.control, self.rank = handles.data[rank], handles.control, rank
        self.next_step, self.timeout_s = start_step, timeout_s
        self.incarnation = uuid.uuid4().hex
        self.reruns = 0  # records asked for again because their objects were lost
        self.control.put(("start", rank, start_step, self.incarnation))

    def _tell(self, kind: str, step: int) -> None:
        self.control.put((kind, self.rank, step, self.incarnation))

    def _next_item(self, want: int, early: dict[int, dict], stop: threading.Event) -> dict | None:
        """The record for step `want` (or the end, or an error), from those that came early or the queue."""
        if want in early:
            return early.pop(want)
        deadline = time.monotonic() + self.timeout_s
        while not stop.is_set():
            try:
                item = self.queue.get(timeout=1.0)
            except Empty:
                if time.monotonic() > deadline:
                    return {"error": f"no supervision within {self.timeout_s}s", "timeout": True}
                continue
            if "error" in item:
                return item
            if item["for"] != self.incarnation:
                continue  # served to this rank's previous worker, before a restart
            if item["step"] == want:
                return item
            if item["step"] < want:
                raise RuntimeError(f"feed served step {item['step']} again while waiting for step {want}")
            early[item["step"]] = item  # a later step, while a lost one is re-run
            if len(early) > self.max_early:
                raise RuntimeError(f"feed skipped from step {want} to {min(early)}")
            deadline = time.monotonic() + self.timeout_s
        return None

    def _fetch(self, out: queue.Queue, stop: threading.Event) -> None:
        """Prefetch thread: put (item, supervision) records, then ("end",) or ("error", message)."""
        want, early = self.next_step, {}
        try:
            while not stop.is_set():
                item = self._next_item(want, early, stop)
                if item is None:
                    return
                if "error" in item:
                    exc = TimeoutError if item.get("timeout") else RuntimeError
                    prefix = "" if item.get("timeout") else "supervision feed failed: "
                    out.put(("error", prefix + item["error"], exc))
                    return
                if item.get("end"):
                    out.put(("end", item))
                    return
                try:
                    sup = Supervision.concat(ray.get(item["refs"]))
                except ObjectLostError as e:  # its node died after hand-out: the feed serves it again
                    log.warning("step %d: supervision lost before it was read (%s); asking for it again", want, e)
                    self.reruns += 1
                    self._tell("lost", want)
                    continue
                out.put(("item", item, sup))
                want += 1
        except BaseException as e:  # surfaced in the training loop, not lost in a thread
            out.put(("error", f"{type(e).__name__}: {e}", RuntimeError))

    def __iter__(self) -> Iterator[tuple[int, Supervision, dict[str, Any]]]:
        records: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        threading.Thread(target=self._fetch, args=(records, stop), name="eagle-ray-prefetch", daemon=True).start()
        try:
            while True:
                kind, *rest = records.get()
                if kind == "error":
                    message, exc = rest
                    raise exc(f"step {self.next_step}: {message}")
                item = rest[0]
                if kind == "end":
                    return
                meta = {k: item[k] for k in ("batch", "tokens", "sequences")}
                yield self.next_step, rest[1], meta
                self._tell("done", self.next_step)  # its bytes leave the pool's budget
                self.next_step += 1
        finally:
            stop.set()
            try:  # unblock a prefetch waiting to hand over a record nobody will take
                records.get_nowait()
            except queue.Empty:
                pass
