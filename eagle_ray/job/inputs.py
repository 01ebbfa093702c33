"""What the jobs resolve the same way: the tokenizer, what engine "auto" means, held-out prompts from the data.

Shared by the training job's evaluation and `eagle-ray evaluate`, so a draft measured either way sees the same
prompts from the same data. No Ray here.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any


def tokenizer_spec(model_path: str | None, tokenizer: str | None) -> str:
    """The tokenizer asked for; else the target's own (a `tokenizer.json` beside its weights); else Qwen's BPE."""
    if tokenizer:
        return tokenizer
    own = model_path is not None and (Path(model_path) / "tokenizer.json").exists()
    return str(model_path) if own else "qwen"


def resolve_engine(name: str) -> str:
    """ "auto": SGLang where it is installed, transformers otherwise."""
    if name != "auto":
        return name
    return "sglang" if importlib.util.find_spec("sglang") is not None else "hf"


def held_out_prompts(source: Any, start_batch: int, n: int) -> list[list[int]]:
    """Up to `n` prompts from batch `start_batch` on: each sequence up to its first loss token (the user turn and
    assistant header)."""
    prompts: list[list[int]] = []
    for batch in itertools.islice(source(start_batch), 100):
        for i in range(batch.num_sequences):
            sl = batch.sequence(i)
            ids, mask = batch.input_ids[sl], batch.loss_mask[sl]
            first = int(mask.nonzero()[0]) if mask.any() else 0
            if first >= 4:
                prompts.append(ids[:first].tolist())
            if len(prompts) == n:
                return prompts
    return prompts
