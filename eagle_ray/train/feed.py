"""Feed supervision refs from the driver's pool to each Ray Train worker, step by step.

The driver thread (`SupervisionFeed`) streams the pool in batch order; global batch
`step * world + rank` goes to rank `rank` as its batch for `step`, through that rank's bounded
queue (a `ray.util.queue.Queue` actor: the bound is the backpressure). Items carry object refs
only; workers `ray.get` them zero-copy.

Restarts: a worker announces the step it starts from (0, or its checkpoint's) on the control
queue. When all ranks of a (re)started group have announced, the feed rewinds the data to that
step, so batches consumed after the last checkpoint are served again and none is skipped.
Every item names the worker incarnation it was served to; a restarted worker drops what is left
in its queue for its predecessor.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.queue import Empty, Full, Queue

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
        self.stall_timeout_s = stall_timeout_s
        opts = {"num_cpus": 0}
        self.handles = FeedHandles(
            [Queue(queue_depth, actor_options=opts) for _ in range(world_size)], Queue(0, actor_options=opts)
        )
        self.error: BaseException | None = None
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "restarts": 0, "wait_s": 0.0}
        self._served: set[str] = set()  # incarnations of the worker group being served
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eagle-ray-feed", daemon=True)

    def start(self) -> SupervisionFeed:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
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

    def _control(self, starts: dict[int, tuple[int, str]], timeout: float | None) -> bool:
        """Read start announcements (waiting up to `timeout` for the first); True if a new worker announced."""
        new = False
        while True:
            try:
                _, rank, step, incarnation = (
                    self.handles.control.get(timeout=timeout) if timeout else self.handles.control.get_nowait()
                )
            except Empty:
                return new
            timeout = None
            starts[rank] = (step, incarnation)
            new = new or incarnation not in self._served

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
                item = {
                    "step": g // self.world,
                    "batch": g,
                    "refs": [r.ref for r in got],
                    "tokens": sum(r.num_tokens for r in got),
                    "sequences": sizes.pop(res.batch_index),
                }
                if self._put(g % self.world, item, starts):
                    return True
                self.stats["batches"] += 1
                self.stats["sequences"] += item["sequences"]
                self.stats["tokens"] += item["tokens"]
        finally:
            stream.close()
        for rank in range(self.world):
            if self._put(rank, {"step": self.max_steps, "end": True}, starts):
                return True
        # stay for restarts: a group may fail after the last batch, before its last checkpoint
        while not self._stop.is_set():
            if self._control(starts, timeout=0.5):
                return True
        return False

    def _put(self, rank: int, item: dict[str, Any], starts: dict[int, tuple[int, str]]) -> bool:
        """Blocking put that gives way to a restart (returns True then) or to `close()`."""
        item = {**item, "for": self._serving[rank]}  # the worker incarnation it is meant for
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.handles.data[rank].put(item, timeout=0.5)
                self.stats["wait_s"] += time.monotonic() - t0
                return False
            except Full:
                pass
            if self._control(starts, timeout=None):
                return True
        raise _Stopped


# -------------------------------------------------------------------------------- worker side


class FeedReader:
    """A worker's view: announce the start step, then one supervision record per step.

    A thread fetches the next record (queue actor round trip, `ray.get` of its refs) while the
    worker trains on the current one, so a step waits only when supply is really behind.
    """

    def __init__(self, handles: FeedHandles, rank: int, start_step: int, timeout_s: float = 600.0):
        import uuid

        self.queue, self.next_step, self.timeout_s = handles.data[rank], start_step, timeout_s
        self.incarnation = uuid.uuid4().hex
        handles.control.put(("start", rank, start_step, self.incarnation))

    def _fetch(self, out: queue.Queue, stop: threading.Event) -> None:
        """Prefetch thread: put (item, supervision) records, then ("end",) or ("error", message)."""
        try:
            while not stop.is_set():
                deadline = time.monotonic() + self.timeout_s
                while True:
                    try:
                        item = self.queue.get(timeout=1.0)
                        break
                    except Empty:
                        if stop.is_set():
                            return
                        if time.monotonic() > deadline:
                            out.put(("error", f"no supervision within {self.timeout_s}s", TimeoutError))
                            return
                if "error" in item:
                    out.put(("error", f"supervision feed failed: {item['error']}", RuntimeError))
                    return
                if item["for"] != self.incarnation:
                    continue  # served to this rank's previous worker, before a restart
                if item.get("end"):
                    out.put(("end", item))
                    return
                out.put(("item", item, Supervision.concat(ray.get(item["refs"]))))
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
                if item["step"] > self.next_step and not item.get("end"):
                    raise RuntimeError(f"feed skipped from step {self.next_step} to {item['step']}")
                if kind == "end":
                    return
                meta = {k: item[k] for k in ("batch", "tokens", "sequences")}
                yield self.next_step, rest[1], meta
                self.next_step += 1
        finally:
            stop.set()
            try:  # unblock a prefetch waiting to hand over a record nobody will take
                records.get_nowait()
            except queue.Empty:
                pass
