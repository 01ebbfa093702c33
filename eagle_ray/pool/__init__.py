"""The target pool: replica actors (replica.py); the pool (pooled.py, its facade), whose state one thread owns
(owner.py) in two halves, replicas (lifecycle.py) and shards (dispatch.py); one pool shared by many processes
(shared.py); shard ledger, placement, chaos."""

from eagle_ray.pool.chaos import ChaosMonkey, Fault
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.pooled import PooledTargetModel, ShardResult
from eagle_ray.pool.replica import TargetReplica
from eagle_ray.pool.shared import PoolClient, connect_pool, serve_pool

__all__ = [
    "ChaosMonkey",
    "Fault",
    "PoolClient",
    "PooledTargetModel",
    "ShardLedger",
    "ShardResult",
    "TargetReplica",
    "connect_pool",
    "serve_pool",
]
