"""One pool, many clients: a `PooledTargetModel` hosted in a named actor, used from any process.

`serve_pool(name, model_path, ...)` starts a `PoolServer` actor that owns the pool (its
replicas live and die with it) and returns the owner's client; `PooledTargetModel.connect(name)`
(= `connect_pool`) gives any other process in the Ray cluster, a trainer's rank for example,
a client of the same pool. A client has the single-target surface (`forward_packed`,
`generate_batch`, `generate_batch_async`, `set_vocab_mapping`, ...). Its requests are served
exactly once and in its own order, concurrently with other clients': the server runs each
request as a `submit` of its own on the pool, which serves several at once.

Tensors never pass through the server: a client sends its batch, the server answers with the
shards' object refs, and the client reads the supervision from the object store. Those refs are
borrowed by the client, so when a client dies Ray frees what it held; the target's weights are
one object a replica put, which every client reads.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, validate_packed
from eagle_ray.target import NeMoSurface

_NAMESPACE = "eagle_ray"  # a client in another job finds the pool without knowing the owner's namespace


class PoolServer:
    """Actor body: hosts one `PooledTargetModel`; each method call runs in a thread of its own."""

    def __init__(self, model_path: str, pool_kwargs: dict[str, Any]):
        from eagle_ray.pool.pooled import PooledTargetModel

        self.pool = PooledTargetModel(model_path, **pool_kwargs)

    def describe(self) -> tuple[ModelInfo, list[ray.ObjectRef]]:
        return self.pool.info, [self.pool.weights_ref()]  # in a list: the client borrows the ref

    def submit(self, batch: PackedBatch, return_logits: bool) -> list[tuple[tuple[int, int], Any, str | None]]:
        return [(r.sequences, r.ref, r.error) for r in self.pool.submit(batch, return_logits)]

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    def scale(self, replicas: int) -> None:
        self.pool.scale(replicas)

    def shutdown(self) -> None:
        self.pool.shutdown()


class PoolClient(NeMoSurface):
    """A handle on a shared pool, with the single-target surface. Cheap: one per process or rank."""

    _async_workers = 16  # generate_batch_async: requests in flight at once

    def __init__(self, server: Any, owner: bool):
        self._server = server
        self._owner = owner
        self._info, (self._weights_ref,) = ray.get(server.describe.remote())
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        batch = validate_packed(batch, self._info.vocab_size, self._info.max_context)  # before dispatch
        return self._forward_validated(batch, return_logits)

    def _forward_validated(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        return _gather(ray.get(self._server.submit.remote(batch, return_logits)))

    def _weights_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            self._weights = ray.get(self._weights_ref)
        return self._weights

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return torch.nn.Embedding.from_pretrained(self._weights_once()[0].clone(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        return self._weights_once()[1]

    def stats(self) -> dict[str, Any]:
        return ray.get(self._server.stats.remote())

    def scale(self, replicas: int) -> None:
        ray.get(self._server.scale.remote(replicas))

    def close(self) -> None:
        """A client lets go; the owner's close also shuts the pool down (its replicas, then the server)."""
        self._close_executor()
        if self._owner and self._server is not None:
            try:
                ray.get(self._server.shutdown.remote(), timeout=60)
            finally:
                ray.kill(self._server, no_restart=True)
        self._server = None

    shutdown = close


def _gather(parts: list[tuple[tuple[int, int], Any, str | None]]) -> Supervision:
    bad = [err for _, _, err in parts if err]
    if bad:
        raise RuntimeError("\n".join(bad))
    return Supervision.concat(ray.get([ref for _, ref, _ in parts]))


def serve_pool(name: str, model_path: str, **pool_kwargs: Any) -> PoolClient:
    """Start a pool that any process in the cluster can `connect` to by `name`; returns the owner's client.

    `pool_kwargs` are `PooledTargetModel`'s. The pool lives until the owner's `close()` or the owner's exit.
    """
    from eagle_ray.ray_init import init_ray

    if not ray.is_initialized():
        init_ray()
    cls = ray.remote(num_cpus=0, max_concurrency=256)(PoolServer)  # threads: each request waits on the pool
    server = cls.options(name=name, namespace=_NAMESPACE, max_restarts=0).remote(model_path, pool_kwargs)
    try:
        return PoolClient(server, owner=True)
    except BaseException:
        ray.kill(server, no_restart=True)
        raise


def connect_pool(name: str) -> PoolClient:
    """A client of the pool another process started with `serve_pool(name, ...)`."""
    try:
        server = ray.get_actor(name, namespace=_NAMESPACE)
    except ValueError:
        raise ValueError(f"no eagle_ray pool named {name!r} in this Ray cluster; start one with serve_pool") from None
    return PoolClient(server, owner=False)
