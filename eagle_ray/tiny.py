"""Tiny targets built from a transformers config: for tests, demos and the laptop default run.

Nothing is downloaded: weights are random (seeded), written as a normal HF checkpoint that
both engines load like any other.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from eagle_ray.contract import PackedBatch

log = logging.getLogger(__name__)

# Where tiny targets built once (the job's default, the benchmarks') are kept between runs
CACHE_DIR = Path(os.environ.get("EAGLE_RAY_CACHE", Path.home() / ".cache" / "eagle_ray"))

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
# The target families users train drafts for, each as transformers' own config class plus the fields that make
# it that family at a tiny size (8 layers, H=64). What the real checkpoints carry beyond transformers' defaults
# is spelled out where an engine reads it (DeepSeek-V3's `moe_layer_freq`, `topk_method`, `scoring_func` and
# YaRN rope; gpt-oss's YaRN rope; Gemma-3's tied lm_head). tests/test_targets.py runs every one through both
# engines; the support matrix in docs/targets.md is what that test checks.
_YARN = dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0)
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {}),
    "phi3": ("Phi3Config", {"head_dim": None, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma3": (
        "Gemma3TextConfig",
        {"sliding_window": 8, "query_pre_attn_scalar": 16, "tie_word_embeddings": True, "pad_token_id": 0},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "deepseek_v3": (  # MLA (q and kv LoRA) + MoE with a shared expert and sigmoid top-k routing; layer 0 dense
        "DeepseekV3Config",
        {
            "head_dim": None,
            "num_key_value_heads": 4,
            "q_lora_rank": 48,
            "kv_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "moe_layer_freq": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "rope_parameters": dict(_YARN, rope_theta=10000.0, mscale=1.0, mscale_all_dim=1.0),
        },
    ),
    "gpt_oss": (  # attention sinks, alternating sliding-window layers, MoE
        "GptOssConfig",
        {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "rope_parameters": dict(_YARN, rope_theta=150000.0, truncate=False),
        },
    ),
    "llama4": (  # text-only Llama-4: chunked attention, NoPE layers, MoE on every second layer
        "Llama4TextConfig",
        {
            "intermediate_size_mlp": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": 16,
            "pad_token_id": 0,
        },
    ),
}


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny `arch` config (see TINY_ARCHS), with `overrides` applied last."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(TINY_ARCHS)}")
    cls, fields = TINY_ARCHS[arch]
    kwargs = {**TINY_SHAPE, **fields, **overrides}
    if kwargs.get("head_dim", 0) is None:  # families that derive it (Phi-3) or split it (MLA)
        del kwargs["head_dim"]
    return getattr(transformers, cls)(**kwargs)


def build_tiny_target(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised tiny `arch` causal LM (fp32) to `path`; return the path."""
    config = tiny_config(arch, **overrides)
    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def markov_sequences(
    num: int, length: int | tuple[int, int], vocab_size: int = 1024, peak: float = 0.9, seed: int = 0
) -> list[torch.Tensor]:
    """Text from a fixed first-order "language": each token has one likely successor (prob `peak`).

    The chain's successor map depends only on `vocab_size` (seed 1234), so every call speaks the same
    language; `seed` picks the samples. A target pretrained on it predicts peaked, context-dependent
    distributions: a draft can learn them, and acceptance means something.
    """
    succ = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    lo, hi = (length, length) if isinstance(length, int) else length
    out = []
    for _ in range(num):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        seq = torch.empty(n, dtype=torch.long)
        seq[0] = torch.randint(0, vocab_size, (1,), generator=g)
        noise = torch.rand(n, generator=g) >= peak
        rand = torch.randint(0, vocab_size, (n,), generator=g)
        for i in range(1, n):
            seq[i] = rand[i] if noise[i] else succ[seq[i - 1]]
        out.append(seq)
    return out


def markov_batches(
    num_batches: int, per_batch: int = 8, length: tuple[int, int] = (20, 60), seed: int = 2
) -> list[PackedBatch]:
    """`num_batches` packed batches of `markov_sequences`, every token in the loss."""
    seqs = markov_sequences(num_batches * per_batch, length, seed=seed)
    return [
        PackedBatch.from_sequences(seqs[i : i + per_batch], [torch.ones_like(s) for s in seqs[i : i + per_batch]])
        for i in range(0, len(seqs), per_batch)
    ]


def pretrain_tiny_target(
    path: str | Path,
    sequences: list[torch.Tensor],
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    on_step: Callable[[int, float], None] | None = None,
    head_vocab: int | None = None,
    schedule: bool = False,
) -> dict[str, float]:
    """Briefly train the causal LM at `path` on `sequences` (next-token loss) and save it in place.

    Done once: a `pretrained.json` marker records the losses, and a second call returns them.
    `on_step(step, loss)` is called after every step (progress). `schedule`: 20 warm-up steps, then a linear
    decay to a tenth of `lr`.

    `head_vocab`: train the lm_head on the `head_vocab` most frequent tokens of `sequences` only, and give every
    other token one shared row, trained as one class whose logit carries log(their count). Once saved with that
    row copied to each of them, the model's full-vocabulary softmax is exactly the one trained (the others share
    the lumped mass evenly), at the cost of `head_vocab` rows per token instead of the whole vocabulary: what
    makes a Qwen-vocabulary (152k) target trainable in minutes on a CPU.
    """
    import json
    import math

    marker = Path(path) / "pretrained.json"
    if marker.exists():
        return json.loads(marker.read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    head = model.get_output_embeddings().weight
    vocab = head.shape[0]
    params = list(model.parameters())
    if head_vocab is not None and head_vocab < vocab:
        counts = torch.bincount(torch.cat(sequences), minlength=vocab)
        kept = counts.argsort(descending=True)[:head_vocab].sort().values
        cls = torch.full((vocab,), head_vocab, dtype=torch.long)  # token -> training class; the rest: the shared one
        cls[kept] = torch.arange(head_vocab)
        shared = torch.nn.Parameter(head.detach().mean(0).clone())
        lumped = math.log(vocab - head_vocab)
        params.append(shared)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        if schedule:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        pick = torch.randint(0, len(sequences), (batch_size,), generator=g).tolist()
        batch = [sequences[i] for i in pick]
        width = max(s.numel() for s in batch)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, : s.numel()], labels[row, : s.numel()], mask[row, : s.numel()] = s, s, 1
        if head_vocab is None or head_vocab >= vocab:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            h = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            keep = mask[:, 1:].bool()
            hk = h[keep]
            logits = torch.cat([hk @ head[kept].T, hk @ shared[:, None] + lumped], 1)
            loss = torch.nn.functional.cross_entropy(logits, cls[ids[:, 1:][keep]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), losses[-1])
    if head_vocab is not None and head_vocab < vocab:
        with torch.no_grad():
            rest = torch.ones(vocab, dtype=torch.bool)
            rest[kept] = False
            head[rest] = shared
    model.save_pretrained(path)
    result = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / min(10, len(losses)), "steps": steps}
    marker.write_text(json.dumps(result))
    return result


def distinct_ngram_ratio(sequences: list[list[int]], n: int = 4) -> float:
    """Distinct n-grams over all n-grams of `sequences` (each counted within its sequence): 1 = no repeats."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def default_target(tokenizer: Any, records: int = 4000, steps: int = 700) -> str:
    """The job's default target: a tiny Qwen3 with the tokenizer's vocabulary, pretrained on ShareGPT text.

    Its lm_head trains on the 4,096 most frequent tokens plus one row the others share (`pretrain_tiny_target`):
    that is what buys the 700 steps (16 x 128 tokens each) that take its greedy text from "the the the" (distinct
    4-gram ratio 0.001, 80 full-vocabulary steps) to about 0.17 (docs/fidelity.md). Built once per shape/tokenizer and
    cached under CACHE_DIR (about 3 minutes on 2 cores), showing its progress: a bar on a terminal, a line
    every 70 steps in job logs.
    """
    vocab = -(-tokenizer.vocab_size // 64) * 64
    path = CACHE_DIR / f"tiny-qwen3-sharegpt-v{vocab}-h64-l8-k4096-s{steps}"
    if (path / "pretrained.json").exists():
        return str(path)
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # two jobs (or test processes) starting at once on a fresh machine: one builds, the other waits for it
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if not (path / "pretrained.json").exists():
            _build_default_target(tokenizer, path, vocab, records, steps)
    return str(path)


def _build_default_target(tokenizer: Any, path: Path, vocab: int, records: int, steps: int) -> None:
    from eagle_ray.data import iter_texts

    log.info("building the default tiny target once (cached in %s): pretraining on ShareGPT text", path)
    chunks: list[torch.Tensor] = []
    for text in iter_texts(max_records=records):
        ids = tokenizer.encode(text)
        chunks += [torch.tensor(ids[i : i + 128]) for i in range(0, len(ids) - 16, 128)]
    tmp = path.with_name(path.name + ".partial")
    build_tiny_target(tmp, "qwen3", vocab_size=vocab, max_position_embeddings=4096)
    with _progress(steps, "tiny target") as on_step:
        stats = pretrain_tiny_target(
            tmp, chunks, steps=steps, batch_size=16, lr=8e-3, on_step=on_step, head_vocab=4096, schedule=True
        )
    log.info("tiny target pretrained: loss %.2f -> %.2f", stats["first_loss"], stats["last_loss"])
    tmp.rename(path)


class _progress:
    """`on_step` for a long loop: a tqdm bar on a terminal, else a log line every tenth of the way."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.bar = total, what, None
        self.every = max(1, total // 10)

    def __enter__(self) -> Callable[[int, float], None]:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, unit="step")
        return self.step

    def step(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.2f}")
        elif n % self.every == 0 or n == self.total:
            log.info("%s: step %d/%d loss %.2f", self.what, n, self.total, loss)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
