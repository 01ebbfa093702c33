"""Export a trained draft for the servers and trainers that load EAGLE-3 drafts, and load it back.

Three layouts of one state dict:

- `save_draft(draft, path)`: the default export, which SGLang 0.5.23 serves as an EAGLE-3 draft and vLLM 0.33
  serves with `--speculative-config '{"method": "eagle3", "model": "<path>", ...}'` (vLLM only when the draft
  vocabulary is smaller than the target's: with both equal it has no parameter for the d2t/t2d this export
  always holds, so serve the speculators export then). `config.json`
  (`architectures: ["LlamaForCausalLMEagle3"]`, see `Eagle3DraftConfig.to_hf`: SGLang's ids in
  `eagle_config`, vLLM's at the top level) and `model.safetensors` with the draft's own parameter names,
  which both loaders read (`midlayer.*` is their alias of `layers.0`; they stack q/k/v and gate/up
  themselves). `load_draft(path)` reads it back.
- `save_speculators(draft, path, verifier=...)`: speculators 0.9.0's Eagle-3 layout
  (`speculators_model_type: "eagle3"`, `transformer_layer_config`, `speculators_config` naming the verifier),
  which speculators' `Eagle3DraftModel.from_pretrained` and vLLM's speculators path load. Tensors are named
  `layers.0.*` instead of `midlayer.*`; `d2t`/`t2d` are left out when the draft vocabulary is the target's
  (speculators then registers them as None and vLLM has no parameter for them).
  `save_draft(draft, path, speculators=True, verifier=...)` writes both: this one in `path / "speculators"`.
- `save_nemo(draft, path)` / `load_nemo_draft(path, aux_layer_ids)`: NeMo AutoModel 0.7.0's consolidated draft
  export (`LlamaEagle3DraftModel`: the same tensors under `model.*`, its config.json without aux ids), to warm
  start NeMo from our draft, or to evaluate a NeMo-trained draft with `speculate.speculative_greedy`.
  `to_nemo_state_dict` / `from_nemo_state_dict` / `nemo_config` are the conversions they use.

The aux ids go through `contract.vllm_aux_layer_ids` wherever vLLM or speculators read them (ours + 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from eagle_ray.contract import vllm_aux_layer_ids
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig

WEIGHTS = "model.safetensors"
SPECULATORS_DIR = "speculators"  # where save_draft(..., speculators=True) puts the speculators export
SPECULATORS_VERSION = "0.9.0"  # the release whose loader tests/test_exports.py runs


def _tensors(draft: Eagle3Draft, dtype: torch.dtype | None) -> tuple[Eagle3DraftConfig, dict[str, torch.Tensor]]:
    module = getattr(draft, "module", draft)  # a DDP-wrapped draft exports the same
    tensors = {}
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    return module.config, tensors


def _written_dtype(tensors: dict[str, torch.Tensor], default: str) -> str:
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    # say what was written, whatever the config believed
    return str(floats.pop()).removeprefix("torch.") if len(floats) == 1 else default


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS)  # a crash never leaves a half-written export behind
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_draft(
    draft: Eagle3Draft,
    path: str | Path,
    dtype: torch.dtype | None = None,
    *,
    speculators: bool = False,
    verifier: str | None = None,
    verifier_architectures: list[str] | None = None,
) -> Path:
    """Write the draft to `path` (weights in `dtype`, default their own; d2t/t2d keep theirs).

    `speculators=True` also writes `save_speculators(draft, path / "speculators", verifier,
    verifier_architectures)`; `verifier` and `verifier_architectures` are used only then.
    """
    path = Path(path)
    config, tensors = _tensors(draft, dtype)
    if speculators:
        _check_speculators(config)  # before anything is written
    hf = config.to_hf()
    hf["torch_dtype"] = _written_dtype(tensors, hf["torch_dtype"])
    _write(path, tensors, hf)
    if speculators:
        save_speculators(draft, path / SPECULATORS_DIR, verifier, verifier_architectures, dtype=dtype)
    return path


def _check_speculators(config: Eagle3DraftConfig) -> None:
    if (config.target_hidden_size or config.hidden_size) != config.hidden_size:
        # speculators 0.9.0 sizes fc as num_aux * the draft's own hidden_size (models/eagle3/core.py)
        raise ValueError(
            f"speculators 0.9.0 cannot hold a draft whose target is wider than itself "
            f"(target_hidden_size {config.target_hidden_size} != hidden_size {config.hidden_size})"
        )


def speculators_name(name: str) -> str:
    """Our parameter name -> speculators' `Eagle3DraftModel` name (`midlayer.` is its `layers.0.`)."""
    return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name


def speculators_config(
    config: Eagle3DraftConfig,
    verifier: str | None = None,
    verifier_architectures: list[str] | None = None,
    speculative_tokens: int = 4,
    torch_dtype: str | None = None,
) -> dict[str, Any]:
    """config.json in speculators 0.9.0's Eagle-3 layout (`Eagle3SpeculatorConfig`).

    No top-level `model_type` (vLLM recognises the format by its absence next to `speculators_config`);
    `transformer_layer_config` is a one-layer LlamaConfig whose `vocab_size` is the TARGET vocabulary;
    `norm_before_residual` is written false because vLLM's speculators adapter defaults it to true.
    `config.extra` (other HF fields) is not carried: this layout has no place for them.
    """
    hf = config.to_hf()
    dtype = torch_dtype or hf["torch_dtype"]
    layer = {k: hf[k] for k in _LAYER_KEYS}
    layer.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype=dtype)
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": hf["target_hidden_size"],
        "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(config.aux_layer_ids),
        "norm_before_residual": False,  # residual = the raw hidden (MidLayer.forward)
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,  # the next step gets the pre-norm hidden (Eagle3Draft.step)
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {"proposal_type": "greedy", "speculative_tokens": speculative_tokens, "verifier_accept_k": 1}
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures or [])},
        },
    }


# the LlamaConfig fields of the draft's one decoder layer, as `to_hf` writes them
_LAYER_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)


def save_speculators(
    draft: Eagle3Draft,
    path: str | Path,
    verifier: str | None = None,
    verifier_architectures: list[str] | None = None,
    speculative_tokens: int = 4,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the draft to `path` in speculators 0.9.0's Eagle-3 format (see the module docstring).

    `verifier`: the target, as speculators and vLLM find it (`speculators_config.verifier.name_or_path`;
    `vllm serve <path>` wants a hub id, and speculators' `from_pretrained` reads its norm and lm_head from
    it); None writes no verifier, which suits vLLM with `--model <target>` but not speculators 0.9.0's
    `Eagle3DraftModel.from_pretrained` (it reads the verifier's config regardless).
    `verifier_architectures`: default the verifier's config.json's when it is a local directory.
    `speculative_tokens`: the greedy proposal's length (eagle_ray's evaluator default)."""
    path = Path(path)
    config, tensors = _tensors(draft, dtype)
    _check_speculators(config)
    tensors = {speculators_name(n): t for n, t in tensors.items()}
    if config.draft_vocab_size == config.vocab_size:
        del tensors["d2t"], tensors["t2d"]
    if verifier_architectures is None and verifier is not None and (Path(verifier) / "config.json").is_file():
        verifier_architectures = json.loads((Path(verifier) / "config.json").read_text()).get("architectures")
    torch_dtype = _written_dtype(tensors, config.torch_dtype)
    spec = speculators_config(config, verifier, verifier_architectures, speculative_tokens, torch_dtype)
    return _write(path, tensors, spec)


# ---------------------------------------------------------------------------------------------
# NeMo AutoModel 0.7.0's `LlamaEagle3DraftModel` (components/speculative/eagle/draft_llama.py): the same network
# (residual = the carried hidden, the pre-norm output feeds the next step), under `model.` except lm_head/d2t/t2d,
# with no d2t/t2d when the draft vocabulary is the target's. Its config.json is the target's own config plus the
# draft keys, and does not record the aux ids.

_NEMO_TOP = ("lm_head.", "d2t", "t2d")


def to_nemo_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> NeMo's (`midlayer.` is `model.layers.0.`; `embed_tokens`, `fc`, `norm` under `model.`)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("midlayer."):
            name = "model.layers.0." + name.removeprefix("midlayer.")
        elif not name.startswith(_NEMO_TOP):
            name = "model." + name
        out[name] = t
    if out["d2t"].numel() == out["t2d"].numel():  # full vocabulary: NeMo registers no mapping buffers
        del out["d2t"], out["t2d"]
    return out


def from_nemo_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo's parameter names -> ours; a full-vocabulary draft gets the identity d2t / all-true t2d."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.layers.0."):
            name = "midlayer." + name.removeprefix("model.layers.0.")
        elif name.startswith("model."):
            name = name.removeprefix("model.")
        out[name] = t
    if "d2t" not in out and "lm_head.weight" in out and "embed_tokens.weight" in out:
        out["d2t"] = torch.zeros(out["lm_head.weight"].shape[0], dtype=torch.long)
        out["t2d"] = torch.ones(out["embed_tokens.weight"].shape[0], dtype=torch.bool)
    return out


def nemo_config(config: Eagle3DraftConfig) -> dict[str, Any]:
    """The config NeMo's `LlamaEagle3DraftModel` is built from for this draft (a LlamaConfig dict).

    EAGLE-3 as we train it: no fc_norm, no norm_output, no parallel drafting; eager attention (NeMo's
    draft implements eager and flash_attention_2 only).
    """
    hf = config.to_hf()
    return {
        **{k: hf[k] for k in _LAYER_KEYS},
        "model_type": "llama",
        "architectures": ["LlamaEagle3DraftModel"],
        "rope_theta": config.rope_theta,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": hf["target_hidden_size"],
        "num_aux_hidden_states": len(config.aux_layer_ids),
        "attn_implementation": "eager",
        "fc_norm": False,
        "norm_output": False,
        "parallel_drafting": False,
        "dtype": config.torch_dtype,
    }


def save_nemo(draft: Eagle3Draft, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the draft as NeMo's consolidated draft export: `config.json` (`nemo_config`) and `model.safetensors`
    with NeMo's names, which its `recipe_args.draft_weights_path` warm start and `LlamaEagle3DraftModel` load."""
    config, tensors = _tensors(draft, dtype)
    cfg = nemo_config(config)
    cfg["dtype"] = _written_dtype(tensors, config.torch_dtype)
    return _write(Path(path), to_nemo_state_dict(tensors), cfg)


def _nemo_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    paths = [path / f for f in files] if files else sorted(path.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for p in paths:
        tensors.update(load_file(str(p)))
    return tensors


def load_nemo_draft(path: str | Path, aux_layer_ids: list[int], dtype: torch.dtype | None = None) -> Eagle3Draft:
    """A draft NeMo AutoModel 0.7.0 saved (its consolidated `config.json` + safetensors) as our `Eagle3Draft`.

    `aux_layer_ids`: the target layers it was trained on, ours = NeMo's convention (output of layer i). NeMo's
    config.json does not record them; its recipe's default is `contract.default_aux_layer_ids` of the target's
    depth, which is the `num_hidden_layers` in that config.json (inherited from the target). Every tensor must be
    present with its shape, and nothing else; NeMo options our draft cannot compute are refused.
    """
    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    c = c.get("text_config") or c
    unsupported = [k for k in ("fc_norm", "norm_output", "parallel_drafting", "attention_bias", "mlp_bias") if c.get(k)]
    rope_type = (c.get("rope_parameters") or {}).get("rope_type", "default")
    if unsupported or rope_type != "default" or c.get("rope_scaling"):
        raise ValueError(
            f"{path}: NeMo draft options eagle_ray's draft does not implement: {unsupported}, rope {rope_type}"
        )
    if c.get("num_aux_hidden_states", 3) != len(aux_layer_ids):
        raise ValueError(f"{path}: {c.get('num_aux_hidden_states', 3)} aux states, aux_layer_ids {aux_layer_ids}")
    tensors = from_nemo_state_dict(_nemo_tensors(path))
    config = Eagle3DraftConfig.from_target(c, c.get("draft_vocab_size", c["vocab_size"]), list(aux_layer_ids))
    target_hidden = c.get("target_hidden_size", config.hidden_size)
    config.target_hidden_size = None if target_hidden == config.hidden_size else target_hidden
    config.torch_dtype = _written_dtype(tensors, config.torch_dtype)
    return _load_exact(config, tensors, dtype, f"{path} is not a NeMo draft of its config")


def load_draft(path: str | Path, dtype: torch.dtype | None = None) -> Eagle3Draft:
    """Round trip of `save_draft`: every tensor must be present with its shape, and nothing else."""
    path = Path(path)
    config = Eagle3DraftConfig.from_hf(json.loads((path / "config.json").read_text()))
    return _load_exact(config, load_file(str(path / WEIGHTS)), dtype, f"{path} is not a draft of its config")


def _load_exact(
    config: Eagle3DraftConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, what: str
) -> Eagle3Draft:
    """A draft of `config` holding `tensors`: every one present with its shape, and nothing else."""
    draft = Eagle3Draft(config)
    expected = draft.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [n for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing {missing}, unexpected {unexpected}, bad shape {bad}")
    draft.load_state_dict({n: t.to(expected[n].dtype) for n, t in tensors.items()})
    if dtype is not None:
        draft.to(dtype)
    return draft
