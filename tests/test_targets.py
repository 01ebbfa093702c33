"""The target matrix: every family users train drafts for, through both engines, the pool, NeMo and a draft.

Tiny models built from transformers' own config classes (`eagle_ray.tiny.TINY_ARCHS`: 8 layers, H=64, fp32).
For each: the HF engine equals transformers' `output_hidden_states`; `generate_batch` equals NeMo AutoModel
0.7.0's own `HFEagle3TargetModel` on the same model; SGLang (on this CPU) equals the HF engine or refuses
at `from_pretrained` with the precise reason; the pool serves it; a draft trains on it and its export passes
SGLang's loader. The support matrix in docs/targets.md is checked against what this module observed.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import random_batch

from eagle_ray import (
    TINY_ARCHS,
    PackedBatch,
    PooledTargetModel,
    Supervision,
    UnsupportedTargetError,
    build_tiny_target,
    save_draft,
    ttt_loss,
    verify_eagle3_exports,
)
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.hf_checkpoint import load_config

ROOT = Path(__file__).resolve().parents[1]
NEMO = ROOT / ".peers" / "nemo"  # nemo-automodel==0.7.0, installed --no-deps by .ci/setup
ARCHS = list(TINY_ARCHS)
MOE = ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4"]
# what SGLang 0.5.23 cannot do on this CPU, and the words its error must hold
SGLANG_REFUSES = {
    "gemma3": "deferred residual add",
    "gpt_oss": "requires one of",
    "llama4": "moe_forward_native",
}
LENGTHS = [11, 5, 17]
TOL = 1e-5  # fp32
OBSERVED: dict[str, dict[str, str]] = {a: {} for a in ARCHS}  # arch -> engine -> "works" | "refused"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("matrix")
    return {a: str(build_tiny_target(root / a, a)) for a in ARCHS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls on 2 shared cores


def batch() -> PackedBatch:
    return random_batch(LENGTHS, seed=3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def diffs_of(a, b) -> dict[str, float]:
    return {f: max_diff(getattr(a, f), getattr(b, f)) for f in ("aux_hidden_states", "last_hidden_states", "logits")}


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_engine_equals_output_hidden_states(arch, paths, hf_target):
    target = hf_target(paths[arch])
    packed = batch()
    sup = target.forward_packed(packed, return_logits=True)
    model = target.engine.model
    assert target.info.aux_layer_ids == (1, 3, 4)
    diffs = {"aux": 0.0, "last": 0.0, "logits": 0.0}
    for b in range(len(LENGTHS)):
        sl = packed.sequence(b)
        ref = model(packed.input_ids[sl][None], output_hidden_states=True)
        want = torch.cat([ref.hidden_states[i + 1][0] for i in target.info.aux_layer_ids], -1)
        diffs["aux"] = max(diffs["aux"], max_diff(sup.aux_hidden_states[sl], want))
        diffs["last"] = max(diffs["last"], max_diff(sup.last_hidden_states[sl], ref.hidden_states[-1][0]))
        diffs["logits"] = max(diffs["logits"], max_diff(sup.logits[sl], ref.logits[0]))
    print(f"{arch} HF engine ({target.engine.attn_implementation}) vs output_hidden_states: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    assert sup.aux_hidden_states.abs().max() > 0.5  # far from zero: the comparison tests something
    OBSERVED[arch]["hf"] = "works"


def _chosen_experts(out, k: int) -> torch.Tensor:
    """The experts a router picked per token, sorted: its int output, else the top-k of its logits."""
    outs = out if isinstance(out, tuple) else (out,)
    ints = [t for t in outs if not t.is_floating_point()]
    idx = ints[0] if ints else outs[-1].topk(k, dim=-1).indices
    return idx.sort(-1).values


@pytest.mark.parametrize("arch", MOE)
def test_moe_routing_is_the_same_padded_or_alone(arch, paths, hf_target):
    """The HF engine pads a run of sequences to its longest: every real token still picks the experts it picks alone."""
    target = hf_target(paths[arch])
    model, k = target.engine.model, target.engine.model.config.num_experts_per_tok
    routers = [m for m in model.modules() if type(m).__name__.endswith(("Router", "TopkRouter", "TopKRouter"))]
    assert routers, f"no router modules found in {type(model).__name__}"
    calls: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: calls.append(_chosen_experts(out, k))) for r in routers]
    try:
        packed = batch()
        target.forward_packed(packed)  # one padded run of 3 rows x 17
        together = list(calls)
        S = max(LENGTHS)
        for b, n in enumerate(LENGTHS):
            calls.clear()
            target.forward_packed(packed.select(b, b + 1))
            for layer, (alone, padded) in enumerate(zip(calls, together, strict=True)):
                assert torch.equal(alone, padded[b * S : b * S + n]), (arch, b, layer)
    finally:
        for h in hooks:
            h.remove()
    assert len(together) == len(routers)


def _nemo_target_cls():
    sys.path.insert(0, str(NEMO))
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel as NeMoTarget

    return NeMoTarget


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batch_equals_nemo(arch, paths, hf_target):
    """NeMo AutoModel 0.7.0's own HF target on the same model object is the reference for generate_batch."""
    assert (NEMO / "nemo_automodel").is_dir(), "run bash .ci/setup: it installs nemo-automodel==0.7.0 into .peers/"
    target = hf_target(paths[arch])
    nemo = _nemo_target_cls()(target.engine.model, aux_layer_ids=list(target.info.aux_layer_ids))
    packed = batch()
    S = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        sl = packed.sequence(b)
        ids[b, :n], attn[b, :n], loss[b, :n] = packed.input_ids[sl], 1, packed.loss_mask[sl]
    ours = target.generate_batch(ids, attn, loss)
    with torch.no_grad():
        theirs = nemo.generate_batch(ids, attn, loss)
    for f in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
    for b, n in enumerate(LENGTHS):  # NeMo runs the pad tokens too: compare real positions
        assert max_diff(ours.aux_hidden_states[b, :n], theirs.aux_hidden_states[b, :n]) <= TOL
        assert max_diff(ours.logits[b, : n - 1], theirs.logits[b, : n - 1]) <= TOL
        assert not ours.aux_hidden_states[b, n:].any() and not ours.logits[b, n - 1 :].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_sglang_equals_hf_or_refuses_precisely(arch, paths, hf_target, sglang_target):
    path = paths[arch]
    if arch in SGLANG_REFUSES:
        with pytest.raises(UnsupportedTargetError) as err:
            sglang_target(path)
        msg = str(err.value)
        print(f"{arch} SGLang: {msg}")
        assert load_config(path).architectures[0] in msg and path in msg
        assert SGLANG_REFUSES[arch] in msg and "engine='hf'" in msg
        OBSERVED[arch]["sglang"] = "refused"
        return
    ref = hf_target(path).forward_packed(batch(), return_logits=True)
    out = sglang_target(path).forward_packed(batch(), return_logits=True)
    diffs = {
        f: max_diff(getattr(ref, f), getattr(out, f)) for f in ("aux_hidden_states", "last_hidden_states", "logits")
    }
    print(f"{arch} SGLang vs HF, fp32 max abs diff: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    OBSERVED[arch]["sglang"] = "works"


def test_sglang_deepseek_captures_the_layers_asked_for(paths, hf_target, sglang_target):
    """DeepSeek's set_eagle3_layers_to_capture adds 1 only when the first id is 1: [2, 3, 5] must still mean the
    output of layers 2, 3, 5 (SGLang alone would capture 1, 2, 4), and ids it cannot express are refused."""
    path = paths["deepseek_v3"]
    ids = [2, 3, 5]
    ref = hf_target(path, aux_layer_ids=ids).forward_packed(batch())
    target = sglang_target(path, aux_layer_ids=ids)
    assert target.engine._rank.runner.model.model.layers_to_capture == [3, 4, 6]
    assert max_diff(target.forward_packed(batch()).aux_hidden_states, ref.aux_hidden_states) <= TOL
    with pytest.raises(UnsupportedTargetError, match=r"cannot capture aux_layer_ids \[0, 3, 5\]"):
        sglang_target(path, aux_layer_ids=[0, 3, 5])
    # the failed build left no parallel state behind: this process builds an engine again
    assert sglang_target(path).forward_packed(batch()).num_tokens == sum(LENGTHS)


def test_sglang_tp2_moe_equals_tp1(paths, sglang_target):
    path = paths["qwen3_moe"]
    one = sglang_target(path).forward_packed(batch(), return_logits=True)
    two = sglang_target(path, tp_size=2).forward_packed(batch(), return_logits=True)
    diffs = {
        f: max_diff(getattr(one, f), getattr(two, f)) for f in ("aux_hidden_states", "last_hidden_states", "logits")
    }
    print(f"qwen3_moe SGLang tp_size=2 vs 1: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs


def test_pool_serves_every_target(paths, hf_target, shared_ray):
    """One HF replica per family, all pools started at once (llama and qwen3 pools: test_pool.py and after)."""
    archs = [a for a in ARCHS if a not in ("llama", "qwen3")]

    def serve(arch: str) -> tuple[str, Supervision]:
        with PooledTargetModel(paths[arch], engine="hf", replicas=1) as pool:
            return arch, pool.forward_packed(batch())

    with ThreadPoolExecutor(len(archs)) as ex:  # replicas mostly import
        served = dict(ex.map(serve, archs))
    for arch in archs:
        want = hf_target(paths[arch]).forward_packed(batch())
        assert torch.equal(served[arch].aux_hidden_states, want.aux_hidden_states), arch
        assert torch.equal(served[arch].last_hidden_states, want.last_hidden_states), arch


def test_drafts_train_on_every_target_and_their_exports_load_in_sglang(paths, hf_target, tmp_path):
    exports = []
    for arch in ARCHS:
        target = hf_target(paths[arch])
        info = target.info
        config = Eagle3DraftConfig.from_target(load_config(paths[arch]), info.vocab_size, list(info.aux_layer_ids))
        emb, head = target.get_input_embeddings().weight, target.get_lm_head_weight()
        draft = Eagle3Draft.from_target(config, emb, head, torch.arange(info.vocab_size), seed=0)
        sup = target.forward_packed(batch())
        opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        for _ in range(8):  # the same batch: the loss must fall (random targets: their entropy is its floor)
            loss, _ = ttt_loss(draft, sup, head, steps=3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"{arch} draft TTT loss over 8 steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
        assert losses[-1] < 0.99 * losses[0], (arch, losses)
        exports.append(save_draft(draft, tmp_path / arch))
    for arch, report in zip(ARCHS, verify_eagle3_exports(exports), strict=True):
        assert report["ok"], (arch, report["not_loaded"], report["mismatched"], report["load_errors"])
        assert report["config"]["target_hidden_size"] == 64


def _readme_matrix() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "targets.md").read_text()
    block = text.split("<!-- target-matrix -->")[1].split("<!-- /target-matrix -->")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`", cells[0]) if cells else None
        if m:
            rows[m.group(1)] = {"hf": re.match(r"\w+", cells[2]).group(), "sglang": re.match(r"\w+", cells[3]).group()}
    return rows


def test_readme_matrix_is_what_this_module_observed():
    readme = _readme_matrix()
    assert sorted(readme) == sorted(ARCHS)
    ran = {a: seen for a, seen in OBSERVED.items() if seen}
    assert ran, "run with the rest of this module"
    for arch, seen in ran.items():
        for engine, verdict in seen.items():
            assert readme[arch][engine] == verdict, (arch, engine, readme[arch][engine], verdict)
