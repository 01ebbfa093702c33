"""Resource shapes and placement groups for target replicas.

One replica = one placement group with ONE bundle (so its TP ranks are packed on one node):
  separate,  GPU cluster: {"CPU": c, "GPU": tp_size}        targets own whole GPUs
  colocated, GPU cluster: {"CPU": c, "GPU": gpu_fraction}    shares a GPU with a train worker
                                                             (tp_size 1; the rest of the GPU is theirs)
  CPU-only cluster:       {"CPU": c}                         c defaults to tp_size
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ray
from ray.util import placement_group_table
from ray.util.placement_group import NODE_ID_LABEL_KEY, PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENTS = ("separate", "colocated")
GROUP_PREFIX = "eagle_ray-replica-"  # every replica's group is named so (PooledTargetModel._start_replica)


@dataclass(frozen=True)
class ReplicaShape:
    cpus: float
    gpus: float

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}


def replica_shape(
    placement: str, tp_size: int, use_gpu: bool, cpus_per_replica: float | None, gpu_fraction: float
) -> ReplicaShape:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not use_gpu:
        return ReplicaShape(cpus=cpus_per_replica if cpus_per_replica is not None else tp_size, gpus=0)
    cpus = cpus_per_replica if cpus_per_replica is not None else 1
    if placement == "separate":
        return ReplicaShape(cpus=cpus, gpus=tp_size)
    if tp_size != 1:
        raise ValueError(
            "placement='colocated' supports tp_size=1: Ray cannot give one actor a fraction of "
            f"each of {tp_size} GPUs; use placement='separate' for tensor-parallel targets"
        )
    if not 0 < gpu_fraction < 1:
        raise ValueError(f"gpu_fraction must be in (0, 1) for colocation, got {gpu_fraction}")
    return ReplicaShape(cpus=cpus, gpus=gpu_fraction)


def reserve(shape: ReplicaShape, name: str, avoid_nodes: list[str] = ()) -> PlacementGroup:
    """One replica's group; `avoid_nodes`: node ids it must not be placed on (a node label selector)."""
    selector = [{NODE_ID_LABEL_KEY: f"!in({','.join(avoid_nodes)})"}] if avoid_nodes else None
    return placement_group([shape.bundle], strategy="STRICT_PACK", name=name, bundle_label_selector=selector)


def node_of(pg: PlacementGroup) -> str | None:
    """The node a replica's group was placed on; None while it waits for room (or once it is gone)."""
    try:
        return placement_group_table(pg).get("bundles_to_node_id", {}).get(0)
    except Exception:  # Ray shutting down
        return None


def fits(shape: ReplicaShape) -> list[str]:
    """Ids of the live nodes with the resources for one replica in all (free or not)."""
    return [
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in shape.bundle.items())
    ]


def strategy(pg: PlacementGroup) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)


def release(pg: PlacementGroup) -> None:
    with contextlib.suppress(Exception):  # already gone with its node, or Ray shutting down
        remove_placement_group(pg)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def live_groups(this_job_only: bool = True) -> list[str]:
    """Names of eagle_ray replica placement groups still reserved (any state but REMOVED) in the cluster.

    A pool's `shutdown()` releases its groups, and Ray removes a job's groups when its driver exits; this is
    how to check either. `this_job_only`: only the groups this driver's job created (a group id ends with its
    job's id), else every job's.
    """
    job = ray.get_runtime_context().get_job_id() if this_job_only else ""
    return sorted(
        g["name"]
        for g in placement_group_table().values()
        if g["name"].startswith(GROUP_PREFIX) and g["state"] != "REMOVED" and g["placement_group_id"].endswith(job)
    )
