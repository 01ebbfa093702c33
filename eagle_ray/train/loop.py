"""The Ray Train worker loop: read this rank's supervision (`reader.py`), train the draft with the TTT loss
(DDP), checkpoint and resume, export at the end.

A checkpoint holds `draft/` (the export format, fp32), `training_state.pt` (optimizer, LR schedule,
step, samples, tokens and skipped batches so far) and `rng_rank{r}.pt` for every rank. Resuming from it
continues the same data order: each rank's batches start again at the checkpoint's step.

A skipped (poison) batch's step still runs on its rank, on a small all-zero record whose loss counts zero:
DDP needs every rank in every step's gradient all-reduce, so that step's update is the other ranks' alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from eagle_ray.contract import Supervision
from eagle_ray.draft.export import load_draft, save_draft
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import TTTObjective, TTTStats
from eagle_ray.pool.shared import read_weights
from eagle_ray.ray_init import quiet_known_warnings
from eagle_ray.testing.faults import train_step_fault
from eagle_ray.train.config import DraftTrainConfig
from eagle_ray.train.epoch_cache import CachedSupply, EpochCache
from eagle_ray.train.prefetch import device_batches
from eagle_ray.train.reader import DumpSupply, PoolSupply, RankReader
from eagle_ray.train.sample_audit import SampleLogWriter, audit_run, fingerprints


def _save(path: Path, draft: Eagle3Draft, opt, sched, state: dict[str, Any], rank: int) -> None:
    if rank == 0:
        save_draft(draft, path / "draft")
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}, path / "training_state.pt"
        )
    torch.save(torch.get_rng_state(), path / f"rng_rank{rank}.pt")


def _load(path: Path, draft: Eagle3Draft, opt, sched, rank: int) -> dict[str, Any]:
    saved = load_draft(path / "draft")
    draft.load_state_dict(saved.state_dict())
    ts = torch.load(path / "training_state.pt", weights_only=False)
    opt.load_state_dict(ts.pop("optimizer"))
    sched.load_state_dict(ts.pop("scheduler"))
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():  # a checkpoint from a run with fewer workers has no state for this rank
        torch.set_rng_state(torch.load(rng))
    return ts


def _checksums(draft: Eagle3Draft, world: int) -> list[float]:
    """Every rank's weight checksum; DDP ranks that disagree would train different drafts."""
    mine = torch.tensor([sum(float(p.detach().double().sum()) for p in draft.parameters())], dtype=torch.float64)
    if world == 1:
        return [float(mine)]
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [float(t) for t in every]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_known_warnings()
    # Ray Train 2.60 names the logger of "Reporting training result N: TrainingReport(...)" by its file path, so
    # RunConfig's LoggingConfig (set in trainer.py) does not reach it; the driver's progress line says the same
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = DraftTrainConfig(**config["train"])
    cuda = torch.cuda.is_available() and config.get("use_gpu", False)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cuda else "cpu")
    torch.manual_seed(cfg.seed + rank)

    # the target weights object may be lost with its node: a live replica of the pool puts it again
    embeddings, lm_head = read_weights(config["weights"][0], config.get("weights_pool"))
    draft_ids = ray.get(config["weights"][1])
    draft = Eagle3Draft.from_target(
        Eagle3DraftConfig(**config["draft_config"]), embeddings, lm_head, draft_ids, cfg.freeze_embeddings, cfg.seed
    ).to(device)
    lm_head = lm_head.to(device)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    state = {"step": 0, "samples": 0, "tokens": 0, "skipped": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state.update(_load(Path(d), draft, opt, sched, rank))
    objective = TTTObjective(
        draft, cfg.ttt_steps, cfg.step_decay, attention=cfg.attention, checkpoint=cfg.activation_checkpointing
    )
    model = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    metrics_path = Path(config["metrics_path"]) if rank == 0 and config.get("metrics_path") else None
    sink = config.get("metrics_sink") if rank == 0 else None

    window = None
    t_window, wait, step_tokens = time.monotonic(), 0.0, 0
    t_wait = time.monotonic()
    timeout = config.get("read_timeout_s", 600.0)
    reader = RankReader(
        _supply(config["supply"], timeout, config["source"], rank, world, state["step"]),
        # this run's steps only: a finished run resumed reads (and dispatches) nothing, a stopping one no more
        islice(config["source"].rank_batches(rank, world, state["step"]), max(_last_step(cfg) - state["step"], 0)),
        state["step"],
        config["queue_depth"],
        timeout,
        rank=rank,
        world=world,
    )
    sample_log = SampleLogWriter(config["run_dir"], rank)
    sample_log.start(state["step"], reader.incarnation)
    fault = train_step_fault(rank, config["run_dir"])  # None unless a test planned one
    served = cached = 0  # target tokens of this rank's supply, and tokens read from the epoch cache, so far
    for step, sup, meta in device_batches(reader, device):
        t_got = time.monotonic()
        step_wait = t_got - t_wait
        wait += step_wait
        if fault is not None:
            fault(step)
        skipped = sup is None
        if skipped:
            sup = _zero_record(draft, lm_head, cfg.ttt_steps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.autocast_bf16):
            loss, stats = model(sup, lm_head)
        if skipped:
            loss = loss * 0.0  # every parameter in the graph (DDP's all-reduce), nothing learnt from it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not skipped or world > 1:
            opt.step()
        sched.step()
        if skipped:
            sample_log.skip(step, meta["batch"], meta["skipped"])
            stats = TTTStats.from_flat(torch.zeros_like(stats.flat()))
        else:
            sample_log.step(step, meta["batch"], fingerprints(sup.input_ids, sup.loss_mask, sup.cu_seqlens))
        # one all-reduce of a few floats: loss, step sums, samples, tokens, skipped batches, target tokens, cached
        cached_now = getattr(reader.supply, "cached_tokens", 0)
        flat = torch.cat(
            [
                loss.detach().double().reshape(1).cpu(),
                stats.flat(),
                torch.tensor(
                    [meta["sequences"], meta["tokens"], skipped, reader.supply.tokens - served, cached_now - cached],
                    dtype=torch.float64,
                ),
            ]
        )
        served, cached = reader.supply.tokens, cached_now
        if world > 1:
            dist.all_reduce(flat)
        step_loss = float(flat[0]) / max(world - int(flat[-3]), 1)
        stats = TTTStats.from_flat(flat[1:-5])
        state["step"], state["samples"], state["tokens"], state["skipped"] = (
            step + 1,
            state["samples"] + int(flat[-5]),
            state["tokens"] + int(flat[-4]),
            state["skipped"] + int(flat[-3]),
        )
        step_tokens += int(flat[-4])
        if state["skipped"] > cfg.max_skipped_batches:
            skips = audit_run(config["run_dir"], world).skipped
            raise RuntimeError(
                f"{state['skipped']} poison batches skipped, more than max_skipped_batches={cfg.max_skipped_batches}: "
                + "; ".join(f"batch {b}: {cause.splitlines()[0]}" for b, cause in sorted(skips.items()))
            )
        window = stats if window is None else window + stats
        done = state["step"] >= cfg.max_steps or (cfg.stop_at_step is not None and state["step"] >= cfg.stop_at_step)
        s = stats.summary()
        row = {
            "step": state["step"],
            "loss": step_loss,
            "acc": s["acc"],
            "acceptance_chain": s["acceptance_chain"],
            "acceptance_product": s["acceptance_product"],
            "lr": sched.get_last_lr()[0],
            "samples": state["samples"],
            "tokens": state["tokens"],
            "skipped": state["skipped"],
            "target_tokens": int(flat[-2]),  # what the target computed for this step's records (all ranks)
            "cached_tokens": int(flat[-1]),  # what the epoch cache served of this step's records (all ranks)
        }
        ckpt_now = state["step"] % cfg.checkpoint_every == 0 or done
        if ckpt_now:
            row["weight_checksums"] = sums = _checksums(draft, world)
            if len(set(sums)) != 1:
                raise RuntimeError(f"DDP ranks hold different weights at step {state['step']}: {sums}")
        row["wait_s"], row["step_s"] = step_wait, time.monotonic() - t_wait
        if sink is not None:
            sink.push.remote(row)  # fire and forget: the driver's progress line
        if metrics_path is not None:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if state["step"] % cfg.log_every == 0 or ckpt_now:
            elapsed = time.monotonic() - t_window
            w = window.summary()
            metrics = {
                **{k: v for k, v in row.items() if k not in ("acc", "weight_checksums")},
                "acc_0": w["acc"][0],
                "acc_last": w["acc"][-1],
                "window_acceptance_chain": w["acceptance_chain"],
                "trainer_tokens_per_s": step_tokens / max(elapsed, 1e-9),
                "wait_fraction": wait / max(elapsed, 1e-9),
            }
            window, t_window, wait, step_tokens = None, time.monotonic(), 0.0, 0
            if ckpt_now:
                with tempfile.TemporaryDirectory() as d:
                    saved = {k: state[k] for k in ("step", "samples", "tokens", "skipped")}
                    _save(Path(d), draft, opt, sched, {**saved, "train": asdict(cfg)}, rank)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        if done:
            break
        t_wait = time.monotonic()


def _last_step(cfg: DraftTrainConfig) -> int:
    return cfg.max_steps if cfg.stop_at_step is None else min(cfg.max_steps, cfg.stop_at_step)


def _supply(
    spec: dict[str, Any], timeout_s: float, source: Any, rank: int, world: int, start_step: int
) -> PoolSupply | DumpSupply | CachedSupply:
    """This rank's supply: its own client of the pool (behind the epoch cache when the spec has one), or the dump on
    shared storage."""
    if "dump" in spec:
        from eagle_ray.offline import OfflineSupervision

        return DumpSupply(OfflineSupervision(spec["dump"]))
    from eagle_ray.pool import connect_pool

    node = ray.get_runtime_context().get_node_id() if spec["local"] else None
    pool = PoolSupply(connect_pool(spec["pool"]), node_id=node, timeout_s=timeout_s)
    cache = spec.get("cache")
    if cache is None:
        return pool
    store = EpochCache(cache["dir"], cache["epoch_batches"], cache["max_bytes"], rank, world, fp8=cache["fp8"])
    return CachedSupply(pool, store, source, rank, world, start_step)


def _zero_record(draft: Eagle3Draft, lm_head: torch.Tensor, ttt_steps: int) -> Supervision:
    """A small all-zero record, every slot in the loss (so every step of the unroll touches every parameter)."""
    n = ttt_steps + 2
    return Supervision(
        input_ids=torch.zeros(n, dtype=torch.long),
        loss_mask=torch.ones(n, dtype=torch.long),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        aux_hidden_states=torch.zeros(n, draft.fc.in_features, dtype=lm_head.dtype),
        last_hidden_states=torch.zeros(n, lm_head.shape[1], dtype=lm_head.dtype),
    )
