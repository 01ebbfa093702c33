"""An exported EAGLE-3 draft loads into SGLang's own `LlamaForCausalLMEagle3`, every parameter exactly.

SGLang cannot serve speculative decoding on this CPU (see DESIGN.md), so the export is checked through SGLang's
construction and `load_weights`: `verify_eagle3_export`. The exports here are random drafts written by the real
exporter (`save_draft`), some then corrupted; a trained draft gets the same check in test_train.py.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
from conftest import random_batch, random_draft
from safetensors.torch import load_file, save_file

from eagle_ray.draft.export import save_draft
from eagle_ray.engines import sglang as sglang_engine
from eagle_ray.engines.sglang import verify_eagle3_export, verify_eagle3_exports

# the tiny target's shape (eagle_ray.tiny.TINY_SHAPE)
V, H, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 64, 4, 2, 16, 128
SGLANG_PARAMS = {
    "model.embed_tokens.weight",
    "model.fc.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.hidden_norm.weight",
    "model.norm.weight",
    "lm_head.weight",
}


def write_random_export(
    path: Path,
    draft_vocab: int = 256,
    dtype: torch.dtype = torch.float32,
    drop: tuple[str, ...] = (),
    shapes: dict[str, tuple[int, ...]] | None = None,
    rename: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random draft for the tiny target, exported by `save_draft`; returns the tensors written.

    `drop`, `shapes` and `rename` corrupt it: leave tensors out, give them another shape, or another name.
    """
    draft = random_draft([1, 3, 4], draft_vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)  # the corruptions' values
    save_draft(draft, path, dtype=dtype)  # the real exporter
    tensors = load_file(str(path / "model.safetensors"))
    for name, shape in (shapes or {}).items():
        tensors[name] = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    for name in drop:
        del tensors[name]
    if shapes or rename or drop:
        save_file(tensors, str(path / "model.safetensors"))
    return tensors


def _assert_exact(report: dict, tensors: dict[str, torch.Tensor]) -> None:
    assert report["ok"], {k: report[k] for k in ("not_loaded", "mismatched", "load_errors", "unused_export_tensors")}
    assert report["model_class"] == "LlamaForCausalLMEagle3"
    assert set(report["params"]) == SGLANG_PARAMS
    for name, p in report["params"].items():
        assert p["loaded"] and p["match"] and p["max_abs_diff"] == 0.0, (name, p)
        assert sorted(p["loaded_from"]) == sorted(p["sources"]), (name, p)
    assert report["params"]["model.layers.0.self_attn.qkv_proj.weight"]["sources"] == [
        f"midlayer.self_attn.{x}_proj.weight" for x in "qkv"
    ]
    # d2t round-trips: SGLang's hot_token_id maps draft id i to target id i + d2t[i]
    hot = report["hot_token_id"]
    assert hot["match"] and hot["in_range"] and hot["unique"] and hot["t2d_consistent"]
    assert torch.equal(hot["ids"], torch.nonzero(tensors["t2d"]).flatten())
    assert report["config"] == {
        "hidden_size": H,
        "target_hidden_size": H,
        "num_aux_hidden_states": 3,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": V,
        "draft_vocab_size": len(tensors["d2t"]),
        "eagle_aux_hidden_state_layer_ids": [1, 3, 4],
    }


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """Three exports through one `verify_eagle3_exports` call (one fresh process, not three)."""
    root = tmp_path_factory.mktemp("exports")
    tensors = {
        "random": write_random_export(root / "random"),
        "bf16_padded": write_random_export(root / "bf16_padded", draft_vocab=250, dtype=torch.bfloat16),
        "corrupted": write_random_export(
            root / "corrupted",
            drop=("midlayer.hidden_norm.weight", "d2t"),
            shapes={"midlayer.self_attn.k_proj.weight": (HEAD_DIM, 2 * H), "fc.weight": (H, 2 * H)},
            rename={"norm.weight": "final_norm.weight"},
        ),
    }
    reports = verify_eagle3_exports([root / name for name in tensors])
    return {name: (report, tensors[name]) for name, report in zip(tensors, reports, strict=True)}


def test_random_export_loads_exactly(checked):
    _assert_exact(*checked["random"])


def test_bf16_export_with_padded_draft_vocab(checked):
    """A draft vocabulary that is no multiple of 64: SGLang pads the lm_head rows (zeros) and still matches."""
    report, tensors = checked["bf16_padded"]
    _assert_exact(report, tensors)
    assert report["dtype"] == "bfloat16"
    head = report["params"]["lm_head.weight"]
    assert head["shape"] == [256, H] and head["padding_rows_zero"]


def test_missing_misshaped_and_misnamed_weights_are_reported(checked):
    """SGLang's load_weights skips unknown names silently and leaves absent ones uninitialised: the check does not."""
    report, _ = checked["corrupted"]
    assert not report["ok"]
    params = report["params"]
    # missing
    missing = params["model.layers.0.hidden_norm.weight"]
    assert not missing["loaded"] and missing["missing_export_tensors"] == ["midlayer.hidden_norm.weight"]
    # mis-shaped: SGLang's weight loaders refuse them; the parameters stay unloaded
    assert set(report["load_errors"]) == {"midlayer.self_attn.k_proj.weight", "fc.weight"}
    assert not params["model.fc.weight"]["loaded"] and not params["model.fc.weight"]["match"]
    qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert not qkv["loaded"] and not qkv["ok"]
    assert "midlayer.self_attn.k_proj.weight" not in qkv["loaded_from"]
    # mis-named: SGLang ignores it silently
    assert report["unused_export_tensors"] == ["final_norm.weight"]
    assert not params["model.norm.weight"]["loaded"]
    assert set(report["not_loaded"]) == {
        "model.layers.0.hidden_norm.weight",
        "model.fc.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.norm.weight",
    }
    # the rest still loaded exactly
    assert all(p["ok"] for n, p in params.items() if n not in report["not_loaded"])
    # no d2t: no hot-token map
    assert report["hot_token_id"] == {"d2t_present": False, "ids": None, "match": False}


def _check_then_serve(draft_dir: str, target_dir: str) -> tuple[bool, dict[str, float]]:
    """In a fresh process: the in-process check, then an SGLang target in the same process, against transformers."""
    from eagle_ray.engines.hf import HFEngine
    from eagle_ray.engines.sglang import SGLangEngine

    assert sglang_engine._live is None
    ok = verify_eagle3_export(draft_dir)["ok"]
    batch = random_batch([5, 9])
    engine = SGLangEngine(target_dir)
    try:
        got = engine.forward(batch, return_logits=True)
    finally:
        engine.close()
    want = HFEngine(target_dir).forward(batch, return_logits=True)
    fields = ("aux_hidden_states", "last_hidden_states", "logits")
    return ok, {f: (getattr(got, f) - getattr(want, f)).abs().max().item() for f in fields}


def test_in_process_check_leaves_sglang_usable(tmp_path, tiny_paths):
    """The check tears down the parallel state it built: an SGLang target built afterwards still serves exactly."""
    write_random_export(tmp_path / "draft")
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        ok, diffs = pool.submit(_check_then_serve, str(tmp_path / "draft"), tiny_paths["llama"]).result()
    assert ok
    assert all(d <= 1e-5 for d in diffs.values()), diffs


def test_check_beside_an_open_engine(tmp_path, tiny_paths, sglang_target):
    """With an SGLang engine open in this process, the check runs in a fresh process and leaves the engine be."""
    tensors = write_random_export(tmp_path / "draft")
    target = sglang_target(tiny_paths["llama"])
    batch = random_batch([4, 7])
    before = target.forward_packed(batch)
    assert sglang_engine._live is not None
    _assert_exact(verify_eagle3_export(tmp_path / "draft"), tensors)
    assert torch.equal(target.forward_packed(batch).aux_hidden_states, before.aux_hidden_states)
