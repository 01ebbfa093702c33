"""Replica lifecycle, on the pool's owner thread: start, ready, drain and replacement, and what a pool keeps per
replica. The replica set of a `PooledTargetModel` (`pooled.py`); a shared pool's client hears its host's instead
(`shared.py`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.util import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from eagle_ray.contract import ModelInfo
from eagle_ray.pool import placement as pl
from eagle_ray.pool.markers import forget_marker

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 60.0)  # a failed start's wait before the next try on its node: the first, and the most
GIVE_UP_ROUNDS = 3  # start-up fails early once every node that fits a replica failed this many rounds, none ready
# a shared pool's draining replica is stopped once the clients' board, heard this long after the drain began (their
# view of it, their last shards on it and their load reports take that), shows none of theirs on it; or at the latest
# after DRAIN_WAIT_S (a client that went quiet counts for nothing on the board after 5 s anyway)
BOARD_LAG_S, DRAIN_WAIT_S = 1.5, 120.0


@dataclass
class _Backoff:
    """Failed starts on one node (or, key None, failures no node is known for: the pool's): no start there before
    `until`, a wait that doubles with each round of failures. A round is the starts launched before its first
    failure: replicas that fail together (a node's 8 GPUs at once) double it once, not 8 times."""

    rounds: int = 0
    failed_at: float = -math.inf
    until: float = 0.0

    def failed(self, launched_at: float, now: float) -> None:
        if launched_at > self.failed_at:
            self.rounds += 1
        self.failed_at = now
        self.until = now + min(BACKOFF_S[0] * 2 ** (self.rounds - 1), BACKOFF_S[1])


@dataclass
class _Replica:
    replica_id: int
    actor: Any  # None until launched: a start after a failure waits for its backoff
    pg: Any
    state: str = "starting"  # starting | ready | draining | dead
    drain_since: float | None = None
    ready_ref: Any = None
    watch_ref: Any = None  # resolves only when the actor dies (an error) or a TP rank of its own did
    started_at: float = field(default_factory=time.monotonic)  # launched (actor created) at
    avoid_until: float | None = None  # its group was kept off nodes that failed starts until then (see `_replace`)
    task_errors: int = 0  # consecutive failed shards
    desc: dict[str, Any] | None = None
    inflight: list = field(default_factory=list)  # meta refs, in dispatch (= execution) order
    inflight_tokens: int = 0
    head_since: float | None = None  # when the shard at the head of `inflight` started running (about)
    probe: float | None = None  # when it was asked what it runs (`Dispatch._probe_hung`), unanswered yet
    busy_s: float = 0.0  # seconds its shards took, as the replica measured them: its rate is tokens_done / busy_s
    tokens_done: int = 0
    gen_s: float = 0.0  # the same for generation shards, per new token: decoding runs at a rate of its own
    gen_tokens: int = 0
    shards_done: int = 0
    dispatches: int = 0  # shards sent to it (by this pool or client)
    others_tokens: int = 0  # a shared pool's other clients' tokens in flight on it, as last heard (`shared.py`)
    failures: int = 0


class Lifecycle:
    """Replicas come and go here; their shards' fates are `Dispatch`'s."""

    def _start_replica(self) -> None:
        """A new replica, launched now or, while starts back off after failures, once the wait is over."""
        rid = self._next_replica_id
        self._next_replica_id += 1
        self._replicas[rid] = r = _Replica(rid, None, None)
        self._launch(r)
        self._changed = True

    def _launch(self, r: _Replica) -> None:
        """Create the replica's placement group and actor, off the nodes whose failed starts still back off."""
        now = time.monotonic()
        if r.actor is not None or now < self._backoff.get(None, _Backoff()).until:
            return
        avoid = {n: b.until for n, b in self._backoff.items() if n is not None and b.until > now}
        r.pg = pl.reserve(self.shape, name=f"eagle_ray-replica-{r.replica_id}-{id(self)}", avoid_nodes=list(avoid))
        r.actor = self._actor_cls.options(
            num_cpus=self.shape.cpus,
            num_gpus=self.shape.gpus,
            scheduling_strategy=pl.strategy(r.pg),
            runtime_env=self._runtime_env,
            max_restarts=0,
        ).remote(r.replica_id, self.engine_name, self.model_path, self._target_kwargs)
        r.started_at, r.avoid_until = now, min(avoid.values(), default=None)
        r.ready_ref, r.watch_ref = r.actor.describe.remote(), r.actor.watch.remote()
        self._owner.on_resolve(r.ready_ref, self._on_ready, r)
        self._owner.on_resolve(r.watch_ref, self._on_watch, r)

    def _reconcile(self) -> None:
        """Start or drain replicas until the live count matches the target."""
        live = [r for r in self._replicas.values() if r.state in ("starting", "ready")]
        for _ in range(self._target_replicas - len(live)):
            self._start_replica()
        surplus = len(live) - self._target_replicas
        now = time.monotonic()
        if surplus > 0:
            # drain starting replicas first, then the least busy ready ones
            order = sorted(live, key=lambda r: (r.state != "starting", r.inflight_tokens + r.others_tokens))
            for r in order[:surplus]:
                r.state, r.drain_since = "draining", now
            self._changed = True
        self._forget_markers(now)
        for r in list(self._replicas.values()):
            if r.state == "draining" and not r.inflight and self._clients_done(r, now):
                self._remove(r)
            elif r.state != "starting":
                continue
            elif r.actor is None:
                self._launch(r)
            elif now - r.started_at > self._start_timeout_s:
                waited = f"{self._start_timeout_s}s (resources {self.shape.bundle})"
                self._start_failed(r, f"replica {r.replica_id} not ready after {waited}")
            elif r.avoid_until is not None and now >= r.avoid_until:
                self._replace(r)

    def _clients_done(self, r: _Replica, now: float) -> bool:
        """No shard of a shared pool's clients is left on the draining `r` either, as far as the board says."""
        if self._board_at is None or r.desc is None:  # not shared, or never ready: nobody else sent it anything
            return True
        if now - r.drain_since > DRAIN_WAIT_S:
            return True
        return r.others_tokens == 0 and self._board_at > r.drain_since + BOARD_LAG_S

    def _replace(self, r: _Replica) -> None:
        """The nodes its group was kept off may be tried again: a group still waiting for room elsewhere starts
        over, free to take them (else it would wait for room it may never get, with the nodes it shuns idle)."""
        r.avoid_until = None
        if placement_group_table(r.pg).get("state") == "PENDING":
            self._remove(r)
            self._reconcile()

    def _start_failed(self, r: _Replica, why: str) -> None:
        """Count a failed start against its node (None: never placed) and replace it once its backoff allows."""
        node = pl.node_of(r.pg) if r.pg is not None else None
        self._start_errors.append(f"{why} (node {node})")
        del self._start_errors[:-20]  # the latest say why; a node that keeps failing adds one per backoff
        log.error("%s", self._start_errors[-1])
        now = time.monotonic()
        self._backoff.setdefault(node, _Backoff()).failed(r.started_at, now)
        self._remove(r)
        self._reconcile()

    def _remove(self, r: _Replica) -> None:
        if self._replicas.get(r.replica_id) is not r:
            return
        if r.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(r.actor, no_restart=True)
            pl.release(r.pg)
        r.state = "dead"
        del self._replicas[r.replica_id]
        self._changed = True
        if r.desc is not None:  # its marker outlives it, for the clients that read it after a death: for a while
            keep = max(60.0, 3 * self._shard_timeout_s)  # past any client's verdict timeout (`Dispatch._awaiting`)
            self._markers.append((time.monotonic() + keep, r.desc["node_id"], r.desc["marker"]))

    def _forget_markers(self, now: float = math.inf) -> list:
        """Delete the marker files kept past their replicas' deaths, once no client may read them any more."""
        due = [m for m in self._markers if m[0] <= now]
        self._markers = [m for m in self._markers if m[0] > now]
        return [
            forget_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(path)
            for _, node, path in due
        ]

    def _stop_replicas(self, timeout_s: float = 30.0) -> None:
        """Shut every replica down at once (its engine's close, then its actor and group), each given `timeout_s`
        together: a hung one holds up the others for that long, not a timeout of its own each."""
        self._target_replicas = 0
        for st in list(self._streams.values()):
            self._fail(st, RuntimeError("the pool was shut down"))
        # one still building its engine would answer only after that: it is killed as it is
        refs = [r.actor.shutdown.remote() for r in self._replicas.values() if r.desc is not None]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for r in list(self._replicas.values()):
            self._remove(r)
        if gone := self._forget_markers():
            ray.wait(gone, num_returns=len(gone), timeout=5.0)  # a lost node's files go with it

    def _on_ready(self, r: _Replica, fut: Any) -> None:
        if self._replicas.get(r.replica_id) is not r:
            return  # removed meanwhile
        try:
            r.desc = fut.result()
        except Exception as e:  # failed to build its engine, or died starting
            self._start_failed(r, f"replica {r.replica_id} failed to start: {e}")
            return
        finally:
            r.ready_ref = None
        info = r.desc["info"]
        # capacity may differ per replica (SGLang sizes its KV pool from free memory): the model may not
        if self._info is not None and _identity(info) != _identity(self._info):
            self._start_failed(r, f"replica {r.replica_id} serves {info}, the pool {self._info}")
            return
        self._backoff.pop(r.desc["node_id"], None)  # the node starts replicas again
        self._backoff.pop(None, None)
        if r.state == "starting":
            r.state = "ready"
            self._changed = True
        ready = [x.desc["info"] for x in self._ready()] or [info]
        self._info = replace(
            info,
            kv_capacity_tokens=min(i.kv_capacity_tokens for i in ready),
            max_context=min(i.max_context for i in ready),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        """Until `min_replicas` are ready: the rest join as they come. Fewer after `timeout_s`, or none while every
        node that fits a replica has failed `GIVE_UP_ROUNDS` rounds of starts (a bad model path, say): fail, with
        the start errors."""
        need = min(self._min_replicas, self._target_replicas)
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        while (ready := self._owner.call(lambda: len(self._ready()))) < need:
            now, hopeless = time.monotonic(), False
            if not ready and now >= next_check:  # once a second: it asks the GCS for the nodes
                next_check = now + 1.0
                hopeless = self._owner.call(self._hopeless, pl.fits(self.shape))
            if hopeless or now > deadline:
                why = "every node that fits one failed to start it" if hopeless else f"after {timeout_s}s"
                errors = self._owner.call(lambda: self._start_errors[-5:])
                raise RuntimeError(
                    f"{ready} of min_replicas={need} replicas ready: {why} (resources {self.shape.bundle}); "
                    f"last start errors: {errors}"
                )
            time.sleep(0.05)

    def _hopeless(self, nodes: list[str]) -> bool:
        return bool(nodes) and all(self._backoff.get(n, _Backoff()).rounds >= GIVE_UP_ROUNDS for n in nodes)

    def _on_watch(self, r: _Replica, fut: Any) -> None:
        """A replica's watch resolves only when it dies (an error) or one of its TP rank processes did (its value
        says which): either way it can never run a shard again, so it is retired and replaced now, whether or not
        a shard would have found out (an idle replica's rank death otherwise stays unseen in the membership)."""
        if self._replicas.get(r.replica_id) is r:
            err = fut.exception()  # logged as "replica N lost: <err>"
            err = err or RuntimeError(fut.result() or "its watch returned")
            if r.state == "starting":  # a failed start (its describe fails too: whichever is heard first counts)
                self._start_failed(r, f"replica {r.replica_id} failed to start: {err}")
            else:
                self._on_replica_death(r, err)

    def _lost(self, r: _Replica, err: BaseException) -> None:
        """`r` died (its shards are `Dispatch._on_replica_death`'s): replace it."""
        self._remove(r)
        self._reconcile()


def _identity(info: ModelInfo) -> ModelInfo:
    return replace(info, kv_capacity_tokens=0, max_context=0)
