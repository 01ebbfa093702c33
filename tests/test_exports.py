"""Our draft exports load in the other projects, proven by their own loading code.

speculators 0.9.0 (installed --no-deps by .ci/setup into .peers/speculators, never on the venv's path):
`save_speculators` output through its own `Eagle3SpeculatorConfig` and `Eagle3DraftModel.from_pretrained`
(with the tiny target as a local verifier), every tensor bit-equal, nothing missing or unexpected but the
verifier_* tensors it builds from the verifier itself, and one draft step through its modules equal to ours.
vLLM 0.33 is not installed: its convention (aux id = hidden-state index = ours + 1, read from the top-level
key by both its runners) is checked on the config.json we write. The ids [0, 3, 7] on the 8-layer target
are the case an off-by-one cannot hide in: the default ids translate to vLLM's own default ids.

NeMo AutoModel 0.7.0 (.peers/nemo): `save_nemo` output through the recipe's own warm start into its
`LlamaEagle3DraftModel`, and a draft NeMo built and exported (the recipe's own functions) read by `load_nemo_draft`
and run by our evaluator; both ways every tensor equal and two draft steps' logits equal in fp32.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_draft
from safetensors.torch import load_file

from eagle_ray import (
    load_draft,
    load_nemo_draft,
    save_draft,
    save_nemo,
    save_speculators,
    speculative_greedy,
    vllm_aux_layer_ids,
)
from eagle_ray.draft.attention import PackedLayout
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig, TTTState
from eagle_ray.tiny import TINY_SHAPE

ROOT = Path(__file__).resolve().parents[1]
SPECULATORS = ROOT / ".peers" / "speculators"  # speculators==0.9.0 + hs-connectors==0.9.0, --no-deps
V, H, L = TINY_SHAPE["vocab_size"], TINY_SHAPE["hidden_size"], TINY_SHAPE["num_hidden_layers"]
VERIFIER_ONLY = {"verifier_norm.weight", "verifier_lm_head.weight"}  # speculators loads these from the verifier
# (name, our aux ids, the vLLM/speculators ids written out by hand, draft vocab, export dtype)
CASES = [
    ("default_ids", [1, 3, 4], [2, 4, 5], 256, torch.float32),  # = vLLM's default (2, L//2, L-3)
    ("edge_ids", [0, 3, 7], [1, 4, 8], 250, torch.float32),  # 8 = L: the last layer's output, pre-norm
    ("full_vocab", [1, 2, 5], [2, 3, 6], V, torch.float32),  # no d2t / t2d in the speculators export
    ("bf16", [1, 3, 4], [2, 4, 5], 256, torch.bfloat16),
]


@pytest.fixture(scope="module")
def spec():
    assert (SPECULATORS / "speculators").is_dir(), "run bash .ci/setup: it installs speculators==0.9.0 into .peers/"
    sys.path.insert(0, str(SPECULATORS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    return Eagle3DraftModel, Eagle3SpeculatorConfig


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine
    yield
    torch.set_num_threads(threads)


def spec_name(ours: str) -> str:  # written out here, not taken from export.py
    return ours.replace("midlayer.", "layers.0.", 1)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_speculators_loads_our_export(case, spec, tiny_paths, tmp_path):
    Eagle3DraftModel, Eagle3SpeculatorConfig = spec
    _, aux, theirs_ids, draft_vocab, dtype = case
    verifier = tiny_paths["llama"]  # the 8-layer tiny Llama: speculators reads its num_hidden_layers, norm, lm_head
    draft = random_draft(aux, draft_vocab)
    out = save_draft(draft, tmp_path / "draft", dtype=dtype, speculators=True, verifier=verifier)
    spec_dir = out / "speculators"

    # our own config.json: SGLang's ids in eagle_config, vLLM's at the top level; the round trip holds
    hf = json.loads((out / "config.json").read_text())
    assert hf["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": aux}
    assert hf["eagle_aux_hidden_state_layer_ids"] == theirs_ids == vllm_aux_layer_ids(aux)
    assert hf["norm_before_residual"] is False
    written_dtype = str(dtype).removeprefix("torch.")
    assert load_draft(out).config == Eagle3DraftConfig(**{**draft.config.as_dict(), "torch_dtype": written_dtype})

    written = json.loads((spec_dir / "config.json").read_text())
    assert "model_type" not in written  # vLLM tells the speculators format by model_type's absence
    assert written["speculators_config"]["verifier"] == {
        "name_or_path": verifier,
        "architectures": ["LlamaForCausalLM"],
    }
    cfg = Eagle3SpeculatorConfig.from_pretrained(str(spec_dir))
    assert type(cfg.transformer_layer_config).__name__ == "LlamaConfig"
    assert cfg.eagle_aux_hidden_state_layer_ids == theirs_ids
    assert (cfg.draft_vocab_size, cfg.target_vocab_size, cfg.target_hidden_size) == (draft_vocab, V, H)
    assert cfg.norm_before_residual is False and not (cfg.norm_before_fc or cfg.fc_norm or cfg.norm_output)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Eagle3DraftModel.from_pretrained(str(spec_dir))
    assert model.target_layer_ids == theirs_ids  # validated against the verifier's 8 layers: [0, 8] allowed
    file_sd = load_file(str(spec_dir / "model.safetensors"))
    model_sd = model.state_dict()
    assert set(model_sd) - set(file_sd) == VERIFIER_ONLY and not set(file_sd) - set(model_sd)
    fresh = Eagle3DraftModel(Eagle3SpeculatorConfig.from_pretrained(str(spec_dir)))
    res = fresh.load_state_dict(file_sd, strict=False)  # the strict key diff, as torch reports it
    assert set(res.missing_keys) == VERIFIER_ONLY and not res.unexpected_keys

    ours = {n: t.to(dtype) if t.is_floating_point() else t for n, t in draft.state_dict().items()}
    if draft_vocab == V:
        assert model.d2t is None and model.t2d is None
        ours = {n: t for n, t in ours.items() if n not in ("d2t", "t2d")}
    assert {spec_name(n) for n in ours} == set(file_sd)
    for name, t in ours.items():
        got = model_sd[spec_name(name)]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    nan = [n for n, p in model_sd.items() if p.is_floating_point() and p.isnan().any()]
    assert not nan, f"never loaded: {nan}"
    target = load_file(str(next(Path(verifier).glob("*.safetensors"))))
    rows = target["lm_head.weight"] if draft_vocab == V else target["lm_head.weight"][draft.t2d]
    assert torch.equal(model.verifier_lm_head.weight, rows.to(dtype))

    if dtype == torch.float32:  # one draft step through speculators' modules equals ours, bit for bit here
        g = torch.Generator().manual_seed(1)
        S = 9
        input_ids = torch.randint(0, V, (1, S), generator=g)
        aux_states = torch.randn(1, S, 3 * H, generator=g)
        pos = torch.arange(S)[None]
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        with torch.no_grad():
            ours_h = rows_step(draft, input_ids, aux_states, pos, rows_state(1, S))
            ours_logits = draft.logits(ours_h)
            layer = model.layers[0]
            layer.self_attn.config._attn_implementation = "sdpa"
            x = torch.cat([model.embed_tokens(input_ids), model.fc(aux_states)], dim=-1)
            theirs_h = layer(
                x, attention_mask=causal[None, None], position_ids=pos, position_embeddings=model.rotary_emb(x, pos)
            )
            theirs_logits = model.lm_head(model.norm(theirs_h))
        assert (ours_h - theirs_h).abs().max().item() <= 1e-5
        assert (ours_logits - theirs_logits).abs().max().item() <= 1e-5


def test_speculators_export_without_a_verifier(spec, tmp_path):
    # speculators 0.9.0's Eagle3DraftModel.from_pretrained reads the verifier's config even when name_or_path is
    # null (load_verifier_weights), so such an export is checked through its config and a strict state-dict load
    Eagle3DraftModel, Eagle3SpeculatorConfig = spec
    draft = random_draft([0, 3, 7], 250)
    out = save_speculators(draft, tmp_path / "s", speculative_tokens=3)
    written = json.loads((out / "config.json").read_text())
    assert written["speculators_config"]["verifier"] == {"name_or_path": None, "architectures": []}
    assert written["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    cfg = Eagle3SpeculatorConfig.from_pretrained(str(out))
    assert cfg.eagle_aux_hidden_state_layer_ids == [1, 4, 8] and cfg.speculators_config.verifier.name_or_path is None
    model = Eagle3DraftModel(cfg)
    res = model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    assert set(res.missing_keys) == VERIFIER_ONLY and not res.unexpected_keys
    assert torch.equal(model.fc.weight, draft.fc.weight) and torch.equal(model.d2t, draft.d2t)


def test_export_refusals(tmp_path):
    draft = random_draft([0, 3, 7], 250)
    hf = draft.config.to_hf()
    with pytest.raises(ValueError, match=r"must be eagle_config's \[0, 3, 7\].*\[1, 4, 8\]"):
        Eagle3DraftConfig.from_hf({**hf, "eagle_aux_hidden_state_layer_ids": [0, 3, 7]})  # copied, not translated
    with pytest.raises(ValueError, match="norm_before_residual"):
        Eagle3DraftConfig.from_hf({**hf, "norm_before_residual": True})
    legacy = {k: v for k, v in hf.items() if k not in ("eagle_aux_hidden_state_layer_ids", "norm_before_residual")}
    assert Eagle3DraftConfig.from_hf(legacy) == draft.config  # exports written before these keys still load
    wide = Eagle3Draft(Eagle3DraftConfig(**{**draft.config.as_dict(), "target_hidden_size": 96}))
    with pytest.raises(ValueError, match="target_hidden_size 96"):
        save_draft(wide, tmp_path / "wide", speculators=True)
    assert not (tmp_path / "wide").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# NeMo AutoModel 0.7.0 (installed --no-deps by .ci/setup into .peers/nemo): its LlamaEagle3DraftModel, its
# safetensors reader, and the recipe's own warm-start and export functions, lifted verbatim from
# recipes/llm/train_eagle3.py (that module itself needs torchao, which is not installed).

NEMO = ROOT / ".peers" / "nemo"
NEMO_RECIPE_FUNCTIONS = ("_load_draft_weights", "_merged_lora_state_dict", "_export_merged_lora_draft")


@pytest.fixture(scope="module")
def nemo():
    assert (NEMO / "nemo_automodel").is_dir(), "run bash .ci/setup: it installs nemo-automodel==0.7.0 into .peers/"
    sys.path.insert(0, str(NEMO))
    from nemo_automodel.components.checkpoint.checkpointing import load_hf_safetensors_state_dict
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel

    recipe = NEMO / "nemo_automodel" / "recipes" / "llm" / "train_eagle3.py"
    tree = ast.parse(recipe.read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in NEMO_RECIPE_FUNCTIONS]
    assert sorted(d.name for d in defs) == sorted(NEMO_RECIPE_FUNCTIONS)
    ns = {
        "os": os,
        "torch": torch,
        "logger": logging.getLogger("nemo_recipe"),
        "load_hf_safetensors_state_dict": load_hf_safetensors_state_dict,
    }
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(recipe), "exec"), ns)
    return SimpleNamespace(
        Draft=LlamaEagle3DraftModel,
        read=load_hf_safetensors_state_dict,
        **{n.removeprefix("_"): ns[n] for n in NEMO_RECIPE_FUNCTIONS},
    )


def nemo_name(ours: str) -> str:  # written out here, not taken from export.py
    if ours.startswith("midlayer."):
        return "model.layers.0." + ours.removeprefix("midlayer.")
    return ours if ours.startswith(("lm_head", "d2t", "t2d")) else "model." + ours


def nemo_draft_from_recipe(nemo, target_path: str, draft_vocab: int, seed: int = 3):
    """A NeMo draft built as recipes/llm/train_eagle3.py builds it (config = the target's + the draft keys)."""
    from transformers import LlamaConfig

    base = LlamaConfig.from_pretrained(target_path)
    cfg = base.to_dict()
    cfg.update(
        draft_vocab_size=draft_vocab,
        target_hidden_size=base.hidden_size,
        architectures=["LlamaEagle3DraftModel"],
        tie_word_embeddings=False,
        attn_implementation="eager",
        fc_norm=False,
        norm_output=False,
        parallel_drafting=False,
    )
    model = nemo.Draft(type(base).from_dict(cfg)).to(dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():  # norms too
            t.copy_(torch.randn(t.shape, generator=g) * 0.05 + (1.0 if t.ndim == 1 else 0.0))
    embed = torch.nn.Embedding(V, H)
    embed.weight.data.copy_(load_file(str(next(Path(target_path).glob("*.safetensors"))))["model.embed_tokens.weight"])
    model.copy_embeddings_from_target(embed)
    # NeMo's selection order is frequency order, not sorted: a random permutation is its general case
    model.set_vocab_mapping(torch.randperm(V, generator=g)[:draft_vocab])
    model.freeze_embeddings()
    return model


def rows_state(b: int, s: int) -> TTTState:
    """A TTT state for `b` rows of `s` tokens, each row one packed document."""
    return TTTState(PackedLayout.from_cu_seqlens(torch.arange(0, b * s + 1, s)))


def rows_step(draft, input_ids, hidden, pos, state: TTTState) -> torch.Tensor:
    """`draft.step` on `[B, S]` rows, through the packed layout it trains on."""
    b, s = input_ids.shape
    return draft.step(input_ids.flatten(), hidden.flatten(0, 1), pos.flatten(), state).view(b, s, -1)


def one_and_two_steps_ours(draft, input_ids, aux_states):
    B, S = input_ids.shape
    pos = torch.arange(S).expand(B, S)
    state = rows_state(B, S)
    with torch.no_grad():
        h1 = rows_step(draft, input_ids, aux_states, pos, state)
        h2 = rows_step(draft, input_ids.roll(-1, 1), h1, pos + 1, state)  # a TTT step: rope one position on
        return draft.logits(h1), draft.logits(h2)


def one_and_two_steps_nemo(model, input_ids, aux_states):
    mask = torch.ones_like(input_ids)
    cache = [[], []]
    with torch.no_grad():
        h1 = model(input_ids, model.project_hidden_states(aux_states), mask, cache_hidden=cache)
        h2 = model(input_ids.roll(-1, 1), h1, mask, cache_hidden=cache)  # NeMo shifts rope by the step itself
        return model.compute_logits(h1), model.compute_logits(h2)


def step_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 9), generator=g), torch.randn(2, 9, 3 * H, generator=g)


def assert_same_as_nemo(draft, ours: dict[str, torch.Tensor], model) -> None:
    """Every tensor equal under NeMo's names, and one and two draft steps' logits within 1e-5."""
    theirs = model.state_dict()
    assert {nemo_name(n) for n in ours} == set(theirs)
    for name, t in ours.items():
        assert torch.equal(theirs[nemo_name(name)], t), name
    ids, aux_states = step_inputs()
    ours_logits = one_and_two_steps_ours(draft, ids, aux_states)
    for a, b in zip(ours_logits, one_and_two_steps_nemo(model, ids, aux_states), strict=True):  # steps 1, 2
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("draft_vocab", [250, V], ids=["draft_vocab", "full_vocab"])
def test_nemo_warm_starts_from_our_export(draft_vocab, nemo, tiny_paths, tmp_path):
    """save_nemo's export through NeMo's own warm start (`_load_draft_weights`: its reader, its mapping check)."""
    draft = random_draft([0, 3, 7], draft_vocab)
    out = save_nemo(draft, tmp_path / "nemo")
    from transformers import LlamaConfig

    model = nemo.Draft(LlamaConfig.from_dict(json.loads((out / "config.json").read_text()))).to(dtype=torch.float32)
    assert model.has_vocab_compression == (draft_vocab < V)
    model.set_vocab_mapping(draft.draft_ids)  # what the recipe does before the warm start; NeMo checks it matches
    nemo.load_draft_weights(model, str(out))  # raises on any missing key or mapping mismatch
    assert set(nemo.read(str(out))) == set(model.state_dict())  # nothing unused either
    ours = draft.state_dict()
    if draft_vocab == V:
        ours = {n: t for n, t in ours.items() if n not in ("d2t", "t2d")}
    assert_same_as_nemo(draft, ours, model)


def test_a_nemo_trained_draft_runs_in_our_evaluator(nemo, tiny_paths, hf_target, tmp_path):
    """NeMo's draft, saved by the recipe's own export function, loads into Eagle3Draft and speculates."""
    target_path = tiny_paths["llama"]
    model = nemo_draft_from_recipe(nemo, target_path, 250)
    out = Path(nemo.export_merged_lora_draft(model, str(tmp_path / "ckpt")))  # <ckpt>/model/consolidated
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == L  # the target's, not the draft's
    draft = load_nemo_draft(out, aux_layer_ids=[0, 3, 6])  # a target serves ids in [0, L-1)
    assert draft.config.aux_layer_ids == [0, 3, 6] and draft.config.draft_vocab_size == 250
    assert_same_as_nemo(draft, draft.state_dict(), model)
    assert torch.equal(draft.draft_ids, model.d2t + torch.arange(250))
    result = speculative_greedy(hf_target(target_path, aux_layer_ids=[0, 3, 6]), draft, [[5, 6, 7], [9]], 6, 3)
    assert result.matches_reference and result.verify_forwards >= 1, result.summary()
    with pytest.raises(ValueError, match="aux"):
        load_nemo_draft(out, aux_layer_ids=[0, 3])
