"""`TargetReplica`: one Ray actor = one target engine (its TP ranks live inside it).

The actor runs shards one at a time and returns two objects per shard: a small
metadata dict (what the driver waits on) and the `Supervision` payload (what consumers
`ray.get`). Tensors are CPU torch tensors; the actor's runtime env sets Ray's
`RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`, so consumers read them zero-copy from the object store.

Each shard's `tag` (its client, shard id and attempt) is written to a small file while the shard runs: when the
replica dies, its clients read the file (from a task on its node) to learn which shard was running, so a death is
blamed on that shard alone, not on whatever each client sent it first (with several clients, that guess blamed
shards that were only queued behind another client's poison shard).

TP ranks >= 1 are processes of the replica's own (children of the actor's process, see `engines/sglang.py`), not
Ray actors: Ray never hears of their deaths. The replica's `watch` does, at once, so the pool retires a replica
whose rank died even when no shard reaches it.
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
import threading
import time
from typing import Any

import ray
import torch

from eagle_ray.contract import PackedBatch, Supervision
from eagle_ray.engines.base import UnsupportedTargetError
from eagle_ray.pool.markers import write_tag
from eagle_ray.testing.faults import replica_shard_fault, replica_start_fault


class TargetReplica:
    """Ray actor body; the pool creates it with `ray.remote(TargetReplica).options(...)`."""

    def __init__(self, replica_id: int, engine: str, model_path: str, target_kwargs: dict[str, Any]):
        from eagle_ray.ray_init import quiet_known_warnings
        from eagle_ray.target import load_target

        quiet_known_warnings()
        replica_start_fault(ray.get_runtime_context().get_node_id())  # off unless EAGLE_RAY_FAIL_START_NODES is set
        self.replica_id = replica_id
        self.engine_name = engine
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0) or 0)
        if cpus:
            torch.set_num_threads(cpus)  # the CPUs this replica reserved, not the whole node
        t0 = time.perf_counter()
        self.target = load_target(engine, model_path, **target_kwargs)
        self.build_seconds = time.perf_counter() - t0
        eng = self.target.engine
        # per TP rank: its process and device (rank 0 is this process)
        self.ranks = eng.ranks() if hasattr(eng, "ranks") else [{"tp_rank": 0, "pid": os.getpid()}]
        self._running: tuple[int, int, float] | None = None  # the shard `run`/`generate` is on: tokens, new, start
        # the running shard's tag, in a file that outlives the process (see the module's docstring)
        self._marker_fd, self.marker = tempfile.mkstemp(prefix=f"eagle_ray-replica{replica_id}-", suffix=".running")

    def describe(self) -> dict[str, Any]:
        """Model facts and where this replica runs; called once when it starts."""
        ctx = ray.get_runtime_context()
        return {
            "replica_id": self.replica_id,
            "info": self.target.info,
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ranks": self.ranks,
            "build_seconds": self.build_seconds,
            "marker": self.marker,
        }

    def _mark(self, tag: str) -> None:
        write_tag(self._marker_fd, tag)

    def run(
        self, tag: str, input_ids: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, logits: bool
    ) -> tuple[dict[str, Any], Supervision]:
        t0 = time.perf_counter()
        self._running = (int(input_ids.numel()), 0, time.monotonic())
        self._mark(tag)
        replica_shard_fault(input_ids)  # off unless a test sets EAGLE_RAY_CHAOS_CRASH_TOKEN
        try:
            sup = self.target.engine.forward(PackedBatch(input_ids, loss_mask, cu_seqlens), logits)
        except Exception:
            if getattr(self.target.engine, "broken", None):
                # TP ranks out of step: this replica can never run again; let the pool replace it
                os._exit(1)
            raise
        finally:
            self._running = None
            self._mark("")
        meta = {
            "replica_id": self.replica_id,
            "tokens": sup.num_tokens,
            "seconds": time.perf_counter() - t0,
        }
        return meta, sup

    def generate(
        self, tag: str, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, params: Any, first: int
    ) -> tuple[dict[str, Any], list[list[int]]]:
        """Continue each prompt of a shard (`eagle_ray.generation`); `first`: the number of its first request."""
        engine = self.target.engine
        if not hasattr(engine, "generate"):
            raise UnsupportedTargetError(f"the {self.engine_name} engine cannot generate yet; use engine='hf'")
        t0 = time.perf_counter()
        batch = PackedBatch(input_ids, torch.ones_like(input_ids), cu_seqlens)
        self._running = (0, (len(cu_seqlens) - 1) * params.max_new_tokens, time.monotonic())
        self._mark(tag)
        try:
            replica_shard_fault(input_ids)
            answers = engine.generate(batch, params, first)
        finally:
            self._running = None
            self._mark("")
        meta = {
            "replica_id": self.replica_id,
            "tokens": 0,  # not prefill work: the shard deadline's rate stays the forward's
            "new_tokens": sum(len(a) for a in answers),
            "seconds": time.perf_counter() - t0,
        }
        return meta, answers

    @ray.method(concurrency_group="probe")
    def running(self) -> tuple[int, int, float] | None:
        """The shard running now, as (tokens, most new tokens, seconds it has run), or None: a client that finds
        its shard overdue asks, since its own clock started when it sent the shard, maybe behind others' shards."""
        running = self._running
        return None if running is None else (running[0], running[1], time.monotonic() - running[2])

    @ray.method(concurrency_group="watch")
    def watch(self) -> str:
        """Never returns while the replica and its TP ranks live: the pool waits on it to notice a death at once.

        The replica's own death fails it (Ray's actor-died error). The death of a TP rank of its own (a process,
        rank >= 1) returns saying which: the replica can never run a shard again (its ranks would meet in no
        collective), and the pool retires and replaces it then, not when a shard next reaches it.
        """
        others = [r for r in self.ranks if r["pid"] != os.getpid()]
        if not others:
            threading.Event().wait()
        rank = _first_to_exit(others)
        return f"its TP rank {rank['tp_rank']} (pid {rank['pid']}) died"

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target.engine.input_embeddings(), self.target.engine.lm_head_weight()

    def shutdown(self) -> None:
        self.target.close()
        os.unlink(self.marker)


def _first_to_exit(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Block until one of `ranks` (each with a "pid") has exited; return it.

    A pidfd (Linux >= 5.3) turns readable when its process exits, zombie or reaped: no polling, and the ranks'
    `multiprocessing` handles stay the only ones to reap them (their exit codes stay theirs). Without pidfds, a poll
    every half second.
    """
    fds: dict[int, dict[str, Any]] = {}
    try:
        for rank in ranks:
            try:
                fds[os.pidfd_open(rank["pid"])] = rank
            except ProcessLookupError:
                return rank  # gone (and reaped) already
        poller = select.poll()  # not select.select: a Ray worker's descriptors may number past FD_SETSIZE
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll()
            if events:
                return fds[events[0][0]]
    except (AttributeError, OSError):  # no pidfd_open here (not Linux, an old kernel, a seccomp filter)
        import psutil  # Ray's own dependency

        while True:
            for rank in ranks:
                try:
                    if psutil.Process(rank["pid"]).status() == psutil.STATUS_ZOMBIE:
                        return rank
                except psutil.NoSuchProcess:
                    return rank
            time.sleep(0.5)
    finally:
        for fd in fds:
            os.close(fd)
