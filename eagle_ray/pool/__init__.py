"""The target pool: replica actors (replica.py); a pool is a dispatcher (dispatch.py: shards, ledger, budget)
with the caller's surface (surface.py) over a replica set, its own (pooled.py + lifecycle.py) or a shared pool's,
heard through its relay (shared.py); one thread owns its state (owner.py); placement, chaos."""

from eagle_ray._lazy import lazy_exports

# imported on first use: a process that needs one piece (a replica's marker task: markers.py) imports only that
_MODULE_OF = {
    "ChaosMonkey": "eagle_ray.pool.chaos",
    "Fault": "eagle_ray.pool.chaos",
    "ShardResult": "eagle_ray.pool.dispatch",
    "ShardLedger": "eagle_ray.pool.ledger",
    "PooledTargetModel": "eagle_ray.pool.pooled",
    "TargetReplica": "eagle_ray.pool.replica",
    "PoolClient": "eagle_ray.pool.shared",
    "connect_pool": "eagle_ray.pool.shared",
    "serve_pool": "eagle_ray.pool.shared",
}
__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)

__all__ = sorted(_MODULE_OF)
