"""Export a trained draft as a directory SGLang 0.5.23 serves as an EAGLE-3 draft, and load it back.

`config.json` (`architectures: ["LlamaForCausalLMEagle3"]`, see `Eagle3DraftConfig.to_hf`) and
`model.safetensors` with the draft's own parameter names, which are the names SGLang's loader
reads (`midlayer.*` is its legacy alias of `layers.0`; it stacks q/k/v and gate/up itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig

WEIGHTS = "model.safetensors"


def save_draft(draft: Eagle3Draft, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the draft to `path` (weights in `dtype`, default their own; d2t/t2d keep theirs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    module = getattr(draft, "module", draft)  # a DDP-wrapped draft exports the same
    tensors = {}
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    config = module.config.to_hf()
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:  # say what was written, whatever the config believed
        config["torch_dtype"] = str(floats.pop()).removeprefix("torch.")
    tmp = path / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS)  # a crash never leaves a half-written export behind
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_draft(path: str | Path, dtype: torch.dtype | None = None) -> Eagle3Draft:
    """Round trip of `save_draft`: every tensor must be present with its shape, and nothing else."""
    path = Path(path)
    config = Eagle3DraftConfig.from_hf(json.loads((path / "config.json").read_text()))
    draft = Eagle3Draft(config)
    tensors = load_file(str(path / WEIGHTS))
    expected = draft.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [n for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path} is not a draft of its config: missing {missing}, unexpected {unexpected}, bad shape {bad}"
        )
    draft.load_state_dict({n: t.to(expected[n].dtype) for n, t in tensors.items()})
    if dtype is not None:
        draft.to(dtype)
    return draft
