"""Draft vocabulary: frequency selection over loss-masked tokens, special tokens, SGLang maps, cache."""

from __future__ import annotations

import pytest
import torch

from eagle_ray import PackedBatch
from eagle_ray.draft import DraftVocab, build_draft_vocab, count_loss_tokens


def test_counts_only_loss_masked_tokens():
    b = PackedBatch.from_sequences([[5, 5, 7, 9], [7, 7]], [[0, 1, 1, 0], [1, 1]])
    counts = count_loss_tokens([b, b], vocab_size=10)
    assert counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 6, 0, 0]


def test_most_frequent_with_specials_deterministic_ties():
    counts = torch.tensor([0, 9, 3, 3, 7, 0, 3, 1])
    v = build_draft_vocab(counts, size=4, special_ids=[0])
    # 0 (special) + 1 (9) + 4 (7) + the lowest of the 3-way tie at 3: id 2
    assert v.target_ids.tolist() == [0, 1, 2, 4]
    assert build_draft_vocab(counts, size=4, special_ids=[0]).target_ids.tolist() == [0, 1, 2, 4]


def test_sglang_maps_round_trip():
    v = DraftVocab(torch.tensor([0, 3, 4, 9]), target_vocab_size=12)
    assert (torch.arange(4) + v.d2t).tolist() == [0, 3, 4, 9]  # SGLang: hot_token_id = d2t + arange
    assert v.t2d.nonzero().flatten().tolist() == [0, 3, 4, 9] and v.t2d.dtype == torch.bool
    assert v.to_draft(torch.tensor([9, 3, 5])).tolist() == [3, 1, -1]


def test_default_size_and_errors():
    counts = torch.arange(100)
    assert build_draft_vocab(counts).size == 100  # min(32000, V)
    with pytest.raises(ValueError, match="size"):
        build_draft_vocab(counts, size=0)
    with pytest.raises(ValueError, match="outside"):
        build_draft_vocab(counts, size=5, special_ids=[100])
    with pytest.raises(ValueError, match="do not fit"):
        build_draft_vocab(counts, size=1, special_ids=[1, 2])


def test_cached_to_file_and_reused(tmp_path):
    path = tmp_path / "draft_vocab.safetensors"
    first = build_draft_vocab(torch.tensor([1, 5, 2, 8, 0]), size=2, cache=path)
    assert path.exists() and first.target_ids.tolist() == [1, 3]
    # different counts, same cache: the saved vocabulary wins (resumed runs agree)
    again = build_draft_vocab(torch.tensor([9, 0, 0, 0, 9]), size=2, cache=path)
    assert torch.equal(again.target_ids, first.target_ids)
