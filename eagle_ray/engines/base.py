"""The engine protocol: what every target engine (transformers, SGLang) offers the layers above."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, plan_runs


class UnsupportedTargetError(ValueError):
    """An engine cannot run this model here. Raised when the target is built, before any batch.

    The message names the model, what the engine would need (attention backend, kernel,
    device) and what to use instead.
    """


class TargetEngine(Protocol):
    """One target model instance. `forward` takes a batch already validated against `info`."""

    info: ModelInfo

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> Supervision: ...

    def input_embeddings(self) -> torch.Tensor: ...

    def lm_head_weight(self) -> torch.Tensor: ...

    def close(self) -> None: ...


RunFn = Callable[[PackedBatch, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def forward_in_runs(
    batch: PackedBatch,
    return_logits: bool,
    run: RunFn,
    max_tokens: int,
    max_sequences: int | None = None,
    padded: bool = False,
) -> Supervision:
    """Split a batch into runs that fit one forward, run each, and join the supervision.

    `run(sub_batch, return_logits)` returns (aux, last hidden, logits | None) for its tokens.
    """
    parts = []
    for start, stop in plan_runs(batch.seqlens, max_tokens, max_sequences, padded):
        sub = batch.select(start, stop)
        parts.append(Supervision(sub.input_ids, sub.loss_mask, sub.cu_seqlens, *run(sub, return_logits)))
    return Supervision.concat(parts)
