"""Driver entry point: train an EAGLE-3 draft on Ray Train, fed live by a `PooledTargetModel`.

    result = train_draft(pool, batches, DraftTrainConfig(max_steps=1000), num_workers=2, ...)

The pool stays on the driver; its supervision reaches each worker as object refs through
`feed.py`. The target's embeddings and lm_head are put in the object store once.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from eagle_ray.contract import PackedBatch
from eagle_ray.draft.model import Eagle3DraftConfig
from eagle_ray.draft.vocab import DraftVocab, build_draft_vocab, count_loss_tokens
from eagle_ray.hf_checkpoint import load_config
from eagle_ray.train.config import DraftTrainConfig
from eagle_ray.train.feed import BatchSource, SupervisionFeed
from eagle_ray.train.loop import train_loop_per_worker
from eagle_ray.train.progress import MetricsSink, Progress
from eagle_ray.train.trackers import Trackers, open_trackers


@dataclass
class TrainResult:
    export_dir: Path | None  # the SGLang-loadable draft, when training reached max_steps
    checkpoint: Any  # ray.train.Checkpoint of the last report (None if none)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics; a re-run step's latest
    feed: dict[str, Any] = field(default_factory=dict)
    vocab: DraftVocab | None = None


def _source(data: Sequence[PackedBatch] | BatchSource) -> BatchSource:
    """Batches from a global index on; a list repeats (epochs) so any step count can be served."""
    if callable(data):
        return data
    if not data:
        raise ValueError("no training batches")
    batches = list(data)

    def from_index(start: int) -> Iterator[PackedBatch]:
        return (batches[i % len(batches)] for i in itertools.count(start))

    return from_index


def train_draft(
    pool: Any,
    data: Sequence[PackedBatch] | BatchSource,
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
    feed_timeout_s: float = 600.0,
    progress: str = "auto",
    progress_every_s: float = 10.0,
    trackers: Sequence[str] | Trackers = (),
    tracker_config: dict[str, Any] | None = None,
    data_plane: str = "feed",
) -> TrainResult:
    """Train a draft for `train.max_steps` steps of `num_workers` batches each.

    `data`: a list of packed batches (repeated as epochs), or a function from a global batch index
    to the batches from there on (deterministic: resume and restarts re-read from an index).
    Rerunning with the same `storage_path`/`name` resumes from that run's latest checkpoint (Ray
    Train restores it); so does `resume_from` (a checkpoint directory). Worker failures restart from
    the last checkpoint up to `max_failures` times. The draft is exported to `export_dir`
    (default `<storage_path>/<name>/draft`) when the run reaches `max_steps`. `progress`: "bar", "lines",
    "auto" (bar on a terminal) or "off". `trackers`: experiment trackers fed every step's metrics, by name
    ("tensorboard" writes `<storage_path>/<name>/tensorboard`; "wandb", "mlflow": see `trackers.py`) or
    opened `Trackers`, closed at the end either way; `tracker_config` is what they record as the run's config
    (default: `train` and the worker count).

    `data_plane`: "feed" (the driver streams the pool and feeds each worker its batches) or "direct" (each
    worker is a client of `pool`, a `serve_pool` pool, and streams its own batches to the replicas: nothing
    per batch on the driver; `data` must then be a list or a `ChatBatchSource`, whose whole data is indexed
    here first). Both serve rank r batch `step * num_workers + r`.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if data_plane not in ("feed", "direct"):
        raise ValueError(f"data_plane must be 'feed' or 'direct', got {data_plane!r}")
    direct = None
    if data_plane == "direct":
        direct = {"pool": _pool_name(pool), "source": _rank_source(data), "depth": queue_depth}
        # colocated: each rank reads its own node's replicas (zero-copy), others only when its node has none
        direct["local"] = pool.placement == "colocated"
    source = _source(data)
    run_dir = Path(storage_path) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    info = pool.info
    target_config = load_config(pool.model_path)

    counts = count_loss_tokens(itertools.islice(source(0), vocab_batches), info.vocab_size)
    vocab = build_draft_vocab(counts, draft_vocab_size, special_token_ids, cache=run_dir / "draft_vocab.safetensors")
    draft_config = Eagle3DraftConfig.from_target(target_config, vocab.size, list(info.aux_layer_ids))
    if hasattr(pool, "weights_ref"):  # one object a replica put: workers read it, the driver never holds it
        target_weights = pool.weights_ref()
    else:
        target_weights = ray.put((pool.get_input_embeddings().weight.detach(), pool.get_lm_head_weight().detach()))
    weights = [target_weights, ray.put(vocab.target_ids)]  # a list: Ray Train hands the refs over, not values

    sink = MetricsSink.remote()
    if not isinstance(trackers, Trackers):  # opened before the feed starts: a tracker that fails leaves nothing to stop
        config = tracker_config if tracker_config is not None else {"train": asdict(train), "num_workers": num_workers}
        trackers = open_trackers(trackers, run_dir, name, config)
    feed = None
    if direct is None:
        feed = SupervisionFeed(pool, source, num_workers, train.max_steps, queue_depth, feed_timeout_s).start()
    # direct: the workers' clients dispatch, so the driver's pool has no traffic to show; the target's rate is
    # then what the trainers consumed (each sample once)
    monitor = Progress(sink, train.max_steps, pool if direct is None else None, progress, progress_every_s, trackers)
    if progress != "off" or trackers:
        monitor.start()
    metrics_path = run_dir / "metrics.jsonl"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": asdict(train),
            "draft_config": draft_config.as_dict(),
            "weights": weights,
            "weights_pool": getattr(pool, "name", None),  # a shared pool: its replicas put the weights again if lost
            "feed": feed.handles if feed is not None else None,
            "direct": direct,
            "use_gpu": use_gpu,
            "metrics_path": str(metrics_path),
            "run_dir": str(run_dir),
            "resume_from": resume_from,
            "feed_timeout_s": feed_timeout_s,
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
    try:
        result = trainer.fit()
    except Exception as e:
        if feed is not None and feed.error is not None:
            raise RuntimeError(f"the supervision feed failed: {feed.error}") from e
        raise
    finally:
        if feed is not None:
            feed.close()
        if monitor.running:
            monitor.stop()
    if feed is not None and feed.error is not None:
        raise RuntimeError(f"the supervision feed failed: {feed.error}") from feed.error
    # rank 0's file has earlier runs' steps (if it is on this node); the sink has this run's, from anywhere
    by_step = {r["step"]: r for r in _history(metrics_path)}
    by_step.update((r["step"], r) for r in ray.get(sink.since.remote(0)))
    history = [by_step[k] for k in sorted(by_step)]
    steps = history[-1]["step"] if history else 0
    exported = None
    if result.checkpoint is not None and steps >= train.max_steps:
        exported = Path(export_dir) if export_dir else run_dir / "draft"
        with result.checkpoint.as_directory() as d:
            if export_dtype is None:
                shutil.copytree(Path(d) / "draft", exported, dirs_exist_ok=True)
            else:
                from eagle_ray.draft.export import load_draft, save_draft

                save_draft(load_draft(Path(d) / "draft"), exported, dtype=export_dtype)
    return TrainResult(exported, result.checkpoint, steps, history, dict(feed.stats) if feed else {}, vocab)


def _pool_name(pool: Any) -> str:
    name = getattr(pool, "name", None)
    if name is None:
        raise TypeError(
            "data_plane='direct' needs a shared pool, whose workers connect to it by name: "
            "pool = serve_pool(name, model_path, ...)"
        )
    return name


def _rank_source(data: Any) -> Any:
    """What each worker builds its own batches from (picklable): `rank_batches(rank, world, step)`."""
    from eagle_ray.data.source import ChatBatchSource
    from eagle_ray.train.direct import CycledBatches

    if isinstance(data, ChatBatchSource):
        return data.for_ranks()
    if callable(data):
        raise TypeError("data_plane='direct' needs a list of batches or a ChatBatchSource, not a function")
    return CycledBatches(list(data))


def _history(path: Path) -> list[dict[str, Any]]:
    """Per-step metrics; where a restart re-ran steps, the latest run of each step wins."""
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
