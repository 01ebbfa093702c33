"""The Ray Train worker loop: read supervision from the feed, train the draft with the TTT loss (DDP),
checkpoint and resume, export at the end.

A checkpoint holds `draft/` (the export format, fp32), `training_state.pt` (optimizer, LR schedule,
step, samples and tokens seen) and `rng_rank{r}.pt` for every rank. Resuming from it continues the
same data order: the feed rewinds to the checkpoint's step.
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

from eagle_ray.draft.export import load_draft, save_draft
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import TTTObjective, TTTStats
from eagle_ray.pool.shared import read_weights
from eagle_ray.ray_init import quiet_known_warnings
from eagle_ray.testing.faults import train_step_fault
from eagle_ray.train.config import DraftTrainConfig
from eagle_ray.train.feed import FeedReader
from eagle_ray.train.prefetch import device_batches
from eagle_ray.train.sample_audit import SampleLogWriter, fingerprints


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
    state = {"step": 0, "samples": 0, "tokens": 0}
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
    timeout = config.get("feed_timeout_s", 600.0)
    if config.get("direct"):  # this worker streams its own batches to the pool's replicas
        from eagle_ray.pool.shared import connect_pool
        from eagle_ray.train.direct import RankReader

        d = config["direct"]
        client = connect_pool(d["pool"])
        # this run's steps only: a finished run resumed reads (and dispatches) nothing, a stopping one no more
        last = cfg.max_steps if cfg.stop_at_step is None else min(cfg.max_steps, cfg.stop_at_step)
        batches = islice(d["source"].rank_batches(rank, world, state["step"]), max(last - state["step"], 0))
        node = ray.get_runtime_context().get_node_id() if d.get("local") else None
        reader = RankReader(client, batches, state["step"], d["depth"], timeout, rank=rank, world=world, node_id=node)
    else:
        reader = FeedReader(config["feed"], rank, state["step"], timeout)
    sample_log = SampleLogWriter(config["run_dir"], rank)
    sample_log.start(state["step"], reader.incarnation)
    for step, sup, meta in device_batches(reader, device):
        t_got = time.monotonic()
        step_wait = t_got - t_wait
        wait += step_wait
        train_step_fault(cfg.fail_at_step, cfg.fail_mode, step, rank, config["run_dir"])  # off unless a test asks
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.autocast_bf16):
            loss, stats = model(sup, lm_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        sample_log.step(step, meta["batch"], fingerprints(sup.input_ids, sup.loss_mask, sup.cu_seqlens))
        # one all-reduce of a few floats: loss, step sums, samples, tokens
        flat = torch.cat(
            [
                loss.detach().double().reshape(1).cpu(),
                stats.flat(),
                torch.tensor([meta["sequences"], meta["tokens"]], dtype=torch.float64),
            ]
        )
        if world > 1:
            dist.all_reduce(flat)
        step_loss = float(flat[0]) / world
        stats = TTTStats.from_flat(flat[1:-2])
        state["step"], state["samples"], state["tokens"] = (
            step + 1,
            state["samples"] + int(flat[-2]),
            state["tokens"] + int(flat[-1]),
        )
        step_tokens += int(flat[-1])
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
                    saved = {k: state[k] for k in ("step", "samples", "tokens")}
                    _save(Path(d), draft, opt, sched, {**saved, "train": asdict(cfg)}, rank)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        if done:
            break
        t_wait = time.monotonic()
