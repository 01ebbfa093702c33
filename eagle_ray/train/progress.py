"""Live progress of a training run, seen from the driver.

Rank 0 pushes one row per step to the driver's `MetricsSink` actor (fire and forget); a row holds every rank's
sums (trainer tokens, target tokens its supply computed). A driver thread (`Progress`) reads them and shows
one line: a tqdm bar on a terminal, plain periodic lines in job logs. It also feeds each row to the experiment trackers
(`trackers.py`: TensorBoard, W&B, MLflow) and sets Ray metrics (`ray.util.metrics`, visible in Ray's
Prometheus endpoint / dashboard).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from eagle_ray.train.trackers import Trackers, row_metrics

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class MetricsSink:
    """Each run's rows, in order. One per driver, shared by its runs: an actor is a process start (~3 s of CPU), which
    a driver that trains several drafts (a notebook, a test suite) would otherwise pay for each."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def push(self, run: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(run, []).append(row)

    def since(self, run: str, n: int) -> list[dict[str, Any]]:
        return self.rows.get(run, [])[n:]

    def forget(self, run: str) -> None:
        self.rows.pop(run, None)


@dataclass(frozen=True)
class RunSink:
    """One run's rows in its driver's sink: what rank 0 pushes to and the driver's threads read."""

    actor: Any
    run: str

    def push(self, row: dict[str, Any]) -> None:
        self.actor.push.remote(self.run, row)  # fire and forget

    def since(self, n: int) -> ray.ObjectRef:
        return self.actor.since.remote(self.run, n)

    def close(self) -> None:
        self.actor.forget.remote(self.run)


# this driver's sink and its connection to Ray (a handle lives as long as its connection): the job id is new at each
# connection to one cluster, the node id at each local Ray (where the job id starts again at 01000000)
_sink: tuple[tuple[str, str], Any] | None = None


def run_sink() -> RunSink:
    """A new run's rows in this driver's sink, started on first use."""
    global _sink
    context = ray.get_runtime_context()
    connection = (context.get_node_id(), context.get_job_id())
    if _sink is None or _sink[0] != connection:
        _sink = (connection, MetricsSink.remote())
    return RunSink(_sink[1], uuid.uuid4().hex)


class _RayMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.target_tokens = Counter("eagle_ray_pool_tokens", "tokens the target pool has processed")
        self.trainer_tokens = Counter("eagle_ray_trainer_tokens", "tokens the draft trainer has consumed")
        self.loss = Gauge("eagle_ray_train_loss", "TTT loss of the last step")
        self.acceptance = Gauge("eagle_ray_train_acceptance", "simulated acceptance length (chain) of the last step")


class Progress:
    def __init__(
        self,
        sink: Any,
        total_steps: int,
        mode: str = "auto",
        every_s: float = 10.0,
        trackers: Trackers | None = None,
    ):
        self.sink, self.total = sink, total_steps
        self.mode = ("bar" if sys.stderr.isatty() else "lines") if mode == "auto" else mode
        self.every_s = every_s
        self.rows: dict[int, dict[str, Any]] = {}  # step -> latest row (a restart re-runs steps)
        self._seen = 0
        self._printed = -1  # the step of the last line printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eagle-ray-progress", daemon=True)
        self.trackers = trackers if trackers is not None else Trackers()  # closed by stop()
        self._metrics: _RayMetrics | None = None
        self._bar = None
        self._last = (0, 0)
        self.rates = {"target_tokens_per_s": 0.0, "trainer_tokens_per_s": 0.0}

    def start(self) -> Progress:
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc="draft", unit="step", dynamic_ncols=True)
        try:
            self._metrics = _RayMetrics()
        except Exception as e:  # metrics are best effort (e.g. a driver without a metrics agent)
            log.warning("Ray metrics unavailable: %s", e)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self._tick()
        except Exception:
            log.exception("progress update failed")
        if self.mode == "lines" and self.rows and max(self.rows) != self._printed:
            self._print_line()  # a run's log ends on its last step, however the interval fell
        if self._bar is not None:
            self._bar.close()
        self.trackers.close()

    def history(self) -> list[dict[str, Any]]:
        return [self.rows[s] for s in sorted(self.rows)]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        last_line = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                self._tick()
            except Exception:  # progress must never take the run down
                log.exception("progress update failed")
            if self.mode == "lines" and self.rows and time.monotonic() - last_line >= self.every_s:
                last_line = time.monotonic()
                self._print_line()

    def _print_line(self) -> None:
        self._printed = max(self.rows)
        print(self.line(), flush=True)

    def _tick(self) -> None:
        try:
            new = ray.get(self.sink.since(self._seen), timeout=10)
        except Exception:
            return
        self._seen += len(new)
        for row in new:
            self.rows[row["step"]] = row
            if self.trackers:
                self.trackers.log(row_metrics(row), row["step"])
        rows = [self.rows[k] for k in sorted(self.rows)]
        if not rows:
            return
        row = rows[-1]
        self.rates = {"target_tokens_per_s": target_rate(rows), "trainer_tokens_per_s": _trainer_rate(rows)}
        now = (sum(r.get("target_tokens", 0) for r in rows), row["tokens"])  # the target's and the trainer's tokens
        if self._metrics is not None:
            m = self._metrics
            for counter, new, old in zip((m.target_tokens, m.trainer_tokens), now, self._last, strict=True):
                if new > old:  # Ray counters refuse 0
                    counter.inc(new - old)
            m.loss.set(row["loss"])
            m.acceptance.set(row["acceptance_chain"])
        self._last = now
        if self._bar is not None:
            self._bar.n = row["step"]
            self._bar.set_postfix_str(self.line(short=True), refresh=True)

    def line(self, short: bool = False) -> str:
        if not self.rows:
            return "waiting for the first step"
        row = self.rows[max(self.rows)]
        recent = [self.rows[s] for s in sorted(self.rows)[-20:]]
        busy = sum(r.get("step_s", 0.0) for r in recent)
        wait = sum(r.get("wait_s", 0.0) for r in recent) / max(busy, 1e-9)
        skipped = f" skipped {row['skipped']}" if row.get("skipped") else ""
        text = (
            f"samples {row['samples']} target {self.rates['target_tokens_per_s']:.0f} tok/s "
            f"trainer {self.rates['trainer_tokens_per_s']:.0f} tok/s wait {100 * wait:.0f}%{skipped} "
            f"loss {row['loss']:.3f} acc {'/'.join(f'{a:.2f}' for a in row['acc'])} "
            f"sim-accept {row['acceptance_chain']:.2f}"
        )
        return text if short else f"[eagle_ray] step {row['step']}/{self.total} {text}"


def target_rate(rows: list[dict[str, Any]]) -> float:
    """Tokens the target computed for the trainers (re-runs included) per second of their steps (waits included)."""
    return sum(r.get("target_tokens", 0) for r in rows) / max(sum(r.get("step_s", 0.0) for r in rows), 1e-9)


def _trainer_rate(rows: list[dict[str, Any]]) -> float:
    """Tokens the trainer consumed per second of its steps (waits included), after the first step.

    From the rows' own step times: rows reach the driver in bursts, so tokens over the driver's clock read as
    millions of tokens/s right after the first burst.
    """
    if len(rows) < 2:
        return 0.0
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / max(sum(r.get("step_s", 0.0) for r in rows[1:]), 1e-9)
