"""Reading a target's Hugging Face checkpoint directory (config, dtype, embeddings, lm_head) without building
the model. Not the trainer's checkpoints: those are Ray Train's (`train/loop.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig


def load_config(model_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return getattr(config, "text_config", None) or config


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the checkpoint was saved in (what transformers' dtype="auto" loads)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _weight_files(model_path: str) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        return {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = root / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_path}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def read_tensor(model_path: str, suffix: str) -> torch.Tensor | None:
    """The one tensor whose name ends with `suffix` (e.g. "embed_tokens.weight"), or None."""
    files = _weight_files(model_path)
    names = [k for k in files if k.endswith(suffix)]
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"{model_path}: several tensors end with {suffix!r}: {names}")
    with safe_open(files[names[0]], "pt") as f:
        return f.get_tensor(names[0])


def embedding_and_lm_head(model_path: str, config: PretrainedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-embedding and lm_head weights `[V, H]`, honouring tied embeddings."""
    embed = read_tensor(model_path, "embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{model_path}: no '*embed_tokens.weight' tensor in the checkpoint")
    head = None if getattr(config, "tie_word_embeddings", False) else read_tensor(model_path, "lm_head.weight")
    return embed, embed if head is None else head
