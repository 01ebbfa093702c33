"""Draft vocabulary: the target tokens the draft predicts, and the maps SGLang reads.

The draft's lm_head covers only the most frequent target tokens among the loss-masked
training tokens (special tokens always kept). SGLang's EAGLE-3 loader reads two buffers:
`d2t[i] = target_id(i) - i` (a draft id plus its offset is the target id) and `t2d`, a
bool mask over the target vocabulary. Selection is deterministic (count, then lower id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eagle_ray.contract import PackedBatch

DEFAULT_DRAFT_VOCAB = 32000


def count_loss_tokens(batches: Iterable[PackedBatch], vocab_size: int) -> torch.Tensor:
    """How often each target token is a training target (loss mask 1), as int64 `[V]`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for b in batches:
        ids = b.input_ids[b.loss_mask.bool()]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


@dataclass(frozen=True)
class DraftVocab:
    target_ids: torch.Tensor  # [D] int64, ascending: draft id i predicts target token target_ids[i]
    target_vocab_size: int

    @property
    def size(self) -> int:
        return self.target_ids.numel()

    @property
    def d2t(self) -> torch.Tensor:
        return self.target_ids - torch.arange(self.size)

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        mask[self.target_ids] = True
        return mask

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target tokens; -1 where the token is outside the draft vocabulary."""
        lookup = torch.full((self.target_vocab_size,), -1, dtype=torch.long)
        lookup[self.target_ids] = torch.arange(self.size)
        return lookup[target_ids]

    def save(self, path: str | Path) -> None:
        save_file({"target_ids": self.target_ids.contiguous()}, str(path), metadata={"V": str(self.target_vocab_size)})

    @staticmethod
    def load(path: str | Path, target_vocab_size: int) -> DraftVocab:
        ids = load_file(str(path))["target_ids"]
        return DraftVocab(ids, target_vocab_size)


def build_draft_vocab(
    counts: torch.Tensor, size: int | None = None, special_ids: Iterable[int] = (), cache: str | Path | None = None
) -> DraftVocab:
    """The `size` most frequent target tokens (default min(32000, V)), special tokens always in.

    With `cache`, a vocabulary saved there before is reused (same target vocabulary size), else
    built and saved, so resumed and parallel runs agree.
    """
    vocab = counts.numel()
    if cache is not None and Path(cache).exists():
        saved = DraftVocab.load(cache, vocab)
        if size is None or saved.size == size:
            return saved
    size = min(DEFAULT_DRAFT_VOCAB, vocab) if size is None else size
    special = sorted({int(i) for i in special_ids})
    if not 0 < size <= vocab:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab}], got {size}")
    if any(not 0 <= i < vocab for i in special):
        raise ValueError(f"special token ids {special} outside [0, {vocab})")
    if len(special) > size:
        raise ValueError(f"{len(special)} special tokens do not fit a draft vocabulary of {size}")
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[special] = True
    # most frequent first; ties go to the lower id (stable sort over ids in order)
    order = torch.sort(-counts, stable=True).indices
    rest = order[~keep[order]][: size - len(special)]
    ids = torch.sort(torch.cat([torch.tensor(special, dtype=torch.long), rest])).values
    result = DraftVocab(ids, vocab)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        result.save(cache)
    return result
