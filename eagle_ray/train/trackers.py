"""Experiment trackers: the per-step training metrics to TensorBoard, Weights & Biases and/or MLflow.

A tracker is a `log(metrics, step)` and a `close()`. `open_trackers(["tensorboard", "wandb"], run_dir,
name, config)` opens the named ones, records the run's config once, and fans `log` out to each, under the
same metric names everywhere (`row_metrics`). W&B and MLflow are optional extras (`eagle-ray[wandb]`,
`eagle-ray[mlflow]`, both: `eagle-ray[trackers]`): naming one that is not installed fails at start-up.

W&B honours the user's environment (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, WANDB_NAME, ...), else project
"eagle_ray" with its files under the run directory. MLflow honours MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME, else a sqlite store `<run_dir>/mlflow.db`, experiment "eagle_ray".
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class Tracker:
    name: str
    log: Callable[[dict[str, float], int], None]
    close: Callable[[], None]


@dataclass
class Trackers:
    items: list[Tracker] = field(default_factory=list)
    _failed: set[str] = field(default_factory=set, repr=False)

    def __bool__(self) -> bool:
        return bool(self.items)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for t in self.items:
            try:
                t.log(metrics, step)
            except Exception:  # one tracker's outage must cost neither the others their row nor the run
                if t.name not in self._failed:
                    self._failed.add(t.name)
                    log.exception("tracker %s failed at step %d (its later failures are not logged)", t.name, step)

    def close(self) -> None:
        for t in self.items:
            try:
                t.close()
            except Exception:
                log.exception("tracker %s failed to close", t.name)


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A training row as tracker metrics: numeric scalars as `train/<key>`, the per-TTT-step `acc` as `acc/step<k>`,
    a sweep's arms as `arm<k>/<key>`.

    Other lists (`weight_checksums`, one per DDP rank) and non-numbers are not metrics.
    """
    metrics: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":  # the x axis, not a series
            continue
        if key == "acc":
            metrics.update((f"acc/step{k}", float(a)) for k, a in enumerate(value))
        elif key == "arms":  # a sweep's: each arm's numbers as its own series
            for k, arm in enumerate(value):
                metrics.update(
                    (f"arm{k}/{name}", float(v))
                    for name, v in arm.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                )
        elif isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"train/{key}"] = float(value)
    return metrics


def open_trackers(
    names: Iterable[str], run_dir: str | Path, run_name: str, config: Mapping[str, Any] | None = None
) -> Trackers:
    """Open the named trackers for one run and record `config` in each; close the result when done."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; trackers are {list(TRACKERS)}")
    run_dir = Path(run_dir)
    for name in names:  # every import before any run is opened: no half-opened set to undo
        for module in _requires(name):
            _require(module, name)
    opened = Trackers()
    try:
        for name in names:
            tracker = _OPEN[name](run_dir, run_name, dict(config or {}))
            if tracker is not None:
                opened.items.append(tracker)
    except BaseException:
        opened.close()
        raise
    return opened


def _requires(name: str) -> tuple[str, ...]:
    if name == "wandb":
        return ("wandb",)
    if name == "mlflow":  # mlflow-skinny's sqlite store needs SQLAlchemy and alembic, which it does not pull in
        sqlite = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:").startswith("sqlite:")
        return ("mlflow", "sqlalchemy", "alembic") if sqlite else ("mlflow",)
    return ()


def _require(module: str, tracker: str) -> None:
    try:
        import_module(module)
    except ImportError as e:
        raise ImportError(
            f"tracker {tracker!r} needs the {module} package, which is not installed: "
            f"pip install 'eagle-ray[{tracker}]' (or 'eagle-ray[trackers]' for all of them)"
        ) from e


def _tensorboard(run_dir: Path, run_name: str, config: dict[str, Any]) -> Tracker | None:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # a core dependency; an environment without it still trains, as it always has
        log.warning("tensorboardX is not installed; no TensorBoard scalars")
        return None
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    # indented: TensorBoard renders text as Markdown, and a code block keeps the JSON's lines
    text = json.dumps(config, indent=2, default=str)
    writer.add_text("config", "\n".join("    " + line for line in text.split("\n")))

    def log_scalars(metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    return Tracker("tensorboard", log_scalars, writer.close)


def _wandb(run_dir: Path, run_name: str, config: dict[str, Any]) -> Tracker:
    import wandb

    env = os.environ
    # wandb.init's arguments override its environment variables: pass ours only where the user set none
    run = wandb.init(
        project=None if env.get("WANDB_PROJECT") else "eagle_ray",
        name=None if env.get("WANDB_NAME") else run_name,
        dir=None if env.get("WANDB_DIR") else str(run_dir),
        config=config,
        reinit="create_new",  # never hand back (and later finish) a run the user's own code has open
    )
    # W&B drops a step lower than one already logged: steps a Ray Train restart re-runs are kept once
    return Tracker("wandb", lambda metrics, step: run.log(metrics, step=step), run.finish)


def _mlflow_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def _mlflow(run_dir: Path, run_name: str, config: dict[str, Any]) -> Tracker:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    local = not os.environ.get("MLFLOW_TRACKING_URI")
    if local:
        run_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=_mlflow_uri(run_dir))
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "eagle_ray"
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:  # a local store's artifacts beside it, not in whatever directory the job was started from
        artifacts = (run_dir / "mlartifacts").resolve().as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    # MLflow refuses a param value over 6000 characters (a long `data.paths`, say) and fails the whole batch
    params = [Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:6000]) for k, v in _flatten(config)]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    return Tracker("mlflow", log_metrics, lambda: client.set_terminated(run_id))


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


_OPEN: dict[str, Callable[[Path, str, dict[str, Any]], Tracker | None]] = {
    "tensorboard": _tensorboard,
    "wandb": _wandb,
    "mlflow": _mlflow,
}
