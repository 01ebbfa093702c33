"""Both engines, for real: transformers and SGLang (in-process, on CPU), on tiny targets."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, random_batch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from eagle_ray import InvalidBatchError, PackedBatch, pack_padded
from eagle_ray.engines.hf import HFEngine

FIELDS = ("aux_hidden_states", "last_hidden_states", "logits")
LENGTHS = [5, 17, 1, 9, 33]


def max_diff(a, b) -> dict[str, float]:
    return {f: (getattr(a, f).float() - getattr(b, f).float()).abs().max().item() for f in FIELDS}


@pytest.mark.parametrize("arch", ARCHS)
def test_sglang_matches_hf_fp32(arch, tiny_paths, hf_target, sglang_target):
    batch = random_batch(LENGTHS)
    ref = hf_target(tiny_paths[arch]).forward_packed(batch, return_logits=True)
    out = sglang_target(tiny_paths[arch]).forward_packed(batch, return_logits=True)
    assert out.aux_hidden_states.shape == (sum(LENGTHS), 3 * 64)
    assert out.last_hidden_states.shape == (sum(LENGTHS), 64)
    assert out.logits.shape == (sum(LENGTHS), 1024)
    assert out.aux_hidden_states.dtype == torch.float32
    diffs = max_diff(ref, out)
    print(f"{arch} fp32 max abs diff SGLang vs HF: {diffs}")
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # the comparison is meaningful: outputs are far from zero
    assert ref.aux_hidden_states.abs().max() > 0.5 and ref.logits.abs().max() > 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_sglang_close_to_hf_bf16(arch, tiny_paths, hf_target, sglang_target):
    batch = random_batch(LENGTHS, seed=1)
    ref = hf_target(tiny_paths[arch], dtype=torch.bfloat16).forward_packed(batch, return_logits=True)
    out = sglang_target(tiny_paths[arch], dtype=torch.bfloat16).forward_packed(batch, return_logits=True)
    assert out.aux_hidden_states.dtype == torch.bfloat16 and out.last_hidden_states.dtype == torch.bfloat16
    diffs = max_diff(ref, out)
    scale = {f: getattr(ref, f).float().abs().max().item() for f in FIELDS}
    print(f"{arch} bf16 max abs diff SGLang vs HF: {diffs} (max abs values {scale})")
    for f in FIELDS:
        assert diffs[f] <= 0.05 * scale[f], (f, diffs[f], scale[f])


@pytest.mark.parametrize("config_cls", [Qwen2Config, MistralConfig])
def test_hf_engine_hooks_other_layouts(config_cls, tmp_path):
    """The hooks capture `hidden_states[i + 1]` (output of layer i) on Qwen2 and Mistral too."""
    path = tmp_path / "m"
    cfg = config_cls(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    _check_hooks_against_output_hidden_states(str(path), vocab=512)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_engine_hooks_match_output_hidden_states(arch, tiny_paths):
    _check_hooks_against_output_hidden_states(tiny_paths[arch], vocab=1024)


def _check_hooks_against_output_hidden_states(path: str, vocab: int) -> None:
    engine = HFEngine(path, aux_layer_ids=[0, 2, 5])
    seq = torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(3))
    sup = engine.forward(PackedBatch.from_sequences([seq]))
    ref = engine.model(seq[None], output_hidden_states=True)
    want = torch.cat([ref.hidden_states[i + 1][0] for i in (0, 2, 5)], -1)
    assert torch.equal(sup.aux_hidden_states, want)
    assert torch.equal(sup.last_hidden_states, ref.hidden_states[-1][0])  # final-norm output
    assert sup.logits is None  # full logits only on request


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_generate_batch_shift_and_padding(engine, tiny_paths, hf_target, sglang_target):
    target = (hf_target if engine == "hf" else sglang_target)(tiny_paths["llama"])
    batch = random_batch([6, 3, 8], seed=2)
    lens = batch.seqlens
    S = max(lens)
    ids = torch.full((3, S), 7)
    attn = torch.zeros(3, S, dtype=torch.long)
    loss = torch.zeros(3, S, dtype=torch.long)
    for b in range(3):
        sl = batch.sequence(b)
        ids[b, : lens[b]] = batch.input_ids[sl]
        attn[b, : lens[b]] = 1
        loss[b, : lens[b]] = batch.loss_mask[sl]
    out = target.generate_batch(ids, attn, loss)
    packed = target.forward_packed(batch, return_logits=True)
    H, V = target.info.hidden_size, target.info.vocab_size
    assert out.aux_hidden_states.shape == (3, S, 3 * H) and out.logits.shape == (3, S, V)
    assert torch.equal(out.attention_mask, attn)
    for b in range(3):
        n, sl = lens[b], batch.sequence(b)
        # aux unshifted; ids, loss mask and logits shifted left by one, zero-filled
        assert torch.equal(out.aux_hidden_states[b, :n], packed.aux_hidden_states[sl])
        assert torch.equal(out.input_ids[b, : S - 1], ids[b, 1:]) and out.input_ids[b, -1] == 0
        assert torch.equal(out.loss_mask[b, : S - 1], loss[b, 1:]) and out.loss_mask[b, -1] == 0
        assert torch.equal(out.logits[b, : n - 1], packed.logits[sl][1:])
        # padding positions hold zeros, never pad-token states
        assert not out.aux_hidden_states[b, n:].any() and not out.logits[b, n - 1 :].any()
    # the content of pad positions never changes real rows
    junk = ids.clone()
    junk[attn == 0] = 999
    again = target.generate_batch(junk, attn, loss)
    assert torch.equal(again.aux_hidden_states, out.aux_hidden_states)
    assert torch.equal(again.logits, out.logits)


def test_left_padding_equals_right_padding(tiny_paths, sglang_target):
    target = sglang_target(tiny_paths["llama"])
    right = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    left = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    r = target.generate_batch(right, (torch.arange(4) < torch.tensor([[3], [4]])).long(), None)
    lmask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    lo = target.generate_batch(left, lmask, None)
    assert torch.equal(r.aux_hidden_states[0, :3], lo.aux_hidden_states[0, 1:])
    assert torch.equal(r.aux_hidden_states[1], lo.aux_hidden_states[1])


def test_packed_equals_padded_path(tiny_paths, sglang_target):
    """The packed fast path and pack_padded of the same sequences give identical tokens' outputs."""
    target = sglang_target(tiny_paths["qwen3"])
    batch = random_batch([4, 12, 7], seed=5)
    S = max(batch.seqlens)
    ids = torch.zeros(3, S, dtype=torch.long)
    attn = torch.zeros(3, S, dtype=torch.long)
    for b, n in enumerate(batch.seqlens):
        ids[b, :n], attn[b, :n] = batch.input_ids[batch.sequence(b)], 1
    repacked = pack_padded(ids, attn, attn)
    a = target.forward_packed(batch)
    b = target.forward_packed(repacked)
    assert torch.equal(a.aux_hidden_states, b.aux_hidden_states)
    assert torch.equal(a.last_hidden_states, b.last_hidden_states)


def test_sglang_batch_larger_than_kv_pool(tiny_paths, sglang_target):
    batch = random_batch([40, 25, 60, 10, 50], seed=4)  # 185 tokens
    big = sglang_target(tiny_paths["llama"]).forward_packed(batch, return_logits=True)
    small_target = sglang_target(tiny_paths["llama"], sglang_kwargs={"max_total_tokens": 64})
    assert small_target.info.kv_capacity_tokens < batch.num_tokens
    small = small_target.forward_packed(batch, return_logits=True)
    assert torch.equal(small.cu_seqlens, batch.cu_seqlens)
    diffs = max_diff(big, small)
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # a sequence that cannot fit the pool at all is rejected at the boundary
    with pytest.raises(InvalidBatchError) as err:
        small_target.forward_packed(random_batch([10, 80]))
    assert err.value.code == "sequence_too_long" and err.value.sequence == 1


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_bad_input_rejected_and_target_keeps_serving(engine, tiny_paths, hf_target, sglang_target):
    target = (hf_target if engine == "hf" else sglang_target)(tiny_paths["llama"])
    good = random_batch([4, 6])
    before = target.forward_packed(good)
    bad = PackedBatch(torch.tensor([1, 2, 5000, 3]), torch.ones(4, dtype=torch.long), torch.tensor([0, 2, 4]))
    with pytest.raises(InvalidBatchError) as err:
        target.forward_packed(bad)
    assert err.value.code == "token_out_of_range" and err.value.sequence == 1 and "5000" in str(err.value)
    too_long = random_batch([3, target.info.max_context + 1])
    with pytest.raises(InvalidBatchError) as err:
        target.forward_packed(too_long)
    assert err.value.code == "sequence_too_long" and err.value.sequence == 1
    with pytest.raises(InvalidBatchError) as err:
        target.generate_batch(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]), None)
    assert err.value.code == "empty_sequence" and err.value.sequence == 1
    after = target.forward_packed(good)
    assert torch.equal(before.aux_hidden_states, after.aux_hidden_states)


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_embeddings_and_lm_head(engine, tiny_paths, hf_target, sglang_target):
    path = tiny_paths["qwen3"]
    target = (hf_target if engine == "hf" else sglang_target)(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    emb = target.get_input_embeddings()
    assert torch.equal(emb.weight, model.get_input_embeddings().weight)
    assert not emb.weight.requires_grad
    assert torch.equal(target.get_lm_head_weight(), model.get_output_embeddings().weight)
    # the trainer's teacher logits from shipped last hidden states equal the engine's logits
    sup = target.forward_packed(random_batch([7, 3]), return_logits=True)
    teacher = sup.last_hidden_states @ target.get_lm_head_weight().T
    assert (teacher - sup.logits).abs().max() <= 1e-5


def test_model_info(tiny_paths, hf_target, sglang_target):
    for target in (hf_target(tiny_paths["llama"]), sglang_target(tiny_paths["llama"])):
        info = target.info
        assert (info.hidden_size, info.vocab_size, info.num_layers) == (64, 1024, 8)
        assert info.aux_layer_ids == (1, 3, 4)  # [1, L//2 - 1, L - 4]
        assert info.bytes_per_token == 16 * 64  # fp32: 4 values of H per token
    with pytest.raises(ValueError, match="distinct"):
        hf_target(tiny_paths["llama"], aux_layer_ids=[1, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        sglang_target(tiny_paths["llama"], aux_layer_ids=[1, 2, 8])


def test_sglang_tp2_matches_tp1(tiny_paths, sglang_target):
    """tp_size=2 runs a second rank process over gloo; rank 0 returns the same supervision."""
    batch = random_batch(LENGTHS, seed=6)
    one = sglang_target(tiny_paths["llama"]).forward_packed(batch, return_logits=True)
    head = sglang_target(tiny_paths["llama"]).get_lm_head_weight().clone()  # before the TP-2 engine replaces it
    two_target = sglang_target(tiny_paths["llama"], tp_size=2)  # left open: the next test's engine
    two = two_target.forward_packed(batch, return_logits=True)
    diffs = max_diff(one, two)
    print(f"SGLang tp_size=2 vs tp_size=1 max abs diff: {diffs}")
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    assert torch.equal(two_target.get_lm_head_weight(), head)


def test_rendezvous_port_is_held_not_guessed():
    import socket

    from eagle_ray.engines.sglang import hold_dist_port

    store_a, env_a = hold_dist_port()
    store_b, env_b = hold_dist_port()
    assert env_a["MASTER_PORT"] != env_b["MASTER_PORT"]
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", int(env_a["MASTER_PORT"])))  # nobody else can take it while we hold it
    store_a.set("k", "v")
    assert store_a.get("k") == b"v"
    del store_a, store_b


def test_rendezvous_env_does_not_leak(tiny_paths, sglang_target):
    """A process holding an SGLang engine must not hand its rendezvous env to what it starts later
    (a raylet, a trainer's process group): torch would make every rank of those a store client."""
    import os

    sglang_target(tiny_paths["llama"], tp_size=2)
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "MASTER_PORT", "MASTER_ADDR"):
        assert key not in os.environ, key


def test_aux_id_of_the_last_layer_is_refused_on_both_engines(tiny_paths, hf_target, sglang_target):
    """Id L-1 (the output of the last layer): SGLang captures "the input of layer i + 1" and has no layer L, so it
    would come back 2H wide. Both engines refuse it alike, before anything is built."""
    for make in (hf_target, sglang_target):
        with pytest.raises(
            ValueError, match=r"\[1, 3, 7\]: id 7, the output of the last of 8 layers, is not supported"
        ):
            make(tiny_paths["llama"], aux_layer_ids=[1, 3, 7])


def test_sglang_checks_the_width_of_what_it_captured(tiny_paths, sglang_target):
    """A model that captures fewer layers than asked (as one that never reaches a layer would) is an error that
    says so, not a narrower aux tensor handed on: SGLang 0.5.23's logits processor counts the captures; the engine
    checks the width of what comes back too (other versions, other capture paths)."""
    target = sglang_target(tiny_paths["llama"], aux_layer_ids=[1, 3, 5])
    model = target.engine._rank.runner.model
    model.set_eagle3_layers_to_capture([1, 3])  # two layers instead of three (SGLang's own call, as it makes it)
    try:
        with pytest.raises((ValueError, RuntimeError), match=r"captured 2 aux hidden states|shape \(9, 128\), not"):
            target.forward_packed(random_batch([4, 5]))
    finally:
        model.set_eagle3_layers_to_capture([1, 3, 5])
    assert target.forward_packed(random_batch([4, 5])).aux_hidden_states.shape == (9, 192)
