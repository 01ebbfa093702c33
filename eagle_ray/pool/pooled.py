"""`PooledTargetModel`: the driver side of the target pool.

Shards batches by tokens across `TargetReplica` actors, dispatches to the replica with
the fewest outstanding tokens, bounds the bytes in flight, replaces dead replicas and
re-runs their shards (a ledger by shard id delivers each shard exactly once), and scales
while streaming. The driver holds object refs only: tensors go replica -> object store ->
consumer, never through the driver (except for the single-target compatibility calls).

One thread owns all of it (`eagle_ray.pool.owner`): it hears of each result, start-up and death as its ref
resolves, dispatches, and settles. A stream's caller pulls and validates its batches in its own thread, hands
them over when the owner asks for more, and yields what the owner sends back; `stats()` is the owner's snapshot.
"""

from __future__ import annotations

import logging
import queue
import random
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from eagle_ray.contract import InvalidBatchError, ModelInfo, PackedBatch, Supervision, plan_runs, validate_packed
from eagle_ray.generation import GenerationParams
from eagle_ray.pool import placement as pl
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.owner import Owner
from eagle_ray.pool.replica import TargetReplica
from eagle_ray.ray_init import ZERO_COPY_ENV, init_ray
from eagle_ray.target import NeMoSurface, check_engine

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
class _Replica:
    replica_id: int
    actor: Any
    pg: Any
    state: str = "starting"  # starting | ready | draining | dead
    ready_ref: Any = None
    watch_ref: Any = None  # resolves (with an error) only when the actor dies
    started_at: float = field(default_factory=time.monotonic)
    task_errors: int = 0  # consecutive failed shards
    desc: dict[str, Any] | None = None
    inflight: list = field(default_factory=list)  # meta refs, in dispatch (= execution) order
    inflight_tokens: int = 0
    head_since: float | None = None  # when the shard at the head of `inflight` started running (about)
    busy_s: float = 0.0  # seconds its shards took, as the replica measured them: its rate is tokens_done / busy_s
    tokens_done: int = 0
    gen_s: float = 0.0  # the same for generation shards, per new token: decoding runs at a rate of its own
    gen_tokens: int = 0
    shards_done: int = 0
    dispatches: int = 0  # shards sent to it (by this pool or client)
    others_tokens: int = 0  # a shared pool's other clients' tokens in flight on it, as last heard (`shared.py`)
    failures: int = 0
    solo: bool = False  # running a suspect shard alone: nothing joins it, so if it dies the blame is certain


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


class PooledTargetModel(NeMoSurface):
    """A pool of target replicas with the surface of a single target. See README "Pool"."""

    _async_workers = 16  # generate_batch_async: requests in flight at once, each a submit of its own

    def __init__(
        self,
        model_path: str,
        *,
        engine: str = "sglang",
        replicas: int = 1,
        tp_size: int = 1,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        placement: str = "separate",
        engine_kwargs: dict[str, Any] | None = None,
        use_gpu: bool | None = None,
        cpus_per_replica: float | None = None,
        gpu_fraction: float = 0.5,
        max_inflight_bytes: int | None = None,
        shard_tokens: int | None = None,
        max_shard_failures: int = 3,
        max_inflight_per_replica: int = 2,
        max_replica_starts: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        start_timeout_s: float = 900.0,
        shard_timeout_s: float = 120.0,
        shard_timeout_factor: float = 10.0,
    ):
        if not ray.is_initialized():
            init_ray()
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        check_engine(engine)
        use_gpu = pl.cluster_has_gpus() if use_gpu is None else use_gpu
        self.shape = pl.replica_shape(placement, tp_size, use_gpu, cpus_per_replica, gpu_fraction)
        self.placement = placement
        self.engine_name = engine
        self.model_path = model_path
        kwargs: dict[str, Any] = {"aux_layer_ids": aux_layer_ids, "dtype": dtype}
        extra = dict(engine_kwargs or {})
        if engine == "sglang":
            sg = dict(extra.pop("sglang_kwargs", {}), **extra)
            if placement == "colocated" and use_gpu:
                # leave the train worker its share of the GPU (SGLang sizes weights + KV by this fraction)
                sg.setdefault("mem_fraction_static", round(0.9 * gpu_fraction, 3))
            kwargs.update(tp_size=tp_size, sglang_kwargs=sg)
        else:
            if tp_size != 1:
                raise ValueError("the hf engine has no tensor parallelism; use tp_size=1 or engine='sglang'")
            kwargs.update(extra)
        self._target_kwargs = kwargs
        env = dict(runtime_env or {})
        env["env_vars"] = {**ZERO_COPY_ENV, **env.get("env_vars", {})}
        self._runtime_env = env
        self._actor_cls = ray.remote(concurrency_groups={"watch": 1})(TargetReplica)  # run() stays sequential
        self._init_dispatch(
            max_inflight_bytes, shard_tokens, max_shard_failures, max_inflight_per_replica, shard_timeout_s,
            shard_timeout_factor,
        )  # fmt: skip
        self._next_replica_id = 0
        self._target_replicas = replicas
        self._starts = 0
        self._max_starts = max_replica_starts if max_replica_starts is not None else 3 * max(replicas, 1) + 10
        self._start_timeout_s = start_timeout_s
        if self._max_inflight_bytes is None:
            store = ray.cluster_resources().get("object_store_memory", 2**31)
            self._max_inflight_bytes = int(0.25 * store)
        self._start_owner()
        try:
            self._owner.call(self._reconcile)
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.shutdown()  # release what was reserved
            raise

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
        # meta ref -> (shard, replica, attempt, payload)
        self._inflight: dict[Any, tuple[_Shard, _Replica, int, Any]] = {}
        self._retry: deque[_Shard] = deque()
        self._inflight_bytes = 0  # dispatched, not yet handed out
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
        self._salt = random.getrandbits(32)
        # None: the least loaded of all replicas (this pool sees all its load). A shared pool's client hears the
        # others' loads a little late, and clients that all take the least loaded one pile onto it: past twice
        # `_choices` replicas, each takes the better of `_choices` drawn at random ("the power of two choices";
        # with few replicas few clients dispatch between two exchanges, and the least loaded of all is better)
        self._choices: int | None = None
        self._rng = random.Random(self._salt)
        # a batch alone is split over the idle replicas; a client of a shared pool sees only its own load, so
        # "idle" means little there and it sends whole batches (`eagle_ray.pool.shared`)
        self._split_idle = True

    def _start_owner(self) -> None:
        self._owner = Owner(f"eagle_ray-pool-{id(self):x}", self._tick)
        self._owner.start()  # once `self._owner` is set: its first tick uses it

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

    @classmethod
    def from_pretrained(cls, model_path: str, **kwargs: Any) -> PooledTargetModel:
        """Start the pool and wait until every replica has built its engine."""
        return cls(model_path, **kwargs)

    # ----------------------------------------------------------------------------------- replicas

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
        """A replica's watch resolves only when it dies."""
        if self._replicas.get(r.replica_id) is r:
            self._on_replica_death(r, fut.exception() or RuntimeError("replica watch returned"))

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

    # ----------------------------------------------------------------------------------- facts

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("no replica has started yet")
        return self._info

    def _bytes_per_token(self, logits: bool) -> int:
        return self.info.bytes_per_token + (4 * self.info.vocab_size if logits else 0)

    def weights_ref(self) -> ray.ObjectRef:
        """(input embedding, lm_head weight): one object a replica put, read by consumers from the store."""
        return self._owner.call(self._weights_ref_once)

    def _weights_ref_once(self) -> ray.ObjectRef:
        if self._weights_ref is None:
            self._weights_ref = self._ready()[0].actor.weights.remote()
        return self._weights_ref

    def _weights_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            self._weights = ray.get(self.weights_ref())
        return self._weights

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return torch.nn.Embedding.from_pretrained(self._weights_once()[0].clone(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        return self._weights_once()[1]

    def replicas(self) -> list[dict[str, Any]]:
        """What each ready replica reported when it started (node, GPU ids, TP rank pids...)."""
        return self._owner.call(lambda: [dict(r.desc) for r in self._ready() if r.desc])

    def pool_stats(self) -> dict[str, Any]:
        """The stats of whoever owns the replicas: this pool's own (a shared pool's client asks its owner)."""
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Per replica: state, node, tokens and shards done, in flight, failures; pool totals. A snapshot, taken
        by the owner thread between two of its steps."""
        return self._owner.call(self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "state": r.state,
                    "node_id": (r.desc or {}).get("node_id"),
                    "tokens_done": r.tokens_done,
                    "shards_done": r.shards_done,
                    "inflight_shards": len(r.inflight),
                    "inflight_tokens": r.inflight_tokens,
                    "others_inflight_tokens": r.others_tokens,
                    "failures": r.failures,
                }
                for r in self._replicas.values()
            ],
            "replicas_replaced": self._replaced,
            "inflight_bytes": self._inflight_bytes,
            "held_bytes": self._held_bytes,
            "bytes_delivered": self._bytes_delivered,
            "max_inflight_bytes": self._max_inflight_bytes,
            "shards_delivered": self._ledger.count("delivered"),
            "shards_quarantined": self._ledger.count("quarantined"),
        }

    # ----------------------------------------------------------------------------------- dispatch

    def _shards(
        self, batch: PackedBatch, batch_index: int, logits: bool, stream_id: int, gen: GenerationParams | None = None
    ) -> list[_Shard]:
        """Split a validated batch into shards (for generation: by sequences, whose answers are the work)."""
        # split over the idle replicas only: one batch alone (submit, a stream's start) is served by all of
        # them at once, while in a busy stream each replica takes whole batches (fewer, larger forwards)
        idle = [r for r in self._ready() if not r.inflight] if self._split_idle and not self._retry else []
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
        # a shard that failed once runs alone: a dying replica's last replies can be lost with it, so blaming
        # the first unfinished of several shards is a guess, and a good shard guessed twice would be quarantined
        room = 1 if self._ledger.suspect(shard.shard_id) else self._per_replica
        ready = [r for r in ready if not r.solo and len(r.inflight) < room]
        if self._choices is not None and len(ready) > 2 * self._choices:
            ready = self._rng.sample(ready, self._choices)
        # the shortest queue, counting other clients' shards as last heard; ties (idle replicas) go to the one
        # sent least so far, then by a per-pool order: one request at a time rotates over the replicas, and
        # clients that heard the same loads spread their shards instead of all picking the lowest id
        key = lambda r: (r.inflight_tokens + r.others_tokens, r.dispatches, hash((r.replica_id, self._salt)))  # noqa: E731
        return min(ready, key=key) if ready else None

    def _dispatch(self, shard: _Shard, r: _Replica) -> None:
        r.solo = self._ledger.suspect(shard.shard_id)
        attempt = self._ledger.dispatch(shard.shard_id)
        b = shard.batch
        if shard.gen is None:
            meta, payload = r.actor.run.options(num_returns=2).remote(
                shard.shard_id, b.input_ids, b.loss_mask, b.cu_seqlens, shard.logits
            )
        else:
            first = shard.sequences[0]
            meta, payload = r.actor.generate.options(num_returns=2).remote(
                shard.shard_id, b.input_ids, b.cu_seqlens, shard.gen, first
            )
        self._inflight[meta] = (shard, r, attempt, payload)
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
                self._on_replica_death(
                    r,
                    TimeoutError(
                        f"shard {shard.shard_id} ran {now - r.head_since:.0f}s, past its {deadline:.0f}s deadline"
                    ),
                )

    def _tick(self) -> float:
        """The owner's periodic work, after each batch of events: dispatch what can go, and a few times a second
        housekeeping over all replicas and streams (a busy replica's death shows at once in its shards' refs; an
        idle one's in its watch ref; a hung one's deadline and a stalled stream can wait that long)."""
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self._housekeeping_s
            self._retire_hung()
            self._reconcile()
            self._check_streams(now)
        self._dispatch_ready()
        if self._changed and self._on_change is not None:
            self._changed = False
            self._on_change()
        return self._next_housekeeping

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

    def _settle(self, ref: Any, shard: _Shard, r: _Replica) -> None:
        del self._inflight[ref]
        if r.inflight and r.inflight[0] == ref:  # the next one starts now (an actor runs its tasks in order)
            r.head_since = time.monotonic() if len(r.inflight) > 1 else None
        r.inflight.remove(ref)
        r.solo = r.solo and bool(r.inflight)
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

    # ----------------------------------------------------------------------------------- public API

    def stream(
        self,
        batches: Iterable[PackedBatch],
        *,
        ordered: bool = True,
        return_logits: bool = False,
        node_id: str | None = None,
        stall_timeout_s: float = 600.0,
        count_held: bool = True,
        generate: GenerationParams | None = None,
        ahead: int | None = None,
    ) -> Iterator[ShardResult]:
        """Supervision for many batches, as `ShardResult`s holding object refs.

        Yields in submission order (`ordered=True`) or as shards complete. Dispatch waits
        while `max_inflight_bytes` are in flight or held by un-released results. Bad input
        raises `InvalidBatchError` when its batch is reached, before it is dispatched.
        `node_id`: serve from replicas on the consumer's node while it has any (others only when
        it has none). `generate`: each batch holds prompts, and each result's ref holds their answers
        (token id lists, see `eagle_ray.generation`) instead of supervision. Several streams and submits may
        run at once, from different threads: each gets its own shards, in its own order, and all share the
        replicas and the byte budget. `ahead`: at most this many of the stream's shards dispatched and not yet
        yielded (a consumer that reads in order gains nothing from more, and holds up the replicas' queues).
        """
        st = _Stream(return_logits, node_id, count_held, generate, ahead, stall_timeout_s)
        self._owner.call(self._open, st)
        try:
            yield from self._consume(st, iter(batches), ordered)
        finally:
            self._owner.post(self._close_stream, st)

    def _consume(self, st: _Stream, it: Iterator[PackedBatch], ordered: bool) -> Iterator[ShardResult]:
        """The caller's side of a stream: when the owner asks, pull a batch (the caller's data loader runs in the
        caller's thread), validate it and hand it over; yield what comes back, in order if asked."""
        order: deque[int] = deque()  # its shard ids in submission order, not yet yielded
        ready: dict[int, ShardResult] = {}
        unyielded: dict[int, int] = {}  # batch index -> its shards not yet yielded
        partial: set[int] = set()  # batches the consumer has some, not all, shards of
        exhausted, batch_index, bad_input = False, 0, None
        while not exhausted or order:
            msg = self._next_message(st)
            if msg is _MORE:
                try:
                    batch = validate_packed(next(it), self.info.vocab_size, self.info.max_context)
                    if st.gen is not None:
                        st.gen.check_fits(batch, self.info)
                except StopIteration:
                    exhausted = True
                    continue
                except InvalidBatchError as e:
                    bad_input, exhausted = e, True  # serve everything before it, then raise at its place
                    continue
                ids = self._owner.call(self._add_batch, st, batch, batch_index)
                unyielded[batch_index] = len(ids)
                batch_index += 1
                order.extend(ids)
                continue
            if isinstance(msg, BaseException):
                raise msg
            out = [msg]
            if ordered:
                ready[msg.shard_id] = msg
                out = []
                while order and order[0] in ready:
                    out.append(ready.pop(order.popleft()))
            else:
                order.remove(msg.shard_id)
            msg = None
            for res in out:
                _yielded(res.batch_index, unyielded, partial)
                self._owner.post(self._took, st, bool(partial))
                yield res
            # what was yielded is the consumer's to hold or drop: this frame must not keep it alive while it
            # waits for the budget (a consumer that dropped it would wait on the stream, the stream on it)
            out = res = None
        if bad_input is not None:
            raise bad_input

    def _next_message(self, st: _Stream) -> Any:
        while True:
            try:
                return st.inbox.get(timeout=1.0)
            except queue.Empty:
                if self._owner.stopped:
                    raise RuntimeError("the pool is shut down") from None

    # the owner's side of streams ---------------------------------------------------------------------

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
        return any(x.stream_id == st.stream_id for x, *_ in self._inflight.values())  # O(in flight): when stuck only

    def _fail(self, st: _Stream, err: BaseException) -> None:
        st.inbox.put(err)
        self._close_stream(st)

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

    def submit(self, batch: PackedBatch, return_logits: bool = False) -> list[ShardResult]:
        """Shard one batch across replicas; return its shards' results (refs) once all are stored.

        Validates first (`InvalidBatchError`, nothing dispatched). Failed replicas are replaced and
        their shards re-run. Quarantined shards come back with `error` set and `ref=None`.
        """
        # the whole batch is gathered by design: only what is in flight counts against the budget
        return list(self.stream([batch], return_logits=return_logits, count_held=False))

    def generate(self, prompts: list[list[int]], params: GenerationParams | None = None) -> list[list[int]]:
        """Each prompt's continuation (new token ids), served exactly once across the replicas.

        Bad prompts (`InvalidBatchError`) and bad params (`ValueError`) are refused before dispatch.
        """
        p = params or GenerationParams()
        batch = PackedBatch.from_sequences([torch.as_tensor(q, dtype=torch.long) for q in prompts])
        results = list(self.stream([batch], count_held=False, generate=p))
        bad = [r.error for r in results if r.error]
        if bad:
            raise RuntimeError("\n".join(bad))
        return [answer for part in ray.get([r.ref for r in results]) for answer in part]

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        """Single-target compatibility: pulls the supervision to the caller."""
        results = self.submit(batch, return_logits)
        bad = [r.error for r in results if r.error]
        if bad:
            raise RuntimeError("\n".join(bad))
        return Supervision.concat(ray.get([r.ref for r in results]))

    @staticmethod
    def connect(name: str, **overrides: Any) -> Any:
        """A client (`PoolClient`) of the pool another process started with `serve_pool(name, ...)`: it dispatches
        to the replicas itself. `overrides`: its own dispatch settings (`max_inflight_bytes`, ...)."""
        from eagle_ray.pool.shared import connect_pool

        return connect_pool(name, **overrides)

    def scale(self, replicas: int) -> None:
        """Set the number of replicas; new ones join when ready, surplus ones drain first."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self._owner.call(self._scale, replicas)

    def _scale(self, replicas: int) -> None:
        self._target_replicas = replicas
        self._max_starts += max(0, replicas - len(self._replicas))
        self._reconcile()

    def close(self) -> None:
        """NeMo's name for `shutdown`."""
        self.shutdown()

    def shutdown(self) -> None:
        self._close_executor()
        if self._owner is None or self._owner.stopped:
            return
        self._owner.call(self._stop_replicas)
        self._owner.stop()

    def _stop_replicas(self) -> None:
        self._target_replicas = 0
        for st in list(self._streams.values()):
            self._fail(st, RuntimeError("the pool was shut down"))
        for r in list(self._replicas.values()):
            if r.state != "starting":  # one still building its engine would answer only after that
                try:
                    ray.get(r.actor.shutdown.remote(), timeout=30)
                except Exception:
                    pass
            self._remove(r)

    def __enter__(self) -> PooledTargetModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _identity(info: ModelInfo) -> ModelInfo:
    return replace(info, kv_capacity_tokens=0, max_context=0)


def _yielded(batch_index: int, unyielded: dict[int, int], partial: set[int]) -> None:
    unyielded[batch_index] -= 1
    if unyielded[batch_index]:
        partial.add(batch_index)
    else:
        del unyielded[batch_index]
        partial.discard(batch_index)
