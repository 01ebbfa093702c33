"""Dispatch and ledger, on the pool's owner thread: shards, placement, the byte budget, completions, a replica's
death and hang as its shards see them, and the owner's side of each running stream. The half of a `Pool`
(`surface.py`) that is the same whoever keeps the replicas: `lifecycle.py` for a pool's own, `shared.py` for a
client's."""

from __future__ import annotations

import logging
import queue
import random
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from eagle_ray.contract import ModelInfo, PackedBatch, plan_runs
from eagle_ray.generation import GenerationParams
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.lifecycle import _Replica
from eagle_ray.pool.markers import running_at_death
from eagle_ray.pool.owner import Owner

log = logging.getLogger(__name__)

_DEAD = (ActorDiedError, ActorUnavailableError, RayActorError)
_MORE = "more"  # the owner to a stream's caller: hand over the next batch


@dataclass
class ShardResult:
    """One shard's supervision, in the object store. Hold it while you use `ref`: the pool
    counts its bytes against `max_inflight_bytes` until this object is released."""

    shard_id: int
    batch_index: int  # which batch of the stream (0 for submit)
    sequences: tuple[int, int]  # [start, stop) sequence indices within that batch
    num_tokens: int
    ref: ray.ObjectRef | None  # -> Supervision; None when quarantined
    replica_id: int | None = None
    error: str | None = None  # set when the shard was quarantined


@dataclass
class _Shard:
    shard_id: int
    stream_id: int  # whose outbox its result goes to
    batch_index: int
    sequences: tuple[int, int]
    batch: PackedBatch
    logits: bool
    nbytes: int
    gen: GenerationParams | None = None  # a generation request (token ids back), not a forward


@dataclass
class _Stream:
    """A running stream (or submit) as the owner keeps it. Its caller's thread only reads `inbox`."""

    logits: bool
    node_id: str | None
    count_held: bool
    gen: GenerationParams | None
    ahead: int | None
    stall_timeout_s: float
    stream_id: int = -1
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # _MORE, ShardResults, an error to raise
    pending: deque[_Shard] = field(default_factory=deque)  # shards not yet dispatched
    unsettled: set[int] = field(default_factory=set)  # its shards neither delivered nor quarantined
    out: int = 0  # shards dispatched (or settled) and not yet yielded: what `ahead` bounds
    partial: bool = False  # the consumer holds part of a batch: the budget lets a shard through for the rest
    asked: bool = False  # a _MORE is out, unanswered
    last_progress: float = field(default_factory=time.monotonic)


@dataclass
class _Lost:
    """Shards lost with a dead replica, until its marker file says which of them it was running."""

    since: float
    shards: list[tuple[_Shard, int]]  # (shard, attempt)
    why: str  # what the ledger records against the one it was running

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard, _ in self.shards)


class Dispatch:
    """Each shard goes to a replica once the budget allows, and comes back once: delivered or quarantined."""

    def _init_dispatch(
        self,
        max_inflight_bytes: int | None,
        shard_tokens: int | None,
        max_shard_failures: int,
        max_inflight_per_replica: int,
        shard_timeout_s: float,
        shard_timeout_factor: float,
    ) -> None:
        """The dispatch state, the same for a pool and its clients (`eagle_ray.pool.shared`). Only the owner
        thread (`_start_owner`) touches what changes."""
        if shard_timeout_s <= 0 or shard_timeout_factor < 1:
            raise ValueError(
                f"shard_timeout_s must be > 0 and shard_timeout_factor >= 1, got {shard_timeout_s}, "
                f"{shard_timeout_factor}"
            )
        if max_inflight_per_replica < 1:
            raise ValueError(f"max_inflight_per_replica must be >= 1, got {max_inflight_per_replica}")
        self._owner: Owner | None = None
        self._replicas: dict[int, _Replica] = {}
        self._ledger = ShardLedger(max_failures=max_shard_failures)
        self._next_shard_id = 0
        self._key = uuid.uuid4().hex  # this pool or client: in each shard's tag (`_tag`), on a shared pool's board
        # meta ref -> (shard, replica, attempt, payload)
        self._inflight: dict[Any, tuple[_Shard, _Replica, int, Any]] = {}
        self._retry: deque[_Shard] = deque()
        self._awaiting: dict[int, _Lost] = {}  # by a key of their own, until the verdict (`_on_replica_death`)
        self._next_verdict = 0
        self._inflight_bytes = 0  # dispatched (or lost and awaiting the verdict), not yet handed out
        self._activity = 0  # dispatches and settlements so far: a shared pool's client tells its load when it moved
        self._held_bytes = 0  # handed out, ShardResult still alive (a finalizer tells the owner when it is not)
        self._max_inflight_bytes = max_inflight_bytes
        self._shard_tokens = shard_tokens
        self._per_replica = max_inflight_per_replica
        self._replaced = 0
        self._bytes_delivered = 0  # supervision handed out, what consumers read from the object store
        self._next_stream_id = 0
        self._streams: dict[int, _Stream] = {}  # running streams (and submits), from any caller thread
        self._changed = False  # membership changed since `_on_change` last heard
        self._on_change: Any = None  # called by the owner when membership changed (a shared pool's server)
        self._start_errors: list[str] = []
        self._info: ModelInfo | None = None
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weights_ref: ray.ObjectRef | None = None
        self._shard_timeout_s = shard_timeout_s
        self._shard_timeout_factor = shard_timeout_factor
        self._housekeeping_s = 0.25
        self._next_housekeeping = 0.0
        self._rng = random.Random()  # this pool's own: ties in placement, and the two choices below
        self._salt = self._rng.getrandbits(32)
        # False: this pool sees all the load on its replicas. A shared pool's client (`eagle_ray.pool.shared`) sees
        # its own exactly and the others' as last heard, so it places differently:
        # - it sends whole batches: "idle" means little to it, where a pool splits a batch alone over its idle
        #   replicas;
        # - past 4 eligible replicas it takes the better of 2 drawn at random ("the power of two choices"):
        #   clients that all took the least loaded of all would pile onto it between two load exchanges (with
        #   few replicas, few clients dispatch between two exchanges, and the least loaded of all is better).
        self._shared = False

    def dispatch_settings(self) -> dict[str, Any]:
        """What a client of this pool dispatches with, unless it says otherwise (`eagle_ray.pool.shared`)."""
        return {
            "max_inflight_bytes": self._max_inflight_bytes,
            "shard_tokens": self._shard_tokens,
            "max_shard_failures": self._ledger.max_failures,
            "max_inflight_per_replica": self._per_replica,
            "shard_timeout_s": self._shard_timeout_s,
            "shard_timeout_factor": self._shard_timeout_factor,
        }

    def _start_owner(self) -> None:
        self._owner = Owner(f"eagle_ray-pool-{id(self):x}", self._tick)
        self._owner.start()  # once `self._owner` is set: its first tick uses it

    def _tick(self) -> float:
        """The owner's periodic work, after each batch of events: dispatch what can go, and a few times a second
        housekeeping over all replicas and streams (a busy replica's death shows at once in its shards' refs; an
        idle one's in its watch ref; a hung one's deadline and a stalled stream can wait that long)."""
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self._housekeeping_s
            self._retire_hung()
            self._expire_verdicts(now)
            self._reconcile()
            self._check_streams(now)
        self._dispatch_ready()
        if self._changed and self._on_change is not None:
            self._changed = False
            self._on_change()
        return self._next_housekeeping

    def _delivered(self, shard: _Shard, attempt: int, payload: Any, r: _Replica, meta: dict[str, Any]) -> None:
        if shard.gen is None:
            r.busy_s += meta["seconds"]
        else:
            r.gen_s, r.gen_tokens = r.gen_s + meta["seconds"], r.gen_tokens + meta["new_tokens"]
        if self._ledger.complete(shard.shard_id, attempt):
            self._bytes_delivered += shard.nbytes
            r.tokens_done += meta["tokens"]
            r.shards_done += 1
            st = self._streams.get(shard.stream_id)
            if st is not None:  # else its stream ended (abandoned it): dropped
                st.unsettled.discard(shard.shard_id)
                st.last_progress = time.monotonic()
                st.inbox.put(self._result(shard, payload, r.replica_id))

    def _failed(self, shard: _Shard, attempt: int, reason: str) -> None:
        verdict = self._ledger.fail(shard.shard_id, attempt, reason)
        if verdict == "retry":
            self._retry.appendleft(shard)
        elif verdict == "quarantine":
            err = self._ledger.error(shard.shard_id)
            log.error("%s", err)
            b = shard.batch
            st = self._streams.get(shard.stream_id)
            if st is not None:
                st.unsettled.discard(shard.shard_id)
                st.last_progress = time.monotonic()
                st.inbox.put(
                    ShardResult(shard.shard_id, shard.batch_index, shard.sequences, b.num_tokens, None, None, str(err))
                )

    def _bytes_per_token(self, logits: bool) -> int:
        return self.info.bytes_per_token + (4 * self.info.vocab_size if logits else 0)

    def _shards(
        self, batch: PackedBatch, batch_index: int, logits: bool, stream_id: int, gen: GenerationParams | None = None
    ) -> list[_Shard]:
        """Split a validated batch into shards (for generation: by sequences, whose answers are the work)."""
        # split over the idle replicas only: one batch alone (submit, a stream's start) is served by all of
        # them at once, while in a busy stream each replica takes whole batches (fewer, larger forwards)
        idle = [r for r in self._ready() if not r.inflight] if not self._shared and not self._retry else []
        n = max(len(idle), 1)
        even = -(-batch.num_tokens // n)
        cap = min(self.info.kv_capacity_tokens, self._shard_tokens or even, even)
        per_shard = -(-batch.num_sequences // n) if gen is not None else None
        shards = []
        for start, stop in plan_runs(batch.seqlens, max(cap, 1), per_shard):
            sub = batch.select(start, stop)
            sid = self._next_shard_id
            self._next_shard_id += 1
            self._ledger.add(sid)
            if gen is None:
                nbytes = sub.num_tokens * self._bytes_per_token(logits)
            else:  # token ids back: 8 bytes per new token at most
                nbytes = sub.num_sequences * gen.max_new_tokens * 8
            shards.append(_Shard(sid, stream_id, batch_index, (start, stop), sub, logits, nbytes, gen))
        return shards

    def _pick(self, shard: _Shard, node_id: str | None) -> _Replica | None:
        ready = self._ready()
        if node_id is not None:
            # the consumer reads local objects zero-copy: serve from its node while it has replicas
            local = [r for r in ready if r.desc and r.desc["node_id"] == node_id]
            ready = local or ready
        # a short queue per replica keeps it busy without piling work onto one that may die,
        # and lets replicas that join later take their share at once
        ready = [r for r in ready if len(r.inflight) < self._per_replica]
        if self._shared and len(ready) > 4:
            ready = self._rng.sample(ready, 2)
        # the shortest queue, counting other clients' shards as last heard; ties (idle replicas) go to the one
        # sent least so far, then by a per-pool order: one request at a time rotates over the replicas, and
        # clients that heard the same loads spread their shards instead of all picking the lowest id
        key = lambda r: (r.inflight_tokens + r.others_tokens, r.dispatches, hash((r.replica_id, self._salt)))  # noqa: E731
        return min(ready, key=key) if ready else None

    def _tag(self, shard_id: int, attempt: int) -> str:
        """What the replica marks while it runs this attempt: after its death, whose shard it was running."""
        return f"{self._key}:{shard_id}:{attempt}"

    def _dispatch(self, shard: _Shard, r: _Replica) -> None:
        attempt = self._ledger.dispatch(shard.shard_id)
        tag, b = self._tag(shard.shard_id, attempt), shard.batch
        if shard.gen is None:
            meta, payload = r.actor.run.options(num_returns=2).remote(
                tag, b.input_ids, b.loss_mask, b.cu_seqlens, shard.logits
            )
        else:
            first = shard.sequences[0]
            meta, payload = r.actor.generate.options(num_returns=2).remote(
                tag, b.input_ids, b.cu_seqlens, shard.gen, first
            )
        self._inflight[meta] = (shard, r, attempt, payload)
        self._activity += 1
        self._owner.on_resolve(meta, self._on_done, meta)
        if not r.inflight:
            r.head_since = time.monotonic()
        r.inflight.append(meta)
        r.dispatches += 1
        r.inflight_tokens += b.num_tokens
        self._inflight_bytes += shard.nbytes

    def _budget_allows(self, shard: _Shard, count_held: bool = True, partial: bool = False) -> bool:
        held = self._held_bytes if count_held else 0
        if self._inflight_bytes + held + shard.nbytes <= self._max_inflight_bytes:
            return True
        # over budget with nothing in flight: a shard larger than the budget runs alone; and a consumer holding part
        # of a batch may be waiting for the rest, so one shard runs. A consumer holding whole batches frees them on
        # its own: it waits (a slow trainer's queue and prefetch stay within the budget)
        return self._inflight_bytes == 0 and (held == 0 or partial)

    def _on_done(self, ref: Any, fut: Any) -> None:
        """A shard's meta ref resolved: deliver it, or count the failure (a task's error, its replica's death)."""
        if ref not in self._inflight:
            return  # settled already (its replica died and the shard was requeued)
        shard, r, attempt, payload = self._inflight[ref]
        try:
            meta = fut.result()  # small dict; the payload stays in the object store
        except _DEAD as e:
            self._on_replica_death(r, e)
            return
        except Exception as e:  # the task raised (RayTaskError), or its result is gone
            self._settle(ref, shard, r)
            r.failures += 1
            r.task_errors += 1
            self._failed(shard, attempt, f"replica {r.replica_id}: {e}")
            if r.task_errors >= 3:
                # alive but failing every shard (e.g. a sticky device error): retire it so its
                # queue is re-run elsewhere instead of quarantining good shards
                self._on_replica_death(r, RuntimeError(f"{r.task_errors} shards failed in a row"))
            return
        self._settle(ref, shard, r)
        r.task_errors = 0
        self._delivered(shard, attempt, payload, r, meta)

    def _probe_hung(self, r: _Replica, deadline: float, now: float) -> None:
        """`r`'s head shard is past `deadline` by this process's clock, which starts when the shard was sent: on a
        shared replica it may still wait behind other clients' shards. So the replica is asked (its "probe"
        group answers while `run` is busy) what it runs and since when; an answer judges that shard by its own
        deadline, and no answer within `shard_timeout_s` means hung (a stopped process, a wedged GPU)."""
        if r.probe is None:
            r.probe = now
            self._owner.on_resolve(r.actor.running.remote(), self._on_probe, r, deadline)
        elif now - r.probe > self._shard_timeout_s:
            shard = self._inflight[r.inflight[0]][0]
            why = f"shard {shard.shard_id} past its {deadline:.0f}s deadline, and no answer in {now - r.probe:.0f}s"
            self._on_replica_death(r, TimeoutError(f"{why} to what it runs"))

    def _on_probe(self, r: _Replica, ours: float, fut: Any) -> None:
        if self._replicas.get(r.replica_id) is not r:
            return
        r.probe = None
        try:
            running = fut.result()  # (tokens, new tokens, seconds it has run) or None
        except _DEAD as e:
            self._on_replica_death(r, e)
            return
        now = time.monotonic()
        if running is None or r.head_since is None:  # between two shards, or ours finished meanwhile
            r.head_since = now if r.inflight else None
            return
        tokens, new_tokens, ran = running
        deadline = self.shard_deadline_s(r, tokens, new_tokens)
        if ran > deadline:
            self._on_replica_death(
                r, TimeoutError(f"its running shard ran {ran:.0f}s, past its {deadline:.0f}s deadline")
            )
        else:  # asked again once the running shard passes its own deadline
            r.head_since = now + (deadline - ran) - ours

    def _settle(self, ref: Any, shard: _Shard, r: _Replica) -> None:
        del self._inflight[ref]
        self._activity += 1
        if r.inflight and r.inflight[0] == ref:  # the next one starts now (an actor runs its tasks in order)
            r.head_since = time.monotonic() if len(r.inflight) > 1 else None
        r.inflight.remove(ref)
        r.inflight_tokens -= shard.batch.num_tokens
        self._inflight_bytes -= shard.nbytes

    def _result(self, shard: _Shard, payload: Any, replica_id: int) -> ShardResult:
        res = ShardResult(
            shard.shard_id, shard.batch_index, shard.sequences, shard.batch.num_tokens, payload, replica_id
        )
        self._held_bytes += shard.nbytes
        weakref.finalize(res, self._owner.post, self._release, shard.nbytes)  # from whichever thread drops it
        return res

    def _release(self, nbytes: int) -> None:
        self._held_bytes -= nbytes

    def _open(self, st: _Stream) -> None:
        st.stream_id = self._next_stream_id
        self._next_stream_id += 1
        self._streams[st.stream_id] = st
        self._ask(st)

    def _ask(self, st: _Stream) -> None:
        """A stream with nothing left to dispatch gets its next batch: one batch ahead of what can go."""
        if not st.pending and not st.asked:
            st.asked = True
            st.inbox.put(_MORE)

    def _add_batch(self, st: _Stream, batch: PackedBatch, batch_index: int) -> list[int]:
        if st.stream_id not in self._streams:
            return []  # it failed meanwhile: the error waits in its inbox
        new = self._shards(batch, batch_index, st.logits, st.stream_id, st.gen)
        st.pending.extend(new)
        st.unsettled.update(x.shard_id for x in new)
        st.asked, st.last_progress = False, time.monotonic()
        self._dispatch_ready()
        self._ask(st)
        return [x.shard_id for x in new]

    def _took(self, st: _Stream, partial: bool) -> None:
        st.out -= 1
        st.partial = partial

    def _dispatch_ready(self) -> None:
        """Dispatch what the replicas' queues and the byte budget allow: re-runs first, then a shard of each
        stream in turn."""
        while self._retry:
            shard = self._retry[0]
            st = self._streams[shard.stream_id]  # a stream that ends takes its re-runs along (`_close_stream`)
            r = self._pick(shard, st.node_id)
            if r is None or not self._budget_allows(shard, st.count_held, st.partial):
                return
            self._dispatch(self._retry.popleft(), r)
        moved = True
        while moved:
            moved = False
            for st in list(self._streams.values()):
                if not st.pending or (st.ahead is not None and st.out >= st.ahead):
                    continue  # nothing to send, or far enough ahead of its consumer
                r = self._pick(st.pending[0], st.node_id)
                if r is None or not self._budget_allows(st.pending[0], st.count_held, st.partial):
                    continue
                self._dispatch(st.pending.popleft(), r)
                st.out += 1
                moved = True
                self._ask(st)

    def _check_streams(self, now: float) -> None:
        """Fail a stream that cannot move instead of letting it wait forever."""
        for st in list(self._streams.values()):
            if not st.unsettled:
                continue
            if self._none_left():
                self._fail(st, RuntimeError(f"no replicas left to serve the stream: {self._start_errors[-3:]}"))
            elif st.pending or any(x.stream_id == st.stream_id for x in self._retry):
                if not self._inflight and now - st.last_progress > st.stall_timeout_s:
                    why = (
                        f"{self._held_bytes} bytes of handed-out results are still referenced (budget "
                        f"{self._max_inflight_bytes}); release ShardResults when done"
                        if self._ready()
                        else f"no replica ready; last start errors: {self._start_errors[-3:]}"
                    )
                    self._fail(st, RuntimeError(f"stream stalled for {st.stall_timeout_s}s: {why}"))
            elif now - st.last_progress > 1.0 and not self._running(st):
                lost = sorted(st.unsettled)[:5]
                self._fail(st, RuntimeError(f"internal error: shards {lost} are neither queued nor in flight"))

    def _running(self, st: _Stream) -> bool:
        """In flight, or lost with a dead replica and waiting for the verdict (`_on_replica_death`). O(in flight):
        asked only when stuck."""
        waiting = (x for lost in self._awaiting.values() for x, _ in lost.shards)
        return any(x.stream_id == st.stream_id for x in (*(v[0] for v in self._inflight.values()), *waiting))

    def _fail(self, st: _Stream, err: BaseException) -> None:
        st.inbox.put(err)
        self._close_stream(st)

    def _ready(self) -> list[_Replica]:
        return [r for r in self._replicas.values() if r.state == "ready"]

    def _on_replica_death(self, r: _Replica, err: BaseException) -> None:
        """A replica died (or was found hung): deliver what it finished; which of the rest it was running, its
        marker file says (`pool/replica.py`): until a task on its node has read it, those shards wait in
        `_awaiting`. The replica set then replaces it (`_lost`)."""
        lost_refs = [ref for ref in r.inflight if ref in self._inflight]
        if self._replicas.get(r.replica_id) is not r and not lost_refs:
            return  # handled already (its watch and a shard both reported the death)
        log.warning("replica %d lost: %s", r.replica_id, err)
        finished = set(ray.wait(lost_refs, num_returns=len(lost_refs), timeout=0)[0]) if lost_refs else set()
        lost = []
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
            lost.append((shard, attempt))
        if lost:
            key = self._next_verdict = self._next_verdict + 1
            why = f"replica {r.replica_id} died running it: {type(err).__name__}"
            self._awaiting[key] = w = _Lost(time.monotonic(), lost, why)
            # their bytes stay in the budget until they run again: else shards behind them take it, and a consumer
            # that holds those results while it waits for the lost ones (in order) leaves no room for them to re-run
            self._inflight_bytes += w.nbytes
            node = NodeAffinitySchedulingStrategy(r.desc["node_id"], soft=False)
            marker = running_at_death.options(scheduling_strategy=node).remote(r.desc["marker"])
            self._owner.on_resolve(marker, self._verdict, key)
        if r.state in ("starting", "ready"):
            self._replaced += 1  # a client counts the replicas it lost: its host replaces them
        self._lost(r, err)

    def _verdict(self, key: int, fut: Any) -> None:
        try:
            tag = fut.result()
        except Exception:  # its node is gone too
            tag = ""
        self._judge(key, tag)

    def _judge(self, key: int, tag: str) -> None:
        """The dead replica's running shard (`tag`), if it was one of ours, has died once more: the ledger blames
        it once it died on a second replica too (a lost node, the OOM killer or an operator takes whatever runs).
        The others were only queued there: they run again, uncounted. No answer ("") blames nothing."""
        lost = self._awaiting.pop(key, None)
        if lost is None:
            return  # timed out before (`_expire_verdicts`)
        self._inflight_bytes -= lost.nbytes
        why = lost.why
        for shard, attempt in lost.shards:
            if tag == self._tag(shard.shard_id, attempt):
                verdict = self._ledger.died(shard.shard_id, attempt, why)
                if verdict == "blame":
                    self._failed(shard, attempt, why)
                elif verdict == "suspect":
                    self._retry.appendleft(shard)
            elif self._ledger.requeue(shard.shard_id, attempt):
                self._retry.append(shard)

    def _expire_verdicts(self, now: float) -> None:
        for key, lost in list(self._awaiting.items()):
            if now - lost.since > self._shard_timeout_s:
                self._judge(key, "")

    def shard_deadline_s(self, r: _Replica, num_tokens: int, new_tokens: int = 0) -> float:
        """How long a shard may run on `r` before the replica counts as hung: `shard_timeout_factor` times
        what its measured rate predicts, at least `shard_timeout_s`; 10x that floor until it finished one
        (a first forward may compile, warm caches, or load lazily). `new_tokens`: a generation shard's most
        new tokens, at the replica's decoding rate."""
        work, secs, done = (new_tokens, r.gen_s, r.gen_tokens) if new_tokens else (num_tokens, r.busy_s, r.tokens_done)
        if secs <= 0 or done <= 0:
            return 10 * self._shard_timeout_s
        return max(self._shard_timeout_s, self._shard_timeout_factor * work * secs / done)

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

    def _none_left(self) -> bool:
        """No replica serves, and none is starting: a stream waiting for one would wait forever."""
        return not self._replicas

    def _close_stream(self, st: _Stream) -> None:
        """A stream ended (done, an error, or its consumer stopped): forget its unfinished shards.

        Shards already running stay in flight until their replica answers (they hold its queue and
        tell which shard a crash happened on); the ledger turns their answers away.
        """
        if self._streams.pop(st.stream_id, None) is None:
            return
        if any(x.stream_id == st.stream_id for x in self._retry):
            self._retry = deque(x for x in self._retry if x.stream_id != st.stream_id)
        for sid in st.unsettled:
            self._ledger.abandon(sid)
        st.pending.clear()
        st.unsettled.clear()
