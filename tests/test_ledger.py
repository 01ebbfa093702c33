"""The shard ledger: exactly-once delivery and quarantine, as pure bookkeeping."""

from __future__ import annotations

import pytest

from eagle_ray.pool.ledger import ShardLedger


def test_delivers_once_and_ignores_stale_attempts():
    led = ShardLedger(max_failures=3)
    led.add(7)
    a1 = led.dispatch(7)
    assert led.fail(7, a1, "replica 0 died") == "retry"
    a2 = led.dispatch(7)
    assert led.complete(7, a1) is False  # a late answer from the first attempt
    assert led.complete(7, a2) is True
    assert led.complete(7, a2) is False  # never twice
    assert led.fail(7, a2, "late") == "stale"
    with pytest.raises(RuntimeError):
        led.dispatch(7)
    assert led.count("delivered") == 1


def test_quarantine_after_max_failures_names_the_shard():
    led = ShardLedger(max_failures=2)
    led.add(3)
    assert led.fail(3, led.dispatch(3), "replica 0 died running it") == "retry"
    assert led.fail(3, led.dispatch(3), "replica 1 died running it") == "quarantine"
    err = led.error(3)
    assert "shard 3 quarantined after 2 failed attempts" in str(err) and "replica 1 died" in str(err)
    assert led.count("quarantined") == 1
    with pytest.raises(RuntimeError):
        led.dispatch(3)


def test_requeue_does_not_count_as_failure_and_abandon_blocks_delivery():
    led = ShardLedger(max_failures=1)
    led.add(1)
    a = led.dispatch(1)
    assert led.requeue(1, a) is True  # queued behind a crashing shard: not its fault
    assert led.records[1].failures == [] and led.records[1].state == "pending"
    b = led.dispatch(1)
    led.abandon(1)
    assert led.complete(1, b) is False and led.count("abandoned") == 1
    with pytest.raises(ValueError):
        led.add(1)


def test_the_ledger_holds_only_what_is_in_flight():
    """A long run settles a million shards: the ledger keeps records for the live ones only."""
    led = ShardLedger(max_failures=2)
    live = []
    for sid in range(1_000_000):
        led.add(sid)
        live.append((sid, led.dispatch(sid)))
        if len(live) > 8:  # eight in flight, as a busy pool keeps them
            done, attempt = live.pop(0)
            assert led.complete(done, attempt)
            assert led.complete(done, attempt) is False  # a late duplicate of a dropped record: stale
    assert len(led.records) == 8 and led.count("delivered") == 1_000_000 - 8 and led.count("running") == 8
    assert led.fail(3, 1, "late") == "stale"
    with pytest.raises(RuntimeError, match="settled"):
        led.dispatch(3)
