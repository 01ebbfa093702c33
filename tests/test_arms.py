"""A sweep's arms in-process (`eagle_ray/train/arms.py`), no Ray: arms step independently of each other, a failed
arm goes back to its snapshot alone, and a checkpoint of K arms restores all K (and refuses another K).

On Ray Train (two DDP ranks, a real pool, the epoch cache), `tests/test_offline.py` holds each arm to the same config
trained alone, and an arm failed on one rank to the clean run.
"""

from __future__ import annotations

import math

import pytest
import torch

from eagle_ray.contract import Supervision
from eagle_ray.draft.model import Eagle3DraftConfig
from eagle_ray.testing.faults import arm_step_fault, plan_arm_fault
from eagle_ray.tiny import TINY_SHAPE
from eagle_ray.train.arms import build_arms, load_arms, save_arms, step_arms
from eagle_ray.train.config import DraftTrainConfig, sweep_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls on 2 shared cores

H, V, D = TINY_SHAPE["hidden_size"], TINY_SHAPE["vocab_size"], 64
SWEEP = [{"lr": 3e-3}, {"lr": 1e-2, "seed": 1}, {"lr": 1e-3, "ttt_steps": 3}]


def _arms(sweep):
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    shape = {k: TINY_SHAPE[k] for k in names}
    config = Eagle3DraftConfig(**shape, draft_vocab_size=D, aux_layer_ids=[0, 1, 2])
    g = torch.Generator().manual_seed(0)
    embeddings, lm_head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    cfgs = sweep_configs(DraftTrainConfig(max_steps=8, ttt_steps=2, warmup_steps=1), sweep)
    return build_arms(cfgs, config, embeddings, lm_head, torch.arange(D), torch.device("cpu"), 1), lm_head


def _batches(n: int) -> list[Supervision]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (40,), generator=g)
        out.append(
            Supervision(
                input_ids=ids,
                loss_mask=torch.ones(40, dtype=torch.long),
                cu_seqlens=torch.tensor([0, 17, 40], dtype=torch.int32),
                aux_hidden_states=torch.randn(40, 3 * H, generator=g),
                last_hidden_states=torch.randn(40, H, generator=g),
            )
        )
    return out


def _no_zero_record(ttt_steps: int) -> Supervision:
    raise AssertionError("no batch here is skipped")


def _train(arms, lm_head, batches, fault=None, start=0) -> list[list[float]]:
    losses = []
    for step, sup in enumerate(batches, start):
        out = step_arms(arms, sup, lm_head, False, step, 1, False, _no_zero_record, fault)
        losses.append([math.nan if r is None else float(r[0]) for r in out])
    return losses


def test_arms_step_as_they_would_alone_and_a_failed_one_goes_back_alone(tmp_path):
    batches = _batches(4)
    swept = _train(*_arms(SWEEP), batches)
    for k, over in enumerate(SWEEP):
        alone = _train(*_arms([over]), batches)
        assert [row[k] for row in swept] == pytest.approx([row[0] for row in alone], rel=1e-6), k
    arms, lm_head = _arms(SWEEP)
    for arm in arms:
        arm.take_snapshot(0)  # as at the start of a run
    plan_arm_fault(tmp_path, 2, arm=1, mode="nan")
    faulty = _train(arms, lm_head, batches, arm_step_fault(0, tmp_path))
    assert [a.restarts for a in arms] == [0, 1, 0] and math.isnan(faulty[2][1])
    for k in (0, 2):
        assert [row[k] for row in faulty] == [row[k] for row in swept], k
    # arm 1 went back to its start: step 3 it trains as its own first step would have, on this batch
    fresh, lm_head = _arms(SWEEP)
    assert faulty[3][1] == pytest.approx(_train(fresh, lm_head, batches[3:4])[0][1], rel=1e-6)


def test_a_checkpoint_of_k_arms_restores_all_k(tmp_path):
    batches = _batches(4)
    arms, lm_head = _arms(SWEEP)
    _train(arms, lm_head, batches[:2])
    arms[2].restarts = 1
    save_arms(tmp_path, arms, {"step": 2, "samples": 4, "tokens": 80, "skipped": 0}, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm0", "arm1", "arm2"]
    again, _ = _arms(SWEEP)
    shared = load_arms(tmp_path, again, 0)
    assert {k: shared[k] for k in ("step", "samples", "tokens", "skipped")} == {
        "step": 2,
        "samples": 4,
        "tokens": 80,
        "skipped": 0,
    }
    assert [a.restarts for a in again] == [0, 0, 1]
    assert _train(again, lm_head, batches[2:], start=2) == _train(arms, lm_head, batches[2:], start=2)
    with pytest.raises(ValueError, match="holds 3 draft"):
        load_arms(tmp_path, _arms(SWEEP[:2])[0], 0)
    with pytest.raises(ValueError, match="holds 3 draft"):
        load_arms(tmp_path, _arms(None)[0], 0)
    one, _ = _arms(None)
    save_arms(tmp_path / "one", one, {"step": 2}, 0)  # one draft: today's layout, no arm directories
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["draft", "rng_rank0.pt", "training_state.pt"]
    with pytest.raises(ValueError, match="holds 1 draft"):
        load_arms(tmp_path / "one", _arms(SWEEP)[0], 0)


@pytest.mark.parametrize("ttt_steps", [1, 3, 7])
def test_the_stats_vector_length_is_what_the_loop_reserves_for_it(ttt_steps):
    """The worker loop lays each arm's stats out in one all-reduce vector by `TTTStats.flat_size`."""
    from eagle_ray.draft.ttt import TTTStats

    z = torch.zeros(ttt_steps)
    assert TTTStats(z, z, z, torch.zeros(())).flat().numel() == TTTStats.flat_size(ttt_steps)
