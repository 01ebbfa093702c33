"""The target pool: replica actors (replica.py), driver-side pool (pooled.py), shard ledger, placement, chaos."""

from eagle_ray.pool.chaos import ChaosMonkey, Fault
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.pooled import PooledTargetModel, ShardResult
from eagle_ray.pool.replica import TargetReplica

__all__ = [
    "ChaosMonkey",
    "Fault",
    "PooledTargetModel",
    "ShardLedger",
    "ShardResult",
    "TargetReplica",
]
