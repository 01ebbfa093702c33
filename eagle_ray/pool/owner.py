"""One thread owns a pool's state; every other thread asks it.

Callers post work to the owner (`post`: run it soon; `call`: run it and wait for the result), and Ray posts
each awaited object ref as it resolves (`on_resolve`, through `ObjectRef.future()`). The owner blocks on that
one queue, runs each item in turn, and between items does its periodic work (`tick`). Nothing else touches the
state, so no lock guards it, and a completion costs O(1): no `ray.wait` over every ref in flight per poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

log = logging.getLogger(__name__)


class Owner:
    """The owning thread. `tick()` runs after each batch of items and returns when (`time.monotonic()`) it
    wants to run next at the latest."""

    def __init__(self, name: str, tick: Callable[[], float]):
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # reentrant: finalizers post from inside any thread
        self._tick = tick
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Owner:
        self._thread.start()
        return self

    def here(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the owner, soon; an error is logged (nobody waits for it)."""
        self._q.put((fn, args, None))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the owner and return what it returns (or raise what it raised)."""
        if self.here():
            return fn(*args)
        if self.stopped:
            raise RuntimeError("the pool is shut down")
        fut: Future = Future()
        self._q.put((fn, args, fut))
        while not wait([fut], timeout=1.0).done:
            if self.stopped and not fut.done():  # it ended without reaching this item
                raise RuntimeError("the pool is shut down")
        return fut.result()

    def on_resolve(self, ref: Any, fn: Callable[..., Any], *args: Any) -> None:
        """Once `ref` resolves, run `fn(*args, future)` on the owner: `future.result()` is its value, or raises
        its error (a task's, an actor's death)."""
        ref.future().add_done_callback(lambda f: self._q.put((fn, (*args, f), None)))

    def stop(self, timeout_s: float = 10.0) -> None:
        self._q.put((None, (), None))
        if not self.here():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        wake = 0.0
        try:
            while True:
                try:
                    item = self._q.get(timeout=max(0.0, wake - time.monotonic()))
                except queue.Empty:
                    item = None
                while item is not None:
                    fn, args, fut = item
                    if fn is None:
                        return
                    _run_one(fn, args, fut)
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        item = None
                try:
                    wake = self._tick()
                except Exception:
                    log.exception("pool owner: periodic work failed")
                    wake = time.monotonic() + 0.5
        finally:
            self.stopped = True
            while True:  # whoever still waits hears it
                try:
                    fut = self._q.get_nowait()[2]
                except queue.Empty:
                    break
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError("the pool is shut down"))


def _run_one(fn: Callable[..., Any], args: tuple, fut: Future | None) -> None:
    try:
        result = fn(*args)
    except Exception as e:
        if fut is None:
            log.exception("pool owner: %s failed", getattr(fn, "__qualname__", fn))
        else:
            fut.set_exception(e)
    else:
        if fut is not None:
            fut.set_result(result)
