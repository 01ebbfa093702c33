"""Single-target API, compatible with NeMo AutoModel's EAGLE-3 target backends.

`HFEagle3TargetModel` and `SGLangEagle3TargetModel` wrap an engine behind the same
surface: the NeMo-style padded `generate_batch`, the packed fast path `forward_packed`,
`get_input_embeddings()` and `get_lm_head_weight()`. Input is validated here, at the
boundary, before any engine sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eagle_ray.contract import (
    ModelInfo,
    PackedBatch,
    Supervision,
    pack_padded,
    shift_left_rows,
    unpack_to_padded,
    validate_packed,
)
from eagle_ray.engines.base import TargetEngine


@dataclass
class Eagle3TargetBatch:
    """NeMo AutoModel's padded, shifted supervision batch.

    `aux_hidden_states [B,S,3H]` unshifted; `input_ids`, `loss_mask` and `logits [B,S,V]`
    shifted left by one per row, zero-filled; `attention_mask` unchanged. Pad positions of
    aux and logits are zero (pad tokens are never run).
    """

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor


def generate_padded(
    forward_packed: Callable[[PackedBatch, bool], Supervision],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> Eagle3TargetBatch:
    """The padded `generate_batch` on top of any packed forward (a single target or a pool)."""
    packed = pack_padded(input_ids, attention_mask, loss_mask)
    sup = forward_packed(packed, True)
    device = input_ids.device
    loss_mask = attention_mask if loss_mask is None else loss_mask
    return Eagle3TargetBatch(
        aux_hidden_states=unpack_to_padded(sup.aux_hidden_states, attention_mask).to(device),
        input_ids=shift_left_rows(input_ids),
        attention_mask=attention_mask,
        loss_mask=shift_left_rows(loss_mask),
        logits=shift_left_rows(unpack_to_padded(sup.logits, attention_mask)).to(device),
    )


class Eagle3TargetModel:
    """An EAGLE-3 target: validates input, runs its engine, speaks the supervision contract."""

    def __init__(self, engine: TargetEngine):
        self.engine = engine

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        """The fast path: packed ragged batch in, unshifted aux + last hidden (+ logits) out."""
        batch = validate_packed(batch, self.info.vocab_size, self.info.max_context)
        return self.engine.forward(batch, return_logits)

    def generate_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> Eagle3TargetBatch:
        """NeMo-compatible: padded `[B, S]` in, shifted padded batch with full logits out."""
        return generate_padded(self.forward_packed, input_ids, attention_mask, loss_mask)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The target's input embedding as a frozen `nn.Embedding` (`.weight` is `[V, H]`)."""
        return torch.nn.Embedding.from_pretrained(self.engine.input_embeddings(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        """The target's lm_head weight `[V, H]` (the trainer computes teacher logits with it)."""
        return self.engine.lm_head_weight()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Eagle3TargetModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HFEagle3TargetModel(Eagle3TargetModel):
    """EAGLE-3 target on transformers (the reference engine)."""

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ) -> HFEagle3TargetModel:
        from eagle_ray.engines.hf import HFEngine

        return cls(HFEngine(model_path, aux_layer_ids, dtype, trust_remote_code, **engine_kwargs))


class SGLangEagle3TargetModel(Eagle3TargetModel):
    """EAGLE-3 target on an in-process SGLang runner (the fast path); `tp_size` ranks."""

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        tp_size: int = 1,
        trust_remote_code: bool = False,
        sglang_kwargs: dict[str, Any] | None = None,
    ) -> SGLangEagle3TargetModel:
        from eagle_ray.engines.sglang import SGLangEngine

        return cls(SGLangEngine(model_path, aux_layer_ids, dtype, tp_size, trust_remote_code, sglang_kwargs))


def load_target(engine: str, model_path: str, **kwargs: Any) -> Eagle3TargetModel:
    """Build a target by engine name ("sglang" or "hf")."""
    classes = {"sglang": SGLangEagle3TargetModel, "hf": HFEagle3TargetModel}
    if engine not in classes:
        raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(classes)}")
    return classes[engine].from_pretrained(model_path, **kwargs)
