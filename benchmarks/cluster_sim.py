"""Cluster simulator: the real pool, object store and rank readers on a simulated many-node Ray cluster,
with a SYNTHETIC target (`eagle_ray.testing.synthetic`: contract-shaped supervision, compute paid by
sleeping) and consumers that "train" by sleeping. A benchmark tool; it tests no engine.

    .venv/bin/python benchmarks/cluster_sim.py            # ~10-15 min on 2 CPU cores
    .venv/bin/python benchmarks/cluster_sim.py --quick    # R in (1, 4, 16), short windows: a smoke run

A `ray.cluster_utils.Cluster` of a head and 8 worker nodes (logical CPUs only, 256 MB object store each)
runs R synthetic replicas (`serve_pool(..., engine="synthetic")`) and W consumer actors (num_cpus=0,
spread over the nodes), each a client of the pool reading its own batches (`step * W + rank`) with the
project's `RankReader`, as a Ray Train rank does: the driver only owns the pool. Batches are pre-built
(4 x 512 tokens) and cycled: data preparation is NOT in the driver figures (it is measured elsewhere).

Sweeps (supply = R x replica tokens/s, demand = W x trainer tokens/s):
  supply<demand   W = min(16, R), demand = 2 x supply.   Figure: delivered / ideal (goal >= 0.9).
  supply>=demand  W = min(16, R), demand = supply / 1.5.  Figure: trainers' wait share (goal <= 5%).
  fixed-W         W = 8 and demand fixed (4 batches/s); every R over-supplies (1.5R x). The delivered
                  batch rate is the same for every R, so what grows in driver ms/batch grows with R.
Per run, over the steady window (all consumers past their warm-up steps, until the first finishes):
  delivered/ideal  consumer-received tokens/s over min(supply, demand)
  wait%            time consumers spent waiting for supervision / their wall time
  driver ms/batch  driver process CPU (user+sys, all threads: Python and Ray core's C++ threads) per
                   delivered batch, from psutil cpu_times of the driver pid sampled by a monitor actor
  store MB         peak object-store bytes used on the busiest node (raylet GetNodeStats, every 0.5 s)
  driver RSS       start / peak / end of the run
Writes benchmarks/results/cluster_sim.json and cluster_sim.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from eagle_ray.ray_init import RAY_SYSTEM_CONFIG, ZERO_COPY_ENV  # noqa: E402

if TYPE_CHECKING:
    from eagle_ray.contract import PackedBatch
    from eagle_ray.pool import PooledTargetModel
# torch and the pool are imported where used: `benchmarks/render.py` imports this module for its `render`s

RESULTS = ROOT / "benchmarks" / "results"
NODES = 8
CPUS_PER_NODE = 8  # logical: a replica reserves 1, so 64 fit; they only sleep
STORE_MB = 256
SEQS, SEQ_LEN = 4, 512  # one batch: 2,048 tokens
BATCH_TOKENS = SEQS * SEQ_LEN
VOCAB = 32_000
MAX_W = 16
REPLICA_MB_GUESS = 340  # USS of one replica process (torch + ray imported), until measured


# ------------------------------------------------------------------------------------------ actors


@ray.remote(num_cpus=0)
class Trainer:
    """A draft worker stand-in: a client of the pool reading its own batches with the real `RankReader`, then
    sleeping tokens / rate."""

    def ready(self) -> int:
        import os

        import eagle_ray.train.reader  # noqa: F401  (import cost paid here, not in the first run)

        return os.getpid()

    def connect(self, pool_name: str, budget: int) -> None:
        """Become a client of the pool, before the run: every consumer starts at once."""
        from eagle_ray import connect_pool

        self.bank = batch_bank()
        self.client = connect_pool(pool_name, max_inflight_bytes=budget)

    def train(self, rank: int, world: int, steps: int, tokens_per_s: float) -> list[tuple[float, ...]]:
        """This rank's batches (`step * world + rank`), streamed to the replicas by its own client; the driver
        and the pool's owner do nothing per batch."""
        from eagle_ray.train.reader import PoolSupply, RankReader

        mine = (self.bank[(s * world + rank) % len(self.bank)] for s in range(steps))
        try:
            reader = RankReader(PoolSupply(self.client, timeout_s=120.0), mine, timeout_s=120.0, rank=rank, world=world)
            return consume(reader, tokens_per_s)
        finally:
            self.client.close()


def consume(reader: Any, tokens_per_s: float) -> list[tuple[float, float, float, int]]:
    """Train on each record by sleeping; per step: (time.time() when it arrived, seconds waited, trained, tokens)."""
    out = []
    it = iter(reader)
    while True:
        t0 = time.time()
        try:
            _, _sup, meta = next(it)
        except StopIteration:
            return out
        t1 = time.time()
        time.sleep(meta["tokens"] / tokens_per_s)
        out.append((t1, t1 - t0, time.time() - t1, int(meta["tokens"])))


@ray.remote(num_cpus=0)
class Monitor:
    """Samples the driver (CPU, RSS, per-thread CPU), the host CPU and each node's object store, from
    outside the driver so the measurement costs the driver nothing (but the raylet's stats RPC to it)."""

    def __init__(self, driver_pid: int, nodes: list[tuple[str, str, int]], period_s: float = 0.1):
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        self.proc = psutil.Process(driver_pid)
        self.owner: psutil.Process | None = None  # the pool's owner process (direct plane), sampled beside
        self.period_s = period_s
        self._req = node_manager_pb2.GetNodeStatsRequest(include_memory_info=False)
        # one channel per raylet, kept: opening one per sample cost ~10 ms of CPU each
        self._stubs = [
            (nid, node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(f"{addr}:{port}")))
            for nid, addr, port in nodes
        ]
        self._lock = threading.Lock()
        self._reset()
        threading.Thread(target=self._loop, daemon=True).start()

    def _reset(self) -> None:
        # t, driver cpu s, driver rss, host busy cpu s, host total cpu s, host available bytes, owner cpu s
        self.samples: list[tuple[float, float, int, float, float, int, float]] = []
        self.threads: list[tuple[float, dict[int, float]]] = []
        self.store: list[tuple[float, dict[str, int]]] = []

    def _loop(self) -> None:
        n = 0
        while True:
            t = time.time()
            try:
                ct = self.proc.cpu_times()
                rss = self.proc.memory_info().rss
                host = psutil.cpu_times()
                total = sum(host)
                busy = total - host.idle - getattr(host, "iowait", 0.0)
                owner = 0.0
                if self.owner is not None:
                    try:
                        oc = self.owner.cpu_times()
                        owner = oc.user + oc.system
                    except psutil.Error:
                        pass
                row = (t, ct.user + ct.system, rss, busy, total, psutil.virtual_memory().available, owner)
                thr = None
                if n % 5 == 0:
                    thr = {th.id: th.user_time + th.system_time for th in self.proc.threads()}
                store = None
                if n % 5 == 0:
                    store = {}
                    for nid, stub in self._stubs:
                        try:
                            store[nid] = stub.GetNodeStats(self._req, timeout=5).store_stats.object_store_bytes_used
                        except Exception:
                            pass
                with self._lock:
                    self.samples.append(row)
                    if thr is not None:
                        self.threads.append((t, thr))
                    if store is not None:
                        self.store.append((t, store))
            except psutil.NoSuchProcess:
                return
            n += 1
            time.sleep(max(0.0, self.period_s - (time.time() - t)))

    def begin(self, owner_pid: int | None = None) -> None:
        with self._lock:
            self._reset()
            self.owner = psutil.Process(owner_pid) if owner_pid else None

    def end(self) -> dict[str, Any]:
        with self._lock:
            return {"samples": self.samples, "threads": self.threads, "store": self.store}

    def thread_names(self) -> dict[int, str]:
        out = {}
        for th in self.proc.threads():
            try:
                out[th.id] = Path(f"/proc/{self.proc.pid}/task/{th.id}/comm").read_text().strip()
            except OSError:
                pass
        return out


# ------------------------------------------------------------------------------------------ the run


def batch_bank(n: int = 16, seed: int = 0) -> list[PackedBatch]:
    import torch

    from eagle_ray.contract import PackedBatch

    g = torch.Generator().manual_seed(seed)
    return [
        PackedBatch.from_sequences([torch.randint(0, VOCAB, (SEQ_LEN,), generator=g) for _ in range(SEQS)])
        for _ in range(n)
    ]


def _slope(ts: list[float]) -> float:
    """Least-squares slope of the cumulative count of events at times `ts` (sorted): events per second."""
    n = len(ts)
    if n < 2:
        return float("nan")
    mt, mi = sum(ts) / n, (n - 1) / 2
    stt = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (i - mi) for i, t in enumerate(ts)) / stt if stt else float("nan")


class OutOfHostMemory(RuntimeError):
    """The (shared) host ran low on memory: the sweep stops growing, the pool is torn down."""


def host_low_on_memory(abort_gb: float) -> str | None:
    free = psutil.virtual_memory().available / 2**30
    return f"host memory available fell to {free:.1f} GB (< {abort_gb} GB)" if free < abort_gb else None


def _at(samples: list[tuple], t: float, col: int) -> float:
    """Linear interpolation of column `col` of time-stamped samples at time t."""
    for a, b in itertools.pairwise(samples):
        if a[0] <= t <= b[0]:
            w = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
            return a[col] + w * (b[col] - a[col])
    return samples[0][col] if t < samples[0][0] else samples[-1][col]


def _thread_split(threads: list[tuple[float, dict[int, float]]], t_a: float, t_b: float, labels: dict[int, str]):
    """Driver CPU per thread label over [t_a, t_b] (nearest snapshots outside it), as shares of the total."""
    before = [s for s in threads if s[0] <= t_a] or threads[:1]
    after = [s for s in threads if s[0] >= t_b] or threads[-1:]
    a, b = before[-1][1], after[0][1]
    split: dict[str, float] = {}
    for tid, cpu in b.items():
        d = cpu - a.get(tid, 0.0)
        if d > 0:
            name = labels.get(tid, "exited")
            split[name] = split.get(name, 0.0) + d
    total = sum(split.values()) or 1.0
    return {k: v / total for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def run_once(
    pool: PooledTargetModel,
    trainers: list,
    monitor: Any,
    spec: dict[str, Any],
    abort_gb: float = 1.5,
) -> dict[str, Any]:
    R, W = spec["R"], spec["W"]
    supply, demand = R * spec["replica_tps"], W * spec["trainer_tps"]
    ideal = min(supply, demand)
    steady = max(4, math.ceil(ideal / BATCH_TOKENS * spec["seconds"] / W))
    # the first steps fill the pipeline (a stream's first batches are split over all idle replicas), and what a
    # consumer read ahead meanwhile drains faster than supply: not steady. Past its read-ahead (a RankReader's
    # depth and its share of the replicas' queues)
    warm = max(2, math.ceil(0.2 * steady), 2 + 1 + math.ceil(2 * R / W) + 2)
    steps = warm + steady
    budget = int(0.25 * NODES * STORE_MB * 2**20 / W)  # the pool's default budget, shared out
    ray.get([trainers[r].connect.remote(spec["pool_name"], budget) for r in range(W)])
    ray.get(monitor.begin.remote(spec.get("owner_pid")))
    t_run0 = time.time()
    refs = [trainers[r].train.remote(r, W, steps, spec["trainer_tps"]) for r in range(W)]
    deadline = time.monotonic() + 60 + 4 * steps * W * BATCH_TOKENS / ideal
    while True:
        done, _ = ray.wait(refs, num_returns=W, timeout=1.0)
        if len(done) == W:
            break
        low = host_low_on_memory(abort_gb)
        if low:
            raise OutOfHostMemory(f"run {spec['sweep']} R={R} W={W} aborted: {low}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {spec} timed out")
    records = ray.get(refs)
    mon = ray.get(monitor.end.remote())
    labels = ray.get(monitor.thread_names.remote())
    labels = {**labels, threading.main_thread().native_id: "main (waits)"}

    # the steady window: every consumer past its warm-up steps, until the first one got its last record
    t_a = max(rec[warm - 1][0] for rec in records)
    t_b = min(rec[-1][0] for rec in records)
    got = sorted((t, w, tr, n) for rec in records for (t, w, tr, n) in rec if t_a <= t <= t_b)
    if t_a >= t_b:  # no common steady window: one consumer was done before another was warm
        t0 = min(rec[0][0] for rec in records)
        spans = ", ".join(f"{rec[0][0] - t0:.1f}/{rec[warm - 1][0] - t0:.1f}/{rec[-1][0] - t0:.1f}" for rec in records)
        print(f"  {spec['sweep']} R={R} W={W}: no steady window; per consumer first/warm/last record (s): {spans}")
    span = max(t_b - t_a, 1e-9)
    # arrivals come in bursts (replicas finish in step): the slope of the cumulative count is the rate, where a
    # count over a window bounded by arrivals is off by up to a burst
    batch_rate = _slope([t for t, *_ in got])
    tokens_rate = batch_rate * sum(n for *_, n in got) / max(len(got), 1)
    wait = sum(w for _, w, _, _ in got[1:])
    busy = sum(w + tr for _, w, tr, _ in got[1:])
    smp = mon["samples"]
    cpu = _at(smp, t_b, 1) - _at(smp, t_a, 1)
    host = (_at(smp, t_b, 3) - _at(smp, t_a, 3)) / max(_at(smp, t_b, 4) - _at(smp, t_a, 4), 1e-9)
    store_peak: dict[str, int] = {}
    for _, per_node in mon["store"]:
        for nid, used in per_node.items():
            store_peak[nid] = max(store_peak.get(nid, 0), used)
    rss = [s[2] for s in smp if s[0] >= t_run0] or [smp[-1][2]]
    row = {
        **spec,
        "run_wall_s": time.time() - t_run0,
        "supply_tps": supply,
        "demand_tps": demand,
        "ideal_tps": ideal,
        "delivered_tps": tokens_rate,
        "delivered_over_ideal": tokens_rate / ideal,
        "wait_share": wait / busy if busy else float("nan"),
        "driver_ms_per_batch": 1e3 * cpu / span / batch_rate,
        "owner_ms_per_batch": 1e3 * (_at(smp, t_b, 6) - _at(smp, t_a, 6)) / span / batch_rate,
        "driver_cores": cpu / span,
        "host_busy": host,
        "window_s": span,
        "window_batches": len(got),
        "host_available_gb_min": min(s[5] for s in smp) / 2**30,
        "steps_per_worker": steps,
        "store_peak_mb_max_node": max(store_peak.values(), default=0) / 2**20,
        "store_peak_mb_per_node": {k[:8]: v / 2**20 for k, v in store_peak.items()},
        "driver_rss_mb": {"start": rss[0] / 2**20, "peak": max(rss) / 2**20, "end": rss[-1] / 2**20},
        "driver_cpu_by_thread": _thread_split(mon["threads"], t_a, t_b, labels),
    }
    idle = spec.get("driver_idle_cores", 0.0)
    row["driver_ms_per_batch_net"] = 1e3 * max(cpu / span - idle, 0.0) / batch_rate
    return row


# ------------------------------------------------------------------------------------------ cluster


def start_cluster() -> tuple[Cluster, list[str]]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,  # replicas and trainers go to the worker nodes; queues and the monitor stay here
            "object_store_memory": STORE_MB * 2**20,
            "include_dashboard": False,
            "_system_config": RAY_SYSTEM_CONFIG,
        },
    )
    for _ in range(NODES):
        cluster.add_node(num_cpus=CPUS_PER_NODE, object_store_memory=STORE_MB * 2**20)
    ray.init(address=cluster.address, runtime_env={"env_vars": ZERO_COPY_ENV}, log_to_driver=False)
    cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()
    workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
    return cluster, workers


def uss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            pass
    return total / 2**20


class Fleet:
    """The consumer actors, created as runs need them (each costs a process with torch: ~340 MB)."""

    def __init__(self, worker_nodes: list[str]):
        self.nodes = worker_nodes
        self.actors: list = []
        self.pids: list[int] = []

    def ensure(self, w: int) -> list:
        new = []
        for i in range(len(self.actors), w):
            node = self.nodes[i % len(self.nodes)]
            new.append(Trainer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote())
        self.pids += ray.get([a.ready.remote() for a in new])
        self.actors += new
        return self.actors

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self.pids = [], []


def idle_cores(monitor: Any, seconds: float = 3.0) -> float:
    """Driver CPU (cores) with the pool up and nothing streaming: Ray's and the pool's fixed background."""
    ray.get(monitor.begin.remote())
    time.sleep(seconds)
    smp = ray.get(monitor.end.remote())["samples"]
    return (smp[-1][1] - smp[0][1]) / max(smp[-1][0] - smp[0][0], 1e-9)


def scale_to(
    pool: PooledTargetModel, R: int, memory: dict[str, Any], min_free_gb: float, extra_mb: float, abort_gb: float
) -> bool:
    """Scale up to R replicas if the host has the memory for them (and `extra_mb` more); False, noted, if not.

    The host may be shared (other test runs): what counts is its available memory now."""
    have = len(pool.replicas())
    per = memory.get("replica_uss_mb") or REPLICA_MB_GUESS
    need_mb = (R - have) * per + extra_mb
    free_mb = psutil.virtual_memory().available / 2**20
    if free_mb - need_mb < min_free_gb * 1024:
        memory["notes"].append(
            f"R={R} skipped: {R - have} more replicas (+ consumers) need ~{need_mb / 1024:.1f} GB, "
            f"{free_mb / 1024:.1f} GB available, {min_free_gb} GB kept free"
        )
        return False
    t0 = time.monotonic()
    pool.scale(R)
    while len(pool.replicas()) < R:
        pool.stats()  # polls: notices replicas that became ready
        if time.monotonic() - t0 > 600:
            raise TimeoutError(f"{R} replicas not ready after 600 s")
        low = host_low_on_memory(abort_gb)
        if low:
            raise OutOfHostMemory(f"scaling to R={R} aborted: {low}")
        time.sleep(0.5)
    pids = [d["pid"] for d in pool.replicas()]
    memory["replica_uss_mb"] = uss_mb(pids) / len(pids)
    memory["by_R"].append(
        {
            "R": R,
            "start_s": time.monotonic() - t0,
            "replica_uss_mb": memory["replica_uss_mb"],
            "host_available_gb": psutil.virtual_memory().available / 2**30,
            "nodes_used": len({d["node_id"] for d in pool.replicas()}),
        }
    )
    return True


def make_pool(replica_tps: float, hidden: int) -> tuple[PooledTargetModel, dict[str, Any]]:
    """The pool (an owner actor holds the replicas; each consumer is a client), and what a run's spec needs."""
    from eagle_ray.pool import serve_pool

    kwargs = {
        "engine": "synthetic",
        "replicas": 1,
        "use_gpu": False,
        "cpus_per_replica": 1,
        "engine_kwargs": {"tokens_per_s": replica_tps, "hidden": hidden, "vocab_size": VOCAB},
        "start_timeout_s": 600.0,
    }
    name = f"cluster-sim-{replica_tps:.0f}"
    owner = serve_pool(name, "synthetic", **kwargs)
    pid = ray.get(owner._server.__ray_call__.remote(lambda self: os.getpid()))
    return owner, {"plane": "direct", "pool_name": name, "owner_pid": pid}


# ------------------------------------------------------------------------------------------ report


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'sweep':<22}{'R':>4}{'W':>4}{'supply':>9}{'demand':>9}{'deliv':>9}{'d/ideal':>8}{'wait%':>7}"
        f"{'drv ms/b':>9}{'net':>7}{'owner':>7}{'drv cores':>10}{'store MB':>9}{'RSS MB s/pk/e':>16}{'host%':>6}"
    )
    print("\n" + head)
    for r in rows:
        rss = r["driver_rss_mb"]
        print(
            f"{r['sweep']:<22}{r['R']:>4}{r['W']:>4}{r['supply_tps'] / 1e3:>8.1f}k{r['demand_tps'] / 1e3:>8.1f}k"
            f"{r['delivered_tps'] / 1e3:>8.1f}k{r['delivered_over_ideal']:>8.3f}{100 * r['wait_share']:>7.1f}"
            f"{r['driver_ms_per_batch']:>9.2f}{r['driver_ms_per_batch_net']:>7.2f}{r['owner_ms_per_batch']:>7.2f}"
            f"{r['driver_cores']:>10.3f}{r['store_peak_mb_max_node']:>9.1f}"
            f"{rss['start']:>6.0f}/{rss['peak']:.0f}/{rss['end']:.0f}".rjust(16)
            + f"{100 * r['host_busy']:>6.0f}"
        )


def _runs(doc: dict[str, Any]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """(plane, sweep, R, W) -> its row; of repeated runs, the last one with a steady window (else the last)."""
    out: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for r in doc["rows"]:
        key = (r["plane"], r["sweep"].split(" ", 1)[1], r["R"], r["W"])
        if key not in out or r["window_batches"] > 0 or out[key]["window_batches"] == 0:
            out[key] = r
    return out


def render(doc: dict[str, Any], rerun: dict[str, Any] | None = None) -> str:
    """docs/benchmarks.md's table of a run (`cluster_sim.json`), each plane's R, W from `rerun` (marked †)
    taking the place of the run's own."""
    runs = _runs(doc)
    redone = _runs(rerun) if rerun else {}
    runs.update(redone)
    lines = [
        "| R | W | plane | delivered/ideal, supply<demand | wait, supply≥demand | driver ms/batch (gross / net) "
        "| owner ms/batch | host busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = [k for k in runs if k[1] == "supply<demand"]
    for key in sorted(keys, key=lambda k: (k[2], k[3], k[0] != "feed")):
        plane, _, R, W = key
        lt, ge = runs[key], runs.get((plane, "supply>=demand", R, W))
        mark = " †" if key in redone else ""
        owner = "–" if plane == "feed" else f"{lt['owner_ms_per_batch']:.2f}"
        wait, busy = (f"{100 * ge['wait_share']:.1f}%", f"{ge['host_busy']:.0%}") if ge else ("–", "–")
        lines.append(
            f"| {R} | {W} | {plane}{mark} | {lt['delivered_over_ideal']:.3f} | {wait} | "
            f"{lt['driver_ms_per_batch']:.2f} / {lt['driver_ms_per_batch_net']:.2f} | {owner} | "
            f"{lt['host_busy']:.0%} / {busy} |"
        )
    foot = f"\n\n(`benchmarks/results/cluster_sim.json`, {doc['wall_s']:.0f} s"
    if rerun:
        foot += f"; † `cluster_sim_direct.json`, {rerun['wall_s']:.0f} s"
    return "\n".join(lines) + foot + "; host busy: supply<demand / supply≥demand)"


def _one_plane_cell(doc: dict[str, Any], plane: str, R: int, W: int, fixed: bool) -> str:
    runs = _runs(doc)
    if fixed:
        lt = ge = runs.get((plane, "fixed-W", R, W))
    else:
        lt, ge = runs.get((plane, "supply<demand", R, W)), runs.get((plane, "supply>=demand", R, W))
    if lt is None and ge is None:
        return "–"
    has = [r is not None and r["window_batches"] > 0 for r in (lt, ge)]
    delivered = f"{lt['delivered_over_ideal']:.3f}" if has[0] else "no window"
    wait = f"{100 * ge['wait_share']:.1f}%" if has[1] else "no window"
    d = lt if has[0] else ge if has[1] else None
    driver = f"{d['driver_ms_per_batch']:.1f} / {d['driver_ms_per_batch_net']:.1f}" if d else "–"
    secs = (d or lt or ge)["seconds"]
    note = f" ({secs:g} s)" if secs != doc["config"]["seconds"] else ""
    return f"{delivered}, {wait}, {driver}{note}"


def render_one_plane(before: dict[str, Any], after: dict[str, Any]) -> str:
    """docs/benchmarks.md's before/after table of the feed plane's removal (issue 26): per R, W, each plane's
    delivered/ideal (supply<demand), wait (supply>=demand) and driver ms/batch (gross / net)."""
    shapes = {(r["R"], r["W"], r["sweep"].endswith("fixed-W")) for d in (before, after) for r in d["rows"]}
    lines = ["| R | W | before: feed | before: direct | after |", "|---|---|---|---|---|"]
    for R, W, fixed in sorted(shapes, key=lambda s: (s[0], s[2], -s[1])):
        cells = [
            _one_plane_cell(before, "feed", R, W, fixed),
            _one_plane_cell(before, "direct", R, W, fixed),
            _one_plane_cell(after, "direct", R, W, fixed),
        ]
        lines.append(f"| {R} | {W}{' (fixed W)' if fixed else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        rs = [r for r in rows if r["sweep"] == sweep]
        xs = [r["R"] for r in rs]
        a.plot(xs, [r["delivered_over_ideal"] for r in rs], "o-", label=sweep)
        b.plot(xs, [r["driver_ms_per_batch"] for r in rs], "o-", label=sweep)
    a.axhline(0.9, color="gray", ls="--", lw=1, label="goal 0.9 (supply<demand)")
    for ax, label in ((a, "delivered / ideal"), (b, "driver CPU ms per delivered batch")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas R")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_ylim(0, 1.1)
    b.set_ylim(bottom=0)
    fig.suptitle("cluster simulator (synthetic target, 8 simulated nodes, 2-core host)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="R in (1, 4, 16), short windows: a smoke run")
    ap.add_argument("--replicas", type=int, nargs="*", help="replica counts to sweep (default 1..64)")
    ap.add_argument("--replica-tps", type=float, default=2048.0, help="tokens/s per replica (supply sweeps)")
    ap.add_argument("--hidden", type=int, default=64, help="synthetic hidden size (bf16: 8H bytes per token)")
    ap.add_argument("--seconds", type=float, default=None, help="steady window per run (default 12, quick 3)")
    ap.add_argument("--min-free-gb", type=float, default=3.0, help="host memory kept free when scaling up")
    ap.add_argument(
        "--abort-gb", type=float, default=1.5, help="a run stops (and the sweep with it) below this much free memory"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster_sim.json")
    args = ap.parse_args(argv)
    Rs = args.replicas or ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    seconds = args.seconds or (2.0 if args.quick else 12.0)
    fixed_rs = [16] if args.quick else Rs
    # fixed-W sweep: 8 trainers, 4 batches/s in all; replicas at 1.5x that each, so even R=1 over-supplies
    fixed_w, fixed_demand = 8, 4 * BATCH_TOKENS
    fixed_replica_tps = 1.5 * fixed_demand

    t_start = time.monotonic()
    driver = psutil.Process()
    memory: dict[str, Any] = {
        "host_total_gb": psutil.virtual_memory().total / 2**30,
        "host_available_gb_at_start": psutil.virtual_memory().available / 2**30,
        "notes": [],
        "by_R": [],
    }
    cluster, workers = start_cluster()
    rows: list[dict[str, Any]] = []
    pool = None
    fleet = Fleet(workers)
    try:
        memory["driver_rss_mb_at_start"] = driver.memory_info().rss / 2**20
        head = ray.get_runtime_context().get_node_id()
        nodes = [(n["NodeID"], n["NodeManagerAddress"], n["NodeManagerPort"]) for n in ray.nodes() if n["Alive"]]
        monitor = Monitor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(
            driver.pid, nodes
        )
        ray.get(monitor.begin.remote())

        def sweep(pool: PooledTargetModel, plane: dict[str, Any], replica_tps: float, rs: list[int], specs) -> None:
            for R in rs:
                more_w = max(0, max(w for _, w, _ in specs(R)) - len(fleet.actors))
                try:
                    if not scale_to(pool, R, memory, args.min_free_gb, more_w * REPLICA_MB_GUESS, args.abort_gb):
                        return
                except OutOfHostMemory as e:
                    memory["notes"].append(str(e))
                    print(f"memory: {e}")
                    return
                idle = idle_cores(monitor, 1.0 if args.quick else 3.0)
                for name, w, trainer_tps in specs(R):
                    spec = {"sweep": f"{plane['plane']} {name}", "R": R, "W": w, "replica_tps": replica_tps}
                    spec.update(trainer_tps=trainer_tps, seconds=seconds, driver_idle_cores=idle, **plane)
                    trainers = fleet.ensure(spec["W"])
                    try:
                        row = run_once(pool, trainers, monitor, spec, abort_gb=args.abort_gb)
                    except OutOfHostMemory as e:
                        memory["notes"].append(str(e))
                        print(f"memory: {e}")
                        fleet.kill()  # they wait on a pool that is gone
                        return
                    row["consumer_uss_mb"] = uss_mb(fleet.pids) / max(len(fleet.pids), 1)
                    rows.append(row)
                    print_table(rows[-1:])
                    print(f"  ({time.monotonic() - t_start:.0f} s so far; this run {row['run_wall_s']:.0f} s)")

        r0 = args.replica_tps

        def ab(R: int):
            W = min(MAX_W, R)
            return [("supply<demand", W, 2 * R * r0 / W), ("supply>=demand", W, R * r0 / (1.5 * W))]

        pool, info = make_pool(r0, args.hidden)
        sweep(pool, info, r0, Rs, ab)
        pool.shutdown()
        pool, info = make_pool(fixed_replica_tps, args.hidden)
        sweep(pool, info, fixed_replica_tps, fixed_rs, lambda R: [("fixed-W", fixed_w, fixed_demand / fixed_w)])
        pool.shutdown()
        pool = None
    finally:
        if pool is not None:
            pool.shutdown()
        fleet.kill()
        memory["driver_rss_mb_at_end"] = driver.memory_info().rss / 2**20
        ray.shutdown()
        cluster.shutdown()

    print_table(rows)
    fits = {}
    for name in dict.fromkeys(r["sweep"] for r in rows):
        rs = [r for r in rows if r["sweep"] == name]
        for key in ("driver_ms_per_batch", "driver_ms_per_batch_net"):
            fit = linear_fit([r["R"] for r in rs], [r[key] for r in rs])
            if fit:
                a, b = fit
                fits[f"{name} {key}"] = {"ms_at_R0": a, "ms_per_replica": b, "ms_at_R64": a + 64 * b}
    print("\ndriver ms/batch ~ a + b*R (least squares over the measured R; net: less the idle pool's CPU):")
    for name, f in fits.items():
        print(
            f"  {name:<42} a={f['ms_at_R0']:6.2f} ms  b={f['ms_per_replica']:6.3f} ms/replica"
            f"  -> R=64: {f['ms_at_R64']:.2f} ms"
        )
    print("\ndriver CPU by thread (share), per run:")
    for r in rows:
        parts = ", ".join(f"{k.split(' (')[0]} {100 * v:.0f}%" for k, v in list(r["driver_cpu_by_thread"].items())[:4])
        print(f"  {r['sweep']:<22} R={r['R']:<3} {parts}")
    for note in memory["notes"]:
        print(f"memory: {note}")
    print(
        "data preparation is not included (pre-built batches, cycled); the target is synthetic (sleeps): "
        "driver ms/batch is the pool owner's + Ray's cost only"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {
            "nodes": NODES + 1,
            "cpus_per_node": CPUS_PER_NODE,
            "store_mb_per_node": STORE_MB,
            "batch_tokens": BATCH_TOKENS,
            "sequences_per_batch": SEQS,
            "hidden": args.hidden,
            "bytes_per_token": 8 * args.hidden,
            "replica_tps": args.replica_tps,
            "fixed_w": fixed_w,
            "fixed_demand_tps": fixed_demand,
            "fixed_replica_tps": fixed_replica_tps,
            "seconds": seconds,
            "quick": args.quick,
            "host_cpus": psutil.cpu_count(),
            "store_metric": "raylet GetNodeStats store_stats.object_store_bytes_used, sampled every 0.5 s",
            "driver_cpu_metric": "psutil cpu_times (user+system) of the driver pid, sampled every 0.1 s",
            "data_prep_included": False,
        },
        "rows": rows,
        "fits": fits,
        "memory": memory,
        "wall_s": time.monotonic() - t_start,
    }
    args.out.write_text(json.dumps(result, indent=1, default=str))
    plot(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
