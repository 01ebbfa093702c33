"""Ray Train wiring: the trainer's config (config.py), the pool feeds supervision refs to draft workers
(feed.py), the worker loop (loop.py), the driver entry point (trainer.py).

Names are imported lazily (PEP 562), as in `eagle_ray/__init__.py`: the job's config reads
`eagle_ray.train.config` without importing Ray Train and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "DraftTrainConfig": "eagle_ray.train.config",
    "OptimConfig": "eagle_ray.train.config",
    "TrainResult": "eagle_ray.train.trainer",
    "train_draft": "eagle_ray.train.trainer",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
