"""Exactly-once bookkeeping for shards: every shard is delivered once, or quarantined once.

Pure Python. The pool records each dispatch (an attempt), each completion and each failure;
the ledger decides whether a completion is the one to deliver and whether a failed shard
is retried or quarantined.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ShardRecord:
    shard_id: int
    attempt: int = 0  # dispatches so far; the live one is `attempt`
    running: bool = False
    failures: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)  # replicas that died running it (the first is not yet blamed)
    state: str = "pending"  # pending | running | delivered | quarantined | abandoned


@dataclass
class ShardLedger:
    """Only shards not yet settled hold a record: a delivered, quarantined or abandoned shard is counted
    and dropped, so the ledger's size is what is in flight, not the run's length. The pool hands out ids
    in increasing order, so an id at or below the highest one added that has no record is settled, and
    any answer for it is stale."""

    max_failures: int = 3
    records: dict[int, ShardRecord] = field(default_factory=dict)  # live shards only
    settled: Counter = field(default_factory=Counter)  # delivered / quarantined / abandoned
    errors: dict[int, str] = field(default_factory=dict)  # why each quarantined shard was given up on
    highest: int = -1

    def add(self, shard_id: int) -> None:
        if shard_id <= self.highest:
            raise ValueError(f"shard {shard_id} already in the ledger (ids increase; the highest is {self.highest})")
        self.highest = shard_id
        self.records[shard_id] = ShardRecord(shard_id)

    def dispatch(self, shard_id: int) -> int:
        """Record a new attempt; returns its number."""
        rec = self.records.get(shard_id)
        if rec is None or rec.running:
            state = "settled" if rec is None else rec.state
            raise RuntimeError(f"shard {shard_id} cannot be dispatched in state {state}")
        rec.attempt += 1
        rec.running, rec.state = True, "running"
        return rec.attempt

    def _live(self, shard_id: int, attempt: int) -> ShardRecord | None:
        """The shard's record if `attempt` is its running attempt, else None (stale or settled)."""
        rec = self.records.get(shard_id)
        return rec if rec is not None and rec.state == "running" and attempt == rec.attempt else None

    def _settle(self, rec: ShardRecord, state: str) -> None:
        del self.records[rec.shard_id]
        self.settled[state] += 1

    def complete(self, shard_id: int, attempt: int) -> bool:
        """True exactly once per shard: for the live attempt's first completion."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return False
        self._settle(rec, "delivered")
        return True

    def fail(self, shard_id: int, attempt: int, reason: str) -> str:
        """Record a failed attempt: returns "retry", "quarantine" or "stale" (an old attempt)."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return "stale"
        rec.running = False
        rec.failures.append(reason)
        if len(rec.failures) >= self.max_failures:
            lines = "\n".join(f"  attempt {i + 1}: {r}" for i, r in enumerate(rec.failures))
            self.errors[shard_id] = f"shard {shard_id} quarantined after {len(rec.failures)} failed attempts:\n{lines}"
            self._settle(rec, "quarantined")
            return "quarantine"
        rec.state = "pending"
        return "retry"

    def died(self, shard_id: int, attempt: int, reason: str) -> str:
        """Its replica died running it (the replica's own marker says so, not a guess): "suspect" the first time
        (re-queued, not counted: a lost node, the OOM killer or an operator takes whatever runs), "blame" once it
        killed another replica too (then both deaths count: the caller `fail`s it for this one), "stale" for an
        old attempt."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return "stale"
        rec.deaths.append(reason)
        if len(rec.deaths) == 1:
            rec.running, rec.state = False, "pending"
            return "suspect"
        if len(rec.deaths) == 2:
            rec.failures.append(rec.deaths[0])
        return "blame"

    def error(self, shard_id: int) -> str:
        """Why a quarantined shard was given up on: the pool logs it and puts it in the shard's result."""
        return self.errors[shard_id]

    def requeue(self, shard_id: int, attempt: int) -> bool:
        """The attempt was lost through no fault of the shard (queued behind one that crashed)."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return False
        rec.running, rec.state = False, "pending"
        return True

    def abandon(self, shard_id: int) -> None:
        """The consumer no longer wants this shard: any later completion is stale."""
        rec = self.records.get(shard_id)
        if rec is not None:
            self._settle(rec, "abandoned")

    def count(self, state: str) -> int:
        """Shards in `state`: O(1) for the settled states, O(in flight) for pending and running."""
        if state in ("delivered", "quarantined", "abandoned"):
            return self.settled[state]
        return sum(r.state == state for r in self.records.values())
