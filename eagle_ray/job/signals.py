"""Stopping the job: Ctrl-C (SIGINT) and `ray job stop` (SIGTERM) unwind it through its `finally` blocks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("eagle_ray.job")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, `kill`) stop the job through its `finally` blocks.

    The first one becomes a KeyboardInterrupt in the main thread, so the cleanup code on the way out (pool,
    Ray) runs. A second one while that cleanup runs is only logged (raising again would cut the cleanup
    short); a third exits at once. Others install handlers of their own in this process: `ray.init` one for
    SIGTERM (a bare `sys.exit(15)`), Ray Train's `fit()` one for SIGINT (it aborts the training run, then
    raises SystemExit(0), and is never removed), so `install()` is called again after each. Every signal that
    arrives is recorded through the wakeup fd whoever's handler ran, so `main` can tell an interruption from a
    failure and name the signal. Signals are the main thread's: in another thread this does nothing.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._pipe: tuple[int, int] | None = None
        self._saved: dict[int, Any] = {}
        self._saved_wakeup = -1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # the C-level handler must never block on it
        self._pipe = (r, w)
        self._saved_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is None:
            return
        for s, handler in self._saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._saved_wakeup)
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    def install(self) -> None:
        """(Re)install our handlers: after `ray.init` and after Ray Train's `fit()` replaced them."""
        if self._pipe is not None:
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)

    def signals(self) -> list[int]:
        """The stop signals received so far, in order, whichever handler ran for them."""
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                self.received += [b for b in os.read(self._pipe[0], 4096) if b in STOP_SIGNALS]
        return self.received

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        n = len(self.signals())  # includes this one: the wakeup byte is written before Python handlers run
        if n <= 1:
            log.warning("%s received: shutting down (target pool, Ray); a third %s exits at once", name, name)
            raise KeyboardInterrupt(name)
        if n == 2:
            log.warning("%s received again: still shutting down; a third one exits at once", name)
            return
        log.error("%s received a third time: exiting without finishing the shutdown", name)
        os._exit(128 + signum)
