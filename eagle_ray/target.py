"""Single-target API: NeMo AutoModel 0.7's `Eagle3TargetBackend` surface, and the packed fast path.

`HFEagle3TargetModel` and `SGLangEagle3TargetModel` wrap an engine behind the same surface:
NeMo's `generate_batch` (padded or packed rows), `generate_batch_async`, `set_vocab_mapping`,
`close` and `Eagle3TargetBatch` (all in `NeMoSurface`, which the pool and its clients share),
the packed `forward_packed`, `get_input_embeddings()` and `get_lm_head_weight()`. Input is
validated here, at the boundary, before any engine sees it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

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
    """NeMo AutoModel 0.7's padded, shifted supervision batch (its fields, validation and
    `to_trainer_inputs`), so `Eagle3TrainerModule(**batch.to_trainer_inputs())` takes it as is.

    `aux_hidden_states [B,S,3H]` unshifted; `input_ids`, `loss_mask` and the teacher shifted left
    by one per row, zero-filled (per row, as NeMo does: in a packed row the slot before a document
    boundary holds the next document's first token, which the trainer masks by `doc_remaining`);
    `attention_mask` and the packing fields unchanged. The teacher is exactly one of `logits
    [B,S,V]` (full vocabulary) or, once a vocab mapping is set, `target_probs [B,S,V_draft]` (fp32)
    with `position_mask [B,S,1]` (bool). Pad positions of aux and logits are zero (pads never run).
    """

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    position_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    def __post_init__(self) -> None:
        has_logits = self.logits is not None
        has_precomputed = self.target_probs is not None and self.position_mask is not None
        if has_logits == has_precomputed:
            raise ValueError(
                "Eagle3TargetBatch requires exactly one supervision source: either `logits` (full-vocab, "
                "projected trainer-side) or both `target_probs` and `position_mask` (over the draft vocab)."
            )

    def to_trainer_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for NeMo's `Eagle3TrainerModule.forward`, for whichever encoding this carries."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
            "aux_hidden_states": self.aux_hidden_states,
        }
        if self.logits is not None:
            inputs["target_logits"] = self.logits
        else:
            inputs["target_probs"] = self.target_probs
            inputs["position_mask"] = self.position_mask
        if self.seq_lens is not None:
            inputs["position_ids"] = self.position_ids
            inputs["seq_lens"] = self.seq_lens
            inputs["doc_remaining"] = self.doc_remaining
        return inputs


@dataclass(frozen=True)
class VocabMapping:
    """NeMo's draft vocabulary: `selected_token_ids [V_draft]` (target ids, in draft order) and
    `selected_token_mask [V]` (True on those ids)."""

    selected_token_ids: torch.Tensor
    selected_token_mask: torch.Tensor

    @staticmethod
    def checked(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> VocabMapping:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.is_floating_point() or ids.numel() == 0:
            raise ValueError(f"selected_token_ids must be a non-empty 1-D integer tensor, got {ids!r}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(
                f"selected_token_ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        if not isinstance(mask, torch.Tensor) or mask.shape != (vocab_size,):
            raise ValueError(f"selected_token_mask must be a [{vocab_size}] tensor, got {getattr(mask, 'shape', mask)}")
        mask = mask.bool()
        if int(mask.sum()) != ids.numel() or not bool(mask[ids].all()):
            raise ValueError("selected_token_mask must be True exactly on selected_token_ids")
        return VocabMapping(ids.long().cpu(), mask.cpu())


# the teacher is computed in chunks of this many tokens: [chunk, V] logits at a time, not [N, V]
_TEACHER_CHUNK = 4096


def target_distribution(
    logits: torch.Tensor, mapping: VocabMapping, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's `_compute_target_distribution`, exactly: supervise a slot only where the target's
    full-vocabulary argmax is in the draft vocabulary; probabilities renormalised over it, fp32."""
    ids = mapping.selected_token_ids.to(logits.device)
    top = logits.argmax(dim=-1)
    position_mask = (mapping.selected_token_mask.to(logits.device)[top] & loss_mask.bool()).unsqueeze(-1)
    target_probs = torch.softmax(logits.index_select(dim=-1, index=ids).float(), dim=-1).detach()
    return target_probs, position_mask


@dataclass
class _Request:
    """A padded request, validated and packed; what comes back is finished into a batch by `_finish`."""

    packed: PackedBatch
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None
    seq_lens: torch.Tensor | None
    doc_remaining: torch.Tensor | None


def _prepare(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    doc_remaining: torch.Tensor | None,
    info: ModelInfo,
) -> _Request:
    packed = pack_padded(input_ids, attention_mask, loss_mask, seq_lens, position_ids)
    packed = validate_packed(packed, info.vocab_size, info.max_context)  # here, before anything is sent
    loss_mask = attention_mask if loss_mask is None else loss_mask
    return _Request(packed, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining)


def _finish(req: _Request, sup: Supervision, lm_head: torch.Tensor, mapping: VocabMapping | None) -> Eagle3TargetBatch:
    """The teacher from the shipped last hidden states and the target's lm_head, on the caller's device."""
    device, attn = req.input_ids.device, req.attention_mask
    last = unpack_to_padded(sup.last_hidden_states.to(device), attn)
    last = shift_left_rows(last)  # slot t: the target's state at t + 1, whose logits predict t + 2
    loss_mask = shift_left_rows(req.loss_mask)
    head = lm_head.to(device=device, dtype=last.dtype)
    teacher: dict[str, torch.Tensor] = {}
    if mapping is None:
        teacher["logits"] = last @ head.T  # zero where `last` is: each row's last slot, pads
    else:
        rows = zip(last.flatten(0, 1).split(_TEACHER_CHUNK), loss_mask.flatten().split(_TEACHER_CHUNK), strict=True)
        parts = [target_distribution(h @ head.T, mapping, m) for h, m in rows]
        B, S = attn.shape
        teacher["target_probs"] = torch.cat([p for p, _ in parts]).view(B, S, -1)
        teacher["position_mask"] = torch.cat([m for _, m in parts]).view(B, S, 1)
    return Eagle3TargetBatch(
        aux_hidden_states=unpack_to_padded(sup.aux_hidden_states, attn.cpu()).to(device),
        input_ids=shift_left_rows(req.input_ids),
        attention_mask=attn,
        loss_mask=loss_mask,
        position_ids=req.position_ids,
        seq_lens=req.seq_lens,
        doc_remaining=req.doc_remaining,
        **teacher,
    )


class NeMoSurface:
    """NeMo AutoModel 0.7's `Eagle3TargetBackend`, on top of `forward_packed` and the lm_head.

    Shared by the single targets, the pool and a pool's clients. Only aux and last hidden states
    are shipped (8H bytes per token in bf16); the teacher, full logits or the draft-vocab
    encoding, is computed by the caller, on the device of its `input_ids`.
    """

    supports_async = True
    _async_workers = 1  # requests in flight at once through generate_batch_async
    _vocab_mapping: VocabMapping | None = None
    _executor: ThreadPoolExecutor | None = None

    info: ModelInfo

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        raise NotImplementedError

    def _forward_validated(self, batch: PackedBatch) -> Supervision:
        """`forward_packed` of a batch `_prepare` has validated already; a target may skip checking it again."""
        return self.forward_packed(batch)

    def get_lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def set_vocab_mapping(
        self, selected_token_ids: torch.Tensor | None, selected_token_mask: torch.Tensor | None
    ) -> None:
        """From now on batches carry `target_probs` + `position_mask` over this draft vocabulary
        (NeMo's precomputed encoding) instead of full logits; `None, None` goes back to logits."""
        if selected_token_ids is None and selected_token_mask is None:
            self._vocab_mapping = None
            return
        self._vocab_mapping = VocabMapping.checked(selected_token_ids, selected_token_mask, self.info.vocab_size)

    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Eagle3TargetBatch:
        """NeMo-compatible: padded `[B, S]` in (rows may pack documents: `seq_lens`), shifted batch out."""
        return self.generate_batch_async(
            input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
        ).result()

    def generate_batch_async(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Future[Eagle3TargetBatch]:
        """Send the request now (bad input raises here); `.result()` gives the batch."""
        req = _prepare(input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining, self.info)
        mapping, head = self._vocab_mapping, self.get_lm_head_weight()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._async_workers, thread_name_prefix="eagle_ray-generate")
        return self._executor.submit(lambda: _finish(req, self._forward_validated(req.packed), head, mapping))

    def _close_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Eagle3TargetModel(NeMoSurface):
    """An EAGLE-3 target: validates input, runs its engine, speaks the supervision contract."""

    def __init__(self, engine: TargetEngine):
        self.engine = engine
        self._engine_lock = threading.Lock()  # generate_batch_async runs it from a thread of its own

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        """The fast path: packed ragged batch in, unshifted aux + last hidden (+ logits) out."""
        return self._forward_validated(
            validate_packed(batch, self.info.vocab_size, self.info.max_context), return_logits
        )

    def _forward_validated(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        with self._engine_lock:
            return self.engine.forward(batch, return_logits)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The target's input embedding as a frozen `nn.Embedding` (`.weight` is `[V, H]`)."""
        return torch.nn.Embedding.from_pretrained(self.engine.input_embeddings(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        """The target's lm_head weight `[V, H]` (the trainer computes teacher logits with it)."""
        return self.engine.lm_head_weight()

    def close(self) -> None:
        self._close_executor()
        self.engine.close()


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


ENGINES = ("sglang", "hf")  # what users choose from
# benchmark tools, never offered to users: name -> "module:class" with a `from_pretrained`
_BENCH_ENGINES = {"synthetic": "eagle_ray.testing.synthetic:SyntheticTarget"}


def check_engine(engine: str) -> None:
    if engine not in ENGINES and engine not in _BENCH_ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")


def load_target(engine: str, model_path: str, **kwargs: Any) -> Eagle3TargetModel:
    """Build a target by engine name ("sglang" or "hf")."""
    check_engine(engine)
    if engine in _BENCH_ENGINES:
        import importlib

        module, name = _BENCH_ENGINES[engine].split(":")
        return getattr(importlib.import_module(module), name).from_pretrained(model_path, **kwargs)
    classes = {"sglang": SGLangEagle3TargetModel, "hf": HFEagle3TargetModel}
    return classes[engine].from_pretrained(model_path, **kwargs)
