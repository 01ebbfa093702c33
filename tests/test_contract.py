"""Unit tests of the pure-torch supervision contract (no Ray, no SGLang, no model)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eagle_ray.contract import (
    ERROR_CODES,
    InvalidBatchError,
    ModelInfo,
    PackedBatch,
    Supervision,
    default_aux_layer_ids,
    pack_padded,
    plan_runs,
    resolve_aux_layer_ids,
    shift_left,
    shift_left_rows,
    unpack_to_padded,
    validate_packed,
)

FAST = settings(max_examples=50, deadline=None)


def packed(ids: list[int], cu: list[int], mask: list[int] | None = None) -> PackedBatch:
    """A PackedBatch built straight from tensors (bypassing from_sequences' checks)."""
    m = [1] * len(ids) if mask is None else mask
    return PackedBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(m, dtype=torch.long), torch.tensor(cu))


def raises(code: str, fn, *args, sequence: int | None = None, match: str | None = None, **kwargs):
    """Call fn, require an InvalidBatchError with this code, sequence and message fragment."""
    assert code in ERROR_CODES
    with pytest.raises(InvalidBatchError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code == code, str(err)
    assert err.sequence == sequence, str(err)
    assert str(err).startswith(f"[{code}]")
    if sequence is not None:
        assert f"sequence {sequence}:" in str(err)
    if match is not None:
        assert match in str(err), str(err)
    return err


# ---------------------------------------------------------------------------------------------
# Aux layer ids


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(32, [1, 15, 28]), (8, [1, 3, 4]), (7, [1, 2, 3]), (28, [1, 13, 24]), (80, [1, 39, 76])],
)
def test_default_aux_layer_ids(num_layers, expected):
    assert default_aux_layer_ids(num_layers) == expected
    assert resolve_aux_layer_ids(None, num_layers) == expected


def test_resolve_aux_layer_ids_wants_layer_order():
    # SGLang concatenates aux states in layer order: [5, 0, 30] would mean one thing to HF, another to a server
    assert resolve_aux_layer_ids((2, 4, 6), 8) == [2, 4, 6]
    with pytest.raises(ValueError, match="must be increasing"):
        resolve_aux_layer_ids([5, 0, 30], 32)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1, 2], "exactly 3"),
        ([1, 2, 3, 4], "exactly 3"),
        ([], "exactly 3"),
        ([1, 1, 3], "distinct"),
        ([-1, 2, 3], "outside [0, 8)"),
        ([1, 2, 8], "outside [0, 8)"),
        ([1, 2, 7], "id 7, the output of the last of 8 layers, is not supported"),
        ([1, 2.0, 3], "must be ints"),
        ([1, "2", 3], "must be ints"),
        ([True, 2, 3], "must be ints"),
    ],
)
def test_resolve_aux_layer_ids_rejects(ids, match):
    with pytest.raises(ValueError) as info:
        resolve_aux_layer_ids(ids, 8)
    assert match in str(info.value)
    assert "default" not in str(info.value)  # an explicit choice is not blamed on the default


def test_default_aux_layer_ids_collide_for_six_layers():
    assert default_aux_layer_ids(6) == [1, 2, 2]
    with pytest.raises(ValueError) as info:
        resolve_aux_layer_ids(None, 6)
    msg = str(info.value)
    assert "distinct" in msg and "default" in msg
    assert "pass aux_layer_ids" in msg
    # the same six-layer target is fine with explicit ids
    assert resolve_aux_layer_ids([0, 2, 4], 6) == [0, 2, 4]


# ---------------------------------------------------------------------------------------------
# Model facts


@pytest.mark.parametrize(("dtype", "per_h"), [(torch.bfloat16, 8), (torch.float16, 8), (torch.float32, 16)])
def test_bytes_per_token(dtype, per_h):
    info = ModelInfo(
        hidden_size=48,
        vocab_size=100,
        num_layers=8,
        aux_layer_ids=(1, 3, 4),
        dtype=dtype,
        max_context=64,
        kv_capacity_tokens=256,
    )
    assert info.bytes_per_token == per_h * 48
    # consistent with what a supervision record of one token actually carries (aux 3H + last H)
    sup = Supervision(
        input_ids=torch.zeros(1, dtype=torch.long),
        loss_mask=torch.zeros(1, dtype=torch.long),
        cu_seqlens=torch.tensor([0, 1]),
        aux_hidden_states=torch.zeros(1, 3 * 48, dtype=dtype),
        last_hidden_states=torch.zeros(1, 48, dtype=dtype),
    )
    hidden_bytes = sup.aux_hidden_states.nbytes + sup.last_hidden_states.nbytes
    assert hidden_bytes == info.bytes_per_token


# ---------------------------------------------------------------------------------------------
# The shift


def reference_shift(x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    out, start = torch.zeros_like(x), 0
    for n in seqlens:
        for t in range(start, start + n - 1):
            out[t] = x[t + 1]
        start += n
    return out


def test_shift_left_hand_written():
    # three sequences: [10, 11, 12], [20], [30, 31]
    x = torch.tensor([10, 11, 12, 20, 30, 31])
    cu = torch.tensor([0, 3, 4, 6])
    assert shift_left(x, cu).tolist() == [11, 12, 0, 0, 31, 0]
    assert x.tolist() == [10, 11, 12, 20, 30, 31]  # input untouched


def test_shift_left_single_sequence_and_single_token():
    assert shift_left(torch.tensor([1, 2, 3]), torch.tensor([0, 3])).tolist() == [2, 3, 0]
    assert shift_left(torch.tensor([7]), torch.tensor([0, 1])).tolist() == [0]
    assert shift_left(torch.tensor([7, 8, 9]), torch.tensor([0, 1, 2, 3])).tolist() == [0, 0, 0]


def test_shift_left_two_d():
    seqlens = [3, 1, 2]
    cu = torch.tensor([0, 3, 4, 6])
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) + 1
    out = shift_left(x, cu)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out[0], x[1])
    torch.testing.assert_close(out[1], x[2])
    for last in (2, 3, 5):  # each sequence's last slot is a zero row
        assert (out[last] == 0).all()
    torch.testing.assert_close(out[4], x[5])
    torch.testing.assert_close(out, reference_shift(x, seqlens))


def test_shift_left_three_d():
    cu = torch.tensor([0, 2, 5])
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(shift_left(x, cu), reference_shift(x, [2, 3]))


@FAST
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.integers(0, 3))
def test_shift_left_matches_reference(seqlens, width):
    n = sum(seqlens)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    x = torch.arange(1, n + 1) if width == 0 else torch.arange(1, n * width + 1).reshape(n, width)
    out = shift_left(x, cu)
    assert torch.equal(out, reference_shift(x, seqlens))
    # never crosses a boundary: the first token of a sequence never lands in the previous one
    for end in cu[1:].tolist():
        assert (out[end - 1] == 0).all()


def test_shift_left_rows_2d():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert shift_left_rows(x).tolist() == [[2, 3, 4, 0], [6, 7, 8, 0]]


def test_shift_left_rows_3d():
    b, s, v = 3, 4, 5
    x = torch.randn(b, s, v)
    out = shift_left_rows(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :-1], x[:, 1:])
    assert (out[:, -1] == 0).all()


def test_shift_left_rows_single_column():
    x = torch.tensor([[3], [4]])
    assert shift_left_rows(x).tolist() == [[0], [0]]


def make_supervision(seqlens: list[int], hidden: int = 4, vocab: int | None = 7, seed: int = 0) -> Supervision:
    g = torch.Generator().manual_seed(seed)
    n = sum(seqlens)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    return Supervision(
        input_ids=torch.randint(0, 100, (n,), generator=g),
        loss_mask=torch.randint(0, 2, (n,), generator=g),
        cu_seqlens=cu,
        aux_hidden_states=torch.randn(n, 3 * hidden, generator=g),
        last_hidden_states=torch.randn(n, hidden, generator=g),
        logits=None if vocab is None else torch.randn(n, vocab, generator=g),
    )


@pytest.mark.parametrize("vocab", [7, None])
def test_supervision_shifted(vocab):
    sup = make_supervision([3, 1, 2], vocab=vocab)
    out = sup.shifted()
    seqlens = [3, 1, 2]
    assert torch.equal(out.input_ids, reference_shift(sup.input_ids, seqlens))
    assert torch.equal(out.loss_mask, reference_shift(sup.loss_mask, seqlens))
    assert torch.equal(out.last_hidden_states, reference_shift(sup.last_hidden_states, seqlens))
    if vocab is None:
        assert out.logits is None
    else:
        assert torch.equal(out.logits, reference_shift(sup.logits, seqlens))
    # aux states stay where they are, and so do the boundaries
    assert torch.equal(out.aux_hidden_states, sup.aux_hidden_states)
    assert torch.equal(out.cu_seqlens, sup.cu_seqlens)
    # the original record is not modified
    assert out is not sup
    assert not torch.equal(out.input_ids, sup.input_ids)


def test_supervision_nbytes():
    sup = make_supervision([2, 3], hidden=4, vocab=7)
    n = 5
    expected = n * 8 + n * 8 + 3 * 8 + n * 12 * 4 + n * 4 * 4 + n * 7 * 4
    assert sup.nbytes == expected
    sup.logits = None
    assert sup.nbytes == expected - n * 7 * 4
    assert sup.num_tokens == n


# ---------------------------------------------------------------------------------------------
# PackedBatch.from_sequences


def test_from_sequences_packs():
    b = PackedBatch.from_sequences([[1, 2, 3], [4], [5, 6]], [[0, 1, 1], [1], [1, 0]])
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.loss_mask.tolist() == [0, 1, 1, 1, 1, 0]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert b.input_ids.dtype == b.loss_mask.dtype == b.cu_seqlens.dtype == torch.long
    assert b.num_sequences == 3 and b.num_tokens == 6 and b.seqlens == [3, 1, 2]
    assert b.input_ids[b.sequence(2)].tolist() == [5, 6]


def test_from_sequences_default_mask_and_tensors():
    b = PackedBatch.from_sequences([torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3])])
    assert b.loss_mask.tolist() == [1, 1, 1]
    assert b.input_ids.dtype == torch.long


def test_from_sequences_empty_batch():
    raises("empty_batch", PackedBatch.from_sequences, [], match="no sequences")


def test_from_sequences_empty_sequence():
    raises("empty_sequence", PackedBatch.from_sequences, [[1, 2], [3], []], sequence=2, match="empty")
    raises("empty_sequence", PackedBatch.from_sequences, [[1], torch.tensor([], dtype=torch.long)], sequence=1)


def test_from_sequences_loss_mask_length():
    raises(
        "loss_mask_length",
        PackedBatch.from_sequences,
        [[1, 2], [3, 4, 5], [6]],
        [[1, 1], [1, 1], [1]],
        sequence=1,
        match="3 tokens",
    )
    raises("loss_mask_length", PackedBatch.from_sequences, [[1, 2], [3]], [[1, 1]], match="1 loss masks for 2")
    raises("loss_mask_length", PackedBatch.from_sequences, [[1, 2]], [[[1, 1]]], sequence=0)


def test_from_sequences_bad_tensor():
    raises("bad_tensor", PackedBatch.from_sequences, [[1], [1.5, 2.0]], sequence=1, match="integers")
    raises("bad_tensor", PackedBatch.from_sequences, [[1], [[1, 2]]], sequence=1, match="1-D")
    raises("bad_tensor", PackedBatch.from_sequences, [[True, False]], sequence=0)


def test_from_sequences_then_validate_rejects_fractional_float_loss_mask():
    """A float loss mask is bad_tensor for validate_packed; going through from_sequences must not
    launder it (today from_sequences casts [1.0, 0.5] to long [1, 0] and validation passes)."""
    with pytest.raises(InvalidBatchError) as info:
        validate_packed(PackedBatch.from_sequences([[1, 2]], [torch.tensor([1.0, 0.5])]), vocab_size=10)
    assert info.value.code == "bad_tensor"


# ---------------------------------------------------------------------------------------------
# validate_packed


def test_validate_packed_valid_returns_long():
    b = PackedBatch(
        torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32),
        torch.tensor([True, False, True, True, False]),
        torch.tensor([0, 2, 5], dtype=torch.int32),
    )
    out = validate_packed(b, vocab_size=6, max_seq_len=3)
    assert out.input_ids.dtype == out.loss_mask.dtype == out.cu_seqlens.dtype == torch.long
    assert out.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert out.loss_mask.tolist() == [1, 0, 1, 1, 0]
    assert out.cu_seqlens.tolist() == [0, 2, 5]


def test_validate_packed_boundaries_accepted():
    # token 0 and vocab-1 are in range; a sequence of exactly max_seq_len is fine
    out = validate_packed(packed([0, 9, 9, 0], [0, 4]), vocab_size=10, max_seq_len=4)
    assert out.input_ids.tolist() == [0, 9, 9, 0]


def test_validate_packed_empty_batch():
    empty = PackedBatch(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.tensor([0]))
    raises("empty_batch", validate_packed, empty, 10, match="no tokens")
    no_seq = PackedBatch(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]))
    raises("empty_batch", validate_packed, no_seq, 10)


def test_validate_packed_empty_sequence():
    raises("empty_sequence", validate_packed, packed([1, 2, 3, 4, 5], [0, 2, 2, 5]), 10, sequence=1, match="no tokens")
    raises("empty_sequence", validate_packed, packed([1, 2], [0, 0, 2]), 10, sequence=0)
    raises("empty_sequence", validate_packed, packed([1, 2], [0, 1, 2, 2]), 10, sequence=2)


@pytest.mark.parametrize(
    ("ids", "cu", "sequence", "match"),
    [
        ([1, 2, 3, 99, 4, 5], [0, 2, 5, 6], 1, "token 99 at position 1"),
        ([1, 2, 3, 4, 5, -1], [0, 2, 5, 6], 2, "token -1 at position 0"),
        ([10, 2, 3, 4, 5, 6], [0, 2, 5, 6], 0, "token 10 at position 0"),
        ([1, 2, 3, 4, 10, 6], [0, 2, 5, 6], 1, "token 10 at position 2"),
        ([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], None, None),
    ],
)
def test_validate_packed_token_out_of_range(ids, cu, sequence, match):
    b = packed(ids, cu)
    if match is None:
        validate_packed(b, vocab_size=10)
        return
    err = raises("token_out_of_range", validate_packed, b, 10, sequence=sequence, match=match)
    assert "[0, 10)" in str(err)


def test_validate_packed_loss_mask_longer():
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[1] * 6)
    raises("loss_mask_length", validate_packed, b, 10, sequence=1, match="loss_mask holds 6 tokens")


def test_validate_packed_loss_mask_shorter_mid_sequence():
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[1] * 3)
    raises("loss_mask_length", validate_packed, b, 10, sequence=1, match="loss_mask holds 3 tokens")
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[1])
    raises("loss_mask_length", validate_packed, b, 10, sequence=0, match="loss_mask holds 1 tokens")


def test_validate_packed_loss_mask_shorter_at_sequence_boundary():
    """A mask that covers sequence 0 exactly and stops there: the first sequence it does not
    cover is sequence 1 (the code's own comment), not the fully covered sequence 0."""
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[1] * 2)
    raises("loss_mask_length", validate_packed, b, 10, sequence=1, match="loss_mask holds 2 tokens")


def test_validate_packed_sequence_too_long():
    b = packed([1] * 8, [0, 2, 7, 8])
    raises("sequence_too_long", validate_packed, b, 10, max_seq_len=4, sequence=1, match="5 tokens exceed")
    validate_packed(b, 10, max_seq_len=5)
    validate_packed(b, 10)  # no limit


def test_validate_packed_bad_dtype_and_rank():
    ok_ids, ok_mask, ok_cu = torch.tensor([1, 2, 3]), torch.tensor([1, 1, 0]), torch.tensor([0, 1, 3])
    cases = [
        (PackedBatch(ok_ids.float(), ok_mask, ok_cu), "input_ids must be an integer tensor"),
        (PackedBatch(ok_ids, ok_mask.float(), ok_cu), "loss_mask must be a bool or integer tensor"),
        (PackedBatch(ok_ids, ok_mask, ok_cu.float()), "cu_seqlens must be an integer tensor"),
        (PackedBatch(ok_ids.bool(), ok_mask, ok_cu), "input_ids must be an integer tensor"),
        (PackedBatch(ok_ids.reshape(1, 3), ok_mask, ok_cu), "input_ids must be 1-D"),
        (PackedBatch(ok_ids, ok_mask.reshape(3, 1), ok_cu), "loss_mask must be 1-D"),
        (PackedBatch([1, 2, 3], ok_mask, ok_cu), "input_ids must be a torch.Tensor, got list"),
    ]
    for b, match in cases:
        raises("bad_tensor", validate_packed, b, 10, match=match)


@pytest.mark.parametrize(
    ("cu", "sequence", "match"),
    [
        ([1, 3, 5], None, "must start at 0"),
        ([0, 3, 2, 5], 1, "decreases (3 -> 2)"),
        ([0, 2, 4], None, "ends at 4 but input_ids holds 5"),
        ([0, 2, 6], None, "ends at 6 but input_ids holds 5"),
    ],
)
def test_validate_packed_bad_cu_seqlens(cu, sequence, match):
    raises("bad_cu_seqlens", validate_packed, packed([1, 2, 3, 4, 5], cu), 10, sequence=sequence, match=match)


def test_validate_packed_loss_mask_values():
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[1, 0, 1, 2, 1])
    raises("bad_tensor", validate_packed, b, 10, sequence=1, match="loss_mask value 2 is not 0 or 1")
    b = packed([1, 2, 3, 4, 5], [0, 2, 5], mask=[-1, 0, 1, 1, 1])
    raises("bad_tensor", validate_packed, b, 10, sequence=0, match="loss_mask value -1")


def test_validate_packed_checks_from_sequences_output():
    b = PackedBatch.from_sequences([[1, 2], [3, 42]])
    raises("token_out_of_range", validate_packed, b, 10, sequence=1, match="token 42 at position 1")


# ---------------------------------------------------------------------------------------------
# Padded <-> packed


def test_pack_padded_right_padded():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    b = pack_padded(ids, attn)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert b.loss_mask.tolist() == [1] * 9
    validate_packed(b, vocab_size=10)


def test_pack_padded_left_padded_with_loss_mask():
    ids = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5], [0, 0, 0, 6]])
    attn = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    loss = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
    b = pack_padded(ids, attn, loss)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.loss_mask.tolist() == [0, 1, 1, 0, 1, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 6]


def test_pack_padded_bool_mask():
    ids = torch.tensor([[1, 2], [3, 0]])
    b = pack_padded(ids, torch.tensor([[True, True], [True, False]]))
    assert b.input_ids.tolist() == [1, 2, 3] and b.cu_seqlens.tolist() == [0, 2, 3]


def test_pack_padded_non_contiguous_mask():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]])
    raises("bad_attention_mask", pack_padded, ids, attn, sequence=1, match="contiguous")
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]])
    raises("bad_attention_mask", pack_padded, ids, attn, sequence=2, match="contiguous")


def test_pack_padded_all_zero_row():
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    attn = torch.tensor([[1, 1], [0, 0], [1, 0]])
    raises("empty_sequence", pack_padded, ids, attn, sequence=1, match="no ones")


def test_pack_padded_shape_errors():
    ids = torch.ones(3, 4, dtype=torch.long)
    attn = torch.ones(3, 4, dtype=torch.long)
    raises("bad_attention_mask", pack_padded, ids, torch.ones(3, 5), match="!= input_ids shape (3, 4)")
    raises("bad_attention_mask", pack_padded, ids, torch.ones(2, 4), match="(2, 4)")
    err = raises("loss_mask_length", pack_padded, ids, attn, torch.ones(2, 4), match="loss_mask shape (2, 4)")
    assert err.sequence is None
    with pytest.raises(InvalidBatchError) as info:
        pack_padded(ids, attn, torch.ones(3, 3))
    assert info.value.code == "loss_mask_length" and "loss_mask shape (3, 3)" in str(info.value)
    raises("bad_tensor", pack_padded, ids.reshape(12), attn, match="input_ids must be [batch, seq]")
    raises("bad_tensor", pack_padded, ids, attn.reshape(3, 4, 1), match="attention_mask must be [batch, seq]")
    raises("bad_tensor", pack_padded, ids.float(), attn, match="integer tensor")
    raises("bad_tensor", pack_padded, ids.tolist(), attn, match="torch.Tensor, got list")
    raises("empty_batch", pack_padded, torch.ones(0, 4, dtype=torch.long), torch.ones(0, 4))


def test_unpack_to_padded_round_trip():
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0], [0, 0, 6, 0]])
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]])
    b = pack_padded(ids, attn)
    assert torch.equal(unpack_to_padded(b.input_ids, attn), ids * attn)
    # per-token rows [N, H] come back as [B, S, H] with zero pads
    h = torch.randn(b.num_tokens, 5)
    out = unpack_to_padded(h, attn)
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out[attn.bool()], h)
    assert (out[~attn.bool()] == 0).all()


@FAST
@given(st.data())
def test_pack_unpack_property(data):
    b = data.draw(st.integers(1, 5))
    s = data.draw(st.integers(1, 6))
    rows = []
    for _ in range(b):
        n = data.draw(st.integers(1, s))
        left = data.draw(st.integers(0, s - n))
        rows.append([0] * left + [1] * n + [0] * (s - n - left))
    attn = torch.tensor(rows)
    ids = torch.randint(1, 50, (b, s)) * attn
    packed_batch = pack_padded(ids, attn)
    assert packed_batch.seqlens == attn.sum(1).tolist()
    for r in range(b):
        assert packed_batch.input_ids[packed_batch.sequence(r)].tolist() == ids[r][attn[r].bool()].tolist()
    assert torch.equal(unpack_to_padded(packed_batch.input_ids, attn), ids)


# ---------------------------------------------------------------------------------------------
# Run planning


def check_plan(seqlens, max_tokens, max_sequences, padded, runs):
    # runs cover [0, len) in order, without gaps, overlap or empty runs
    assert runs[0][0] == 0 and runs[-1][1] == len(seqlens)
    for (_, stop), (next_start, _) in zip(runs, runs[1:], strict=False):
        assert stop == next_start
    for start, stop in runs:
        assert stop > start
        run = seqlens[start:stop]
        if max_sequences is not None:
            assert len(run) <= max_sequences
        cost = len(run) * max(run) if padded else sum(run)
        if len(run) > 1:
            assert cost <= max_tokens
        else:
            assert cost <= max_tokens or run[0] > max_tokens


def test_plan_runs_examples():
    assert plan_runs([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert plan_runs([3, 3, 3], 9) == [(0, 3)]
    assert plan_runs([3, 3, 3], 100, max_sequences=1) == [(0, 1), (1, 2), (2, 3)]
    assert plan_runs([3, 3, 3], 100, max_sequences=2) == [(0, 2), (2, 3)]
    # padded: rows x longest row
    assert plan_runs([1, 5, 1], 6) == [(0, 2), (2, 3)]
    assert plan_runs([1, 5, 1], 6, padded=True) == [(0, 1), (1, 2), (2, 3)]
    assert plan_runs([2, 2, 2, 2], 8, padded=True) == [(0, 4)]
    assert plan_runs([4], 3) == [(0, 1)]


def test_plan_runs_too_long_sequence_alone():
    assert plan_runs([2, 10, 2], 5) == [(0, 1), (1, 2), (2, 3)]
    assert plan_runs([10, 1, 1], 5) == [(0, 1), (1, 3)]
    assert plan_runs([1, 1, 10], 5, padded=True) == [(0, 2), (2, 3)]


@FAST
@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=30),
    st.integers(1, 40),
    st.one_of(st.none(), st.integers(1, 6)),
    st.booleans(),
)
def test_plan_runs_property(seqlens, max_tokens, max_sequences, padded):
    runs = plan_runs(seqlens, max_tokens, max_sequences, padded)
    check_plan(seqlens, max_tokens, max_sequences, padded, runs)
    # greedy: a run is closed only when the next sequence would not fit
    for (start, stop), _ in zip(runs, runs[1:], strict=False):
        grown = seqlens[start : stop + 1]
        cost = len(grown) * max(grown) if padded else sum(grown)
        assert cost > max_tokens or (max_sequences is not None and len(grown) > max_sequences)


# ---------------------------------------------------------------------------------------------
# Sub-batches and concat


def sub_supervision(whole: Supervision, batch: PackedBatch, start: int, stop: int) -> Supervision:
    """What an engine would return for batch.select(start, stop)."""
    part = batch.select(start, stop)
    lo, hi = int(batch.cu_seqlens[start]), int(batch.cu_seqlens[stop])
    return Supervision(
        input_ids=part.input_ids,
        loss_mask=part.loss_mask,
        cu_seqlens=part.cu_seqlens,
        aux_hidden_states=whole.aux_hidden_states[lo:hi],
        last_hidden_states=whole.last_hidden_states[lo:hi],
        logits=None if whole.logits is None else whole.logits[lo:hi],
    )


def assert_supervision_equal(a: Supervision, b: Supervision):
    for name in ("input_ids", "loss_mask", "cu_seqlens", "aux_hidden_states", "last_hidden_states"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.logits is None) == (b.logits is None)
    if a.logits is not None:
        assert torch.equal(a.logits, b.logits)


def test_select():
    b = PackedBatch.from_sequences([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]])
    part = b.select(1, 3)
    assert part.input_ids.tolist() == [4, 5, 6]
    assert part.cu_seqlens.tolist() == [0, 1, 3]
    assert part.seqlens == [1, 2]
    validate_packed(part, vocab_size=11)
    assert b.select(0, 4).cu_seqlens.tolist() == b.cu_seqlens.tolist()


@pytest.mark.parametrize("vocab", [7, None])
@pytest.mark.parametrize("splits", [[0, 4], [0, 1, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]])
def test_concat_of_selected_parts_equals_whole(vocab, splits):
    seqlens = [3, 1, 2, 4]
    whole = make_supervision(seqlens, vocab=vocab)
    batch = PackedBatch(whole.input_ids, whole.loss_mask, whole.cu_seqlens)
    parts = [sub_supervision(whole, batch, a, b) for a, b in zip(splits, splits[1:], strict=False)]
    joined = Supervision.concat(parts)
    assert_supervision_equal(joined, whole)
    assert joined.cu_seqlens.tolist() == [0, 3, 4, 6, 10]
    # the shift never crosses a boundary, so shifting commutes with splitting
    assert_supervision_equal(Supervision.concat([p.shifted() for p in parts]), whole.shifted())


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=10), st.integers(1, 12), st.integers(0, 2**16))
def test_concat_of_planned_runs_property(seqlens, max_tokens, seed):
    whole = make_supervision(seqlens, hidden=2, vocab=3, seed=seed)
    batch = PackedBatch(whole.input_ids, whole.loss_mask, whole.cu_seqlens)
    runs = plan_runs(batch.seqlens, max_tokens)
    joined = Supervision.concat([sub_supervision(whole, batch, a, b) for a, b in runs])
    assert_supervision_equal(joined, whole)


# ---------------------------------------------------------------------------------------------
# Packed rows (NeMo's packing: several documents per row) and the draft-vocab teacher


def test_pack_padded_packed_rows_become_one_sequence_per_document():
    # row 0: documents of 3 and 2 tokens + 1 pad (folded into the last); row 1: one document of 4 + 2 pads
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    seq_lens = torch.tensor([[3, 3], [6, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    b = pack_padded(ids, attn, None, seq_lens, pos)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert pack_padded(ids, attn, None, seq_lens).cu_seqlens.tolist() == [0, 3, 5, 9]  # positions optional


def test_pack_padded_bad_packing_is_refused_with_its_row():
    ids = torch.ones(2, 4, dtype=torch.long)
    attn = torch.ones(2, 4, dtype=torch.long)
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([[2, 2], [3, 0]]), sequence=1, match="sum to 3")
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([4, 4]), match="max_docs")
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([[2.0, 2.0], [4.0, 0.0]]), match="integer")
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([[5, -1], [4, 0]]), match=">= 0")
    bad_pos = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])  # row 0 packs two documents: positions must restart
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([[2, 2], [4, 0]]), bad_pos, sequence=0)
    raises("bad_packing", pack_padded, ids, attn, None, torch.tensor([[2, 2], [4, 0]]), bad_pos[:1], match="[2, 4]")
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    raises("empty_sequence", pack_padded, ids, attn, None, torch.tensor([[4, 0], [2, 2]]), sequence=1)


def test_target_distribution_is_nemos_encoding():
    from eagle_ray.target import VocabMapping, target_distribution

    logits = torch.tensor([[[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.5], [0.0, 0.0, 4.0, 1.0]]])
    mapping = VocabMapping.checked(torch.tensor([2, 1]), torch.tensor([False, True, True, False]), 4)
    probs, mask = target_distribution(logits, mapping, torch.tensor([[1, 1, 0]]))
    # argmax 1 (in the draft vocab), 0 (not in it), 2 (in it, but outside the loss)
    assert mask.squeeze(-1).tolist() == [[True, False, False]] and mask.shape == (1, 3, 1)
    torch.testing.assert_close(probs[0, 0], torch.softmax(torch.tensor([1.0, 5.0]), -1))  # draft order, renormalised
    assert probs.dtype == torch.float32


def test_vocab_mapping_refuses_what_does_not_fit():
    from eagle_ray.target import VocabMapping

    mask = torch.tensor([False, True, True, False])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        VocabMapping.checked(torch.tensor([1, 7]), mask, 4)
    with pytest.raises(ValueError, match="exactly on"):
        VocabMapping.checked(torch.tensor([1, 3]), mask, 4)
    with pytest.raises(ValueError, match=r"\[4\] tensor"):
        VocabMapping.checked(torch.tensor([1, 2]), mask[:3], 4)
    with pytest.raises(ValueError, match="1-D integer"):
        VocabMapping.checked(torch.tensor([1.0, 2.0]), mask, 4)
