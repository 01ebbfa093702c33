"""Fuzzing the pool's driver API (`PooledTargetModel`) with random ragged batches, valid and damaged.

Every example must end one of two ways: served, with the values the engine gives when called directly
on the same batch, or rejected at the driver with `InvalidBatchError` carrying the code (and sequence)
of the one thing the example damaged. Any other outcome is a hole in the contract boundary: another
exception type, a vaguer code, a wrong sequence index, or worse, input the driver lets through that
breaks a replica (SGLang matters most: a replica it kills costs a rebuild and re-runs). So after each
property the pool must be as it started: no replica died, failed or was replaced, the same processes
serve, and a normal batch still comes back right.

Covered: `forward_packed`, `submit`, `stream` (valid batches, then one damaged batch: the shards of the
batches before it are served, then it raises), and the padded `generate_batch`. Both an SGLang pool
(1 replica) and an HF pool (2 replicas, so batches are split into shards) are fuzzed; both are compared
with the in-process HF target at test_pool.py's tolerance. Valid batches also come in every integer
dtype and as strided, offset or expanded views, which the contract accepts. Examples are derandomized
for a reproducible CI; each damage kind runs its own few examples so every kind is exercised every run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import ray
import torch
from conftest import random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eagle_ray import HFEagle3TargetModel, InvalidBatchError, PackedBatch
from eagle_ray.contract import ERROR_CODES
from eagle_ray.pool import PooledTargetModel

VOCAB = 1024  # the tiny targets' vocabulary (checked against pool.info below)
MAX_LEN = 40  # ordinary sequences: short, so valid examples cost milliseconds
ATOL = 1e-5  # test_pool.py's tolerance between a pool and the direct HF engine
ENGINES = ["sglang", "hf"]


def fuzz(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
        database=None,  # derandomized: nothing to replay, and no .hypothesis folder left behind
    )


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cluster(shared_ray):
    yield


@pytest.fixture(scope="module")
def pools(cluster, tiny_paths):
    """Both pools, started at once (each spends most of its start-up importing and building its engine)."""
    path = tiny_paths["llama"]
    kwargs = {
        "sglang": dict(engine="sglang", replicas=1, use_gpu=False),
        "hf": dict(engine="hf", replicas=2, use_gpu=False, cpus_per_replica=1),
    }
    with ThreadPoolExecutor(len(kwargs)) as ex:
        futures = {name: ex.submit(PooledTargetModel.from_pretrained, path, **kw) for name, kw in kwargs.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()
        out = {}
        for name, pool in started.items():
            assert pool.info.vocab_size == VOCAB and pool.info.max_context > MAX_LEN * 6
            pids = replica_pids(pool)
            assert len(pids) == kwargs[name]["replicas"]
            out[name] = (pool, pids)
        yield out
    finally:
        for pool in started.values():
            pool.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_paths):
    return HFEagle3TargetModel.from_pretrained(tiny_paths["llama"])


def replica_pids(pool: PooledTargetModel) -> list[tuple[int, int]]:
    return sorted((d["replica_id"], d["pid"]) for d in pool.replicas())


# ---------------------------------------------------------------------------------------------
# Cases: one batch, and what the contract says must happen to it


@dataclass
class Case:
    kind: str
    batch: PackedBatch
    expect: tuple[str, int | None] | None  # (code, sequence) it must be rejected with; None: served


@dataclass
class PaddedCase:
    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor | None
    expect: tuple[str, int | None] | None


def seeded_ids(seed: int, n: int, high: int = VOCAB) -> torch.Tensor:
    # long sequences: hypothesis draws the seed, not a thousand integers
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


@st.composite
def ragged(draw, min_seqs: int = 1, high: int = VOCAB) -> tuple[list[list[int]], list[list[int]]]:
    """1..6 sequences of 1..MAX_LEN tokens, loss masks random, all zero or all one."""
    lens = draw(st.lists(st.integers(1, MAX_LEN), min_size=min_seqs, max_size=6))
    ids = [draw(st.lists(st.integers(0, high - 1), min_size=n, max_size=n)) for n in lens]
    mode = draw(st.sampled_from(["random", "zeros", "ones"]))
    masks = [
        draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)) if mode == "random" else [int(mode == "ones")] * n
        for n in lens
    ]
    return ids, masks


def pack(ids: list[list[int]], masks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(ids) + 1, dtype=torch.long)
    cu[1:] = torch.tensor([len(s) for s in ids]).cumsum(0)
    return torch.tensor(sum(ids, []), dtype=torch.long), torch.tensor(sum(masks, []), dtype=torch.long), cu


def relayout(draw, t: torch.Tensor, dtypes: list[torch.dtype]) -> torch.Tensor:
    """The same values in another integer dtype, maybe as a view: strided, offset into a larger buffer,
    or (all values equal) one element expanded, as in `torch.ones(1).expand(n)`."""
    t = t.to(draw(st.sampled_from(dtypes)))
    how = draw(st.sampled_from(["contiguous", "strided", "offset", "expanded"]))
    if how == "expanded" and bool((t == t[0]).all()):
        return t[:1].clone().expand(t.numel())
    if how == "strided":
        buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
        buf[::2] = t
        return buf[::2]
    if how == "offset":
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t
        return buf[3:]
    return t


def sequence_at(cu: torch.Tensor, pos: int) -> int:
    """Index of the sequence holding token position `pos`."""
    return max(j for j in range(cu.numel() - 1) if int(cu[j]) <= pos)


def insert_sequence(ids, mask, cu, i: int, seq: torch.Tensor):
    """Put `seq` in as sequence i (0..B)."""
    at = int(cu[i])
    lens = cu.diff().tolist()
    lens.insert(i, seq.numel())
    new_cu = torch.zeros(len(lens) + 1, dtype=torch.long)
    new_cu[1:] = torch.tensor(lens).cumsum(0)
    new_ids = torch.cat([ids[:at], seq, ids[at:]])
    new_mask = torch.cat([mask[:at], torch.ones_like(seq), mask[at:]])
    return new_ids, new_mask, new_cu


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PACKED_KINDS = {  # kind -> forward_packed examples; invalid ones cost no engine time
    "valid": 10,
    "valid_layout": 6,  # other integer dtypes, bool masks, non-contiguous views: the contract takes them all
    "valid_one_token": 3,  # the same for a 1-token batch: a 1-element view is "contiguous" with any stride
    "valid_at_max_context": 1,
    "token_negative": 3,
    "token_too_high": 3,
    "mask_value": 3,
    "empty_sequence": 3,
    "empty_batch": 3,
    "mask_short": 3,
    "mask_long": 3,
    "cu_start": 3,
    "cu_decreasing": 3,
    "cu_end": 3,
    "ids_dtype": 3,
    "cu_dtype": 3,
    "mask_dtype": 3,
    "rank:ids": 3,  # the damaged field after the colon, so each is covered every run
    "rank:mask": 3,
    "rank:cu": 3,
    "not_tensor:ids": 3,
    "not_tensor:mask": 3,
    "not_tensor:cu": 3,
    "too_long": 3,
}


@st.composite
def packed_case(draw, kind: str, max_context: int) -> Case:
    """A random batch damaged in exactly one way (`kind`), and the rejection that damage calls for."""
    if kind in ("valid_layout", "valid_one_token"):
        # small ids sometimes, so uint8 / int8 hold them too
        high = draw(st.sampled_from([128, 256, VOCAB]))
        if kind == "valid_one_token":
            ids, mask, cu = pack([[draw(st.integers(0, high - 1))]], [[draw(st.integers(0, 1))]])
        else:
            ids, mask, cu = pack(*draw(ragged(high=high)))
        id_types = [torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]
        id_types += [torch.uint8] * (high <= 256) + [torch.int8] * (high <= 128)
        # at most 6 x 40 = 240 tokens: cu_seqlens fits uint8 (and int8 below 128)
        cu_types = [torch.uint8, torch.int16, torch.int32, torch.uint32] + [torch.int8] * (int(cu[-1]) < 128)
        mask_types = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.uint64]
        batch = PackedBatch(
            relayout(draw, ids, id_types), relayout(draw, mask, mask_types), relayout(draw, cu, cu_types)
        )
        return Case(kind, batch, None)

    ids, mask, cu = pack(*draw(ragged(min_seqs=2 if kind == "cu_decreasing" else 1)))
    n, b = ids.numel(), cu.numel() - 1
    lens = cu.diff().tolist()
    i = draw(st.integers(0, b - 1))  # the sequence to damage
    pos = int(cu[i]) + draw(st.integers(0, lens[i] - 1))
    expect: tuple[str, int | None] | None = None
    ids_, mask_, cu_ = ids.clone(), mask.clone(), cu.clone()

    if kind == "valid":
        pass
    elif kind == "valid_at_max_context":
        ids_, mask_, cu_ = insert_sequence(ids, mask, cu, i, seeded_ids(draw(st.integers(0, 2**16)), max_context))
    elif kind == "token_negative":
        ids_[pos] = -draw(st.integers(1, 2**62))
        expect = ("token_out_of_range", i)
    elif kind == "token_too_high":
        ids_[pos] = VOCAB + draw(st.integers(0, 2**62))
        expect = ("token_out_of_range", i)
    elif kind == "mask_value":
        mask_[pos] = draw(st.sampled_from([2, 3, -1, 255, -(2**40)]))
        expect = ("bad_tensor", i)
    elif kind == "empty_sequence":
        j = draw(st.integers(0, b))  # a zero-length sequence anywhere, last place included
        cu_ = torch.cat([cu[: j + 1], cu[j:]])
        expect = ("empty_sequence", j)
    elif kind == "empty_batch":
        ids_, mask_ = ids[:0], mask[:0]
        cu_ = torch.zeros(draw(st.integers(0, 3)), dtype=torch.long)  # [], [0], [0, 0], [0, 0, 0]
        expect = ("empty_batch", None)
    elif kind == "mask_short":
        keep = n - draw(st.integers(1, n))
        mask_ = mask[:keep]
        expect = ("loss_mask_length", sequence_at(cu, keep))  # the first sequence it leaves uncovered
    elif kind == "mask_long":
        mask_ = torch.cat([mask, torch.ones(draw(st.integers(1, 50)), dtype=torch.long)])
        expect = ("loss_mask_length", b - 1)
    elif kind == "cu_start":
        cu_[0] = draw(st.integers(-(2**40), 2**40).filter(lambda v: v != 0))
        expect = ("bad_cu_seqlens", None)
    elif kind == "cu_decreasing":
        j = draw(st.integers(1, b - 1))  # an inner boundary; start and end stay right
        if draw(st.booleans()):
            cu_[j] = int(cu[j + 1]) + draw(st.integers(1, 100))  # sequence j runs backwards
            expect = ("bad_cu_seqlens", j)
        else:
            cu_[j] = int(cu[j - 1]) - draw(st.integers(1, 100))  # sequence j - 1 runs backwards
            expect = ("bad_cu_seqlens", j - 1)
    elif kind == "cu_end":
        if draw(st.booleans()):  # cu_seqlens ends elsewhere (never before its last start)
            cu_[-1] = n + draw(st.integers(-lens[-1], 100).filter(lambda d: d != 0))
        else:  # or tokens trail past the last sequence
            extra = draw(st.integers(1, 20))
            ids_ = torch.cat([ids, torch.zeros(extra, dtype=torch.long)])
            mask_ = torch.cat([mask, torch.zeros(extra, dtype=torch.long)])
        expect = ("bad_cu_seqlens", None)
    elif kind == "ids_dtype":
        ids_ = ids.to(draw(st.sampled_from([*FLOATS, torch.bool, torch.complex64])))
        expect = ("bad_tensor", None)
    elif kind == "cu_dtype":
        cu_ = cu.to(draw(st.sampled_from([*FLOATS, torch.bool])))
        expect = ("bad_tensor", None)
    elif kind == "mask_dtype":
        mask_ = mask.to(draw(st.sampled_from([*FLOATS, torch.complex64])))
        expect = ("bad_tensor", None)
    elif kind.startswith(("rank:", "not_tensor:")):
        what, name = kind.split(":")
        t = {"ids": ids_, "mask": mask_, "cu": cu_}[name]
        if what == "rank":
            t = draw(st.sampled_from([t[None], t[:, None], t[0], torch.stack([t, t])]))
        else:
            t = draw(st.sampled_from([t.tolist(), t.numpy(), None]))
        ids_, mask_, cu_ = (t if name == k else v for k, v in (("ids", ids_), ("mask", mask_), ("cu", cu_)))
        expect = ("bad_tensor", None)
    elif kind == "too_long":
        extra = draw(st.integers(1, 64))
        ids_, mask_, cu_ = insert_sequence(
            ids, mask, cu, i, seeded_ids(draw(st.integers(0, 2**16)), max_context + extra)
        )
        expect = ("sequence_too_long", i)
    else:
        raise AssertionError(kind)
    return Case(kind, PackedBatch(ids_, mask_, cu_), expect)


PADDED_KINDS = {  # kind -> generate_batch examples
    "valid": 10,
    "valid_at_max_context": 1,
    "token_negative": 3,
    "token_too_high": 3,
    "empty_row": 3,
    "gap": 3,
    "attention_shape": 3,
    "loss_shape": 3,
    "loss_value": 3,
    "ids_dtype": 3,
    "rank:ids": 3,
    "rank:attn": 3,
    "rank:loss": 3,
    "empty_batch": 3,
    "too_long": 3,
}


@st.composite
def padded_case(draw, kind: str, max_context: int) -> PaddedCase:
    """A [B, S] batch: each row one contiguous run of real tokens anywhere (left, right or both sides padded)."""
    lens = draw(st.lists(st.integers(3 if kind == "gap" else 1, MAX_LEN), min_size=1, max_size=6))
    r = draw(st.integers(0, len(lens) - 1))  # the row to damage
    if kind == "valid_at_max_context":
        lens = lens[:2]  # full [B, S, V] logits come back: keep B small
        r = min(r, len(lens) - 1)
        lens[r] = max_context
    elif kind == "too_long":
        lens[r] = max_context + draw(st.integers(1, 16))
    b, s = len(lens), max(lens) + draw(st.integers(0, 3))
    # pad tokens are never run, so anything goes there, out-of-range ids included
    pad = draw(st.sampled_from([0, 7, -1, VOCAB, 10**9]))
    ids = torch.full((b, s), pad, dtype=torch.long)
    attn = torch.zeros(b, s, dtype=torch.long)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))  # rows may be ~1k long: seeded, not drawn
    loss = (torch.rand(b, s, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))).long()
    for row, n in enumerate(lens):
        off = draw(st.integers(0, s - n))
        if n > MAX_LEN:
            ids[row, off : off + n] = seeded_ids(draw(st.integers(0, 2**16)), n)
        else:
            ids[row, off : off + n] = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)))
        attn[row, off : off + n] = 1
    loss_mask = draw(st.sampled_from([loss, None]))
    attn = attn.to(draw(st.sampled_from([torch.long, torch.int32, torch.bool])))
    on = attn[r].nonzero().flatten()
    p = int(on[draw(st.integers(0, on.numel() - 1))])  # a real position of row r
    expect: tuple[str, int | None] | None = None

    if kind in ("valid", "valid_at_max_context"):
        pass
    elif kind == "token_negative":
        ids[r, p] = -draw(st.integers(1, 2**62))
        expect = ("token_out_of_range", r)
    elif kind == "token_too_high":
        ids[r, p] = VOCAB + draw(st.integers(0, 2**62))
        expect = ("token_out_of_range", r)
    elif kind == "empty_row":
        attn[r] = 0
        expect = ("empty_sequence", r)
    elif kind == "gap":
        attn[r, int(on[draw(st.integers(1, on.numel() - 2))])] = 0  # an inner hole: two runs
        expect = ("bad_attention_mask", r)
    elif kind == "attention_shape":
        attn = draw(st.sampled_from([attn[:, :-1], attn[:-1], torch.cat([attn, attn[:, :1]], 1), attn.T]))
        expect = ("bad_attention_mask", None)
        if attn.shape == ids.shape:  # a square batch transposed: still the right shape, not this damage
            attn = attn[:, :-1]
    elif kind == "loss_shape":
        loss_mask = draw(st.sampled_from([loss[:, :-1], loss[:-1], torch.cat([loss, loss[:, :1]], 1)]))
        expect = ("loss_mask_length", None)
    elif kind == "loss_value":
        loss_mask = loss.clone()
        loss_mask[r, p] = draw(st.sampled_from([2, -1, 100]))
        expect = ("bad_tensor", r)
    elif kind == "ids_dtype":
        ids = ids.to(draw(st.sampled_from([*FLOATS, torch.bool])))
        expect = ("bad_tensor", None)
    elif kind.startswith("rank:"):
        which = kind.split(":")[1]
        squash = draw(st.sampled_from([lambda t: t[0], lambda t: t[None], lambda t: t.flatten()]))
        if which == "ids":
            ids = squash(ids)
        elif which == "attn":
            attn = squash(attn)
        else:
            loss_mask = squash(loss)
        expect = ("bad_tensor", None)
    elif kind == "empty_batch":
        rows, cols = draw(st.sampled_from([(0, s), (b, 0), (0, 0)]))
        ids, attn = ids[:rows, :cols], attn[:rows, :cols]
        loss_mask = None if loss_mask is None else loss[:rows, :cols]
        expect = ("empty_batch", None)
    elif kind == "too_long":
        expect = ("sequence_too_long", r)
    else:
        raise AssertionError(kind)
    return PaddedCase(kind, ids, attn, loss_mask, expect)


# ---------------------------------------------------------------------------------------------
# Checks


def assert_rejected(err: InvalidBatchError, expect: tuple[str, int | None]) -> None:
    code, sequence = expect
    assert code in ERROR_CODES
    assert (err.code, err.sequence) == (code, sequence), str(err)
    assert str(err).startswith(f"[{code}]"), str(err)


def assert_unharmed(pool: PooledTargetModel, pids: list[tuple[int, int]]) -> None:
    """No replica died, failed a shard or was replaced; the same processes serve; nothing left in flight."""
    stats = pool.stats()
    assert stats["replicas_replaced"] == 0, stats
    assert stats["shards_quarantined"] == 0, stats
    assert stats["inflight_bytes"] == 0, stats
    assert [(r["state"], r["failures"]) for r in stats["replicas"]] == [("ready", 0)] * len(pids), stats
    assert replica_pids(pool) == pids


def assert_same(got, want, batch: PackedBatch, logits: bool) -> None:
    """Pool supervision == the direct engine's, for the same batch, with canonical (long) ids."""
    torch.testing.assert_close(got.aux_hidden_states, want.aux_hidden_states, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.last_hidden_states, want.last_hidden_states, atol=ATOL, rtol=0)
    if logits:
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    else:
        assert got.logits is None
    for f in ("input_ids", "loss_mask", "cu_seqlens"):
        assert getattr(got, f).dtype == torch.long, f
        assert torch.equal(getattr(got, f), getattr(batch, f).to(torch.long)), f
    assert want.aux_hidden_states.abs().max() > 0.5  # far from zero: the comparison means something


def assert_shards_match(results, batches: list[PackedBatch], reference) -> None:
    """Ordered shards cover every sequence of each batch once, in order, with the engine's values."""
    keys = [(r.batch_index, *r.sequences) for r in results]
    assert keys == sorted(keys), keys
    for k, batch in enumerate(batches):
        mine = [r for r in results if r.batch_index == k]
        spans = [r.sequences for r in mine]
        assert spans and spans[0][0] == 0 and spans[-1][1] == batch.num_sequences, spans
        assert all(a[1] == c[0] for a, c in zip(spans, spans[1:], strict=False)), spans
        cu = batch.cu_seqlens.to(torch.long)  # the batch may come in any integer dtype
        assert all(r.error is None and r.num_tokens == int(cu[r.sequences[1]] - cu[r.sequences[0]]) for r in mine)
        parts = ray.get([r.ref for r in mine])
        got = torch.cat([p.aux_hidden_states for p in parts])
        last = torch.cat([p.last_hidden_states for p in parts])
        want = reference.forward_packed(batch)
        torch.testing.assert_close(got, want.aux_hidden_states, atol=ATOL, rtol=0)
        torch.testing.assert_close(last, want.last_hidden_states, atol=ATOL, rtol=0)
        assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids.to(torch.long))


def assert_serves_normal_batch(pool: PooledTargetModel, reference) -> None:
    batch = random_batch([13, 1, 30, 7], seed=99)
    assert_same(pool.forward_packed(batch, True), reference.forward_packed(batch, True), batch, logits=True)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("engine", ENGINES)
def test_forward_packed_serves_or_rejects(engine, pools, reference):
    pool, pids = pools[engine]
    max_context = pool.info.max_context

    def check(case: Case, logits: bool) -> None:
        delivered = pool.stats()["shards_delivered"]
        if case.expect is None:
            got = pool.forward_packed(case.batch, logits)
            assert_same(got, reference.forward_packed(case.batch, logits), case.batch, logits)
        else:
            with pytest.raises(InvalidBatchError) as err:
                pool.forward_packed(case.batch, logits)
            assert_rejected(err.value, case.expect)
            assert pool.stats()["shards_delivered"] == delivered  # rejected before dispatch
        assert_unharmed(pool, pids)

    for kind, n in PACKED_KINDS.items():
        fuzz(n)(given(case=packed_case(kind, max_context), logits=st.booleans())(check))()
    assert_unharmed(pool, pids)
    assert_serves_normal_batch(pool, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_submit_serves_or_rejects(engine, pools, reference):
    pool, pids = pools[engine]
    max_context = pool.info.max_context

    def check(case: Case) -> None:
        if case.expect is None:
            results = pool.submit(case.batch)
            assert {r.batch_index for r in results} == {0}
            assert_shards_match(results, [case.batch], reference)
        else:
            with pytest.raises(InvalidBatchError) as err:
                pool.submit(case.batch)
            assert_rejected(err.value, case.expect)
        assert_unharmed(pool, pids)

    for kind, n in PACKED_KINDS.items():
        fuzz(min(n, 5) if kind == "valid" else min(n, 2))(given(case=packed_case(kind, max_context))(check))()
    assert_unharmed(pool, pids)
    assert_serves_normal_batch(pool, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_serves_batches_before_the_bad_one_then_raises(engine, pools, reference):
    pool, pids = pools[engine]
    max_context = pool.info.max_context

    @st.composite
    def stream_case(draw, kind: str) -> tuple[list[PackedBatch], Case]:
        good = draw(st.lists(packed_case("valid", max_context), min_size=0 if kind != "valid" else 1, max_size=2))
        return [c.batch for c in good], draw(packed_case(kind, max_context))

    def check(case: tuple[list[PackedBatch], Case], ordered: bool) -> None:
        good, last = case
        batches = [*good, last.batch]
        results = []
        if last.expect is None:
            results = list(pool.stream(batches, ordered=ordered))
            served = batches
        else:
            with pytest.raises(InvalidBatchError) as err:
                for r in pool.stream(batches, ordered=ordered):
                    results.append(r)
            assert_rejected(err.value, last.expect)
            served = good
        if not ordered:
            results.sort(key=lambda r: (r.batch_index, r.sequences))
        assert {r.batch_index for r in results} == set(range(len(served)))  # nothing of or after the bad one
        assert_shards_match(results, served, reference)
        del results  # release the shards: the pool counts held bytes until then
        assert_unharmed(pool, pids)

    for kind in PACKED_KINDS:
        if not kind.startswith("valid_"):  # forward_packed and submit cover the layouts
            fuzz(3 if kind == "valid" else 2)(given(case=stream_case(kind), ordered=st.booleans())(check))()
    assert_unharmed(pool, pids)
    assert_serves_normal_batch(pool, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_batch_serves_or_rejects(engine, pools, reference):
    pool, pids = pools[engine]
    max_context = pool.info.max_context

    def check(case: PaddedCase) -> None:
        args = (case.input_ids, case.attention_mask, case.loss_mask)
        if case.expect is None:
            got, want = pool.generate_batch(*args), reference.generate_batch(*args)
            torch.testing.assert_close(got.aux_hidden_states, want.aux_hidden_states, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
            for f in ("input_ids", "attention_mask", "loss_mask"):
                assert torch.equal(getattr(got, f), getattr(want, f)), f
            pad = ~case.attention_mask.bool()
            assert not got.aux_hidden_states[pad].any()  # pad tokens never ran
            assert want.aux_hidden_states.abs().max() > 0.5
        else:
            with pytest.raises(InvalidBatchError) as err:
                pool.generate_batch(*args)
            assert_rejected(err.value, case.expect)
        assert_unharmed(pool, pids)

    for kind, n in PADDED_KINDS.items():
        fuzz(n)(given(case=padded_case(kind, max_context))(check))()
    assert_unharmed(pool, pids)
    assert_serves_normal_batch(pool, reference)
