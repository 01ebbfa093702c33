"""Experiment trackers (`eagle_ray.train.trackers`): real clients, offline or local, read back in their own formats.

One `Progress` (the driver thread of `train_draft`) is fed rows shaped like the worker loop's, without Ray: its
sink is a stand-in and `ray.get` the identity. What TensorBoard, W&B (WANDB_MODE=offline) and MLflow (a sqlite
store in the run directory) wrote is then read back. wandb 0.31 no longer ships a Python reader of its `.wandb`
transaction log (`wandb.sdk.internal.datastore` is gone, the Go core writes it), nor writes
`wandb-summary.json` offline, so the log's framing (LevelDB's log format behind a W&B header) is read here and
each record parsed with wandb's own protobuf schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from eagle_ray.job.config import ConfigError, load_job_config
from eagle_ray.train import progress as progress_module
from eagle_ray.train import trackers as trackers_module
from eagle_ray.train.progress import Progress
from eagle_ray.train.trackers import Tracker, Trackers, open_trackers, row_metrics


def _row(step: int) -> dict[str, Any]:
    """A row as `train_loop_per_worker` pushes it, plus a key the loop does not have (yet)."""
    return {
        "step": step,
        "loss": 10.0 / step,
        "acc": [0.9 - 0.1 * k - 0.01 * step for k in range(3)],
        "acceptance_chain": 1.5 + step / 10,
        "acceptance_product": 1.25 + step / 10,
        "lr": 1e-3 * step,
        "samples": 4 * step,
        "tokens": 100 * step,
        "wait_s": 0.5,
        "step_s": 2.0,
        "per_step_weighted_loss": 3.0 + step,
        **({"weight_checksums": [123456789, 123456789]} if step == 2 else {}),
    }


def test_row_metrics_names_scalars_train_and_acc_per_ttt_step():
    row = {**_row(2), "engine": "hf", "finished": True}
    metrics = row_metrics(row)
    assert metrics == {
        "train/loss": 5.0,
        "train/acceptance_chain": 1.7,
        "train/acceptance_product": 1.45,
        "train/lr": 2e-3,
        "train/samples": 8.0,
        "train/tokens": 200.0,
        "train/wait_s": 0.5,
        "train/step_s": 2.0,
        "train/per_step_weighted_loss": 5.0,
        **{f"acc/step{k}": row["acc"][k] for k in range(3)},
    }
    assert all(type(v) is float for v in metrics.values())


def test_a_sweeps_arms_are_series_of_their_own():
    row = {
        **_row(2),
        "arms": [{"loss": 5.0, "acc": [0.5], "restarts": 0, "failed": False}, {"loss": 4.0, "restarts": 1}],
    }
    metrics = row_metrics(row)
    assert metrics["arm0/loss"] == 5.0 and metrics["arm1/loss"] == 4.0 and metrics["arm1/restarts"] == 1.0
    assert "arm0/failed" not in metrics and "arm0/acc" not in metrics and metrics["train/loss"] == 5.0


def test_fan_out_reaches_every_tracker_when_one_fails(caplog):
    seen: list[tuple[str, int]] = []

    def broken(metrics: dict[str, float], step: int) -> None:
        raise OSError("disk full")

    trackers = Trackers(
        [
            Tracker("broken", broken, lambda: None),
            Tracker("ok", lambda m, s: seen.append((next(iter(m)), s)), lambda: seen.append(("closed", -1))),
        ]
    )
    trackers.log({"train/loss": 1.0}, 1)
    trackers.log({"train/loss": 0.5}, 2)
    trackers.close()
    assert seen == [("train/loss", 1), ("train/loss", 2), ("closed", -1)]
    assert sum("tracker broken failed" in r.getMessage() for r in caplog.records) == 1  # once, not per step


@pytest.mark.parametrize(("tracker", "module"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_requested_tracker_that_is_not_installed_fails_naming_the_extra(tmp_path, monkeypatch, tracker, module):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_import = trackers_module.import_module

    def import_module(name: str) -> Any:
        if name == module:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name)

    # patched in trackers.py only: a process-wide `sys.modules["sqlalchemy"] = None` would outlive the test,
    # in the model-registry schemes mlflow settles on once per process
    monkeypatch.setattr(trackers_module, "import_module", import_module)
    with pytest.raises(ImportError, match=rf"tracker '{tracker}' needs the {module} package.*eagle-ray\[{tracker}\]"):
        open_trackers(["tensorboard", tracker], tmp_path, "run")
    assert not (tmp_path / "tensorboard").exists()  # checked before anything was opened
    if module == tracker:  # the job refuses it when loading its config, before any Ray or target start-up
        monkeypatch.setitem(sys.modules, module, None)  # find_spec's answer for a module that is not there
        with pytest.raises(ConfigError, match=rf"logging.trackers: {tracker} is not installed.*eagle-ray\[{tracker}\]"):
            load_job_config(None, [f"logging.trackers=[tensorboard,{tracker}]"])


def test_unknown_tracker_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        open_trackers(["comet"], tmp_path, "run")
    with pytest.raises(ConfigError, match=r"logging.trackers\[0\]"):
        load_job_config(None, ["logging.trackers=[comet]"])


# ------------------------------------------------------------------------------------- real clients


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars of TFRecord event files (length, crc, Event proto, crc), parsed with tensorboardX's Event."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            n = int.from_bytes(data[pos : pos + 8], "little")
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def _wandb_records(path: Path) -> list[Any]:
    from wandb.proto.wandb_internal_pb2 import Record

    block, data = 32768, path.read_bytes()
    assert data[:7] == b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00", data[:7]
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # preallocated zeros after the last record
            break
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST (FIRST and MIDDLE fragments continue)
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def _wandb_history(records: list[Any]) -> dict[str, dict[int, float]]:
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[items["_step"]] = v
    return history


@pytest.fixture(autouse=True)
def _fresh_wandb_session():
    """wandb reads its environment variables once per process session: each test gets its own session."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


class _Sink:
    """`RunSink`'s reading side without Ray: `since(n)` is the rows themselves (ray.get is patched)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.since = lambda n: rows[n:]


def test_progress_rows_reach_tensorboard_wandb_and_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))  # the user's own choice wins over run_dir
    monkeypatch.setenv("WANDB_PROJECT", "from_env")
    for name in ("WANDB_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb_env").mkdir()
    monkeypatch.setattr(progress_module.ray, "get", lambda value, timeout=None: value)

    config = {"training": {"lr": 0.003, "max_steps": 3}, "data": {"paths": ["a.json"], "max_records": None}}
    trackers = open_trackers(["tensorboard", "wandb", "mlflow"], run_dir, "trk-run", config)
    assert [t.name for t in trackers.items] == ["tensorboard", "wandb", "mlflow"]
    rows = [_row(s) for s in (1, 2, 3)]
    monitor = Progress(_Sink(rows), total_steps=3, mode="off", trackers=trackers).start()
    monitor.stop()  # its last tick reads every row, then it closes the trackers
    assert [r["step"] for r in monitor.history()] == [1, 2, 3]
    expected = {k: {r["step"]: row_metrics(r)[k] for r in rows} for k in row_metrics(rows[0])}
    assert "acc/step2" in expected and "train/per_step_weighted_loss" in expected

    tb = _tensorboard_scalars(run_dir / "tensorboard")
    assert tb.keys() == expected.keys()
    for k, by_step in expected.items():
        assert tb[k] == pytest.approx(by_step, rel=1e-6), k  # TensorBoard keeps float32

    (log,) = (tmp_path / "wandb_env" / "wandb").glob("offline-run-*/run-*.wandb")
    assert not (run_dir / "wandb").exists()
    records = _wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("from_env", "trk-run")
    assert {i.key: json.loads(i.value_json) for i in run.config.update}["training"] == config["training"]
    assert _wandb_history(records) == expected

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("eagle_ray")
    (found,) = client.search_runs([experiment.experiment_id])
    assert (found.info.run_name, found.info.status) == ("trk-run", "FINISHED")
    assert found.data.params == {
        "training.lr": "0.003",
        "training.max_steps": "3",
        "data.paths": '["a.json"]',
        "data.max_records": "null",
    }
    for k, by_step in expected.items():
        history = client.get_metric_history(found.info.run_id, k)
        assert {m.step: m.value for m in history} == by_step, k
    assert experiment.artifact_location == (run_dir / "mlartifacts").resolve().as_uri()


def test_wandb_and_mlflow_defaults_live_in_the_run_dir_and_env_uri_wins(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    run_dir = tmp_path / "run"
    trackers = open_trackers(["wandb", "mlflow"], run_dir, "defaults")
    trackers.log({"train/loss": 2.5}, 7)
    trackers.close()

    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "eagle_ray"
    assert _wandb_history(records) == {"train/loss": {7: 2.5}}

    assert not (run_dir / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere}")
    (found,) = client.search_runs([client.get_experiment_by_name("eagle_ray").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss")] == [(7, 2.5)]
