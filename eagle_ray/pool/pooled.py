"""`PooledTargetModel`: the driver side of the target pool.

Shards batches by tokens across `TargetReplica` actors, dispatches to the replica with
the fewest outstanding tokens, bounds the bytes in flight, replaces dead replicas and
re-runs their shards (a ledger by shard id delivers each shard exactly once), and scales
while streaming. The driver holds object refs only: tensors go replica -> object store ->
consumer, never through the driver (except for the single-target compatibility calls).

The state lives in two halves, each a mixin of the pool: `lifecycle.py` (replicas) and `dispatch.py` (shards,
ledger, budget). One thread owns all of it (`owner.py`): it hears of each result, start-up and death as its ref
resolves, dispatches, and settles. A stream's caller pulls and validates its batches in its own thread, hands
them over when the owner asks for more, and yields what the owner sends back; `stats()` is the owner's snapshot.
"""

from __future__ import annotations

import logging
import queue
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError

from eagle_ray.contract import InvalidBatchError, ModelInfo, PackedBatch, Supervision, validate_packed
from eagle_ray.generation import GenerationParams
from eagle_ray.pool import placement as pl
from eagle_ray.pool.dispatch import _MORE, Dispatch, ShardResult, _Stream
from eagle_ray.pool.lifecycle import Lifecycle
from eagle_ray.pool.replica import TargetReplica
from eagle_ray.ray_init import ZERO_COPY_ENV, init_ray
from eagle_ray.target import NeMoSurface, check_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Membership:
    """What a pool's clients may dispatch to (`PooledTargetModel.on_membership`)."""

    ready: tuple[tuple[int, Any, dict], ...]  # (replica id, actor handle, description) of each ready replica
    starting: int  # replicas being started
    info: ModelInfo | None
    errors: tuple[str, ...]  # the last start errors


class PooledTargetModel(Dispatch, Lifecycle, NeMoSurface):
    """A pool of target replicas with the surface of a single target. See docs/architecture.md "The pool"."""

    _async_workers = 16  # generate_batch_async: requests in flight at once, each a submit of its own

    def __init__(
        self,
        model_path: str,
        *,
        engine: str = "sglang",
        replicas: int = 1,
        min_replicas: int | None = None,
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
        runtime_env: dict[str, Any] | None = None,
        start_timeout_s: float = 900.0,
        shard_timeout_s: float = 120.0,
        shard_timeout_factor: float = 10.0,
    ):
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if min_replicas is not None and not 1 <= min_replicas <= max(replicas, 1):
            raise ValueError(f"min_replicas must be in [1, replicas={replicas}], got {min_replicas}")
        if not ray.is_initialized():
            init_ray()
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
        # run() stays sequential; watch() blocks for good; running() answers while run() is busy
        self._actor_cls = ray.remote(concurrency_groups={"watch": 1, "probe": 1})(TargetReplica)
        self._init_dispatch(
            max_inflight_bytes, shard_tokens, max_shard_failures, max_inflight_per_replica, shard_timeout_s,
            shard_timeout_factor,
        )  # fmt: skip
        self._next_replica_id = 0
        self._target_replicas = replicas
        self._min_replicas = replicas if min_replicas is None else min_replicas  # None: all (a job's default: 1)
        self._backoff: dict[str | None, Any] = {}  # node id (None: unknown) -> its failed starts' backoff
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

    @classmethod
    def from_pretrained(cls, model_path: str, **kwargs: Any) -> PooledTargetModel:
        """Start the pool and wait until `min_replicas` (default: all) replicas have built their engines (the rest
        join as they come)."""
        return cls(model_path, **kwargs)

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("no replica has started yet")
        return self._info

    def weights_ref(self, fresh: bool = False) -> ray.ObjectRef:
        """(input embedding, lm_head weight): one object a replica put, read by consumers from the store.
        `fresh`: put again by a live replica (the node that held the last one was lost)."""
        return self._owner.call(self._weights_ref_once, fresh)

    def _weights_ref_once(self, fresh: bool) -> ray.ObjectRef:
        if self._weights_ref is None or fresh:
            self._weights_ref = self._ready()[0].actor.weights.remote()
        return self._weights_ref

    def _weights_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            try:
                self._weights = ray.get(self.weights_ref())
            except ObjectLostError:  # lost with its node (or its replica died before storing it): once more
                self._weights = ray.get(self.weights_ref(fresh=True))
        return self._weights

    def on_membership(self, fn: Any) -> None:
        """Call `fn(Membership)` on the pool's owner thread now and whenever its membership changes (a replica
        started, became ready, was retired or drained): what a shared pool's host publishes to its clients."""
        self._owner.call(self._watch_membership, fn)

    def _watch_membership(self, fn: Any) -> None:
        def publish() -> None:
            ready = tuple((r.replica_id, r.actor, r.desc) for r in self._ready())
            starting = sum(r.state == "starting" for r in self._replicas.values())
            fn(Membership(ready, starting, self._info, tuple(self._start_errors[-3:])))

        self._on_change = publish
        publish()

    def retire(self, replica_id: int, reason: str) -> None:
        """Retire a ready (or draining) replica as dead (a client found it dead or hung): its shards re-run
        elsewhere, and another starts in its place. An unknown or already retired replica: nothing happens."""
        self._owner.call(self._retire, replica_id, reason)

    def _retire(self, replica_id: int, reason: str) -> None:
        r = self._replicas.get(replica_id)
        if r is not None and r.state in ("ready", "draining"):
            self._on_replica_death(r, RuntimeError(reason))

    def replica_actor(self, replica_id: int) -> Any:
        """The actor handle of a replica this pool knows (None if it knows none by that id): for fault tools."""
        return self._read(lambda: getattr(self._replicas.get(replica_id), "actor", None))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return torch.nn.Embedding.from_pretrained(self._weights_once()[0].clone(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        return self._weights_once()[1]

    def replicas(self) -> list[dict[str, Any]]:
        """What each ready replica reported when it started (node, GPU ids, TP rank pids...)."""
        return self._read(lambda: [dict(r.desc) for r in self._ready() if r.desc])

    def pool_stats(self) -> dict[str, Any]:
        """The stats of whoever owns the replicas: this pool's own (a shared pool's client asks its owner)."""
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Per replica: state, node, tokens and shards done, in flight, failures; pool totals. A snapshot, taken
        by the owner thread between two of its steps."""
        return self._read(self._snapshot)

    def _read(self, fn: Any) -> Any:
        """`fn()` on the owner thread; once that has ended (shut down), here: nothing changes the state then."""
        return fn() if self._owner.stopped else self._owner.call(fn)

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
            ready[msg.shard_id] = msg
            if not ordered:  # as it completes: it goes first
                order.remove(msg.shard_id)
                order.appendleft(msg.shard_id)
            msg = None
            while order and order[0] in ready:
                res = ready.pop(order.popleft())
                _yielded(res.batch_index, unyielded, partial)
                self._owner.post(self._took, st, bool(partial))
                yield res
            # what was yielded is the consumer's to hold or drop: this frame must not keep it alive while it
            # waits for the budget (a consumer that dropped it would wait on the stream, the stream on it)
            msg = res = None
        if bad_input is not None:
            raise bad_input

    def _next_message(self, st: _Stream) -> Any:
        while True:
            try:
                return st.inbox.get(timeout=1.0)
            except queue.Empty:
                if self._owner.stopped:
                    raise RuntimeError("the pool is shut down") from None

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
        self._reconcile()

    def close(self) -> None:
        """NeMo's name for `shutdown`."""
        self.shutdown()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every replica (each engine's close, then its actor and group), all given `timeout_s` together."""
        self._close_executor()
        if self._owner is None or self._owner.stopped:
            return
        self._owner.call(self._stop_replicas, timeout_s)
        self._owner.stop()

    def __enter__(self) -> PooledTargetModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _yielded(batch_index: int, unyielded: dict[int, int], partial: set[int]) -> None:
    unyielded[batch_index] -= 1
    if unyielded[batch_index]:
        partial.add(batch_index)
    else:
        del unyielded[batch_index]
        partial.discard(batch_index)
