"""Ray Train wiring: the pool feeds supervision refs to draft workers (feed.py), the worker loop (loop.py),
the driver entry point (trainer.py)."""

from eagle_ray.train.loop import DraftTrainConfig
from eagle_ray.train.trainer import TrainResult, train_draft

__all__ = ["DraftTrainConfig", "TrainResult", "train_draft"]
