"""The target pool: replica actors (replica.py); a pool is a dispatcher (dispatch.py: shards, ledger, budget)
with the caller's surface (surface.py) over a replica set, its own (pooled.py + lifecycle.py) or a shared pool's,
heard through its relay (shared.py); one thread owns its state (owner.py); placement, chaos."""

from eagle_ray.pool.chaos import ChaosMonkey, Fault
from eagle_ray.pool.dispatch import ShardResult
from eagle_ray.pool.ledger import ShardLedger
from eagle_ray.pool.pooled import PooledTargetModel
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
