"""Bytes shipped per token: EAGLE-3 supervision (3 aux + last hidden) vs the full logits, for real target
shapes, and measured on the tiny target through a real pool.

The formula is `ModelInfo.bytes_per_token` (4H values in the target dtype = 8H bytes in bf16), plus the
token id and loss mask that travel with every token.
"""

from __future__ import annotations

import torch

from eagle_ray.contract import ModelInfo, PackedBatch

# (hidden_size, vocab_size, num_layers) from each model's config.json
SHAPES = {
    "Llama-3.1-8B": (4096, 128256, 32),
    "Qwen3-8B": (4096, 151936, 36),
    "Llama-3.3-70B": (8192, 128256, 80),
}
ID_AND_MASK_BYTES = 8 + 8  # int64 token id and loss mask per token (what PackedBatch carries)


def _info(hidden: int, vocab: int, layers: int, dtype: torch.dtype) -> ModelInfo:
    return ModelInfo(hidden, vocab, layers, (1, layers // 2 - 1, layers - 4), dtype, 0, 0)


def formula_rows() -> list[dict]:
    rows = []
    for name, (h, v, layers) in SHAPES.items():
        shipped = _info(h, v, layers, torch.bfloat16).bytes_per_token + ID_AND_MASK_BYTES
        logits = v * 2  # full-vocabulary logits, bf16
        rows.append(
            {
                "name": f"bytes/token {name} (H={h}, V={v}): logits / shipped",
                "ratio_median": logits / shipped,
                "ratio_min": logits / shipped,
                "ratio_max": logits / shipped,
                "repeats": 1,
                "shipped B/token": shipped,
                "8H": 8 * h,
                "logits bf16 B/token": logits,
                "shipped GB per 1M tokens": shipped * 1e6 / 1e9,
            }
        )
    return rows


def measured_row(pool, batch: PackedBatch) -> dict:
    """What actually reaches a consumer through the pool, per token, against 8H (a bf16 target)."""
    import ray

    info = pool.info
    results = pool.submit(batch)
    sups = ray.get([r.ref for r in results])
    tokens = sum(s.num_tokens for s in sups)
    hidden = sum(s.aux_hidden_states.nbytes + s.last_hidden_states.nbytes for s in sups) / tokens
    dtype = str(sups[0].aux_hidden_states.dtype).removeprefix("torch.")
    ratio = hidden / (8 * info.hidden_size)
    return {
        "name": f"bytes/token tiny target (H={info.hidden_size}, {dtype}): measured hidden / 8H",
        "ratio_median": ratio,
        "ratio_min": ratio,
        "ratio_max": ratio,
        "repeats": 1,
        "goal": 1.0,
        "goal_is": "at most",
        "meets_goal": ratio <= 1.0,
        "measured hidden B/token": hidden,
        "measured total B/token": sum(s.nbytes for s in sups) / tokens,  # + ids, mask, cu_seqlens
        "8H": 8 * info.hidden_size,
    }
