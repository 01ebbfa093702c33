"""Driver entry point: train an EAGLE-3 draft on Ray Train, each rank reading its own batches' supervision.

    pool = serve_pool("my-pool", model_path, replicas=4)
    result = train_draft(pool, batches, DraftTrainConfig(max_steps=1000), num_workers=2, ...)

Rank r takes global batch `step * num_workers + r` at each step and reads its supervision itself
(`reader.py`): from the pool, as a client that dispatches its own shards to the replicas, or from a dump
on shared storage. The driver does nothing per batch. The target's embeddings and lm_head are one
object in the object store.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from eagle_ray.contract import PackedBatch
from eagle_ray.data.source import ChatBatchSource
from eagle_ray.draft.model import Eagle3DraftConfig
from eagle_ray.draft.vocab import DraftVocab, build_draft_vocab, count_loss_tokens
from eagle_ray.hf_checkpoint import load_config
from eagle_ray.offline import OfflineSupervision, shard_name
from eagle_ray.pool import PoolClient, PooledTargetModel
from eagle_ray.train.arms import arm_dir
from eagle_ray.train.config import CACHE_DISK_SHARE, DraftTrainConfig, EpochCacheConfig, sweep_configs
from eagle_ray.train.epoch_cache import finish_epoch_cache, init_epoch_cache, marker
from eagle_ray.train.loop import train_loop_per_worker
from eagle_ray.train.progress import Progress, run_sink
from eagle_ray.train.reader import rank_source
from eagle_ray.train.trackers import Trackers, open_trackers

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    export_dir: Path | None  # the SGLang-loadable draft, when training reached max_steps (a sweep's: arm 0's)
    checkpoint: Any  # ray.train.Checkpoint of the last report (None if none)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics; a re-run step's latest
    vocab: DraftVocab | None = None
    cache: dict[str, Any] | None = None  # the epoch cache: dir, batches, tokens, bytes, bytes_per_token, complete...
    exports: list[Path] = field(default_factory=list)  # one draft per arm of a sweep (`[export_dir]` for one draft)
    arms: list[DraftTrainConfig] = field(default_factory=list)  # each arm's config (`[train]` for one draft)

    @property
    def skipped_batches(self) -> int:
        """Poison batches skipped over the run (every rank's, as of the last step)."""
        return self.history[-1].get("skipped", 0) if self.history else 0


def train_draft(
    target: PoolClient | OfflineSupervision,
    data: Sequence[PackedBatch] | ChatBatchSource,
    train: DraftTrainConfig,
    *,
    storage_path: str | Path,
    name: str = "eagle3-draft",
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    backend: str | None = None,
    draft_vocab_size: int | None = None,
    special_token_ids: Sequence[int] = (),
    vocab_batches: int = 1000,
    queue_depth: int = 2,
    max_failures: int = 0,
    resume_from: str | None = None,
    export_dir: str | Path | None = None,
    export_dtype: torch.dtype | None = None,
    read_timeout_s: float = 600.0,
    progress: str = "auto",
    progress_every_s: float = 10.0,
    trackers: Sequence[str] | Trackers = (),
    tracker_config: dict[str, Any] | None = None,
    cache: EpochCacheConfig | None = None,
    release_after_cache: int | None = None,
    sweep: Sequence[Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train a draft for `train.max_steps` steps of `num_workers` batches each.

    `target`: a `serve_pool` pool (each worker connects to it by name and streams its own batches to the
    replicas) or an `OfflineSupervision` dump on storage every worker can read (each reads its own batches'
    files). `data`: a list of packed batches (repeated as epochs) or a `ChatBatchSource` (indexed here
    first; each worker then reads only its own batches). Worker r trains on global batch `step * num_workers + r`.
    Rerunning with the same `storage_path`/`name` resumes from that run's latest checkpoint (Ray Train
    restores it); so does `resume_from` (a checkpoint directory). Worker failures restart from the last
    checkpoint up to `max_failures` times. A poison batch (the pool gave up on it) is skipped, up to
    `train.max_skipped_batches`. The draft is exported to `export_dir` (default `<storage_path>/<name>/draft`)
    when the run reaches `max_steps`. `queue_depth`: records each worker reads ahead; `read_timeout_s`: how long
    one may wait for its next record (and a shard may stall) before it fails. `progress`: "bar",
    "lines", "auto" (bar on a terminal) or "off". `trackers`: experiment trackers fed every step's metrics, by
    name ("tensorboard" writes `<storage_path>/<name>/tensorboard`; "wandb", "mlflow": see `trackers.py`) or
    opened `Trackers`, closed at the end either way; `tracker_config` is what they record as the run's config
    (default: `train` and the worker count). `cache`: the epoch cache (`epoch_cache.py`; None: off): with a pool and
    a run longer than one epoch, each rank's epoch-1 supervision is written to files as fast as the pool serves it,
    and every epoch reads it back; `TrainResult.cache` says what it holds. `release_after_cache`: once every rank's
    writer is through epoch 1 and the cache holds all of it (possibly long before training is), scale the pool to
    that many replicas (0 frees it all; None keeps it). `sweep`: K overrides of `train`'s optimisation
    (`config.SWEEP_FIELDS`: lr, ttt_steps, seed...), one per arm: every worker trains the K drafts on each batch it
    reads, so the target computes each batch once for all K (`arms.py`). Each arm trains as it would alone; one
    whose step fails goes back to its last checkpoint without stopping the others, and replays what it lost from the
    epoch cache (`history` rows: `arms`, `arm_restarts`). The export then writes `<export_dir>/arm{k}` per arm
    (`TrainResult.exports`). None: one draft, `train`.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if queue_depth < 1:
        raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
    arms = sweep_configs(train, sweep)
    if len(arms) == 1:
        train = arms[0]  # a sweep of one is a plain run of that config
    supply, target_weights = _supply(target)
    source = rank_source(data)
    run_dir = Path(storage_path) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    info = target.info
    target_config = load_config(target.model_path)

    # global batches 0, 1, 2... (a chat source's read in Ray tasks, not in this process)
    first = data.batches_from(0) if isinstance(data, ChatBatchSource) else source.rank_batches(0, 1)
    counts = count_loss_tokens(itertools.islice(first, vocab_batches), info.vocab_size)
    vocab = build_draft_vocab(counts, draft_vocab_size, special_token_ids, cache=run_dir / "draft_vocab.safetensors")
    draft_config = Eagle3DraftConfig.from_target(target_config, vocab.size, list(info.aux_layer_ids))
    weights = [target_weights, ray.put(vocab.target_ids)]  # a list: Ray Train hands the refs over, not values
    cache_spec = _epoch_cache(cache, target, source, train.max_steps * num_workers, run_dir)
    if cache_spec is not None:
        supply = {**supply, "cache": cache_spec}

    sink = run_sink()
    if not isinstance(trackers, Trackers):  # opened before training starts: a tracker that fails leaves nothing to stop
        config = tracker_config if tracker_config is not None else {"train": asdict(train), "num_workers": num_workers}
        if len(arms) > 1 and tracker_config is None:
            config["sweep"] = list(sweep)
        trackers = open_trackers(trackers, run_dir, name, config)
    monitor = Progress(sink, train.max_steps, progress, progress_every_s, trackers)
    if progress != "off" or trackers:
        monitor.start()
    metrics_path = run_dir / "metrics.jsonl"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": asdict(train),
            "arms": [asdict(a) for a in arms] if len(arms) > 1 else None,
            "draft_config": draft_config.as_dict(),
            "weights": weights,
            "supply": supply,
            "weights_pool": supply.get("pool"),  # a shared pool: its replicas put the weights again if lost
            "source": source,
            "queue_depth": queue_depth,
            "use_gpu": use_gpu,
            "metrics_path": str(metrics_path),
            "run_dir": str(run_dir),
            "resume_from": resume_from,
            "read_timeout_s": read_timeout_s,
            "metrics_sink": sink,
        },
        torch_config=TorchConfig(backend=backend) if backend else None,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines ("Reporting training result N: TrainingReport(...)", worker-group
            # start-up) repeat what the progress line shows; its warnings and errors still come through
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    release = None
    if cache_spec is not None and release_after_cache is not None:
        release = _Release(target, sink, cache_spec, num_workers, release_after_cache).start()
    try:
        result = trainer.fit()
    finally:
        if monitor.running:
            monitor.stop()
        if release is not None:
            release.stop()
    # rank 0's file has earlier runs' steps (if it is on this node); the sink has this run's, from anywhere
    by_step = _history(metrics_path)
    by_step.update((r["step"], r) for r in ray.get(sink.since(0)))
    sink.close()
    history = [by_step[k] for k in sorted(by_step)]
    steps = history[-1]["step"] if history else 0
    exports = []
    if result.checkpoint is not None and steps >= train.max_steps:
        root = Path(export_dir) if export_dir else run_dir / "draft"
        with result.checkpoint.as_directory() as d:
            for k in range(len(arms)):
                src, out = arm_dir(Path(d), k, len(arms)) / "draft", arm_dir(root, k, len(arms))
                if export_dtype is None:
                    shutil.copytree(src, out, dirs_exist_ok=True)
                else:
                    from eagle_ray.draft.export import load_draft, save_draft

                    save_draft(load_draft(src), out, dtype=export_dtype)
                exports.append(out)
    exported = exports[0] if exports else None
    held = finish_epoch_cache(cache_spec["dir"], cache_spec["epoch_batches"]) if cache_spec else None
    if held is not None and release is not None:
        held["released_at_step"] = release.at_step
    return TrainResult(exported, result.checkpoint, steps, history, vocab, held, exports, arms)


class _Release:
    """A driver thread: shrinks the pool to `keep` replicas once every rank has said its first epoch is written
    (`done_rank{r}.json`, by its cache writer once its stream is over) and every first-epoch batch's file is there.
    From then on no reader asks the pool for anything: a later batch goes to the pool only for a file that is not
    there. `at_step`: the last step the driver had heard of when it did."""

    def __init__(self, pool: PoolClient, sink: Any, spec: dict[str, Any], world: int, keep: int):
        self.pool, self.sink, self.spec, self.world, self.keep = pool, sink, spec, world, keep
        self.at_step: int | None = None  # when it scaled the pool down
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eagle-ray-release-after-cache", daemon=True)

    def start(self) -> _Release:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        root, first = Path(self.spec["dir"]), self.spec["epoch_batches"]
        seen, step, missing = 0, 0, 0  # missing: the first batch not seen in the cache
        while not self._stop.wait(0.5):
            try:
                rows = ray.get(self.sink.since(seen), timeout=30)
            except Exception:  # the sink is busy or gone: try again, or stop with the run
                continue
            seen += len(rows)
            step = max([step, *(r["step"] for r in rows)])
            if not all(marker(root, "done", r).exists() for r in range(self.world)):
                continue
            while missing < first and (root / shard_name(missing)).exists():
                missing += 1
            if missing < first:
                continue  # a rank's share was full: some later batches still need the pool
            log.info(
                "epoch cache complete: target pool scaled to %d replica(s) at step %d (target.release_after_cache)",
                self.keep,
                step,
            )
            self.pool.scale(self.keep)
            self.at_step = step
            return


def _epoch_cache(
    cache: EpochCacheConfig | None, target: Any, source: Any, batches: int, run_dir: Path
) -> dict[str, Any] | None:
    """The workers' epoch-cache spec, when the cache is on and the run is longer than one epoch from a pool."""
    if cache is None or cache.mode == "off" or not isinstance(target, PoolClient):
        return None
    epoch_batches = source.batches_per_epoch()
    if batches <= epoch_batches:
        return None  # one epoch (or less): nothing is read twice
    root = init_epoch_cache(Path(cache.dir).expanduser() if cache.dir else run_dir / "epoch_cache", target)
    budget = cache.max_bytes
    if budget is None:  # the checkpoints and the export share that disk: leave them room
        budget = int(CACHE_DISK_SHARE * shutil.disk_usage(root).free)
    batch_tokens = getattr(source, "batch_tokens", None)
    need = epoch_batches * batch_tokens * target.info.bytes_per_token if batch_tokens else None
    log.info(
        "epoch cache: %d first-epoch batches (%s) to %s, budget %.2f GB (cache.max_bytes%s); read back in later epochs",
        epoch_batches,
        "size unknown" if need is None else f"at most {need / 1e9:.2f} GB",
        root,
        budget / 1e9,
        "" if cache.max_bytes else f": {CACHE_DISK_SHARE:.0%} of the free space there",
    )
    if need is not None and need > budget:
        log.warning(
            "epoch cache: its budget holds about %d%% of epoch 1; the pool serves the rest", 100 * budget // need
        )
    return {"dir": str(root), "epoch_batches": epoch_batches, "max_bytes": budget, "fp8": cache.fp8}


def _supply(target: Any) -> tuple[dict[str, Any], ray.ObjectRef]:
    """Where each worker reads supervision from (picklable), and the target weights' object."""
    if isinstance(target, PoolClient):
        # colocated: each rank reads its own node's replicas (zero-copy), others only when its node has none
        return {"pool": target.name, "local": target.placement == "colocated"}, target.weights_ref()
    if isinstance(target, OfflineSupervision):
        return {"dump": str(target.root.resolve())}, ray.put(target.weights())
    if isinstance(target, PooledTargetModel):
        # a pool's replicas belong to the process that started it: the workers could not reach them
        raise TypeError(
            "train_draft needs a pool its workers can connect to: start it with serve_pool(name, model_path, ...) "
            "instead of PooledTargetModel(...)"
        )
    raise TypeError(f"train_draft reads from a serve_pool pool or an OfflineSupervision dump, not {type(target)!r}")


def _history(path: Path) -> dict[int, dict[str, Any]]:
    """Per-step metrics by step; where a restart re-ran steps, the latest run of each step wins."""
    lines = path.read_text().splitlines() if path.exists() else []
    return {(row := json.loads(line))["step"]: row for line in lines if line.strip()}
