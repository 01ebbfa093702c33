"""Ray Train wiring: the trainer's config (config.py), each rank's reader of its own batches' supervision
(reader.py) and its epoch cache (epoch_cache.py), the worker loop (loop.py), the driver entry point (trainer.py).

Names are imported lazily (PEP 562), as in `eagle_ray/__init__.py`: the job's config reads
`eagle_ray.train.config` without importing Ray Train and torch.
"""

from __future__ import annotations

from eagle_ray._lazy import lazy_exports

_MODULE_OF = {
    "DraftTrainConfig": "eagle_ray.train.config",
    "EpochCacheConfig": "eagle_ray.train.config",
    "OptimConfig": "eagle_ray.train.config",
    "TrainResult": "eagle_ray.train.trainer",
    "train_draft": "eagle_ray.train.trainer",
}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
