"""Chaos for a live pool: kill target replicas at random moments while a run goes on.

Faults: the ways replicas die or fail to start on a real cluster, and one of the control plane:
  ray_kill     `ray.kill` of the replica actor (an operator, an autoscaler, a preempted node's drain)
  sigkill      SIGKILL of the replica's own process, TP rank 0 (the OOM killer, a segfault)
  sigkill_tp   SIGKILL of a TP rank other than 0, a child process of the replica (tp_size > 1 only)
  pool_server  `ray.kill` of a shared pool's named relay (`serve_pool` pools only): Ray restarts it, and its
               clients find it again
  start_failure  `ray.kill` of a replica whose replacement's next starts fail (a bad GPU or driver on a node):
               the pool backs off and starts again (`start_failures`: the file the replicas read, see
               `testing.faults.fail_next_starts`)

OS kills run as a Ray task pinned to the replica's node, so they work on a multi-node cluster too.
Faults start once the pool has delivered a shard of the run; each hits a random ready replica, even while
earlier victims are still being replaced (so the run may find no replica for a while, and must wait).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from eagle_ray.pool.shared import POOL_NAMESPACE, PoolClient
from eagle_ray.testing.faults import FAULTS, fail_next_starts

log = logging.getLogger(__name__)

START_FAILURES = 2  # starts that fail after a "start_failure" kill: two rounds of backoff (1 s, 2 s)


@dataclass
class Fault:
    at_s: float  # seconds after the monkey started
    kind: str
    replica_id: int | None  # None for pool_server
    pid: int | None  # the process killed (None for ray_kill and pool_server)
    tp_rank: int | None


@ray.remote(num_cpus=0)
def _kill_pid(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class ChaosMonkey:
    """A driver thread that injects up to `max_faults` faults into `pool`, one every `every_s` seconds
    (uniform in the range, seeded), cycling through `kinds` so each kind is exercised.
    `recover_timeout_s`: how long to wait for a ready replica to hit before giving up (an error)."""

    def __init__(
        self,
        pool: Any,
        kinds: tuple[str, ...] = FAULTS,
        every_s: tuple[float, float] = (5.0, 15.0),
        max_faults: int = 3,
        seed: int = 0,
        recover_timeout_s: float = 300.0,
        start_failures: str | None = None,
    ):
        bad = [k for k in kinds if k not in FAULTS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULTS}, got {kinds}")
        replicas = pool.replicas()
        if "sigkill_tp" in kinds and all(len(d["ranks"]) < 2 for d in replicas):
            raise ValueError("sigkill_tp needs replicas with tp_size > 1")
        if "pool_server" in kinds and not isinstance(pool, PoolClient):
            raise ValueError("pool_server needs a shared pool (a serve_pool pool's client)")
        if "start_failure" in kinds and start_failures is None:
            raise ValueError("start_failure needs start_failures: its replicas' EAGLE_RAY_FAIL_STARTS_FILE")
        self.start_failures = start_failures
        self.pool, self.kinds, self.every_s, self.max_faults = pool, kinds, every_s, max_faults
        self.recover_timeout_s = recover_timeout_s
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eagle-ray-chaos", daemon=True)
        self._t0, self._delivered0 = 0.0, 0
        # the owner's stats are the replicas' truth; a shared pool's clients' work shows as tokens in flight
        # there (the owner's own client may dispatch nothing)
        self._stats = pool.pool_stats

    def start(self) -> ChaosMonkey:
        self._t0 = time.monotonic()
        self._delivered0 = self._stats()["shards_delivered"]
        self._thread.start()
        return self

    def stop(self) -> list[Fault]:
        self._stop.set()
        self._thread.join(timeout=self.recover_timeout_s + 30)
        return self.faults

    def __enter__(self) -> ChaosMonkey:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            if not self._wait(_serving(self._delivered0), "the first shard"):
                return  # faults start once the run is being served, not while it sets up
            while len(self.faults) < self.max_faults:
                if self._stop.wait(self.rng.uniform(*self.every_s)):
                    return
                victims = self._wait(self._victims, "a ready replica")
                if not victims:
                    return
                self.faults.append(self.inject(self.kinds[len(self.faults) % len(self.kinds)], victims))
                log.warning("chaos: %s", self.faults[-1])
        except BaseException as e:  # noticed by the caller, never raised into the run
            log.exception("chaos monkey failed")
            self.error = e

    def _wait(self, until: Any, what: str) -> Any:
        """Poll the pool's stats until `until(stats)` is true, and return that; None if stopped first."""
        deadline = time.monotonic() + self.recover_timeout_s
        while not self._stop.is_set():
            if got := until(self._stats()):
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"chaos: no {what} within {self.recover_timeout_s}s")
            self._stop.wait(0.2)
        return None

    def _victims(self, st: dict[str, Any]) -> list[dict]:
        """Ready replicas by `st` (for a shared pool the owner's: a client's own list lags its views), with what
        they reported (pids, TP ranks)."""
        ready = {r["replica_id"] for r in st["replicas"] if r["state"] == "ready"}
        return [d for d in self.pool.replicas() if d["replica_id"] in ready]

    def inject(self, kind: str, victims: list[dict] | None = None) -> Fault:
        """Kill one randomly chosen ready replica (of `victims`, default the pool's), the `kind` way, or the pool's
        relay."""
        if kind == "pool_server":
            ray.kill(ray.get_actor(self.pool.name, namespace=POOL_NAMESPACE), no_restart=False)  # Ray restarts it
            return Fault(time.monotonic() - self._t0, kind, None, None, None)
        desc = self.rng.choice(victims or self.pool.replicas())
        rid, at = desc["replica_id"], time.monotonic() - self._t0
        if kind == "start_failure":
            fail_next_starts(self.start_failures, START_FAILURES)
        if kind in ("ray_kill", "start_failure"):
            actor = self.pool.replica_actor(rid)  # the pool owns the handle; a fault tool borrows it
            if actor is not None:  # (else it died meanwhile, of something else)
                ray.kill(actor, no_restart=True)
            return Fault(at, kind, rid, None, None)
        ranks = [r for r in desc["ranks"] if (r["tp_rank"] != 0) == (kind == "sigkill_tp")]
        rank = self.rng.choice(ranks)
        on_node = NodeAffinitySchedulingStrategy(desc["node_id"], soft=False)
        ray.get(_kill_pid.options(scheduling_strategy=on_node).remote(rank["pid"]))
        return Fault(at, kind, rid, rank["pid"], rank["tp_rank"])


def _serving(delivered0: int) -> Any:
    """A pool serving the run: a shard delivered since the start, or (clients of a shared pool) work in flight."""
    return lambda st: st["shards_delivered"] > delivered0 or any(r["inflight_tokens"] for r in st["replicas"])
