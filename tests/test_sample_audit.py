"""The sample log's audit (pure file replay): restarts roll back, duplicates and gaps are caught."""

from __future__ import annotations

import pytest
import torch

from eagle_ray import PackedBatch
from eagle_ray.train.sample_audit import (
    SampleLogWriter,
    audit_run,
    batch_fingerprints,
    check_skip_budget,
    expected_samples,
    fingerprints,
)

WORLD = 2


def _batches(n: int) -> list[PackedBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        seqs = [torch.randint(0, 100, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(3)]
        out.append(PackedBatch.from_sequences(seqs, [torch.ones_like(s) for s in seqs]))
    return out


def _write(run_dir, batches, rank: int, steps: range, start: int = 0, incarnation: str = "a") -> SampleLogWriter:
    w = SampleLogWriter(run_dir, rank)
    w.start(start, incarnation)
    for s in steps:
        w.step(s, s * WORLD + rank, batch_fingerprints(batches[s * WORLD + rank]))
    return w


def test_fingerprints_are_per_sequence_and_see_ids_and_mask():
    ids, cu = torch.tensor([1, 2, 3, 1, 2, 3]), torch.tensor([0, 3, 6])
    a = fingerprints(ids, torch.ones(6, dtype=torch.bool), cu)
    assert len(a) == 2 and a[0] == a[1]  # same tokens, same mask
    b = fingerprints(ids, torch.tensor([1, 1, 1, 1, 1, 0]), cu)
    assert b[0] == a[0] and b[1] != a[1]  # the mask is part of the sample
    assert fingerprints(torch.tensor([1, 2, 4, 1, 2, 3]), torch.ones(6), cu)[0] != a[0]


def test_fault_free_run_commits_every_sample_once(tmp_path):
    batches = _batches(8)
    for rank in range(WORLD):
        _write(tmp_path, batches, rank, range(4))
    audit = audit_run(tmp_path, WORLD)
    assert audit.ok and audit.steps == 4 and audit.restarts == 0 and audit.duplicates == 0
    assert audit.samples == expected_samples(batches) and audit.compare(expected_samples(batches)) == []


def test_restart_rolls_back_steps_after_the_checkpoint(tmp_path):
    batches = _batches(12)
    for rank in range(WORLD):
        w = _write(tmp_path, batches, rank, range(5))  # trained steps 0-4, checkpoint at 3 ...
        w.start(3, "b")  # ... died; the new group resumes from step 3 and trains 3-5 again
        for s in range(3, 6):
            w.step(s, s * WORLD + rank, batch_fingerprints(batches[s * WORLD + rank]))
    audit = audit_run(tmp_path, WORLD)
    assert audit.ok, audit.problems
    assert audit.restarts == 1 and audit.rolled_back == 2 * WORLD and audit.steps == 6
    assert audit.samples == expected_samples(batches)


def test_duplicates_gaps_and_wrong_data_are_problems(tmp_path):
    batches = _batches(8)
    _write(tmp_path, batches, 0, range(4))
    w = _write(tmp_path, batches, 1, range(3))
    w.step(2, 5, batch_fingerprints(batches[5]))  # step 2 again, no restart between
    audit = audit_run(tmp_path, WORLD)
    assert not audit.ok and audit.duplicates == batches[5].num_sequences
    assert any("twice" in p for p in audit.problems) and any("different step counts" in p for p in audit.problems)
    assert audit.compare(expected_samples(batches))[0].startswith("3 samples missing")  # batch 7 never trained

    other = tmp_path / "other"
    _write(other, batches, 0, range(4))
    w = SampleLogWriter(other, 1)
    w.start(0, "a")
    for s in range(4):  # rank 1 trained rank 0's batches: the data position is wrong
        w.step(s, s * WORLD, batch_fingerprints(batches[s * WORLD]))
    audit = audit_run(other, WORLD)
    assert any("trained batch 0, not 1" in p for p in audit.problems)

    gap = tmp_path / "gap"
    w = _write(gap, batches, 0, range(2))
    w.start(3, "b")  # resumes past what was committed: steps lost
    audit = audit_run(gap, 1)
    assert any("after a gap" in p for p in audit.problems)


def test_changed_content_is_reported(tmp_path):
    batches = _batches(4)
    for rank in range(WORLD):
        _write(tmp_path, batches, rank, range(2))
    want = expected_samples(batches)
    want[(1, 0)] = "0" * 16
    assert audit_run(tmp_path, WORLD).compare(want) == ["1 samples different content (batch, sequence): [(1, 0)]"]


def test_a_skipped_batch_is_accounted_for_not_missing_and_rolls_back_like_a_step(tmp_path):
    batches = _batches(8)
    _write(tmp_path, batches, 0, range(4))
    w = SampleLogWriter(tmp_path, 1)
    w.start(0, "a")
    for s in range(4):
        if s == 2:  # a poison batch: skipped, its cause recorded; then a restart at step 2 skips it again
            w.skip(s, s * WORLD + 1, "shard 9 quarantined after 3 failed attempts")
            w.start(2, "b")
            w.skip(s, s * WORLD + 1, "shard 12 quarantined after 3 failed attempts")
        else:
            w.step(s, s * WORLD + 1, batch_fingerprints(batches[s * WORLD + 1]))
    audit = audit_run(tmp_path, WORLD)
    assert audit.ok and audit.steps == 4 and audit.rolled_back == 1, audit.problems
    assert audit.skipped == {5: "shard 12 quarantined after 3 failed attempts"}
    assert audit.compare(expected_samples(batches)) == []  # batch 5's samples: skipped, not missing
    assert all(k[0] != 5 for k in audit.samples) and len(audit.samples) == 7 * 3


def test_a_run_over_its_skip_budget_fails_naming_each_skipped_batch_and_its_cause(tmp_path):
    """What every rank raises (the loop calls it after each step's all-reduce of the skip count): within the budget
    nothing; over it, each skipped batch from the sample logs, with the first line of the pool's verdict."""
    batches = _batches(8)
    _write(tmp_path, batches, 0, range(3))
    _write(tmp_path, batches, 1, range(2)).skip(2, 5, "batch 5 quarantined: it failed on 2 replicas\nTraceback ...")
    assert audit_run(tmp_path, WORLD).skipped == {5: "batch 5 quarantined: it failed on 2 replicas\nTraceback ..."}
    check_skip_budget(tmp_path, WORLD, skipped=1, limit=1)
    check_skip_budget(tmp_path, WORLD, skipped=0, limit=0)
    with pytest.raises(RuntimeError) as err:
        check_skip_budget(tmp_path, WORLD, skipped=1, limit=0)
    assert str(err.value) == (
        "1 poison batches skipped, more than max_skipped_batches=0: "
        "batch 5: batch 5 quarantined: it failed on 2 replicas"
    )
