"""The pool's owner thread (`eagle_ray/pool/owner.py`): plain unit tests, no Ray (the pool's tests run it on
real refs)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from eagle_ray.pool.owner import Owner


def _owner(period_s: float = 0.05) -> tuple[Owner, list[float]]:
    ticks: list[float] = []

    def tick() -> float:
        ticks.append(time.monotonic())
        return time.monotonic() + period_s

    return Owner("test-owner", tick).start(), ticks


def test_calls_and_posts_run_on_the_owner_in_order():
    owner, _ = _owner()
    seen: list[tuple[str, int]] = []
    try:
        for i in range(50):
            owner.post(lambda i=i: seen.append((threading.current_thread().name, i)))
        assert owner.call(lambda: len(seen)) == 50  # FIFO: every post before the call has run
        assert [i for _, i in seen] == list(range(50)) and {n for n, _ in seen} == {"test-owner"}
        assert owner.call(owner.here) and not owner.here()
        assert owner.call(lambda: owner.call(lambda: 7)) == 7  # a call from the owner runs inline
    finally:
        owner.stop()


def test_a_call_raises_what_it_raised_and_a_failed_post_does_not_stop_the_owner():
    owner, _ = _owner()
    try:
        with pytest.raises(KeyError, match="nope"):
            owner.call(lambda: {}["nope"])
        with pytest.raises(TimeoutError):  # not mistaken for the wait's own timeout
            owner.call(lambda: (_ for _ in ()).throw(TimeoutError("mine")))
        owner.post(lambda: 1 / 0)
        assert owner.call(lambda: "alive") == "alive"
    finally:
        owner.stop()


def test_resolved_futures_post_their_handler_with_the_future():
    owner, _ = _owner()
    got: list = []
    try:
        fut: Future = Future()

        class Ref:  # what `on_resolve` uses of an ObjectRef
            def future(self):
                return fut

        owner.on_resolve(Ref(), lambda tag, f: got.append((tag, f.result(), owner.here())), "meta")
        fut.set_result(42)
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert got == [("meta", 42, True)]
    finally:
        owner.stop()


def test_tick_runs_when_due_without_items():
    owner, ticks = _owner(period_s=0.05)
    try:
        time.sleep(0.5)
        assert 4 <= len(ticks) <= 20, len(ticks)  # every ~50 ms, not a busy loop
    finally:
        owner.stop()


def test_after_stop_calls_fail_at_once_and_waiting_ones_hear_it():
    owner, _ = _owner()
    gate = threading.Event()
    owner.post(gate.wait)  # holds the owner while a call queues behind it
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            owner.call(lambda: None)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=caller)
    owner._q.put((None, (), None))  # a stop ahead of the caller's item
    t.start()
    time.sleep(0.2)
    gate.set()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and "shut down" in str(errors[0])
    assert owner.stopped
    with pytest.raises(RuntimeError, match="shut down"):
        owner.call(lambda: None)
