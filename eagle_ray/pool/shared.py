"""One pool, many clients: a pool's replicas owned by one named actor, used from any process.

`serve_pool(name, model_path, ...)` starts a `PoolServer` actor that owns the replicas (starts,
watches, replaces and scales them) and returns the owner's client; `PooledTargetModel.connect(name)`
(= `connect_pool`) gives any other process in the Ray cluster, a trainer's rank for example, a
client of the same replicas.

The server is the control plane only: membership. A client is a `PooledTargetModel` of its own
that dispatches its shards straight to the replicas, keeps its own shard ledger and byte budget,
and owns its results, so no request, tensor or object ref of a client passes through the server
(or the driver). What grows with the traffic runs where the traffic is. The client learns of
membership by long-polling the server (`view`); a replica it finds dead or hung it drops at once,
re-runs its shards elsewhere, and reports to the server, which retires and replaces it for everyone.

Placement sees everyone's load: a few times a second each busy client tells the server its tokens
in flight per replica and hears the totals (`loads`, one small call, never per shard), so it sends
each shard to the shorter queue, counting other clients' shards, of two replicas drawn at random
(the shortest of all would draw every client to the same replica between two exchanges; with 4
replicas or fewer it takes the shortest of all). Without
the exchange, clients that each balance their own load pile onto some replicas while others idle.

A client's requests are served exactly once and in its own order (its own ledger), concurrently
with other clients'. A client that dies leaks nothing: Ray frees the objects it owned.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from eagle_ray.contract import ModelInfo
from eagle_ray.pool.lifecycle import _Replica
from eagle_ray.pool.pooled import PooledTargetModel

log = logging.getLogger(__name__)

_NAMESPACE = "eagle_ray"  # a client in another job finds the pool without knowing the owner's namespace
_LOADS_EVERY_S = 0.1  # a busy client's load exchange: fresh against shards of a second, 10 small calls a second
_LOADS_STALE_S = 5.0  # a client not heard from for this long (dead, or gone quiet) counts for nothing
_LOADS_CALL_S = 0.002  # the board's thread spends well under this per call: its period is this times the clients
_LOADS_IDLE_S = 1.0  # a client whose load has not moved, with a stream open or work in flight, tells it this often


@dataclass(frozen=True)
class View:
    """The pool's membership as its owner sees it: what a client may dispatch to."""

    version: int
    info: ModelInfo | None
    replicas: tuple[tuple[int, Any, dict], ...] = ()  # ready ones: (replica id, actor handle, description)
    starting: int = 0  # replicas being started (a client with none ready waits for them)
    errors: tuple[str, ...] = field(default_factory=tuple)  # the owner's last start errors


class PoolServer:
    """Actor body: owns one pool's replicas. The pool's owner thread watches them and, on every change of
    membership, publishes a new view."""

    def __init__(self, model_path: str, pool_kwargs: dict[str, Any]):
        self.pool = PooledTargetModel(model_path, **pool_kwargs)
        self._cond = threading.Condition()
        self._view = View(0, None)
        self._closed = False
        # the load board, owned by the one thread of the "loads" group: client -> {replica id: tokens in flight}
        self._board: dict[str, dict[int, int]] = {}
        self._heard: dict[str, float] = {}
        self._totals: dict[int, int] = {}
        self._next_sweep = 0.0
        self.pool._owner.call(self._watch)

    def _watch(self) -> None:
        self.pool._on_change = self._publish
        self._publish()

    def _publish(self) -> None:
        """On the pool's owner thread: its state, as a view for the clients."""
        pool = self.pool
        ready = tuple((r.replica_id, r.actor, r.desc) for r in pool._ready())
        starting = sum(r.state == "starting" for r in pool._replicas.values())
        info = pool._info
        errors = tuple(pool._start_errors[-3:])
        with self._cond:
            old = self._view
            if [x[0] for x in old.replicas] == [x[0] for x in ready] and old.starting == starting:
                return
            self._view = View(old.version + 1, info, ready, starting, errors)
            self._cond.notify_all()

    def view(self, since: int, timeout_s: float = 30.0) -> View:
        """The membership once its version is past `since` (at most `timeout_s` later: then as it is)."""
        with self._cond:
            self._cond.wait_for(lambda: self._view.version > since or self._closed, timeout_s)
            return self._view

    @ray.method(concurrency_group="loads")
    def loads(self, client: str, mine: dict[int, int] | None) -> tuple[dict[int, int], float]:
        """A client's tokens in flight per replica in (None: it left); every client's totals, and how long
        until it should call again, out: the period grows with the clients, so the board's thread keeps up."""
        now = time.monotonic()
        self._post(client, mine)
        if now >= self._next_sweep:  # a client that died or went quiet stops counting
            self._next_sweep = now + 1.0
            for c in [c for c, t in self._heard.items() if now - t > _LOADS_STALE_S]:
                self._post(c, None)
        if mine is not None:
            self._heard[client] = now
        return dict(self._totals), max(_LOADS_EVERY_S, len(self._heard) * _LOADS_CALL_S)

    def _post(self, client: str, mine: dict[int, int] | None) -> None:
        for rid, tokens in self._board.pop(client, {}).items():
            left = self._totals.pop(rid) - tokens
            if left:
                self._totals[rid] = left
        if mine is None:
            self._heard.pop(client, None)
            return
        self._board[client] = mine
        for rid, tokens in mine.items():
            self._totals[rid] = self._totals.get(rid, 0) + tokens

    def describe(self) -> tuple[ModelInfo, list[ray.ObjectRef], dict[str, Any], View, dict[str, str]]:
        # the weights ref in a list: the client borrows it
        where = {"model_path": self.pool.model_path, "engine_name": self.pool.engine_name}
        where["placement"] = self.pool.placement
        return self.pool.info, [self.pool.weights_ref()], self.pool.dispatch_settings(), self._view, where

    def report(self, replica_id: int, reason: str) -> None:
        """A client found this replica dead or hung: retire it (its TP ranks die with it) and start another."""
        self.pool._owner.call(self._retire, replica_id, reason)

    def _retire(self, replica_id: int, reason: str) -> None:
        r = self.pool._replicas.get(replica_id)
        if r is not None and r.state in ("ready", "draining"):
            self.pool._on_replica_death(r, RuntimeError(f"a client reported it: {reason}"))

    @ray.method(concurrency_group="loads")  # the board's thread: it reads the totals
    def stats(self) -> dict[str, Any]:
        """The owner's stats; each replica's `inflight_tokens` is every client's, as last reported."""
        out = self.pool.stats()
        for r in out["replicas"]:
            r["inflight_tokens"] = self._totals.get(r["replica_id"], 0)
        return out

    def scale(self, replicas: int) -> None:
        self.pool.scale(replicas)

    def shutdown(self) -> None:
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        self.pool.shutdown()


class PoolClient(PooledTargetModel):
    """A pool's client, with the pool's whole surface (`stream`, `submit`, `generate`, `forward_packed`,
    `generate_batch[_async]`...): it dispatches to the owner's replicas itself. Cheap: one per process or rank.

    It dispatches with the owner's settings (byte budget, shard size, timeouts) unless `overrides` says
    otherwise: the budget is this client's own, so many clients may want a share each. `stats()` counts
    this client's traffic; `pool_stats()` is the owner's view (replicas, replacements).
    """

    def __init__(self, server: Any, owner: bool, name: str, **overrides: Any):
        self._server, self._owns_pool = server, owner
        self.name = name  # what other processes `connect` to
        info, (weights_ref,), settings, view, where = ray.get(server.describe.remote())
        self.model_path, self.engine_name = where["model_path"], where["engine_name"]  # what the replicas serve
        self.placement = where["placement"]  # colocated: a rank reads its own node's replicas
        unknown = set(overrides) - set(settings)
        if unknown:
            raise TypeError(f"unknown client settings {sorted(unknown)}; known: {sorted(settings)}")
        self._init_dispatch(**{**settings, **overrides})
        self._shared = True
        self._info, self._weights_ref = info, weights_ref
        self._target_replicas = 0  # the owner's business
        self._gone: set[int] = set()  # replicas this client found dead: never taken back from a stale view
        self._key = uuid.uuid4().hex  # this client on the owner's load board
        self._loads_out = False  # a loads call is on its way
        self._next_loads = self._last_loads = 0.0
        self._activity_told = -1  # `_activity` as of the last exchange
        self._loads_every_s = _LOADS_EVERY_S  # as the owner says (it grows with the clients)
        self._view = View(-1, info)
        self._start_owner()
        self._owner.call(self._apply, view)

    # membership comes from the owner -----------------------------------------------------------------

    def _apply(self, view: View) -> None:
        """Take a newer view, then ask for the next one (a long poll, on the owner thread's queue)."""
        if self._server is not None:
            self._owner.on_resolve(self._server.view.remote(max(view.version, self._view.version)), self._on_view)
        if view.version <= self._view.version:
            return
        self._view = view
        self._start_errors = list(view.errors)  # the owner's: what a client's "no replicas" error shows
        if view.info is not None:
            self._info = view.info
        listed = set()
        for rid, actor, desc in view.replicas:
            listed.add(rid)
            if rid not in self._replicas and rid not in self._gone:
                # no watch ref: a busy replica's death shows in its shards' refs, an idle one's in a new view
                self._replicas[rid] = _Replica(rid, actor, None, state="ready", desc=desc)
        for r in list(self._replicas.values()):
            if r.replica_id not in listed and r.state == "ready":
                r.state = "draining"  # the owner retired or drained it: finish what it runs, send it nothing
        self._reconcile()

    def _tick(self) -> float:
        wake = super()._tick()
        return min(wake, self._share_loads())

    def _share_loads(self, asked: bool = False) -> float:
        """Tell the owner this client's tokens in flight per replica and hear everyone's, one call at a time:
        every `_loads_every_s` while its load moves (a shard sent or settled since the last exchange), every
        `_LOADS_IDLE_S` while it has a stream open or work in flight but nothing moved, never while quiet
        (unless `asked`: `stats()`). Returns when it is next due."""
        now = time.monotonic()
        if self._server is None or self._loads_out:
            return now + _LOADS_IDLE_S
        if self._activity != self._activity_told or asked:
            due = self._next_loads
        elif self._inflight or self._streams:
            due = max(self._next_loads, self._last_loads + _LOADS_IDLE_S)
        else:
            return now + _LOADS_IDLE_S  # quiet: the board has its last word (no tokens), and it places nothing
        if now < due:
            return due
        mine = {r.replica_id: r.inflight_tokens for r in self._replicas.values() if r.inflight_tokens}
        self._loads_out, self._last_loads, self._activity_told = True, now, self._activity
        self._owner.on_resolve(self._server.loads.remote(self._key, mine), self._on_loads, mine)
        return now + _LOADS_IDLE_S

    def _snapshot(self) -> dict[str, Any]:
        self._share_loads(asked=True)  # what it shows of the others' loads is at most one exchange old
        return super()._snapshot()

    def _on_loads(self, mine: dict[int, int], fut: Any) -> None:
        self._loads_out = False
        try:
            totals, self._loads_every_s = fut.result()
        except Exception:
            return  # the owner is gone: the membership poll says so
        self._next_loads = time.monotonic() + self._loads_every_s
        for r in self._replicas.values():
            r.others_tokens = max(0, totals.get(r.replica_id, 0) - mine.get(r.replica_id, 0))

    def _on_view(self, fut: Any) -> None:
        try:
            view = fut.result()
        except Exception as e:  # the owner is gone: serve on with the replicas known, while they live
            if self._server is not None:
                log.warning("pool owner unreachable (%s): no more membership updates", e)
            self._server = None
            return
        self._apply(view)

    def _reconcile(self) -> None:
        for r in list(self._replicas.values()):
            if r.state == "draining" and not r.inflight:
                self._remove(r)

    def _remove(self, r: _Replica) -> None:
        if self._replicas.get(r.replica_id) is r:  # the owner kills and releases it, not a client
            r.state = "dead"
            del self._replicas[r.replica_id]

    def _on_replica_death(self, r: _Replica, err: BaseException) -> None:
        if r.replica_id not in self._gone:
            self._gone.add(r.replica_id)
            if self._server is not None:
                self._server.report.remote(r.replica_id, f"{type(err).__name__}: {err}")
        super()._on_replica_death(r, err)

    def _none_left(self) -> bool:
        return not self._replicas and (self._server is None or not (self._view.replicas or self._view.starting))

    def _wait_ready(self, timeout_s: float) -> None:
        return  # replicas arrive with views

    def _let_go(self) -> None:
        for st in list(self._streams.values()):
            self._fail(st, RuntimeError("the pool client was closed"))
        self._replicas.clear()

    # the owner's business, through the server --------------------------------------------------------

    def weights_ref(self) -> ray.ObjectRef:
        return self._weights_ref

    def pool_stats(self) -> dict[str, Any]:
        """The owner's stats: every replica's state and node, replacements (not this client's traffic)."""
        return ray.get(self._server.stats.remote())

    def scale(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        ray.get(self._server.scale.remote(replicas))

    def shutdown(self) -> None:
        """A client lets go; the owner's close also shuts the pool down (its replicas, then the server)."""
        self._close_executor()
        if self._owner is not None and not self._owner.stopped:
            self._owner.call(self._let_go)
            self._owner.stop()
        server, self._server = self._server, None
        if server is not None:
            server.loads.remote(self._key, None)  # off the board now, not once it goes stale
        if self._owns_pool and server is not None:
            try:
                ray.get(server.shutdown.remote(), timeout=60)
            finally:
                ray.kill(server, no_restart=True)


def serve_pool(name: str, model_path: str, **pool_kwargs: Any) -> PoolClient:
    """Start a pool that any process in the cluster can `connect` to by `name`; returns the owner's client.

    `pool_kwargs` are `PooledTargetModel`'s. The pool lives until the owner's `close()` or the owner's exit.
    """
    from eagle_ray.ray_init import init_ray

    if not ray.is_initialized():
        init_ray()
    # threads: each client's membership long-poll holds one; the load board has a thread of its own
    cls = ray.remote(num_cpus=0, max_concurrency=1024, concurrency_groups={"loads": 1})(PoolServer)
    server = cls.options(name=name, namespace=_NAMESPACE, max_restarts=0).remote(model_path, pool_kwargs)
    try:
        return PoolClient(server, owner=True, name=name)
    except BaseException:
        ray.kill(server, no_restart=True)
        raise


def connect_pool(name: str, **overrides: Any) -> PoolClient:
    """A client of the pool another process started with `serve_pool(name, ...)`; `overrides`: its own
    dispatch settings (`max_inflight_bytes`, `shard_tokens`, `max_inflight_per_replica`, ...)."""
    try:
        server = ray.get_actor(name, namespace=_NAMESPACE)
    except ValueError:
        raise ValueError(f"no eagle_ray pool named {name!r} in this Ray cluster; start one with serve_pool") from None
    return PoolClient(server, owner=False, name=name, **overrides)
