"""The draft trainer's config: one set of defaults and one validation, shared with the job's `training:` section.

`OptimConfig` is the optimisation (steps, LR schedule, TTT objective, seed). The job's `training:` section
(`eagle_ray/job/config.py::TrainingConfig`) subclasses it and adds the job's own knobs (workers,
resources); `DraftTrainConfig` subclasses it and adds what the worker loop reads from elsewhere in the
job (checkpoint and log cadence, frozen embeddings).

The defaults are the tiny laptop run's (`configs/tiny.yaml`), for the job and for a library caller of
`train_draft` alike: notably `lr` 3e-3, which suits the tiny target; real targets want 1e-4 (the
shipped GPU configs set it).

Torch- and Ray-free, so the job's config (and `--help`) loads it in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

# the TTT attention backends (eagle_ray/draft/attention.py implements them; a test holds the two lists equal)
ATTENTION_BACKENDS = ("auto", "sdpa", "torch", "flex")


@dataclass
class OptimConfig:
    max_steps: int = 150  # optimizer steps; each worker takes one batch per step
    lr: float = 3e-3  # the tiny run's; 1e-4 for real targets (see configs/)
    warmup_steps: int | None = None  # None: 5% of max_steps (linear), then cosine decay to 10%
    weight_decay: float = 0.0
    grad_clip: float | None = 0.5  # max gradient norm; None or 0: no clipping
    ttt_steps: int = 7  # training-time-test unroll depth
    step_decay: float = 0.8  # loss weight of TTT step k: step_decay^k
    attention: str = "auto"  # TTT attention: auto (flex on CUDA, sdpa on the CPU), sdpa, torch or flex
    activation_checkpointing: bool = False  # recompute each TTT step's draft layer in the backward pass
    seed: int = 0
    max_skipped_batches: int = 2  # poison batches (the pool gave up on them) skipped before the run fails; 0: none

    def __post_init__(self) -> None:
        # messages start with the field name: the job prefixes its section ("training.lr: ...")
        if self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.max_skipped_batches < 0:
            raise ValueError(f"max_skipped_batches: must be >= 0, got {self.max_skipped_batches}")
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps: must be >= 1, got {self.ttt_steps}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention: must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")

    def optim_fields(self) -> dict[str, Any]:
        """The `OptimConfig` fields alone, by name (a subclass's own fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(OptimConfig)}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% at max_steps."""
        warm = self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, self.max_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass
class DraftTrainConfig(OptimConfig):
    """What `train_draft` trains with; sent to every worker as `asdict(cfg)` and rebuilt there.

    The job builds it from its `training:` section plus `checkpoint.every`, `logging.log_every` and
    `draft.freeze_embeddings`, whose defaults are these.
    """

    checkpoint_every: int = 50  # steps between checkpoints (and DDP weight checks)
    log_every: int = 10  # steps between ray.train.report rows
    freeze_embeddings: bool = True
    autocast_bf16: bool = True  # on CUDA only; master weights stay fp32
    stop_at_step: int | None = None  # end this run early (as a preemption would); resume later

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_optim(cls, optim: OptimConfig, **rest: Any) -> DraftTrainConfig:
        """`optim`'s optimisation fields (a job's `training:` section, say), then `rest` over them."""
        return cls(**{**optim.optim_fields(), **rest})


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# what one arm of a sweep may set: how its draft learns. Not max_steps or max_skipped_batches: the arms share one
# stream of batches, step for step, so those are the run's, not an arm's. Each field: what it takes, as an error
# says it, and the check of a value
_SWEEPABLE: dict[str, tuple[str, Any]] = {
    "lr": ("a number", _number),
    "warmup_steps": ("an int >= 0 or None", lambda v: v is None or (_int(v) and v >= 0)),
    "weight_decay": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "grad_clip": ("a number >= 0 or None", lambda v: v is None or (_number(v) and v >= 0)),
    "ttt_steps": ("an int", _int),
    "step_decay": ("a number > 0", lambda v: _number(v) and v > 0),
    "seed": ("an int", _int),
    "attention": ("a string", lambda v: isinstance(v, str)),
    "activation_checkpointing": ("a bool", lambda v: isinstance(v, bool)),
}
SWEEP_FIELDS = tuple(_SWEEPABLE)


def sweep_configs(base: DraftTrainConfig, sweep: Sequence[Mapping[str, Any]] | None) -> list[DraftTrainConfig]:
    """One config per arm: `base` with each of `sweep`'s overrides over it (`SWEEP_FIELDS` only); None: `[base]`.

    Errors name the arm and the field (`sweep[1].lr: must be > 0, got -1.0`)."""
    if sweep is None:
        return [base]
    if isinstance(sweep, str | bytes | Mapping) or not isinstance(sweep, Sequence):
        raise ValueError(f"sweep: expected a list of override mappings (one per arm), got {sweep!r}")
    if not sweep:
        raise ValueError("sweep: an empty list trains nothing; leave it out (None) to train one draft")
    arms = []
    for k, over in enumerate(sweep):
        if not isinstance(over, Mapping):
            raise ValueError(f"sweep[{k}]: expected a mapping of overrides, got {over!r}")
        unknown = sorted(set(over) - set(SWEEP_FIELDS))
        if unknown:
            raise ValueError(f"sweep[{k}].{unknown[0]}: not a per-arm field; an arm may set {list(SWEEP_FIELDS)}")
        for name, value in over.items():
            if not _SWEEPABLE[name][1](value):
                raise ValueError(f"sweep[{k}].{name}: expected {_SWEEPABLE[name][0]}, got {value!r}")
        try:
            arms.append(dataclasses.replace(base, **over))
        except ValueError as e:  # OptimConfig's own checks: the message starts with the field
            raise ValueError(f"sweep[{k}].{e}") from None
    return arms


@dataclass
class EpochCacheConfig:
    """The epoch cache (`eagle_ray/train/epoch_cache.py`): epoch 1's supervision, written by each rank as it trains,
    read back for epochs 2..E instead of running the target again. The job's `cache:` section."""

    mode: str | bool = "auto"  # off (YAML false too) or auto: cache epoch 1 when a pool serves 2+ epochs
    dir: str | None = None  # None: <storage_path>/<name>/epoch_cache (shared storage: a restarted group finds it)
    max_bytes: int | None = None  # disk budget, shared evenly by the ranks; past it the pool serves; None: 80% of free
    fp8: bool = False  # hidden states as float8 (e4m3) with a per-token scale: 1/4 of fp32's bytes, 1/2 of bf16's

    def __post_init__(self) -> None:
        if self.mode is False:  # YAML 1.1 reads a bare `off` as false
            self.mode = "off"
        if self.mode not in CACHE_MODES:
            raise ValueError(f"mode: must be one of {', '.join(CACHE_MODES)}, got {self.mode!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or self.max_bytes < 1):
            raise ValueError(f"max_bytes: must be a positive number of bytes or None, got {self.max_bytes!r}")
        if self.dir is not None and not str(self.dir).strip():
            raise ValueError("dir: must be a directory path or None, got an empty string")


CACHE_MODES = ("off", "auto")
CACHE_DISK_SHARE = 0.8  # cache.max_bytes None: this share of the free space where the cache lives, at the start
