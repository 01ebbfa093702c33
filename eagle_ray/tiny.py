"""Tiny targets built from a transformers config: for tests, demos and the laptop default run.

Nothing is downloaded: weights are random (seeded), written as a normal HF checkpoint that
both engines load like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

TINY_SHAPE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    # a wider init than the default 0.02 keeps hidden states and logits well away from zero,
    # so engine comparisons test something
    initializer_range=0.05,
)
CONFIGS = {"llama": LlamaConfig, "qwen3": Qwen3Config}


def build_tiny_target(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised tiny `arch` causal LM (fp32) to `path`; return the path."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(CONFIGS)}")
    path = Path(path)
    if (path / "config.json").exists():
        return path
    config = CONFIGS[arch](**{**TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path
