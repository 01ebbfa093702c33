"""The README's main command, run as a user would (a fresh process, default arguments)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_supervision_summary_default_run(tmp_path):
    env = {**os.environ, "EAGLE_RAY_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "jobs/supervision_summary.py", "--sequences", "3", "--max-len", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[hf]" in out and "[sglang]" in out
    assert (tmp_path / "tiny-llama" / "config.json").exists()  # built once, cached
    diff = re.search(r"max_abs_diff_vs_hf: \{'aux': ([0-9.e-]+), 'last': ([0-9.e-]+)\}", out)
    assert diff and float(diff[1]) <= 1e-5 and float(diff[2]) <= 1e-5, out
    assert out.count("aux: (") == 2


def test_cluster_runtime_env_matches_the_pool():
    import yaml

    from eagle_ray.ray_init import ZERO_COPY_ENV

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    assert env["env_vars"] == ZERO_COPY_ENV
