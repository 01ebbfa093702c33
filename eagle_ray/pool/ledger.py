"""Exactly-once bookkeeping for shards: every shard is delivered once, or quarantined once.

Pure Python. The pool records each dispatch (an attempt), each completion and each failure;
the ledger decides whether a completion is the one to deliver and whether a failed shard
is retried or quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShardRecord:
    shard_id: int
    attempt: int = 0  # dispatches so far; the live one is `attempt`
    running: bool = False
    failures: list[str] = field(default_factory=list)
    state: str = "pending"  # pending | running | delivered | quarantined | abandoned


@dataclass
class ShardLedger:
    max_failures: int = 3
    records: dict[int, ShardRecord] = field(default_factory=dict)

    def add(self, shard_id: int) -> None:
        if shard_id in self.records:
            raise ValueError(f"shard {shard_id} already in the ledger")
        self.records[shard_id] = ShardRecord(shard_id)

    def dispatch(self, shard_id: int) -> int:
        """Record a new attempt; returns its number."""
        rec = self.records[shard_id]
        if rec.state in ("delivered", "quarantined") or rec.running:
            raise RuntimeError(f"shard {shard_id} cannot be dispatched in state {rec.state}")
        rec.attempt += 1
        rec.running, rec.state = True, "running"
        return rec.attempt

    def _live(self, shard_id: int, attempt: int) -> ShardRecord | None:
        """The shard's record if `attempt` is its running attempt, else None (stale or settled)."""
        rec = self.records[shard_id]
        return rec if rec.state == "running" and attempt == rec.attempt else None

    def complete(self, shard_id: int, attempt: int) -> bool:
        """True exactly once per shard: for the live attempt's first completion."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return False
        rec.running, rec.state = False, "delivered"
        return True

    def fail(self, shard_id: int, attempt: int, reason: str) -> str:
        """Record a failed attempt: returns "retry", "quarantine" or "stale" (an old attempt)."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return "stale"
        rec.running = False
        rec.failures.append(reason)
        if len(rec.failures) >= self.max_failures:
            rec.state = "quarantined"
            return "quarantine"
        rec.state = "pending"
        return "retry"

    def error(self, shard_id: int) -> str:
        """Why a quarantined shard was given up on: the pool logs it and puts it in the shard's result."""
        rec = self.records[shard_id]
        lines = "\n".join(f"  attempt {i + 1}: {r}" for i, r in enumerate(rec.failures))
        return f"shard {shard_id} quarantined after {len(rec.failures)} failed attempts:\n{lines}"

    def requeue(self, shard_id: int, attempt: int) -> bool:
        """The attempt was lost through no fault of the shard (queued behind one that crashed)."""
        rec = self._live(shard_id, attempt)
        if rec is None:
            return False
        rec.running, rec.state = False, "pending"
        return True

    def abandon(self, shard_id: int) -> None:
        """The consumer no longer wants this shard: any later completion is stale."""
        rec = self.records[shard_id]
        if rec.state in ("pending", "running"):
            rec.running, rec.state = False, "abandoned"

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.records.values())
