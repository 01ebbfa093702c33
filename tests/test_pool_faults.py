"""The pool's start-up and replica lifecycle under faults: min_replicas, failed starts (backoff, node avoidance),
parallel shutdown, on a simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`, fake GPUs)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import ray
import torch
from conftest import CLUSTER_HEAD as HEAD
from conftest import random_batch
from ray.cluster_utils import Cluster
from test_pool_cluster import _starting

from eagle_ray import HFEagle3TargetModel
from eagle_ray.job.config import ConfigError, load_job_config
from eagle_ray.pool import PooledTargetModel
from eagle_ray.pool import placement as pl
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.lifecycle import BACKOFF_S, _Backoff
from eagle_ray.ray_init import ZERO_COPY_ENV
from eagle_ray.testing.faults import FAIL_START_ENV, FAIL_START_LOG_ENV


@pytest.mark.parametrize("replicas,min_replicas", [(2, 0), (2, 3), (0, 2)])
def test_min_replicas_out_of_range_is_refused_before_anything_starts(replicas, min_replicas):
    with pytest.raises(ValueError, match=rf"min_replicas must be in \[1, replicas={replicas}\], got {min_replicas}"):
        PooledTargetModel("/nonexistent", engine="hf", replicas=replicas, min_replicas=min_replicas)
    with pytest.raises(ConfigError, match="target.min_replicas: out of range"):
        load_job_config(overrides=[f"target.replicas={replicas}", f"target.min_replicas={min_replicas}"])


def test_failed_starts_back_off_by_rounds():
    """Replicas that fail together (one round) double the wait once; a start launched after a failure that
    fails again doubles it; the wait stops at its cap."""
    b = _Backoff()
    b.failed(launched_at=0.0, now=5.0)
    b.failed(launched_at=0.0, now=5.1)  # the same round: launched before the first failure
    assert (b.rounds, b.until) == (1, 5.1 + BACKOFF_S[0])
    b.failed(launched_at=6.2, now=8.0)
    assert (b.rounds, b.until) == (2, 8.0 + 2 * BACKOFF_S[0])
    for t in range(20):
        b.failed(launched_at=100.0 + t, now=100.5 + t)
    assert b.until == 119.5 + BACKOFF_S[1]


def test_a_death_blames_its_shard_only_when_the_shard_kills_another_replica_too():
    led = ShardLedger(max_failures=2)
    led.add(1)
    assert led.died(1, led.dispatch(1), "replica 0 died running it") == "suspect"  # re-queued, not counted
    assert led.count("pending") == 1 and not led.records[1].failures
    assert led.complete(1, led.dispatch(1))  # fine elsewhere: the death was the replica's, never the shard's
    led.add(2)
    assert led.died(2, led.dispatch(2), "replica 1 died running it") == "suspect"
    a = led.dispatch(2)
    assert led.died(2, a, "replica 2 died running it") == "blame"  # it killed two: both deaths count
    assert led.fail(2, a, "replica 2 died running it") == "quarantine"
    assert "attempt 1: replica 1 died" in led.error(2) and "attempt 2: replica 2 died" in led.error(2)
    assert led.died(2, a, "late") == "stale"


NODE = {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 128 * 2**20}  # one one-GPU replica per node


@pytest.fixture(scope="module")
def cluster():
    """A head with no GPU and three one-GPU nodes: each replica's node is known from how many there are."""
    c = _starting(lambda: Cluster(initialize_head=True, head_node_args=HEAD))
    try:
        nodes = [_starting(lambda: c.add_node(wait=False, **NODE)) for _ in range(3)]
        ray.init(address=c.address, runtime_env={"env_vars": ZERO_COPY_ENV})
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_paths):
    return HFEagle3TargetModel.from_pretrained(tiny_paths["llama"])


def _serve_and_check(pool, reference, seed: int) -> set[int]:
    """Stream a few batches: each shard exactly once, equal to transformers; returns the replicas that served."""
    inputs = [random_batch([20, 30, 25], seed=seed + i) for i in range(6)]
    seen = {}
    for r in pool.stream(inputs):
        assert r.error is None, r.error
        key = (r.batch_index, *r.sequences)
        assert key not in seen
        seen[key] = (r.replica_id, ray.get(r.ref).aux_hidden_states.clone())
    for b, batch in enumerate(inputs):
        parts = sorted((k[1], k[2]) for k in seen if k[0] == b)
        have = torch.cat([seen[(b, s, e)][1] for s, e in parts])
        torch.testing.assert_close(have, reference.forward_packed(batch).aux_hidden_states, atol=1e-5, rtol=0)
    return {rid for rid, _ in seen.values()}


def test_one_nodes_replicas_fail_to_start_the_pool_runs_on_the_others_and_backs_off(
    cluster, tiny_paths, reference, tmp_path
):
    """Three replicas, one per node; the middle node fails every start. The pool starts at min_replicas=2 on the
    others and serves; the replacement is kept off the bad node while its backoff lasts, then tries it again:
    the attempts there come at gaps that double (1 s, 2 s, 4 s...), never back to back."""
    _, nodes = cluster
    bad = nodes[1].node_id
    log = tmp_path / "failed_starts"
    env = {"env_vars": {FAIL_START_ENV: bad, FAIL_START_LOG_ENV: str(log)}}
    with PooledTargetModel.from_pretrained(
        tiny_paths["llama"], engine="hf", replicas=3, min_replicas=2, use_gpu=True, runtime_env=env
    ) as pool:
        served = {d["replica_id"]: d["node_id"] for d in pool.replicas()}
        assert len(served) == 2 and bad not in served.values()
        assert _serve_and_check(pool, reference, seed=10) <= set(served)

        def failures() -> list[float]:
            lines = log.read_text().split("\n") if log.exists() else []
            assert all(line.split()[0] == bad for line in lines if line)
            return [float(line.split()[1]) for line in lines if line]

        deadline = time.monotonic() + 300
        while len(failures()) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        times = failures()
        assert len(times) >= 4, times
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"failed starts on the bad node: {len(times)}, gaps {[round(g, 1) for g in gaps]} s")
        for k, gap in enumerate(gaps[:3]):  # each try waits out the backoff its node's last failure set
            assert gap >= BACKOFF_S[0] * 2**k, gaps
        assert {d["node_id"] for d in pool.replicas()} == set(served.values())  # the good nodes serve on


def test_a_pool_that_no_node_can_start_fails_early_with_the_cause(cluster, tiny_paths):
    """Every node fails every start (a bad GPU driver everywhere, a broken model): start-up fails once each node
    has failed a few rounds, naming the cause, long before start_timeout_s."""
    every = ",".join(n.node_id for n in cluster[1])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="every node that fits one failed to start it.*injected start failure"):
        PooledTargetModel.from_pretrained(
            tiny_paths["llama"], engine="hf", replicas=2, use_gpu=True, start_timeout_s=600,
            runtime_env={"env_vars": {FAIL_START_ENV: every}},
        )  # fmt: skip
    assert time.monotonic() - t0 < 300
    assert pl.live_groups() == []  # what it reserved is released


def test_a_replica_killed_under_a_shard_does_not_count_against_the_shard(cluster, tiny_paths, reference):
    """max_shard_failures=1: a shard would be quarantined at its first failure. Replicas killed while they run
    shards (an operator, a lost node: not the shards' doing) cost no shard: each re-runs, all are delivered."""
    with PooledTargetModel.from_pretrained(
        tiny_paths["llama"], engine="hf", replicas=2, use_gpu=True, max_shard_failures=1, max_inflight_per_replica=1
    ) as pool:
        inputs = [random_batch([20, 30, 25], seed=40 + i) for i in range(10)]
        results, killed, markers = [], 0, []
        for r in pool.stream(inputs):
            results.append(r)
            busy = [x for x in pool.stats()["replicas"] if x["state"] == "ready" and x["inflight_shards"]]
            if len(results) in (2, 5) and busy:
                victim = next(d for d in pool.replicas() if d["replica_id"] == busy[0]["replica_id"])
                os.kill(victim["pid"], signal.SIGKILL)  # the OOM killer: no goodbye
                killed += 1
                markers.append(victim["marker"])
        deadline = time.monotonic() + 60
        while pool.stats()["replicas_replaced"] < killed and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = pool.stats()
        markers += [d["marker"] for d in pool.replicas()]
    # the dead replicas' marker files outlive them (their clients read them), and go with the pool
    assert [m for m in markers if os.path.exists(m)] == []
    assert killed >= 1 and stats["replicas_replaced"] == killed
    assert [r.error for r in results if r.error] == [] and stats["shards_quarantined"] == 0
    assert sum(r.num_tokens for r in results) == sum(b.num_tokens for b in inputs)
    assert len({(r.batch_index, *r.sequences) for r in results}) == len(results)  # each once


def test_start_with_one_of_three_nodes_dead_starts_at_min_replicas_the_rest_join_and_stopped_ones_shut_down_at_once(
    cluster, tiny_paths, reference
):
    """One of the three nodes is gone: 3 replicas can't all start. The pool starts once min_replicas=2 are ready
    and serves; a node that joins later takes the third. Then the shutdown of three replicas whose processes are
    stopped (SIGSTOP: they never answer their shutdown call): the pool waits its timeout (here 10 s) for all of them
    together, not 10 s for each in turn, and their processes end."""
    c, nodes = cluster
    c.remove_node(nodes[2])
    t0 = time.monotonic()
    pool = PooledTargetModel.from_pretrained(
        tiny_paths["llama"], engine="hf", replicas=3, min_replicas=2, use_gpu=True, start_timeout_s=600
    )
    try:
        assert time.monotonic() - t0 < 300
        states = sorted(r["state"] for r in pool.stats()["replicas"])
        assert states == ["ready", "ready", "starting"]
        assert len(_serve_and_check(pool, reference, seed=20)) >= 1
        nodes[2] = _starting(lambda: c.add_node(wait=False, **NODE))
        deadline = time.monotonic() + 300
        while len(pool.replicas()) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {d["node_id"] for d in pool.replicas()} == {n.node_id for n in nodes}
        pids = [d["pid"] for d in pool.replicas()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        pool.shutdown(timeout_s=10.0)
        took = time.monotonic() - t_stop
    finally:
        pool.shutdown()
    assert 10 <= took < 30, took  # one at a time: 30 s
    assert pl.live_groups() == []
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "a stopped replica outlived the pool's shutdown"
        time.sleep(0.5)
