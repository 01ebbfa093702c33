"""Replica lifecycle, on the pool's owner thread: start, ready, drain, death and hang, and what the pool keeps
per replica. A mixin of `PooledTargetModel` (`pooled.py`); `dispatch.py` is the other half of its state."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from eagle_ray.contract import ModelInfo
from eagle_ray.pool import placement as pl

log = logging.getLogger(__name__)


@dataclass
class _Replica:
    replica_id: int
    actor: Any
    pg: Any
    state: str = "starting"  # starting | ready | draining | dead
    ready_ref: Any = None
    watch_ref: Any = None  # resolves only when the actor dies (an error) or a TP rank of its own did
    started_at: float = field(default_factory=time.monotonic)
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
    solo: bool = False  # running a suspect shard alone: nothing joins it, so if it dies the blame is certain


class Lifecycle:
    """Replicas come and go here; their shards' fates are `Dispatch`'s."""

    def _start_replica(self) -> None:
        if self._starts >= self._max_starts:
            raise RuntimeError(
                f"replica start budget spent ({self._starts} starts); last errors: {self._start_errors[-3:]}"
            )
        self._starts += 1
        rid = self._next_replica_id
        self._next_replica_id += 1
        pg = pl.reserve(self.shape, name=f"eagle_ray-replica-{rid}-{id(self)}")
        actor = self._actor_cls.options(
            num_cpus=self.shape.cpus,
            num_gpus=self.shape.gpus,
            scheduling_strategy=pl.strategy(pg),
            runtime_env=self._runtime_env,
            max_restarts=0,
        ).remote(rid, self.engine_name, self.model_path, self._target_kwargs)
        r = _Replica(rid, actor, pg, ready_ref=actor.describe.remote(), watch_ref=actor.watch.remote())
        self._replicas[rid] = r
        self._owner.on_resolve(r.ready_ref, self._on_ready, r)
        self._owner.on_resolve(r.watch_ref, self._on_watch, r)
        self._changed = True

    def _reconcile(self) -> None:
        """Start or drain replicas until the live count matches the target."""
        live = [r for r in self._replicas.values() if r.state in ("starting", "ready")]
        for _ in range(self._target_replicas - len(live)):
            self._start_replica()
        surplus = len(live) - self._target_replicas
        if surplus > 0:
            # drain starting replicas first, then the least busy ready ones
            order = sorted(live, key=lambda r: (r.state != "starting", r.inflight_tokens))
            for r in order[:surplus]:
                r.state = "draining"
            self._changed = True
        for r in list(self._replicas.values()):
            if r.state == "draining" and not r.inflight:
                self._remove(r)
            elif r.state == "starting" and time.monotonic() - r.started_at > self._start_timeout_s:
                waited = f"{self._start_timeout_s}s (resources {self.shape.bundle})"
                self._start_errors.append(f"replica {r.replica_id} not ready after {waited}")
                self._remove(r)
                self._reconcile()

    def _remove(self, r: _Replica) -> None:
        if self._replicas.get(r.replica_id) is not r:
            return
        try:
            ray.kill(r.actor, no_restart=True)
        except Exception:
            pass
        pl.release(r.pg)
        r.state = "dead"
        del self._replicas[r.replica_id]
        self._changed = True

    def _on_ready(self, r: _Replica, fut: Any) -> None:
        if self._replicas.get(r.replica_id) is not r:
            return  # removed meanwhile
        try:
            r.desc = fut.result()
        except Exception as e:  # failed to build its engine, or died starting
            self._start_errors.append(f"replica {r.replica_id}: {e}")
            log.error("replica %d failed to start: %s", r.replica_id, e)
            self._remove(r)
            self._reconcile()
            return
        finally:
            r.ready_ref = None
        info = r.desc["info"]
        # capacity may differ per replica (SGLang sizes its KV pool from free memory): the model may not
        if self._info is not None and _identity(info) != _identity(self._info):
            self._start_errors.append(f"replica {r.replica_id} serves {info}, the pool {self._info}")
            log.error("%s", self._start_errors[-1])
            self._remove(r)
            return
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
        deadline = time.monotonic() + timeout_s
        while starting := self._owner.call(lambda: sum(r.ready_ref is not None for r in self._replicas.values())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{starting} replicas not ready after {timeout_s}s (resources: {self.shape})")
            time.sleep(0.05)
        if self._target_replicas and not self._owner.call(self._ready):
            raise RuntimeError(f"no replica started: {self._start_errors}")

    def _ready(self) -> list[_Replica]:
        return [r for r in self._replicas.values() if r.state == "ready"]

    def _on_watch(self, r: _Replica, fut: Any) -> None:
        """A replica's watch resolves only when it dies (an error) or one of its TP rank processes did (its value
        says which): either way it can never run a shard again, so it is retired and replaced now, whether or not
        a shard would have found out (an idle replica's rank death otherwise stays unseen in the membership)."""
        if self._replicas.get(r.replica_id) is r:
            err = fut.exception()  # logged as "replica N lost: <err>"
            self._on_replica_death(r, err or RuntimeError(fut.result() or "its watch returned"))

    def _on_replica_death(self, r: _Replica, err: BaseException) -> None:
        """Replace a dead replica; deliver what it finished, re-queue the rest of its shards."""
        lost_refs = [ref for ref in r.inflight if ref in self._inflight]
        if self._replicas.get(r.replica_id) is not r and not lost_refs:
            return  # handled already (its watch and a shard both reported the death)
        log.warning("replica %d lost: %s", r.replica_id, err)
        finished = set(ray.wait(lost_refs, num_returns=len(lost_refs), timeout=0)[0]) if lost_refs else set()
        blamed = False
        for ref in lost_refs:
            shard, _, attempt, payload = self._inflight[ref]
            self._settle(ref, shard, r)
            if ref in finished:
                try:
                    meta = ray.get(ref)
                except Exception:
                    pass
                else:  # done before the death, only not yet collected: deliver it
                    self._delivered(shard, attempt, payload, r, meta)
                    continue
            if not blamed:  # an actor runs its tasks in order: the first unfinished one was running (or its reply
                # was lost with the process: a suspect re-runs alone, see `_pick`)
                blamed = True
                self._failed(shard, attempt, f"replica {r.replica_id} died running it: {type(err).__name__}")
            elif self._ledger.requeue(shard.shard_id, attempt):
                self._retry.append(shard)
        if r.state in ("starting", "ready"):
            self._replaced += 1
        self._remove(r)
        self._reconcile()

    def shard_deadline_s(self, r: _Replica, num_tokens: int, new_tokens: int = 0) -> float:
        """How long a shard may run on `r` before the replica counts as hung: `shard_timeout_factor` times
        what its measured rate predicts, at least `shard_timeout_s`; 10x that floor until it finished one
        (a first forward may compile, warm caches, or load lazily). `new_tokens`: a generation shard's most
        new tokens, at the replica's decoding rate."""
        if new_tokens:
            if r.gen_s <= 0 or r.gen_tokens <= 0:
                return 10 * self._shard_timeout_s
            return max(self._shard_timeout_s, self._shard_timeout_factor * new_tokens * r.gen_s / r.gen_tokens)
        if r.busy_s <= 0 or r.tokens_done <= 0:
            return 10 * self._shard_timeout_s
        return max(self._shard_timeout_s, self._shard_timeout_factor * num_tokens * r.busy_s / r.tokens_done)

    def _retire_hung(self) -> None:
        """A replica whose running shard is past its deadline (a wedged GPU, a TP rank stuck in a collective,
        a stopped process) never answers and never dies: retire it (its TP ranks die with it), re-run its shards."""
        now = time.monotonic()
        for r in list(self._replicas.values()):
            if r.state not in ("ready", "draining") or not r.inflight or r.head_since is None:
                continue
            shard = self._inflight[r.inflight[0]][0]
            new = shard.batch.num_sequences * shard.gen.max_new_tokens if shard.gen is not None else 0
            deadline = self.shard_deadline_s(r, shard.batch.num_tokens, new)
            if now - r.head_since > deadline:
                self._probe_hung(r, deadline, now)  # overdue by this process's clock: the replica's own decides


def _identity(info: ModelInfo) -> ModelInfo:
    return replace(info, kv_capacity_tokens=0, max_context=0)
