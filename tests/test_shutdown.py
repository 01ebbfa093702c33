"""Clean shutdown, with real processes: `ray job stop` leaves no engine process, Ray process or placement group
behind.

1. The job's signal handlers (`eagle_ray.job.signals.StopSignals`), in this process: what they raise, what they record
   (Ctrl-C's path: the first SIGINT or SIGTERM unwinds the job through its clean-up, which 3 runs end to end).
2. A TP rank's life (`sglang.die_with_parent`), without Ray or SGLang: a rank dies with the process that spawned
   it even when frozen, and not when merely the thread that spawned it exits.
3. `ray job submit` of the tiny config to a private `ray start --head --block` (its own ports and temp dir; torn
   down by signalling that one process, never `ray stop`), then `ray job stop`. Before the stop, TP rank 1 is frozen
   (SIGSTOP: a rank wedged in a collective never reads its pipe) and the head runs with Ray's own clean-up of a dead
   worker's children off, so once the replica actor is killed only the rank's parent-death signal
   (`die_with_parent`) can end it: what happens when a replica dies by a crash, the OOM killer or a `kill -9` that
   Ray did not send. The job must end STOPPED, its placement groups REMOVED, its driver, replica and TP-rank
   processes gone.

The job's run to its end is test_job.py's (a local Ray: the same job code after start-up; a submitted job joins the
head through RAY_ADDRESS, which 3 exercises up to training). Ctrl-C of the job on its own local Ray, which ran the
same clean-up path as 3 on a second Ray start-up and training run, was left out to keep the suite within its time.
3 uses the built-in tiny target (cached in ~/.cache/eagle_ray by the job; the first build takes minutes) and ShareGPT
data, with settings that reach the first training step quickly (about a minute here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from eagle_ray.ray_init import RAY_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
# a run that would go on for a long time: the tests stop it once training has started
LONG_RUN = [
    "training.max_steps=1000",
    "checkpoint.every=1000",
    "logging.log_every=1",
    "logging.progress=lines",
    "logging.trackers=[]",
    "logging.plot=false",
    "data.max_records=400",
    "draft.vocab_batches=4",
    "target.replicas=1",
    "target.tp_size=2",
]
START_TIMEOUT_S = 300  # first training step; ~60-90 s on the shared 2-core machine
EXIT_BOUND_S = 60


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python`, `ray` = this venv's
    env.pop("RAY_ADDRESS", None)
    return env


def _short_tmp() -> str:
    return tempfile.mkdtemp(prefix="er-sd-", dir="/tmp")  # Ray's unix socket paths must fit 107 characters


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ProcessWatch:
    """Every process seen under `roots` (recursively) or naming `marker` in its command line, polled while the
    job runs: a process re-parented after its parent died is still known. Keyed by (pid, start time)."""

    def __init__(self, roots: list[int], marker: str):
        self.roots, self.marker = roots, marker
        self.seen: dict[tuple[int, float], dict] = {}

    def poll(self) -> None:
        procs: list[psutil.Process] = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        for p in psutil.process_iter():
            try:
                if self.marker in " ".join(p.cmdline()):
                    procs.append(p)
            except psutil.Error:
                pass
        for p in procs:
            try:
                key, cmd = (p.pid, p.create_time()), " ".join(p.cmdline())[:160]
                # the parent at first sight; every title it showed (a Ray worker starts as ray::IDLE)
                info = self.seen.setdefault(key, {"pid": p.pid, "ppid": p.ppid(), "cmd": cmd, "titles": set()})
                info["cmd"] = cmd or info["cmd"]
                info["titles"].add(cmd)
            except psutil.Error:
                pass

    def matching(self, pred: Callable[[dict], bool]) -> list[dict]:
        return [info for info in self.seen.values() if pred(info)]

    def replicas(self) -> list[dict]:
        """Replica actors' processes. A process a replica forks shows the replica's title until it execs (torch
        inductor's compile workers, on a loaded machine caught by a poll): its parent is a replica, it is not one."""
        titled = self.matching(lambda i: any(t.startswith("ray::TargetReplica") for t in i["titles"]))
        return [i for i in titled if i["ppid"] not in {t["pid"] for t in titled}]

    def tp_ranks(self) -> list[dict]:
        """Spawned children of a replica actor: TP ranks (and multiprocessing's resource tracker)."""
        replica_pids = {r["pid"] for r in self.replicas()}
        return self.matching(lambda i: i["ppid"] in replica_pids and "multiprocessing" in i["cmd"])

    def alive(self, among: list[dict] | None = None) -> list[dict]:
        keys = [k for k, i in self.seen.items() if among is None or any(i is a for a in among)]
        out = []
        for pid, started in keys:
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(self.seen[(pid, started)])
            except psutil.Error:
                pass
        return out

    def wait_gone(self, timeout_s: float, among: list[dict] | None = None) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while (left := self.alive(among)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def kill_alive(self) -> None:
        """Test teardown: whatever is still alive of what was seen (identity checked by start time)."""
        for info in self.alive():
            try:
                os.kill(info["pid"], signal.SIGKILL)
            except OSError:
                pass


def _training_started(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"  # rank 0 appends one line per step
    return metrics.exists() and metrics.stat().st_size > 0


def _poll_until(cond: Callable[[], bool], timeout_s: float, watch: ProcessWatch, what: str, why: Callable[[], str]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watch.poll()
        if cond():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout_s}s\n{why()}")


def _describe(procs: list[dict]) -> str:
    return "\n".join(f"  pid {p['pid']} (parent {p['ppid']}): {p['cmd']}" for p in procs)


# ----------------------------------------------------------------------------------------------- 1. the job's handlers


def test_stop_signals_record_every_stop_signal_whoever_handles_it():
    """The job's handlers: the first stop signal raises KeyboardInterrupt, the second only logs; a signal caught by
    someone else's handler (Ray Train's SIGINT one raises SystemExit(0)) is still recorded; all restored after."""
    from eagle_ray.job.signals import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in this thread between bytecodes
        os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: logged, not raised
        time.sleep(0.1)

        def foreign(signum, frame):  # what Ray Train's fit() installs for SIGINT
            sys.exit(0)

        signal.signal(signal.SIGINT, foreign)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stop.signals() == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------------------------- 2. a rank's life

# A stand-in for a replica process: spawns two "ranks" the way SGLangEngine does (multiprocessing spawn), one from
# its main thread, one from a thread that exits once the rank is armed; prints their pids, then waits to be killed.
PARENT = """
import multiprocessing as mp, os, sys, threading, time
from eagle_ray.engines.sglang import die_with_parent

def rank(parent_pid, from_main_thread, armed):
    die_with_parent(parent_pid, from_main_thread)
    armed.set()
    time.sleep(600)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    pids = []
    def spawn(from_main_thread):
        armed = ctx.Event()
        p = ctx.Process(target=rank, args=(os.getpid(), from_main_thread, armed), daemon=True)
        p.start()
        assert armed.wait(120), "rank never armed"
        pids.append(p.pid)
    spawn(True)
    t = threading.Thread(target=spawn, args=(False,))
    t.start()
    t.join()  # the thread that spawned the second rank is gone now: a parent-death signal would fire on that
    print(*pids, flush=True)
    time.sleep(600)
"""


def test_a_rank_dies_with_its_parent_and_only_then(tmp_path):
    """`die_with_parent`: a rank spawned from the main thread dies with its parent even when frozen (SIGSTOP, as
    if wedged in a collective: only the kernel's parent-death signal reaches it); one spawned from another thread
    survives that thread's exit, then dies with the parent too (its watchdog thread)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    ranks: list[psutil.Process] = []
    try:
        line = parent.stdout.readline()
        assert line, "the parent process failed"
        ranks = [psutil.Process(int(pid)) for pid in line.split()]
        time.sleep(2.5)  # > the watchdog's poll: a rank wrongly tied to the spawning thread would be gone now
        assert all(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
        ranks[0].suspend()  # SIGSTOP
        parent.kill()  # SIGKILL: no clean-up of its own
        parent.wait()
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks outlived their parent: {alive}"
    finally:
        parent.kill()
        for r in ranks:
            try:
                r.kill()
            except psutil.Error:
                pass


# ----------------------------------------------------------------------------------------------- 3: the head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[dict]:
    """A private head for this module: `ray start --head --block` with its own ports and temp dir, in its own session.

    Ray's own clean-up of a dead worker's children is off on it (per-worker process groups, and killing the
    children it finds when it kills a worker), so killing a replica actor does not take its TP ranks along: only
    `die_with_parent` can (without it, the frozen rank outlives the job: this test fails, checked). Torn down by
    SIGTERM to the blocking `ray start` (it stops the processes it started), then SIGKILL to anything of it still
    alive; never `ray stop`, which would stop every Ray on this machine. `watch()`: a watch of the head's processes
    from now on, for one test (an earlier test's ended job is not in it); whatever any watch saw is ended at teardown.
    """
    temp = _short_tmp()
    gcs, dashboard, client, agent = _free_ports(4)
    start = [
        "ray",
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=4",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}",
        f"--temp-dir={temp}",
    ]
    # Ray's two ways of taking a dead worker's children along off (see above); no node drain on SIGTERM (it
    # would wait up to 30 s at teardown)
    env = {
        **_ray_env(),
        "RAY_process_group_cleanup_enabled": "0",
        "RAY_kill_child_processes_on_worker_exit": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    with open(tmp_path_factory.mktemp("head") / "head.log", "w") as out:
        proc = subprocess.Popen(start, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watches = [ProcessWatch([proc.pid], marker=temp)]

    def watch() -> ProcessWatch:
        watches.append(ProcessWatch([proc.pid], marker=temp))
        return watches[-1]

    try:
        yield {"gcs": f"127.0.0.1:{gcs}", "api": f"http://127.0.0.1:{dashboard}", "watch": watch, "proc": proc}
    finally:
        for w in watches:
            w.poll()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        watches[0].wait_gone(10)
        for w in watches:
            w.kill_alive()
        shutil.rmtree(temp, ignore_errors=True)


def _ray_env() -> dict[str, str]:
    # token auth, as Ray 2.60 sets up for a new head (its job client needs it said): the head creates the token
    # (~/.ray/auth_token) when missing, every client reads it
    return {**_env(), "RAY_AUTH_MODE": "token"}


def _ray_cli(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=ROOT, env=_ray_env(), capture_output=True, text=True, timeout=timeout_s)


def _submit(head: dict, storage: Path, name: str, flags: list[str], overrides: list[str], timeout_s: float = 120):
    """`ray job submit` of the tiny config to the head; returns (process, its output). Right after `ray start` the
    head's dashboard and job agent may not be up yet: tried again for up to 3 minutes until accepted."""
    args = [
        "job",
        "submit",
        f"--address={head['api']}",
        *flags,
        "--working-dir=.",
        "--runtime-env=cluster/runtime_env.yaml",
    ]
    args += ["--", "python", "jobs/train_eagle3.py", "--config", "configs/tiny.yaml"]
    args += [f"checkpoint.storage_path={storage}", f"checkpoint.name={name}", *overrides]
    deadline = time.monotonic() + 180
    while True:
        proc = _ray_cli(args, timeout_s)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or "submitted successfully" in out or time.monotonic() > deadline:
            return proc, out
        time.sleep(2)


# ----------------------------------------------------------------------------------------------- 3. ray job stop


# A second driver on the head, in its own process (this test process stays out of Ray: Ray reads its auth mode
# once per process). Per line on stdin it prints the eagle_ray groups still reserved: at once ("now"), or once
# none is left, giving up after argv[2] seconds ("gone").
GROUP_PROBE = """
import json, sys, time
import ray
from eagle_ray.pool.placement import live_groups
ray.init(address=sys.argv[1], logging_level="ERROR")
for line in sys.stdin:
    deadline = time.monotonic() + (float(sys.argv[2]) if line.strip() == "gone" else 0)
    while (left := live_groups(this_job_only=False)) and time.monotonic() < deadline:
        time.sleep(0.5)
    print(json.dumps(left), flush=True)
"""


def _ask(probe: subprocess.Popen, what: str) -> list[str] | None:
    probe.stdin.write(what + "\n")
    probe.stdin.flush()
    return json.loads(probe.stdout.readline() or "null")


def test_ray_job_stop_leaves_no_engine_process_or_placement_group(ray_head, tmp_path):
    watch: ProcessWatch = ray_head["watch"]()
    job_id = f"er-shutdown-{os.getpid()}-{int(time.time())}"
    proc, out = _submit(ray_head, tmp_path, "stopped", [f"--submission-id={job_id}", "--no-wait"], LONG_RUN)
    assert proc.returncode == 0, out[-4000:]

    def logs() -> str:
        p = _ray_cli(["job", "logs", f"--address={ray_head['api']}", job_id])
        return (p.stdout + p.stderr)[-5000:]

    probe = subprocess.Popen(
        [sys.executable, "-c", GROUP_PROBE, ray_head["gcs"], "30"],
        cwd=ROOT,
        env=_ray_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def is_driver(info: dict) -> bool:
        return "jobs/train_eagle3.py" in info["cmd"]

    def started_or_ended() -> bool:
        ended = watch.matching(is_driver) and not watch.alive(watch.matching(is_driver))
        return bool(ended) or (_training_started(tmp_path / "stopped") and bool(watch.tp_ranks()))

    try:
        _poll_until(started_or_ended, START_TIMEOUT_S, watch, "first training step", logs)
        drivers = watch.matching(is_driver)
        assert watch.alive(drivers), f"the job ended before it was stopped:\n{logs()}"
        replicas, spawned = watch.replicas(), watch.tp_ranks()
        ranks = [r for r in spawned if "spawn_main" in r["cmd"]]
        assert drivers and len(replicas) == 1 and len(ranks) == 1, _describe(list(watch.seen.values()))
        before = _ask(probe, "now")
        assert before, f"the running job's replica holds no eagle_ray placement group? {before}"

        os.kill(ranks[0]["pid"], signal.SIGSTOP)  # wedged: it can neither read its pipe nor see a peer leave
        t0 = time.monotonic()
        stop = _ray_cli(["job", "stop", f"--address={ray_head['api']}", job_id])
        stop_s = time.monotonic() - t0
        assert stop.returncode == 0, stop.stdout + stop.stderr
        status = _ray_cli(["job", "status", f"--address={ray_head['api']}", job_id])
        # the CLI's words for JobStatus.STOPPED (not FAILED, not SUCCEEDED)
        assert f"Job '{job_id}' was stopped" in status.stdout + status.stderr, status.stdout + status.stderr

        after = _ask(probe, "gone")
        assert after == [], f"placement groups still reserved after the job stopped: {after} (before: {before})"
    finally:
        probe.kill()
        probe.wait()
    left = watch.wait_gone(30, among=drivers + replicas + spawned)
    assert not left, f"left running after `ray job stop`:\n{_describe(left)}"
    text = logs()
    assert "SIGTERM received: shutting down" in text, text  # the driver's own handler ran before any SIGKILL
    print(
        f"\nray job stop: returned after {stop_s:.1f}s; driver, replica {replicas[0]['pid']} and its children "
        f"{[r['pid'] for r in spawned]} (rank 1 frozen) gone; placement groups {before} removed"
    )
