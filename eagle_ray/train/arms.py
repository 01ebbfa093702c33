"""A sweep's arms: K drafts, each with its own optimizer, LR schedule and RNG, trained on one supervision stream.

Every rank holds all K arms. For each batch the worker loop reads the supervision once and steps every arm on it
in turn, so the target computes each batch once for all K, a batch is held (in this process) until the last arm
has read it, and no arm can fall behind the others. One draft is the K=1 case of the same code.

An arm is independent of the others: its draft is initialised from its own seed and its RNG state is swapped in
for its step alone, so arm k of a sweep trains as the same config trained alone (same data, same seeds).

An arm whose step fails in-process (its forward raises, or its loss or gradient norm is not finite) is put back to
its last checkpoint (kept in host memory) and counted in `restarts`; the others go on untouched. It then catches up
(`catch_up`): the steps it lost are replayed for it alone from the epoch cache, so it is where the others are, as
if it had not failed. Without the cache (or with a lost batch not in it on some rank) it resumes with the next
batch, that many updates behind the others. With DDP the ranks agree on which arms failed (one all-reduce of a
flag per arm) before any arm's backward, so all ranks skip, and replay, the same arms. With one arm there is
nothing to isolate: a failure stops the group, and Ray Train restarts it from the checkpoint, replaying the missed
steps exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eagle_ray.contract import Supervision
from eagle_ray.draft.export import load_draft, save_draft
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import TTTObjective, TTTStats
from eagle_ray.train.config import DraftTrainConfig

log = logging.getLogger(__name__)


@dataclass
class Arm:
    """One draft of the sweep and everything that trains it."""

    index: int
    cfg: DraftTrainConfig
    draft: Eagle3Draft
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    model: torch.nn.Module  # the TTT objective, DDP-wrapped with several ranks
    rng: torch.Tensor  # this arm's CPU RNG state, swapped in for its step
    restarts: int = 0
    replayed: int = 0  # steps replayed from the epoch cache to catch up after failures
    snapshot: dict[str, Any] | None = field(default=None, repr=False)  # the last checkpoint, in host memory

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.draft.parameters() if p.requires_grad]

    @property
    def snapshot_step(self) -> int:
        """The run's step the snapshot was taken at: the first step a put-back arm has to train again."""
        return self.snapshot["step"]

    def take_snapshot(self, step: int) -> None:
        """What a failure puts back: the state just checkpointed (or the start), at the run's `step`."""
        self.snapshot = {
            "step": step,
            "draft": _host(self.draft.state_dict()),
            "opt": _host(self.opt.state_dict()),
            "sched": self.sched.state_dict(),
            "rng": self.rng.clone(),
        }

    def restore(self) -> None:
        s = self.snapshot
        self.draft.load_state_dict(s["draft"])
        self.opt.load_state_dict(_host(s["opt"]))  # a copy: the snapshot stays for a second failure
        self.sched.load_state_dict(s["sched"])
        self.rng = s["rng"].clone()
        self.opt.zero_grad(set_to_none=True)
        self.restarts += 1


def build_arms(
    cfgs: list[DraftTrainConfig],
    draft_config: Eagle3DraftConfig,
    embeddings: torch.Tensor,
    lm_head: torch.Tensor,
    draft_ids: torch.Tensor,
    device: torch.device,
    world: int,
) -> list[Arm]:
    arms = []
    for k, cfg in enumerate(cfgs):
        # from_target seeds the global RNG with the arm's seed: what it leaves is this arm's RNG from here on
        draft = Eagle3Draft.from_target(
            draft_config, embeddings, lm_head, draft_ids, cfg.freeze_embeddings, cfg.seed
        ).to(device)
        params = [p for p in draft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
        objective = TTTObjective(
            draft, cfg.ttt_steps, cfg.step_decay, attention=cfg.attention, checkpoint=cfg.activation_checkpointing
        )
        # no buffer sync in the forward: the draft's buffers are its vocab maps, equal on every rank and never
        # trained, and a forward with no collective in it is what lets one rank's failed arm be skipped by all
        ddp = torch.nn.parallel.DistributedDataParallel
        model = ddp(objective, forward_sync_buffers=False) if world > 1 else objective
        arms.append(Arm(k, cfg, draft, opt, sched, model, torch.get_rng_state()))
    return arms


def arm_dir(path: Path, arm: int, k: int) -> Path:
    """Where arm `arm` of `k` lives in a checkpoint or an export: the directory itself for one draft (today's
    layout), `arm{i}/` under it for a sweep."""
    return path if k == 1 else path / f"arm{arm}"


def save_arms(path: Path, arms: list[Arm], state: dict[str, Any], rank: int) -> None:
    for arm in arms:
        d = arm_dir(path, arm.index, len(arms))
        d.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            save_draft(arm.draft, d / "draft")
            torch.save(
                {
                    "optimizer": arm.opt.state_dict(),
                    "scheduler": arm.sched.state_dict(),
                    **state,
                    "train": asdict(arm.cfg),
                    "arm_restarts": arm.restarts,
                },
                d / "training_state.pt",
            )
        torch.save(arm.rng, d / f"rng_rank{rank}.pt")


def load_arms(path: Path, arms: list[Arm], rank: int) -> dict[str, Any]:
    """Every arm's state from a checkpoint; the run's (step, samples, ...) as arm 0 saved it."""
    k = len(arms)
    held = sorted(p.name for p in path.glob("arm*") if p.is_dir())
    if (k == 1) != (not held) or (k > 1 and len(held) != k):
        raise ValueError(
            f"checkpoint {path} holds {len(held) or 1} draft(s) and this run trains {k}: resume a sweep with the "
            "same number of arms"
        )
    shared: dict[str, Any] = {}
    for arm in arms:
        d = arm_dir(path, arm.index, k)
        arm.draft.load_state_dict(load_draft(d / "draft").state_dict())
        ts = torch.load(d / "training_state.pt", weights_only=False)
        arm.opt.load_state_dict(ts.pop("optimizer"))
        arm.sched.load_state_dict(ts.pop("scheduler"))
        arm.restarts = ts.pop("arm_restarts", 0)
        rng = d / f"rng_rank{rank}.pt"
        if rng.exists():  # a checkpoint from a run with fewer workers has no state for this rank
            arm.rng = torch.load(rng)
        if arm.index == 0:
            shared = ts
    return shared


def step_arms(
    arms: list[Arm],
    sup: Supervision,
    lm_head: torch.Tensor,
    skipped: bool,
    step: int,
    world: int,
    autocast: bool,
    zero_record: Callable[[int], Supervision],
    fault: Callable[[int, int], bool] | None = None,
    isolate: bool | None = None,
) -> list[tuple[torch.Tensor, TTTStats] | None]:
    """One optimizer step of every arm on this batch's supervision: (loss, stats) per arm, None for an arm that
    failed and was put back to its last checkpoint. `isolate` (default: with more than one arm) catches a failed
    arm instead of raising."""
    isolate = len(arms) > 1 if isolate is None else isolate
    out: list[tuple[torch.Tensor, TTTStats] | None] = []
    for arm in arms:
        torch.set_rng_state(arm.rng)
        rec = zero_record(arm.cfg.ttt_steps) if skipped else sup
        loss = stats = None
        try:
            poison = fault is not None and fault(step, arm.index)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and arm.cfg.autocast_bf16):
                loss, stats = arm.model(rec, lm_head)
            if skipped:
                loss = loss * 0.0  # every parameter in the graph (DDP's all-reduce), nothing learnt from it
            if poison:
                loss = loss * float("nan")
            ok = bool(torch.isfinite(loss)) if isolate else True
        except Exception:
            if not isolate:
                raise
            log.exception("sweep arm %d failed at step %d", arm.index, step)
            ok = False
        if isolate and world > 1:  # every rank skips the arm if any rank's forward failed
            flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
            dist.all_reduce(flag)
            ok = float(flag) == 0.0
        if ok:
            arm.opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(arm.params, arm.cfg.grad_clip) if arm.cfg.grad_clip else None
            # the same on every rank (DDP all-reduced the gradients): the ranks agree without asking each other
            ok = not isolate or norm is None or bool(torch.isfinite(norm))
        if ok:
            if not skipped or world > 1:
                arm.opt.step()
            arm.sched.step()
            arm.rng = torch.get_rng_state()
            out.append((loss, stats))
        else:
            log.warning(
                "sweep arm %d: step %d failed; put back to its last checkpoint (the other arms go on)", arm.index, step
            )
            del loss, stats
            arm.restore()
            out.append(None)
    return out


def catch_up(
    arm: Arm,
    step: int,
    cache: Any,
    source: Any,
    rank: int,
    world: int,
    train_step: Callable[[Arm, Supervision | None, int], bool],
) -> int:
    """Replay a put-back arm's lost steps (its snapshot's step through `step`) from the epoch cache, so it is where
    the other arms are; the number of steps replayed, 0 when it could not (no cache, or some rank's batch not in
    it: the arm then goes on from its checkpoint, that many updates behind). With DDP every rank replays or none
    does (one all-reduce), then they step the arm together. `train_step(arm, sup, t)`: one step of the arm alone
    (`sup` None: a zero record, as a skipped batch), False if it failed again."""
    if cache is None or not hasattr(source, "epoch_origins"):
        return 0
    plan = []
    for t in range(arm.snapshot_step, step + 1):
        batch = next(iter(source.rank_batches(rank, world, t)))
        plan.append((t, batch, source.epoch_origins(t * world + rank)[1]))
    ready = torch.tensor([float(all(cache.has(origins) for _, _, origins in plan))], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
    if not float(ready):
        log.warning("sweep arm %d: steps %d-%d not all in the epoch cache; it goes on from its checkpoint", arm.index,
                    arm.snapshot_step, step)  # fmt: skip
        return 0
    for t, batch, origins in plan:
        # a file torn since `has`: this rank's part of the step is a zero record, so DDP's ranks still step together
        if not train_step(arm, cache.get(batch, origins), t):
            return 0
    arm.replayed += len(plan)
    log.warning("sweep arm %d: replayed steps %d-%d from the epoch cache", arm.index, plan[0][0], step)
    return len(plan)


def _host(obj: Any) -> Any:
    """A deep copy with every tensor cloned to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_host(v) for v in obj)
    return obj
