"""The EAGLE-3 supervision contract, shared by every engine, the pool and the trainer.

Pure torch: imports neither Ray nor SGLang, so everything that produces or consumes
supervision agrees by construction. Holds the packed ragged batch, the supervision
record, the model facts an engine reports, the aux-layer convention, the per-sequence
shift, and input validation with one specific error per kind of bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# ---------------------------------------------------------------------------------------------
# Errors


class InvalidBatchError(ValueError):
    """Bad input, rejected before any engine sees it.

    `code` says which rule was broken (one of `ERROR_CODES`); `sequence` is the index of
    the offending sequence (row of a padded batch), or None when the batch as a whole is bad.
    """

    def __init__(self, code: str, message: str, sequence: int | None = None):
        assert code in ERROR_CODES, code
        self.code = code
        self.sequence = sequence
        where = f"sequence {sequence}: " if sequence is not None else ""
        super().__init__(f"[{code}] {where}{message}")


ERROR_CODES = (
    "empty_batch",
    "empty_sequence",
    "token_out_of_range",
    "loss_mask_length",
    "sequence_too_long",
    "bad_tensor",  # wrong type, dtype, rank or values
    "bad_cu_seqlens",
    "bad_attention_mask",
    "bad_packing",  # seq_lens / position_ids of packed rows (several documents per row)
)

# ---------------------------------------------------------------------------------------------
# Aux layers: "output of decoder layer i" convention (hidden_states[i + 1] in transformers).


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high layers, as SpecForge and NeMo AutoModel pick them."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def resolve_aux_layer_ids(aux_layer_ids: list[int] | tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Default or validate aux ids: exactly three increasing ints in [0, num_layers - 1)."""
    explicit = aux_layer_ids is not None
    ids = list(aux_layer_ids) if explicit else default_aux_layer_ids(num_layers)
    origin = "aux_layer_ids" if explicit else f"the default aux_layer_ids for {num_layers} layers"
    if len(ids) != 3:
        raise ValueError(f"{origin} must hold exactly 3 layer ids, got {len(ids)}: {ids}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{origin} must be ints, got {ids}")
    hint = "" if explicit else "; pass aux_layer_ids explicitly (the default needs a target of >= 7 layers)"
    if len(set(ids)) != 3:
        raise ValueError(f"{origin} must be distinct, got {ids}{hint}")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{origin} {ids}: {bad} outside [0, {num_layers}) for a {num_layers}-layer target{hint}")
    if num_layers - 1 in ids:
        # refused on every engine, so all agree: SGLang captures "the input of layer i + 1", and there is no layer L
        raise ValueError(
            f"{origin} {ids}: id {num_layers - 1}, the output of the last of {num_layers} layers, is not "
            f"supported: SGLang captures aux states as the input of the next layer, and layer {num_layers} does not "
            f"exist. Pick ids in [0, {num_layers - 1}); the final state ships anyway, normed, as last_hidden_states"
        )
    if ids != sorted(ids):
        # SGLang concatenates aux states in layer order, whatever order the ids came in: HF would disagree
        raise ValueError(f"{origin} must be increasing, got {ids}: aux states are concatenated in layer order")
    return ids


def vllm_aux_layer_ids(aux_layer_ids: list[int] | tuple[int, ...]) -> list[int]:
    """Our aux ids in vLLM 0.33's and speculators 0.9's convention: each id + 1.

    Ours (and SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids`, which adds the 1 itself):
    id i = the output of decoder layer i. vLLM and speculators read a top-level
    `eagle_aux_hidden_state_layer_ids` as hidden-state indices: id j = the residual stream entering
    layer j, before the final norm when j = num_layers, i.e. the output of layer j - 1. So our default
    `[1, L//2 - 1, L - 4]` is their default `[2, L//2, L - 3]`; any other ids would be off by one if
    copied as they are. The one place this translation is written: every export goes through it.
    """
    return [int(i) + 1 for i in aux_layer_ids]


# ---------------------------------------------------------------------------------------------
# Model facts


@dataclass(frozen=True)
class ModelInfo:
    """What a target reports once: enough for the pool to shard and the trainer to build a draft."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    aux_layer_ids: tuple[int, ...]
    dtype: torch.dtype
    max_context: int  # longest sequence one forward accepts
    kv_capacity_tokens: int  # tokens one forward can hold; larger batches are split by the engine

    @property
    def bytes_per_token(self) -> int:
        """Bytes shipped per token: aux (3H) + last hidden (H) in the target dtype."""
        return 4 * self.hidden_size * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------
# The packed batch


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


@dataclass(frozen=True)
class PackedBatch:
    """Ragged sequences packed end to end: `input_ids [N]`, `loss_mask [N]`, `cu_seqlens [B+1]`.

    Never padded for compute. Build with `PackedBatch.from_sequences` (validates each
    sequence) or directly from tensors and call `validate_packed`.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seqlens(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    def sequence(self, i: int) -> slice:
        return slice(int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1]))

    def select(self, start: int, stop: int) -> PackedBatch:
        """Sequences [start, stop) as their own batch (views, no copies of token data)."""
        lo, hi = int(self.cu_seqlens[start]), int(self.cu_seqlens[stop])
        return PackedBatch(self.input_ids[lo:hi], self.loss_mask[lo:hi], self.cu_seqlens[start : stop + 1] - lo)

    @staticmethod
    def from_sequences(
        input_ids: list[list[int]] | list[torch.Tensor],
        loss_masks: list[list[int]] | list[torch.Tensor] | None = None,
    ) -> PackedBatch:
        """Pack per-sequence ids (and loss masks; default all ones), naming the bad sequence if any."""
        if len(input_ids) == 0:
            raise InvalidBatchError("empty_batch", "the batch holds no sequences")
        if loss_masks is not None and len(loss_masks) != len(input_ids):
            raise InvalidBatchError("loss_mask_length", f"{len(loss_masks)} loss masks for {len(input_ids)} sequences")
        ids, masks = [], []
        for i, seq in enumerate(input_ids):
            t = torch.as_tensor(seq)
            if t.ndim != 1:
                raise InvalidBatchError("bad_tensor", f"input_ids must be 1-D, got shape {tuple(t.shape)}", i)
            if t.numel() == 0:
                raise InvalidBatchError("empty_sequence", "input_ids is empty", i)
            if not _is_int(t):
                raise InvalidBatchError("bad_tensor", f"input_ids must be integers, got {t.dtype}", i)
            m = torch.ones_like(t) if loss_masks is None else torch.as_tensor(loss_masks[i])
            if m.ndim != 1 or m.numel() != t.numel():
                raise InvalidBatchError(
                    "loss_mask_length", f"loss_mask has shape {tuple(m.shape)}, input_ids has {t.numel()} tokens", i
                )
            if not (_is_int(m) or m.dtype == torch.bool):
                raise InvalidBatchError("bad_tensor", f"loss_mask must be bool or integers, got {m.dtype}", i)
            ids.append(t.to(torch.long))
            masks.append(m.to(torch.long))
        cu = torch.zeros(len(ids) + 1, dtype=torch.long)
        cu[1:] = torch.tensor([t.numel() for t in ids]).cumsum(0)
        return PackedBatch(torch.cat(ids), torch.cat(masks), cu)


def validate_packed(batch: PackedBatch, vocab_size: int, max_seq_len: int | None = None) -> PackedBatch:
    """Check a packed batch against the contract; return it with canonical dtypes (long).

    Raises InvalidBatchError with the code of the first rule broken, naming the sequence.
    """
    for name in ("input_ids", "loss_mask", "cu_seqlens"):
        t = getattr(batch, name)
        if not isinstance(t, torch.Tensor):
            raise InvalidBatchError("bad_tensor", f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 1:
            raise InvalidBatchError("bad_tensor", f"{name} must be 1-D, got shape {tuple(t.shape)}")
    ids, mask, cu = batch.input_ids, batch.loss_mask, batch.cu_seqlens
    if not _is_int(ids):
        raise InvalidBatchError("bad_tensor", f"input_ids must be an integer tensor, got {ids.dtype}")
    if not _is_int(cu):
        raise InvalidBatchError("bad_tensor", f"cu_seqlens must be an integer tensor, got {cu.dtype}")
    if not (_is_int(mask) or mask.dtype == torch.bool):
        raise InvalidBatchError("bad_tensor", f"loss_mask must be a bool or integer tensor, got {mask.dtype}")
    # Check and ship int64 with unit stride. In a narrow or unsigned dtype comparisons wrap (uint8
    # `ids >= 1024` is all true, a uint8 cu_seqlens.diff() is never negative) and torch lacks most ops for
    # uint16/32/64. And one element of a strided or expanded view counts as contiguous yet keeps its stride,
    # which Ray's zero-copy tensor serializer cannot store: the replica's result for it would be an error.
    ids, mask, cu = (
        t.to(torch.long, copy=t.stride() != (1,), memory_format=torch.contiguous_format) for t in (ids, mask, cu)
    )
    if cu.numel() < 2 or ids.numel() == 0:
        raise InvalidBatchError("empty_batch", "the batch holds no tokens")
    if int(cu[0]) != 0:
        raise InvalidBatchError("bad_cu_seqlens", f"cu_seqlens must start at 0, got {int(cu[0])}")
    lens = cu.diff()
    if (lens < 0).any():
        i = int((lens < 0).nonzero()[0])
        raise InvalidBatchError("bad_cu_seqlens", f"cu_seqlens decreases ({int(cu[i])} -> {int(cu[i + 1])})", i)
    if int(cu[-1]) != ids.numel():
        raise InvalidBatchError(
            "bad_cu_seqlens", f"cu_seqlens ends at {int(cu[-1])} but input_ids holds {ids.numel()} tokens"
        )
    if (lens == 0).any():
        raise InvalidBatchError("empty_sequence", "sequence has no tokens", int((lens == 0).nonzero()[0]))
    if mask.numel() != ids.numel():
        # name the first sequence the mask does not cover exactly
        # shorter: the sequence holding position mask.numel(); longer: the last sequence
        i = min(int(torch.searchsorted(cu[1:], mask.numel(), right=True)), lens.numel() - 1)
        raise InvalidBatchError(
            "loss_mask_length", f"loss_mask holds {mask.numel()} tokens but input_ids holds {ids.numel()}", i
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = int(bad.nonzero()[0])
        i = int(torch.searchsorted(cu[1:], pos, right=True))
        raise InvalidBatchError(
            "token_out_of_range",
            f"token {int(ids[pos])} at position {pos - int(cu[i])} is outside [0, {vocab_size})",
            i,
        )
    if ((mask != 0) & (mask != 1)).any():
        pos = int(((mask != 0) & (mask != 1)).nonzero()[0])
        i = int(torch.searchsorted(cu[1:], pos, right=True))
        raise InvalidBatchError("bad_tensor", f"loss_mask value {int(mask[pos])} is not 0 or 1", i)
    if max_seq_len is not None and (lens > max_seq_len).any():
        i = int((lens > max_seq_len).nonzero()[0])
        raise InvalidBatchError(
            "sequence_too_long", f"{int(lens[i])} tokens exceed the target's context of {max_seq_len}", i
        )
    return PackedBatch(ids, mask, cu)


# ---------------------------------------------------------------------------------------------
# Padded [B, S] batches (NeMo AutoModel's generate_batch surface) <-> packed


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> PackedBatch:
    """Drop the padding of a [B, S] batch. Each row's attention mask must be one contiguous run
    of ones (left or right padding); pad tokens never reach the engine.

    Packed rows (NeMo AutoModel's packing): `seq_lens [B, D]` holds each row's document lengths,
    zero-padded, the row's padding folded into its last document, so each row sums to S. Each
    document becomes a sequence of its own (it attends only within itself); `position_ids`, when
    given, must restart at 0 in each document, as NeMo's packer writes them.
    """
    if attention_mask is None:
        raise InvalidBatchError("bad_attention_mask", "attention_mask is required (ones on real tokens)")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise InvalidBatchError("bad_tensor", f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise InvalidBatchError("bad_tensor", f"{name} must be [batch, seq], got shape {tuple(t.shape)}")
    if not _is_int(input_ids):
        raise InvalidBatchError("bad_tensor", f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InvalidBatchError("empty_batch", f"input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise InvalidBatchError(
            "bad_attention_mask",
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}",
        )
    if not (_is_int(attention_mask) or attention_mask.dtype == torch.bool) or bool(
        ((attention_mask != 0) & (attention_mask != 1)).any()
    ):
        raise InvalidBatchError("bad_attention_mask", "attention_mask must hold only 0 and 1 (bool or integers)")
    if loss_mask is None:
        loss_mask = attention_mask
    if loss_mask.shape != input_ids.shape:
        raise InvalidBatchError(
            "loss_mask_length", f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    keep = attention_mask.bool()
    lens = keep.sum(1)
    for b in range(keep.shape[0]):
        if int(lens[b]) == 0:
            raise InvalidBatchError("empty_sequence", "attention_mask has no ones", b)
        on = keep[b].nonzero()
        if int(on[-1]) - int(on[0]) + 1 != int(lens[b]):
            raise InvalidBatchError("bad_attention_mask", "attention_mask is not one contiguous run of ones", b)
    if seq_lens is not None:
        lens = _document_lengths(keep, seq_lens, position_ids)
    cu = torch.zeros(len(lens) + 1, dtype=torch.long)
    cu[1:] = lens.cumsum(0)
    return PackedBatch(input_ids[keep], loss_mask[keep], cu)


def _document_lengths(keep: torch.Tensor, seq_lens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Real tokens per document, row by row, for packed rows: the packed batch's sequence lengths."""
    B, S = keep.shape
    if not isinstance(seq_lens, torch.Tensor) or not _is_int(seq_lens) or seq_lens.ndim != 2:
        raise InvalidBatchError(
            "bad_packing", f"seq_lens must be an integer [batch, max_docs] tensor, got {seq_lens!r}"
        )
    if seq_lens.shape[0] != B or bool((seq_lens < 0).any()):
        raise InvalidBatchError("bad_packing", f"seq_lens {tuple(seq_lens.shape)} must be [{B}, max_docs], >= 0")
    sums = seq_lens.sum(1)
    if bool((sums != S).any()):
        b = int((sums != S).nonzero()[0])
        raise InvalidBatchError("bad_packing", f"seq_lens sum to {int(sums[b])}, not the row length {S}", b)
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.shape != (B, S)):
        raise InvalidBatchError("bad_packing", f"position_ids must be a [{B}, {S}] tensor like input_ids")
    out = []
    for b in range(B):
        start = 0
        for n in seq_lens[b].tolist():
            if n == 0:
                continue
            real = int(keep[b, start : start + n].sum())
            if real == 0:
                raise InvalidBatchError(
                    "empty_sequence", f"a document of seq_lens {seq_lens[b].tolist()} is all padding", b
                )
            if position_ids is not None:
                pos = position_ids[b, start : start + n][keep[b, start : start + n]]
                if not torch.equal(pos.long(), torch.arange(real)):
                    raise InvalidBatchError(
                        "bad_packing", f"position_ids of a document must be 0..{real - 1}, got {pos.tolist()[:8]}...", b
                    )
            out.append(real)
            start += n
    return torch.tensor(out, dtype=torch.long)


def unpack_to_padded(packed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scatter packed rows [N, ...] back to [B, S, ...]; padding positions are zero."""
    out = packed.new_zeros(*attention_mask.shape, *packed.shape[1:])
    out[attention_mask.bool()] = packed
    return out


# ---------------------------------------------------------------------------------------------
# The shift: slot t holds token t's aux state and the targets of position t + 1.


def shift_left(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """out[t] = x[t + 1] within each sequence; each sequence's last slot is zero.

    Never crosses a sequence boundary. Used for ids, loss masks, logits and last hidden states.
    """
    out = torch.zeros_like(x)
    out[:-1] = x[1:]
    out[cu_seqlens[1:] - 1] = 0
    return out


def shift_left_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise shift of a padded [B, S, ...] tensor, zero-filled: NeMo AutoModel's convention."""
    b, s = x.shape[:2]
    cu = torch.arange(0, b * s + 1, s)
    return shift_left(x.reshape(b * s, *x.shape[2:]), cu).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# The supervision record


@dataclass
class Supervision:
    """What a target returns for one packed batch, unshifted (apply `shifted()` to train).

    `aux_hidden_states [N, 3H]`: residual stream after each aux layer, concatenated low→high.
    `last_hidden_states [N, H]`: final-norm output, what the lm_head consumes.
    `logits [N, V]`: only when asked for; the trainer normally applies the lm_head itself.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    aux_hidden_states: torch.Tensor
    last_hidden_states: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if (t := getattr(self, f.name)) is not None)

    def shifted(self) -> Supervision:
        """Training view: ids, loss mask, last hidden and logits of slot t come from t + 1."""
        cu = self.cu_seqlens
        return replace(
            self,
            input_ids=shift_left(self.input_ids, cu),
            loss_mask=shift_left(self.loss_mask, cu),
            last_hidden_states=shift_left(self.last_hidden_states, cu),
            logits=None if self.logits is None else shift_left(self.logits, cu),
        )

    @staticmethod
    def concat(parts: list[Supervision]) -> Supervision:
        """Join supervision of consecutive sub-batches into one record."""
        if len(parts) == 1:
            return parts[0]
        offsets = torch.tensor([0] + [p.num_tokens for p in parts[:-1]]).cumsum(0)
        cu = torch.cat([parts[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + o for p, o in zip(parts, offsets, strict=True)])
        rest = [f.name for f in fields(Supervision) if f.name != "cu_seqlens" and getattr(parts[0], f.name) is not None]
        return Supervision(cu_seqlens=cu, **{k: torch.cat([getattr(p, k) for p in parts]) for k in rest})


def plan_runs(
    seqlens: list[int], max_tokens: int, max_sequences: int | None = None, padded: bool = False
) -> list[tuple[int, int]]:
    """Greedy runs of whole sequences [start, stop) that fit one forward.

    A run holds at most `max_tokens` tokens (counted as rows x longest row when `padded`)
    and at most `max_sequences` sequences. A single sequence longer than `max_tokens` gets a
    run of its own (the context check at the boundary decides whether it may run at all).
    """
    if not seqlens:
        return []
    runs, start, used, longest = [], 0, 0, 0
    for i, n in enumerate(seqlens):
        width = max(longest, n)
        cost = width * (i - start + 1) if padded else used + n
        full = max_sequences is not None and i - start >= max_sequences
        if i > start and (cost > max_tokens or full):
            runs.append((start, i))
            start, used, longest = i, 0, 0
        used += n
        longest = max(longest, n)
    runs.append((start, len(seqlens)))
    return runs
