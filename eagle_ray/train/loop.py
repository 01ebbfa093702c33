"""The Ray Train worker loop: read this rank's supervision (`reader.py`), train the draft with the TTT loss
(DDP), checkpoint and resume, export at the end.

A checkpoint holds `draft/` (the export format, fp32), `training_state.pt` (optimizer, LR schedule,
step, samples, tokens and skipped batches so far) and `rng_rank{r}.pt` for every rank. Resuming from it
continues the same data order: each rank's batches start again at the checkpoint's step. A sweep of K drafts
(`arms.py`) trains every arm on each batch in turn, and its checkpoint holds that layout once per arm, in `arm{k}/`.

A skipped (poison) batch's step still runs on its rank, on a small all-zero record whose loss counts zero:
DDP needs every rank in every step's gradient all-reduce, so that step's update is the other ranks' alone.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from eagle_ray.contract import Supervision
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import TTTStats
from eagle_ray.pool.shared import read_weights
from eagle_ray.ray_init import quiet_known_warnings
from eagle_ray.testing.faults import arm_step_fault, train_step_fault
from eagle_ray.train.arms import build_arms, catch_up, load_arms, save_arms, step_arms
from eagle_ray.train.config import DraftTrainConfig
from eagle_ray.train.epoch_cache import CachedSupply, EpochCache
from eagle_ray.train.prefetch import device_batches
from eagle_ray.train.reader import DumpSupply, PoolSupply, RankReader
from eagle_ray.train.sample_audit import SampleLogWriter, check_skip_budget, fingerprints


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
    cfgs = [DraftTrainConfig(**c) for c in config.get("arms") or [config["train"]]]
    arms = build_arms(cfgs, Eagle3DraftConfig(**config["draft_config"]), embeddings, lm_head, draft_ids, device, world)
    lm_head = lm_head.to(device)
    state = {"step": 0, "samples": 0, "tokens": 0, "skipped": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state.update(load_arms(Path(d), arms, rank))
    sweep = len(arms) > 1
    if sweep:  # what a failed arm goes back to (one arm has no other to protect: the group restarts instead)
        for arm in arms:
            arm.take_snapshot(state["step"])
    metrics_path = Path(config["metrics_path"]) if rank == 0 and config.get("metrics_path") else None
    sink = config.get("metrics_sink") if rank == 0 else None

    windows: list[TTTStats | None] = [None] * len(arms)
    t_window = t_wait = time.monotonic()
    wait, step_tokens = 0.0, 0
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
    arm_fault = arm_step_fault(rank, config["run_dir"]) if sweep else None
    served = cached = 0  # target tokens of this rank's supply, and tokens read from the epoch cache, so far
    width = [1 + TTTStats.flat_size(a.cfg.ttt_steps) for a in arms]  # per arm in the all-reduce: loss, stats

    zero = functools.partial(_zero_record, arms[0].draft, lm_head)  # a skipped batch's stand-in, per TTT steps

    def replay(arm: Any, sup: Supervision | None, t: int) -> bool:
        rec = None if sup is None else next(iter(device_batches([(t, sup, {})], device)))[1]
        return step_arms([arm], rec, lm_head, rec is None, t, world, cuda, zero, None, isolate=True)[0] is not None

    # loss and TTTStats.flat() of each arm in the all-reduce
    for step, sup, meta in device_batches(reader, device):
        step_wait = time.monotonic() - t_wait
        wait += step_wait
        if fault is not None:
            fault(step)
        skipped = sup is None
        results = step_arms(arms, sup, lm_head, skipped, step, world, cuda, zero, arm_fault)
        for arm, res in zip(arms, results, strict=True):
            if res is None:  # put back to its checkpoint: replay what it lost, if the epoch cache holds it
                catch_up(arm, step, getattr(reader.supply, "cache", None), config["source"], rank, world, replay)
        if skipped:
            sample_log.skip(step, meta["batch"], meta["skipped"])
        else:
            sample_log.step(step, meta["batch"], fingerprints(sup.input_ids, sup.loss_mask, sup.cu_seqlens))
        # one all-reduce of a few floats: each arm's loss and step sums (zeros for an arm put back), then samples,
        # tokens, skipped batches, target tokens, cached tokens
        parts = []
        for res, n in zip(results, width, strict=True):
            if res is None or skipped:
                parts.append(torch.zeros(n, dtype=torch.float64))
            else:
                parts.append(torch.cat([res[0].detach().double().reshape(1).cpu(), res[1].flat().cpu()]))
        failed = [r is None for r in results]  # the ranks agreed on these (step_arms): the same list on every rank
        del results
        # each read once: the serving thread adds to both while this step runs, and a second read would lose that
        served_now, cached_now = reader.supply.tokens, getattr(reader.supply, "cached_tokens", 0)
        counts = [meta["sequences"], meta["tokens"], skipped, served_now - served, cached_now - cached]
        flat = torch.cat([*parts, torch.tensor(counts, dtype=torch.float64)])
        served, cached = served_now, cached_now
        if world > 1:
            dist.all_reduce(flat)
        per_arm, at = [], 0
        for n in width:
            loss = float(flat[at]) / max(world - int(flat[-3]), 1)
            per_arm.append((loss, TTTStats.from_flat(flat[at + 1 : at + n])))
            at += n
        state["step"] = step + 1
        for key, n in zip(("samples", "tokens", "skipped"), flat[-5:-2].tolist(), strict=True):
            state[key] += int(n)
        step_tokens += int(flat[-4])
        check_skip_budget(config["run_dir"], world, state["skipped"], cfg.max_skipped_batches)
        windows = [st if w is None else w + st for w, (_, st) in zip(windows, per_arm, strict=True)]
        done = state["step"] >= _last_step(cfg)
        rows = []
        for arm, bad, (loss, st) in zip(arms, failed, per_arm, strict=True):
            s = st.summary()
            rows.append(
                {
                    "loss": float("nan") if bad else loss,  # NaN, not None: the progress line and trackers format it
                    "acc": s["acc"],
                    "acceptance_chain": s["acceptance_chain"],
                    "acceptance_product": s["acceptance_product"],
                    "lr": arm.sched.get_last_lr()[0],
                }
            )
        row = {
            "step": state["step"],
            **rows[0],  # arm 0's at the top level: what a run of one draft reports
            "samples": state["samples"],
            "tokens": state["tokens"],
            "skipped": state["skipped"],
            # what the target computed since the last step (all ranks): for this step's records, or, written ahead by
            # the epoch cache, for later ones
            "target_tokens": int(flat[-2]),
            "cached_tokens": int(flat[-1]),  # what the epoch cache served of this step's records (all ranks)
        }
        if sweep:
            for r, arm, bad in zip(rows, arms, failed, strict=True):
                r["restarts"], r["failed"], r["replayed"] = arm.restarts, bad, arm.replayed
            row["arms"] = rows
            row["arm_restarts"] = sum(arm.restarts for arm in arms)
        ckpt_now = state["step"] % cfg.checkpoint_every == 0 or done
        if ckpt_now:
            for arm, r in zip(arms, rows, strict=True):
                r["weight_checksums"] = sums = _checksums(arm.draft, world)
                if len(set(sums)) != 1:
                    raise RuntimeError(
                        f"DDP ranks hold different weights at step {state['step']} (arm {arm.index}): {sums}"
                    )
            row["weight_checksums"] = rows[0]["weight_checksums"]
        row["wait_s"], row["step_s"] = step_wait, time.monotonic() - t_wait
        if sink is not None:
            sink.push(row)  # fire and forget: the driver's progress line
        if metrics_path is not None:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if state["step"] % cfg.log_every == 0 or ckpt_now:
            elapsed = time.monotonic() - t_window
            w = windows[0].summary()
            metrics = {
                **{k: v for k, v in row.items() if k not in ("acc", "weight_checksums", "arms")},
                "acc_0": w["acc"][0],
                "acc_last": w["acc"][-1],
                "window_acceptance_chain": w["acceptance_chain"],
                "trainer_tokens_per_s": step_tokens / max(elapsed, 1e-9),
                "wait_fraction": wait / max(elapsed, 1e-9),
            }
            if sweep:
                metrics["arms_window_acceptance_chain"] = [x.summary()["acceptance_chain"] for x in windows]
                metrics["arms_loss"] = [r["loss"] for r in rows]
            windows, t_window, wait, step_tokens = [None] * len(arms), time.monotonic(), 0.0, 0
            if ckpt_now:
                with tempfile.TemporaryDirectory() as d:
                    saved = {k: state[k] for k in ("step", "samples", "tokens", "skipped")}
                    save_arms(Path(d), arms, saved, rank)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                if sweep:
                    for arm in arms:
                        arm.take_snapshot(state["step"])
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
