"""One pool, many clients: a pool's replicas owned by one process, used from any process.

`serve_pool(name, model_path, ...)` starts the pool in the calling process (its host: a `PooledTargetModel`
that starts, watches, replaces and scales the replicas) and a named `PoolServer` actor, the pool's relay, and
returns the host's client; `PooledTargetModel.connect(name)` (= `connect_pool`) gives any other process in the
Ray cluster, a trainer's rank for example, a client of the same replicas.

Why the lifecycle lives with the host and the named actor is only a relay: the host is the job's driver, which
the job fate-shares with anyway, and lifecycle work is a few events a minute, not per batch. The replicas are the
host's actors: they die with it (nothing outlives the job, no detached actor to leak) and with nothing else. The
relay holds nothing it cannot get back: Ray restarts it (`max_restarts=-1`, pinned to the host's node, whose loss
is the job's anyway), the host republishes its view, description and stats at its next sync (every 2 s, backing
off while the relay restarts), and the clients refill the load board at their next exchange. The alternative,
detached replicas that a restarted server rebuilds its state from, leaks every replica when the job dies before
its shutdown, and must rebuild starts in progress and counters it cannot see.

The relay is the control plane only: membership. A client is a `PooledTargetModel` of its own that dispatches
its shards straight to the replicas, keeps its own shard ledger, and owns its results, so no request, tensor or
object ref of a client passes through the relay (or the driver). What grows with the traffic runs where the
traffic is. The client learns of membership by long-polling the relay (`view`); a replica it finds dead or hung
it drops at once, re-runs its shards elsewhere, and reports to the relay, whose host retires and replaces it for
everyone. A client whose long poll fails (the relay died) serves on with the replicas it knows, finds the relay
by name again (backing off up to 5 s), and resumes views, load exchanges and reports (a report the dead relay
lost is sent again while views still list the replica).

Placement sees everyone's load: a few times a second each busy client tells the relay its tokens
in flight per replica and hears the totals (`loads`, one small call, never per shard), so it sends
each shard to the shorter queue, counting other clients' shards, of two replicas drawn at random
(the shortest of all would draw every client to the same replica between two exchanges; with 4
replicas or fewer it takes the shortest of all). Without
the exchange, clients that each balance their own load pile onto some replicas while others idle.

The byte budget (`max_inflight_bytes`, default a quarter of the cluster's object store) is the cluster's: each
client holds a share, the budget over the clients on the load board (heard from within 5 s), as the relay says at
each exchange (a new client starts with the budget over the clients there plus itself). So the clients' sum stays
within it, except for one exchange (0.1 s while busy) after a client joins or a quiet one wakes up.

A client's requests are served exactly once and in its own order (its own ledger), concurrently
with other clients'. A client that dies leaks nothing: Ray frees the objects it owned.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from eagle_ray.contract import ModelInfo
from eagle_ray.pool.lifecycle import _Replica
from eagle_ray.pool.pooled import Membership, PooledTargetModel
from eagle_ray.pool.surface import Pool

log = logging.getLogger(__name__)

POOL_NAMESPACE = "eagle_ray"  # a client in another job finds the pool without knowing the owner's namespace
_LOADS_EVERY_S = 0.1  # a busy client's load exchange: fresh against shards of a second, 10 small calls a second
_LOADS_STALE_S = 5.0  # a client not heard from for this long (dead, or gone quiet) counts for nothing
_LOADS_CALL_S = 0.002  # the board's thread spends well under this per call: its period is this times the clients
_LOADS_IDLE_S = 1.0  # a client whose load has not moved, with a stream open or work in flight, tells it this often
_RETRY_S = (0.2, 5.0)  # finding a restarting relay again: the first wait, doubled up to the last


@dataclass(frozen=True)
class View:
    """The pool's membership as its host sees it: what a client may dispatch to."""

    version: int
    info: ModelInfo | None
    replicas: tuple[tuple[int, Any, dict], ...] = ()  # ready ones: (replica id, actor handle, description)
    starting: int = 0  # replicas being started (a client with none ready waits for them)
    errors: tuple[str, ...] = field(default_factory=tuple)  # the host's last start errors


class PoolServer:
    """Actor body: the pool's named relay. It owns nothing but what it relays, all of it republished by the
    pool's host (`_Host`, in the process that called `serve_pool`) after a restart: the membership view, the
    description a client connects with, the host's last stats; the clients' reports and scale requests, which
    the host takes with its sync long poll; and the load board, which the clients refill as they exchange."""

    def __init__(self) -> None:
        self._cond = threading.Condition()  # the view and description: clients' long polls wait on it
        self._view: View | None = None
        self._desc: dict[str, Any] | None = None
        self._stats: dict[str, Any] | None = None
        self._closed = False
        self._asks = threading.Condition()  # what the host takes: reports and a scale request
        self._reports: list[tuple[int, str]] = []
        self._scale: int | None = None
        # the load board, owned by the one thread of the "loads" group: client -> {replica id: tokens in flight}
        self._board: dict[str, dict[int, int]] = {}
        self._heard: dict[str, float] = {}
        self._totals: dict[int, int] = {}
        self._next_sweep = 0.0

    # the host's side ---------------------------------------------------------------------------------

    def publish(self, view: View) -> None:
        """A new membership (the host posts it at each change; a restarted relay hears it at the next sync)."""
        with self._cond:
            if self._view is None or view.version > self._view.version:
                self._view = view
                self._cond.notify_all()

    def sync(
        self, view: View, stats: dict[str, Any], desc: dict[str, Any] | None, wait_s: float
    ) -> tuple[list[tuple[int, str]], int | None, bool]:
        """The host's long poll: its view, stats and (when asked) description in; the clients' reports and the
        last scale request out, as soon as there are any (at most `wait_s` later), and whether the relay still
        lacks the description (a restarted one)."""
        self.publish(view)
        with self._cond:
            self._stats = stats
            if desc is not None:
                self._desc = desc
                self._cond.notify_all()
            missing = self._desc is None
        with self._asks:
            self._asks.wait_for(lambda: self._reports or self._scale is not None or self._closed, wait_s)
            out, self._reports, scale, self._scale = self._reports, [], self._scale, None
        return out, scale, missing

    def close(self) -> None:
        self._closed = True
        for c in (self._cond, self._asks):
            with c:
                c.notify_all()

    # the clients' side -------------------------------------------------------------------------------

    def describe(self, timeout_s: float = 60.0) -> tuple[dict[str, Any], View, int]:
        """What a client connects with (model, weights ref, dispatch settings, where), the current view and the
        number of clients on the load board; a restarted relay waits for its host's next sync."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._desc is not None and self._view is not None, timeout_s):
                raise TimeoutError(f"the pool's host has not published it within {timeout_s}s")
            return self._desc, self._view, len(self._heard)

    def view(self, since: int, timeout_s: float = 30.0) -> View | None:
        """The membership once its version is past `since` (at most `timeout_s` later: then as it is; None on a
        restarted relay its host has not synced with yet)."""
        with self._cond:
            self._cond.wait_for(lambda: (self._view and self._view.version > since) or self._closed, timeout_s)
            return self._view

    def report(self, replica_id: int, reason: str) -> None:
        """A client found this replica dead or hung: the host retires it (its TP ranks die with it) and starts
        another."""
        with self._asks:
            self._reports.append((replica_id, reason))
            self._asks.notify_all()

    def scale(self, replicas: int) -> None:
        with self._asks:
            self._scale = replicas
            self._asks.notify_all()

    @ray.method(concurrency_group="loads")
    def loads(self, client: str, mine: dict[int, int] | None) -> tuple[dict[int, int], float, int | None]:
        """A client's tokens in flight per replica in (None: it left); every client's totals, how long until it
        should call again (the period grows with the clients, so the board's thread keeps up) and its share of
        the pool's byte budget (the budget over the clients heard from lately; None until the host synced) out."""
        now = time.monotonic()
        self._post(client, mine)
        if now >= self._next_sweep:  # a client that died or went quiet stops counting
            self._next_sweep = now + 1.0
            for c in [c for c, t in self._heard.items() if now - t > _LOADS_STALE_S]:
                self._post(c, None)
        if mine is not None:
            self._heard[client] = now
        desc = self._desc
        share = None if desc is None else _share(desc["settings"]["max_inflight_bytes"], len(self._heard))
        return dict(self._totals), max(_LOADS_EVERY_S, len(self._heard) * _LOADS_CALL_S), share

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

    @ray.method(concurrency_group="loads")  # the board's thread: it reads the totals
    def stats(self) -> dict[str, Any]:
        """The host's stats as of its last sync (a few seconds old at most), with the board's loads."""
        with self._cond:
            # short: this is the board's one thread (a restarted relay has the host's stats within its backoff)
            if not self._cond.wait_for(lambda: self._stats is not None, 10.0):
                raise TimeoutError("the pool's host has not synced with this restarted relay yet; ask again")
            out = dict(self._stats, replicas=[dict(r) for r in self._stats["replicas"]])
        return _with_loads(out, self._totals, len(self._heard))

    @ray.method(concurrency_group="loads")
    def board(self) -> tuple[dict[int, int], int]:
        """Every client's tokens in flight per replica, as last reported, and the number of clients."""
        return dict(self._totals), len(self._heard)


def _with_loads(stats: dict[str, Any], totals: dict[int, int], clients: int) -> dict[str, Any]:
    """A host's stats with each replica's `inflight_tokens` every client's, as last reported."""
    for r in stats["replicas"]:
        r["inflight_tokens"] = totals.get(r["replica_id"], 0)
    stats["clients"] = clients
    return stats


def _share(budget: int, clients: int) -> int:
    return budget // max(clients, 1)


class _Host:
    """In the process that called `serve_pool`: the pool itself (its replicas' lifecycle, on its owner thread) and
    its link to the relay. Membership changes go out at once (`publish`); a sync long poll, one thread, brings the
    clients' reports and scale requests in and carries the host's view, stats and, to a restarted relay, the
    description (backing off while the relay restarts)."""

    _SYNC_WAIT_S = 2.0  # a relay's stats are at most this old; reports come at once

    def __init__(self, server: Any, pool: PooledTargetModel):
        self.server, self.pool = server, pool
        self._stop = threading.Event()
        self._version = 0
        self._view = View(0, None)
        self._key: tuple = ()
        pool.on_membership(self._changed)
        where = {"model_path": pool.model_path, "engine_name": pool.engine_name, "placement": pool.placement}
        # the weights ref in a list: a client borrows it
        self._desc = {"info": pool.info, "weights": [pool.weights_ref()], "settings": pool.dispatch_settings()}
        self._desc["where"] = where
        self._sync_once(self._desc)  # the relay can describe the pool before any client asks
        self._thread = threading.Thread(target=self._sync_loop, name="eagle_ray-pool-host", daemon=True)
        self._thread.start()

    def _changed(self, m: Membership) -> None:
        """On the pool's owner thread: a new view for the clients, when what they may dispatch to changed."""
        key = (tuple(x[0] for x in m.ready), m.starting)
        if key == self._key:
            return
        self._key, self._version = key, self._version + 1
        self._view = View(self._version, m.info, m.ready, m.starting, m.errors)
        self.server.publish.remote(self._view)  # lost if the relay is restarting: the next sync carries it

    def _sync_once(self, desc: dict[str, Any] | None) -> bool:
        """One sync; True if the relay lacks the description."""
        call = self.server.sync.remote(self._view, self.pool.stats(), desc, self._SYNC_WAIT_S)
        reports, scale, missing = ray.get(call, timeout=self._SYNC_WAIT_S + 60)
        for rid, reason in reports:
            self.pool.retire(rid, f"a client reported it: {reason}")
        if scale is not None:
            self.pool.scale(scale)
        at = time.monotonic()
        self.pool.heard_loads(ray.get(self.server.board.remote(), timeout=60)[0], at)
        return missing

    def _sync_loop(self) -> None:
        missing, backoff = False, _RETRY_S[0]
        while not self._stop.is_set():
            try:
                missing = self._sync_once(self._desc if missing else None)
                backoff = _RETRY_S[0]
            except Exception as e:  # the relay died: Ray restarts it; it hears everything again at the next sync
                if self._stop.is_set():
                    return
                log.warning("pool relay unreachable (%s: %s); again in %.1fs", type(e).__name__, e, backoff)
                missing = True
                self._stop.wait(backoff)
                backoff = min(2 * backoff, _RETRY_S[1])

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            ray.get(self.server.close.remote(), timeout=10)  # ends the sync and the clients' long polls
        self._thread.join(timeout=self._SYNC_WAIT_S + 70)
        self.pool.shutdown()
        ray.kill(self.server, no_restart=True)


class PoolClient(Pool):
    """A pool's client, with the pool's whole surface (`stream`, `submit`, `generate`, `forward_packed`,
    `generate_batch[_async]`...): it dispatches to the host's replicas itself. Cheap: one per process or rank.

    It dispatches with the host's settings (shard size, timeouts) unless `overrides` says otherwise. Its byte
    budget is its share of the host's (`max_inflight_bytes` over the clients heard from lately, as the relay
    tells it at each load exchange); an override of `max_inflight_bytes` caps that share. `stats()` counts this
    client's traffic; `pool_stats()` is the host's view (replicas, replacements).
    """

    def __init__(self, server: Any, name: str, host: _Host | None = None, **overrides: Any):
        self._server, self._host = server, host
        self.name = name  # what other processes `connect` to
        desc, view, clients = ray.get(server.describe.remote())
        where, settings = desc["where"], desc["settings"]
        self.model_path, self.engine_name = where["model_path"], where["engine_name"]  # what the replicas serve
        self.placement = where["placement"]  # colocated: a rank reads its own node's replicas
        unknown = set(overrides) - set(settings)
        if unknown:
            raise TypeError(f"unknown client settings {sorted(unknown)}; known: {sorted(settings)}")
        self._budget_cap = overrides.get("max_inflight_bytes")  # this client's own limit on its share, if any
        self._init_dispatch(**{**settings, **overrides})
        self._max_inflight_bytes = self._capped(_share(settings["max_inflight_bytes"], clients + 1))
        self._shared = True
        self._info, self._weights_ref = desc["info"], desc["weights"][0]
        self._gone: set[int] = set()  # replicas this client found dead: never taken back from a stale view
        self._loads_out = False  # a loads call is on its way
        self._next_loads = self._last_loads = 0.0
        self._activity_told = -1  # `_activity` as of the last exchange
        self._loads_every_s = _LOADS_EVERY_S  # as the relay says (it grows with the clients)
        self._lost_since: float | None = None  # the relay stopped answering then: find it again, backing off
        self._retry_s, self._next_find = _RETRY_S[0], 0.0
        self._view = View(-1, desc["info"])
        self._start_owner()
        self._owner.call(self._apply, view)

    # membership comes from the relay ----------------------------------------------------------------

    def _apply(self, view: View | None) -> None:
        """Take a newer view, then ask for the next one (a long poll, on the owner thread's queue)."""
        self._poll(view.version if view is not None else -1)
        if view is None:
            return
        if self._lost_since is not None:  # the relay answers with its host's views again
            log.warning("pool relay %r back after %.1fs", self.name, time.monotonic() - self._lost_since)
            self._lost_since, self._retry_s = None, _RETRY_S[0]
        if view.version <= self._view.version:
            return
        self._view = view
        self._start_errors = list(view.errors)  # the host's: what a client's "no replicas" error shows
        if view.info is not None:
            self._info = view.info
        listed = set()
        for rid, actor, desc in view.replicas:
            listed.add(rid)
            if rid in self._gone:  # still listed: the report may have been lost with a relay that restarted
                self._server.report.remote(rid, "found dead by a client (reported again)")
            elif rid not in self._replicas:
                # no watch ref: a busy replica's death shows in its shards' refs, an idle one's in a new view
                self._replicas[rid] = _Replica(rid, actor, None, state="ready", desc=desc)
        for r in list(self._replicas.values()):
            if r.replica_id not in listed and r.state == "ready":
                r.state = "draining"  # the host retired or drained it: finish what it runs, send it nothing
        self._reconcile()

    def _poll(self, since: int) -> None:
        if self._server is not None:
            self._owner.on_resolve(self._server.view.remote(max(since, self._view.version)), self._on_view)

    def _on_view(self, fut: Any) -> None:
        try:
            view = fut.result()
        except Exception as e:  # the relay died (Ray restarts it): serve on with the replicas known, find it again
            if self._server is None:
                return  # closed
            if self._lost_since is None:
                log.warning("pool relay unreachable (%s: %s): finding it again", type(e).__name__, e)
                self._lost_since = time.monotonic()
            self._next_find = time.monotonic() + self._retry_s
            self._retry_s = min(2 * self._retry_s, _RETRY_S[1])
            return
        self._apply(view)

    def _find_server(self, now: float) -> None:
        """Look the relay up by name again and resume the long poll (a view ends the outage; a failed poll
        backs off again); loads and reports follow."""
        try:
            self._server = ray.get_actor(self.name, namespace=POOL_NAMESPACE)
        except Exception as e:
            self._next_find = now + self._retry_s
            self._retry_s = min(2 * self._retry_s, _RETRY_S[1])
            log.debug("pool relay %r not found yet: %s", self.name, e)
            return
        self._next_find = float("inf")  # until this poll fails
        self._poll(self._view.version)

    def _tick(self) -> float:
        wake = super()._tick()
        if self._lost_since is not None and self._server is not None:
            now = time.monotonic()
            if now >= self._next_find:
                self._find_server(now)
            wake = min(wake, self._next_find)
        return min(wake, self._share_loads())

    def _share_loads(self, asked: bool = False) -> float:
        """Tell the relay this client's tokens in flight per replica and hear everyone's, one call at a time:
        every `_loads_every_s` while its load moves (a shard sent or settled since the last exchange), every
        `_LOADS_IDLE_S` while it has a stream open or work in flight but nothing moved, never while quiet
        (unless `asked`: `stats()`). Returns when it is next due."""
        now = time.monotonic()
        if self._server is None or self._loads_out or self._lost_since is not None:
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
            totals, self._loads_every_s, share = fut.result()
        except Exception:
            self._next_loads = time.monotonic() + _LOADS_IDLE_S  # the relay is restarting: the long poll says so
            return
        self._next_loads = time.monotonic() + self._loads_every_s
        if share is not None:
            self._max_inflight_bytes = self._capped(share)
        for r in self._replicas.values():
            r.others_tokens = max(0, totals.get(r.replica_id, 0) - mine.get(r.replica_id, 0))

    def _capped(self, share: int) -> int:
        return share if self._budget_cap is None else min(share, self._budget_cap)

    def _reconcile(self) -> None:
        for r in list(self._replicas.values()):
            if r.state == "draining" and not r.inflight:
                self._remove(r)

    def _remove(self, r: _Replica) -> None:
        if self._replicas.get(r.replica_id) is r:  # the host kills and releases it, not a client
            r.state = "dead"
            del self._replicas[r.replica_id]

    def _lost(self, r: _Replica, err: BaseException) -> None:
        """Tell the relay (its host retires and replaces `r` for everyone); send it nothing more."""
        if r.replica_id not in self._gone:
            self._gone.add(r.replica_id)
            if self._server is not None:  # lost with a restarting relay: sent again while views list it
                self._server.report.remote(r.replica_id, f"{type(err).__name__}: {err}")
        self._remove(r)

    def _none_left(self) -> bool:
        # with the relay away, the last view says whether replicas are coming: wait for it to come back
        return not self._replicas and (self._server is None or not (self._view.replicas or self._view.starting))

    def _let_go(self) -> None:
        for st in list(self._streams.values()):
            self._fail(st, RuntimeError("the pool client was closed"))
        self._replicas.clear()

    # the host's business, through the relay ----------------------------------------------------------

    def weights_ref(self, fresh: bool = False) -> ray.ObjectRef:
        """The (embedding, lm_head) object; `fresh`: put again by a live replica (after the node that held the
        first was lost), owned by this client."""
        if fresh:
            actors = self._read(lambda: [r.actor for r in self._ready()])
            self._weights_ref = ray.put(_read_weights_from(actors))
        return self._weights_ref

    def pool_stats(self) -> dict[str, Any]:
        """The host's stats: every replica's state and node, replacements (not this client's traffic), and each
        replica's tokens in flight from every client."""
        if self._host is None:
            return ray.get(self._server.stats.remote())
        stats = self._host.pool.stats()  # fresh, where the relay's is as of its last sync
        try:
            board = ray.get(self._server.board.remote(), timeout=10)
        except Exception:  # the relay is restarting: the clients' loads are unknown for now
            board = ({}, 0)
        return _with_loads(stats, *board)

    def scale(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if self._host is not None:
            self._host.pool.scale(replicas)
        else:
            ray.get(self._server.scale.remote(replicas))

    def shutdown(self) -> None:
        """A client lets go; the host's close also shuts the pool down (its replicas, then the relay)."""
        self._close_executor()
        if self._owner is not None and not self._owner.stopped:
            self._owner.call(self._let_go)
            self._owner.stop()
        server, self._server = self._server, None
        if server is not None:
            server.loads.remote(self._key, None)  # off the board now, not once it goes stale
        host, self._host = self._host, None
        if host is not None:
            host.close()


def _read_weights_from(actors: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights, put again by the first of `actors` (live replicas) that answers."""
    errors = []
    for actor in actors:
        try:
            return ray.get(actor.weights.remote(), timeout=300)
        except Exception as e:  # it died meanwhile: the next one
            errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError(f"no live replica could put the target weights again: {errors}")


def read_weights(ref: ray.ObjectRef, pool: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the target's (embedding, lm_head) object; if it was lost with its node, a live replica of the pool
    named `pool` (`serve_pool`) puts it again."""
    try:
        return ray.get(ref)
    except ObjectLostError as e:
        if pool is None:
            raise
        log.warning("the target weights object was lost (%s): asking a live replica of %r", type(e).__name__, pool)
    server = ray.get_actor(pool, namespace=POOL_NAMESPACE)
    view = ray.get(server.view.remote(-1, 0.0)) or ray.get(server.view.remote(-1, 60.0))  # a restarted relay: wait
    return _read_weights_from([actor for _, actor, _ in view.replicas])


def serve_pool(name: str, model_path: str, **pool_kwargs: Any) -> PoolClient:
    """Start a pool that any process in the cluster can `connect` to by `name`; returns this process's client,
    whose `close()` shuts the pool down.

    `pool_kwargs` are `PooledTargetModel`'s. The pool's replicas are this process's (they live until that
    `close()` or this process's exit); the named relay is restarted by Ray when it dies.
    """
    from eagle_ray.ray_init import init_ray

    if not ray.is_initialized():
        init_ray()
    # threads: each client's membership long-poll holds one, the host's sync one; the load board has one of its own
    cls = ray.remote(num_cpus=0, max_concurrency=1024, concurrency_groups={"loads": 1})(PoolServer)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    server = cls.options(name=name, namespace=POOL_NAMESPACE, max_restarts=-1, scheduling_strategy=here).remote()
    host = None
    try:
        pool = PooledTargetModel(model_path, **pool_kwargs)
        try:
            host = _Host(server, pool)
        except BaseException:
            pool.shutdown()
            raise
        return PoolClient(server, name, host)
    except BaseException:
        if host is not None:
            host.close()
        ray.kill(server, no_restart=True)
        raise


def connect_pool(name: str, **overrides: Any) -> PoolClient:
    """A client of the pool another process started with `serve_pool(name, ...)`; `overrides`: its own
    dispatch settings (`max_inflight_bytes`, `shard_tokens`, `max_inflight_per_replica`, ...)."""
    try:
        server = ray.get_actor(name, namespace=POOL_NAMESPACE)
    except ValueError:
        raise ValueError(f"no eagle_ray pool named {name!r} in this Ray cluster; start one with serve_pool") from None
    return PoolClient(server, name, **overrides)
