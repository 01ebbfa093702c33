"""The synthetic target (a benchmark stand-in, `eagle_ray.testing.synthetic`): its supervision has the
contract's shapes and shift convention, and it paces itself at the configured rate. Tests the stand-in
only, never an engine."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import random_batch

from eagle_ray.contract import default_aux_layer_ids, shift_left, validate_packed
from eagle_ray.target import ENGINES, load_target
from eagle_ray.testing.synthetic import SyntheticTarget

H, V, LAYERS = 16, 1000, 8


def _target(**kw) -> SyntheticTarget:
    kw = {"hidden": H, "vocab_size": V, "num_layers": LAYERS, "dtype": torch.float32, "tokens_per_s": math.inf, **kw}
    return load_target("synthetic", "synthetic", **kw)


def test_benchmark_engine_is_not_offered_to_users():
    assert "synthetic" not in ENGINES
    assert isinstance(_target(), SyntheticTarget)


def test_supervision_has_the_contract_shapes_and_shift():
    target = _target()
    info = target.info
    assert info.aux_layer_ids == tuple(default_aux_layer_ids(LAYERS))
    batch = validate_packed(random_batch([7, 1, 12], vocab=V), V)
    sup = target.forward_packed(batch)
    n = batch.num_tokens
    assert sup.aux_hidden_states.shape == (n, 3 * H) and sup.last_hidden_states.shape == (n, H)
    assert sup.aux_hidden_states.dtype == sup.last_hidden_states.dtype == info.dtype
    assert (sup.aux_hidden_states.numel() + sup.last_hidden_states.numel()) * info.dtype.itemsize == (
        n * info.bytes_per_token
    )
    # unshifted, as engines return it: the contract's `shifted()` is the one shift
    assert torch.equal(sup.input_ids, batch.input_ids) and torch.equal(sup.loss_mask, batch.loss_mask)
    assert torch.equal(sup.cu_seqlens, batch.cu_seqlens)
    # slot t's state belongs to token t (every channel holds its id), so after the shift slot t holds token
    # t + 1's state next to token t + 1's id, and each sequence's last slot is zero
    shifted = sup.shifted()
    assert torch.equal(shifted.input_ids, shift_left(batch.input_ids, batch.cu_seqlens))
    assert torch.equal(shifted.last_hidden_states[:, 0].long(), shifted.input_ids)
    assert torch.equal(sup.aux_hidden_states.view(n, 3, H)[:, :, 0].long(), batch.input_ids[:, None].expand(n, 3))
    assert not shifted.last_hidden_states[batch.cu_seqlens[1:] - 1].any()
    # the padded NeMo surface runs on it too (teacher logits from its lm_head)
    ids = torch.randint(0, V, (2, 5))
    out = target.generate_batch(ids, torch.ones_like(ids))
    assert out.aux_hidden_states.shape == (2, 5, 3 * H) and out.logits.shape == (2, 5, V)
    assert target.get_input_embeddings().weight.shape == target.get_lm_head_weight().shape == (V, H)


def test_paces_itself_at_the_configured_rate():
    rate = 10_000.0  # 0.2 s a call: the output's own cost, under load, stays well inside it
    target = _target(tokens_per_s=rate, dtype=None)
    batch = validate_packed(random_batch([1000, 1000], vocab=V), V)
    target.forward_packed(batch)  # first call pays for lazy allocations
    t0 = time.perf_counter()
    for _ in range(3):
        target.forward_packed(batch)
    ratio = (time.perf_counter() - t0) / (3 * batch.num_tokens / rate)
    assert 0.95 <= ratio <= 2.0, ratio  # never faster than configured; generous above (a loaded host)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_rejects_a_rate_that_is_not_positive(bad):
    with pytest.raises(ValueError, match="tokens_per_s"):
        _target(tokens_per_s=bad)


def test_runs_in_the_pool(shared_ray):
    from eagle_ray.pool import PooledTargetModel

    kw = {"tokens_per_s": 1e6, "hidden": H, "vocab_size": V, "num_layers": LAYERS}
    with PooledTargetModel("synthetic", engine="synthetic", use_gpu=False, engine_kwargs=kw) as pool:
        batch = random_batch([9, 4], vocab=V)
        sup = pool.forward_packed(batch)
        assert sup.aux_hidden_states.shape == (13, 3 * H) and sup.aux_hidden_states.dtype == torch.bfloat16
        assert pool.info == _target(dtype=torch.bfloat16).info
