"""Fault injection, for tests and chaos runs: every hook here is off unless asked for.

Each hook is called from one place in production code, and does nothing by default:

- `replica_shard_fault(input_ids)`, in `pool/replica.py`: the replica process exits (code 3) when a shard
  holds the token id in `EAGLE_RAY_CHAOS_CRASH_TOKEN` (set in the replica actor's runtime_env) -- a
  poison shard that kills every replica it lands on.
- `replica_start_fault(node_id)`, in `pool/replica.py`: a replica starting on a node listed (comma-separated ids) in
  `EAGLE_RAY_FAIL_START_NODES` fails to start, as one on a node with a bad GPU or a broken driver would; each such
  failure appends "<node id> <unix time>" to the file `EAGLE_RAY_FAIL_START_LOG` names, if set (tests count them).
  It also fails a start while the file `EAGLE_RAY_FAIL_STARTS_FILE` names holds a count above 0, taking one off
  (`fail_next_starts`: the chaos tool's "start_failure", which sets the count while the pool runs).
- `train_step_fault(rank, run_dir)`, in `train/loop.py`: rank 0 of the draft workers fails once at the step
  `plan_train_fault(run_dir, step, mode)` asked for (a file in the run dir), by `mode`; a marker file in the
  run dir keeps the restarted group from failing again. It fires once Ray Train has registered every checkpoint
  written so far, so the restart resumes where the test expects.
- `arm_step_fault(rank, run_dir)`, in `train/arms.py` (a sweep's step): arm `arm` of a sweep fails once on rank 0 at
  the step `plan_arm_fault(run_dir, step, arm, mode)` asked for: its forward raises ("raise") or its loss is
  not finite ("nan"). A marker file in the run dir keeps it from failing again.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# the chaos monkey's faults (`pool/chaos.py` says what each does), here where the chaos job reaches them without Ray
FAULTS = ("ray_kill", "sigkill", "sigkill_tp", "pool_server", "start_failure")
CRASH_TOKEN_ENV = "EAGLE_RAY_CHAOS_CRASH_TOKEN"
FAIL_START_ENV = "EAGLE_RAY_FAIL_START_NODES"
FAIL_START_LOG_ENV = "EAGLE_RAY_FAIL_START_LOG"
FAIL_STARTS_FILE_ENV = "EAGLE_RAY_FAIL_STARTS_FILE"
FAIL_MODES = ("raise", "exit", "sigkill")
TRAIN_FAULT_FILE = "inject_train_fault.json"  # in a run dir: `plan_train_fault` writes it, the worker loop reads it
ARM_FAULT_FILE = "inject_arm_fault.json"  # in a run dir: `plan_arm_fault` writes it, a sweep's step reads it
ARM_FAIL_MODES = ("raise", "nan")

# read once, when the replica module imports this one in the actor: its runtime_env is set by then
_CRASH_TOKEN = int(os.environ[CRASH_TOKEN_ENV]) if CRASH_TOKEN_ENV in os.environ else None


def replica_shard_fault(input_ids: torch.Tensor) -> None:
    """Exit the process, as a crashing kernel would, if this shard holds the poison token."""
    if _CRASH_TOKEN is not None and bool((input_ids == _CRASH_TOKEN).any()):
        os._exit(3)


def replica_start_fault(node_id: str) -> None:
    """Fail a replica's start on the nodes `EAGLE_RAY_FAIL_START_NODES` names (read now: the actor's env is set)."""
    if node_id in os.environ.get(FAIL_START_ENV, "").split(","):
        if FAIL_START_LOG_ENV in os.environ:
            with open(os.environ[FAIL_START_LOG_ENV], "a") as f:
                f.write(f"{node_id} {time.time()}\n")
        raise RuntimeError(f"injected start failure on node {node_id}")
    if FAIL_STARTS_FILE_ENV in os.environ and _take_one(os.environ[FAIL_STARTS_FILE_ENV]):
        raise RuntimeError(f"injected start failure on node {node_id} (one of the next starts asked to fail)")


def fail_next_starts(path: str | Path, count: int) -> None:
    """Make the pool's next `count` replica starts fail (the pool's replicas need `EAGLE_RAY_FAIL_STARTS_FILE`
    = `path` in their runtime_env, and `path` readable on their nodes)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # replicas starting at once take from the count one at a time
        f.seek(0)
        f.truncate()
        f.write(str(count))


def _take_one(path: str) -> bool:
    try:
        f = open(path, "r+")
    except FileNotFoundError:
        return False
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        left = int(f.read().strip() or 0)
        if left <= 0:
            return False
        f.seek(0)
        f.truncate()
        f.write(str(left - 1))
        return True


def check_fail_mode(mode: str) -> None:
    if mode not in FAIL_MODES:
        raise ValueError(f"fail_mode: must be one of {FAIL_MODES}, got {mode!r}")


def plan_train_fault(run_dir: str | Path, step: int, mode: str = "raise") -> None:
    """Make rank 0 of the next training run in `run_dir` fail once at `step`, by `mode` ("raise", "exit" or
    "sigkill"). A file in the run dir, not a config field: no user-facing config carries test hooks."""
    check_fail_mode(mode)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / TRAIN_FAULT_FILE).write_text(json.dumps({"step": step, "mode": mode}))


def train_step_fault(rank: int, run_dir: str | Path) -> Callable[[int], None] | None:
    """The fault planned for this worker (read once, when it starts), as a function of the step; None if none.

    It fires on rank 0 at the planned step, the first time only (a marker file says it happened)."""
    plan = Path(run_dir) / TRAIN_FAULT_FILE
    if rank != 0 or not plan.exists():
        return None
    fault = json.loads(plan.read_text())
    marker = Path(run_dir) / f"injected_failure_step{fault['step']}"

    def fire(step: int) -> None:
        if step != fault["step"] or marker.exists():
            return
        _checkpoints_registered(Path(run_dir))
        marker.write_text(str(step))
        if fault["mode"] == "exit":
            os._exit(1)
        if fault["mode"] == "sigkill":  # as the OOM killer or a lost node would: no cleanup, no goodbye
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected train worker failure at step {step}")

    return fire


def plan_arm_fault(run_dir: str | Path, step: int, arm: int, mode: str = "raise") -> None:
    """Make arm `arm` of the next sweep in `run_dir` fail once, on rank 0, at `step`: its forward raises
    ("raise") or its loss is NaN ("nan"). In-process: the worker lives on, and so do the other arms."""
    if mode not in ARM_FAIL_MODES:
        raise ValueError(f"mode: must be one of {ARM_FAIL_MODES}, got {mode!r}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / ARM_FAULT_FILE).write_text(json.dumps({"step": step, "arm": arm, "mode": mode}))


def arm_step_fault(rank: int, run_dir: str | Path) -> Callable[[int, int], bool] | None:
    """The arm fault planned for this worker, as a function of (step, arm) called before the arm's forward; it
    raises, or returns True when the arm's loss is to be made NaN. None if none is planned."""
    plan = Path(run_dir) / ARM_FAULT_FILE
    if rank != 0 or not plan.exists():
        return None
    fault = json.loads(plan.read_text())
    marker = Path(run_dir) / f"injected_arm{fault['arm']}_failure_step{fault['step']}"

    def fire(step: int, arm: int) -> bool:
        if step != fault["step"] or arm != fault["arm"] or marker.exists():
            return False
        marker.write_text(str(step))
        if fault["mode"] == "raise":
            raise RuntimeError(f"injected failure of sweep arm {arm} at step {step}")
        return True

    return fire


def _checkpoints_registered(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Wait until Ray Train's controller has registered every checkpoint in `run_dir`. It registers a reported
    one only when it next polls the workers: a worker killed before then loses it, and the group restarts from
    the one before (seen on CI under load: 15 steps rolled back where the test planned 5). A planned fault
    fires after that, so a test knows where the restart resumes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        on_disk = {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()}
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # none yet, or caught mid-write
            snapshot = {}
        if on_disk <= {c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])}:
            return
        time.sleep(0.2)
