"""`PooledTargetModel`: a pool that owns its replicas.

A `Pool` (`surface.py`: stream, submit, generate, the NeMo surface, over `dispatch.py`'s shards, ledger and budget)
whose replica set is its own (`lifecycle.py`): `TargetReplica` actors it starts, watches, replaces and scales. It
shards batches by tokens across them, bounds the bytes in flight, re-runs a dead replica's shards (a ledger by
shard id delivers each exactly once) and scales while streaming. The driver holds object refs only: tensors go
replica -> object store -> consumer, never through the driver (except for the single-target compatibility calls).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
import torch

from eagle_ray.contract import ModelInfo
from eagle_ray.pool import placement as pl
from eagle_ray.pool.lifecycle import Lifecycle
from eagle_ray.pool.replica import TargetReplica
from eagle_ray.pool.surface import Pool
from eagle_ray.ray_init import ZERO_COPY_ENV, init_ray
from eagle_ray.target import check_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Membership:
    """What a pool's clients may dispatch to (`PooledTargetModel.on_membership`)."""

    ready: tuple[tuple[int, Any, dict], ...]  # (replica id, actor handle, description) of each ready replica
    starting: int  # replicas being started
    info: ModelInfo | None
    errors: tuple[str, ...]  # the last start errors


class PooledTargetModel(Pool, Lifecycle):
    """A pool of target replicas with the surface of a single target. See docs/architecture.md "The pool"."""

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
        self._board_at: float | None = None  # a shared pool's: when its clients' loads were last heard
        self._markers: list[tuple[float, str, str]] = []  # dead replicas' marker files: (delete after, node, path)
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

    def weights_ref(self, fresh: bool = False) -> ray.ObjectRef:
        """(input embedding, lm_head weight): one object a replica put, read by consumers from the store.
        `fresh`: put again by a live replica (the node that held the last one was lost)."""
        return self._owner.call(self._weights_ref_once, fresh)

    def _weights_ref_once(self, fresh: bool) -> ray.ObjectRef:
        if self._weights_ref is None or fresh:
            self._weights_ref = self._ready()[0].actor.weights.remote()
        return self._weights_ref

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

    def heard_loads(self, totals: dict[int, int], at: float) -> None:
        """A shared pool's board (its clients' tokens in flight per replica) as of `at` (monotonic): dispatch counts
        them, and a draining replica is stopped once none of theirs is left on it (`Lifecycle._clients_done`)."""
        self._owner.call(self._heard_loads, totals, at)

    def _heard_loads(self, totals: dict[int, int], at: float) -> None:
        self._board_at = at
        for r in self._replicas.values():
            r.others_tokens = totals.get(r.replica_id, 0)

    def pool_stats(self) -> dict[str, Any]:
        """The stats of whoever owns the replicas: this pool's own (a shared pool's client asks its owner)."""
        return self.stats()

    def scale(self, replicas: int) -> None:
        """Set the number of replicas; new ones join when ready, surplus ones drain first."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self._owner.call(self._scale, replicas)

    def _scale(self, replicas: int) -> None:
        self._target_replicas = replicas
        self._reconcile()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every replica (each engine's close, then its actor and group), all given `timeout_s` together."""
        self._close_executor()
        if self._owner is None or self._owner.stopped:
            return
        self._owner.call(self._stop_replicas, timeout_s)
        self._owner.stop()
