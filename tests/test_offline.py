"""Offline mode: dump a real shared pool's supervision (HF replica, local Ray) from writer tasks that are its
clients, resume after a crash, the dump job's CLI end to end, the epoch cache, a sweep of three drafts fed by one
stream (each arm trains as alone; an arm that fails goes back to its checkpoint, the others untouched), and
training from the dump, each rank reading its own batches' files, with the pool shut down (last: it stops the
pool). The pool splits a batch in two shards (`shard_tokens`): what is written is the joined batch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from eagle_ray import PackedBatch
from eagle_ray.draft.export import load_draft
from eagle_ray.hf_checkpoint import load_config
from eagle_ray.offline import (
    SHARD_FIELDS,
    DumpMismatchError,
    MissingSupervisionError,
    OfflineSupervision,
    _exclusive,
    dump_supervision,
    shard_name,
)
from eagle_ray.pool import serve_pool
from eagle_ray.tiny import markov_sequences
from eagle_ray.train.loop import DraftTrainConfig
from eagle_ray.train.trainer import train_draft

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


def _batches(n: int, per_batch: int = 4, seed: int = 5) -> list[PackedBatch]:
    seqs = markov_sequences(n * per_batch, (16, 32), seed=seed)
    masks = [(torch.arange(s.numel()) >= 4).long() for s in seqs]  # a prompt part, not trained on
    return [
        PackedBatch.from_sequences(seqs[i : i + per_batch], masks[i : i + per_batch])
        for i in range(0, len(seqs), per_batch)
    ]


def _assert_same(a, b) -> None:
    for k in SHARD_FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and torch.equal(x, y), k


def _shards(d: Path) -> dict[str, tuple[int, int]]:
    """Shard file -> (inode, mtime): a rewritten shard changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.glob("batch_*.safetensors"))}


@pytest.fixture(scope="module")
def cluster(shared_ray):
    yield


@pytest.fixture(scope="module")
def pool(cluster, tiny_paths):
    with serve_pool("offline", tiny_paths["llama"], engine="hf", replicas=1, cpus_per_replica=1, shard_tokens=64) as p:
        yield p


def test_dump_is_bit_identical_to_the_pool(pool, tiny_paths, tmp_path):
    batches = _batches(4)
    assert all(b.num_tokens > 64 for b in batches)  # each comes back from the pool in two shards or more
    manifest = dump_supervision(pool, batches, tmp_path, writers=2)
    assert manifest["complete"] and manifest["num_batches"] == 4 and manifest["last_run"]["written"] == 4
    assert [e["file"] for e in manifest["batches"]] == [shard_name(i) for i in range(4)]
    assert manifest["num_tokens"] == sum(b.num_tokens for b in batches)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    off = OfflineSupervision(tmp_path)
    for b in batches:
        _assert_same(off.load(b), pool.forward_packed(b))
    assert off.info == pool.info
    embed, head = off.weights()
    assert torch.equal(embed, pool.get_input_embeddings().weight) and torch.equal(head, pool.get_lm_head_weight())
    config = lambda path: {k: v for k, v in load_config(path).to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config(off.model_path) == config(tiny_paths["llama"])
    with pytest.raises(MissingSupervisionError, match="not in the dump"):
        off.load(_batches(1, seed=9)[0])
    # one writer or two: the same files
    one = dump_supervision(pool, batches, tmp_path / "one", writers=1)
    assert one["batches"] == manifest["batches"]
    for i in range(4):
        a, b = load_file(tmp_path / shard_name(i)), load_file(tmp_path / "one" / shard_name(i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="serve_pool"):
        dump_supervision(off, batches, tmp_path / "nowhere")


def test_crash_resume_writes_each_batch_exactly_once(pool, tmp_path):
    batches = _batches(6)
    bad = batches[4].input_ids.clone()
    bad[0] = 10**6  # out of the vocabulary: the writer's pool client refuses it when it gets there
    crashing = [*batches[:4], PackedBatch(bad, batches[4].loss_mask, batches[4].cu_seqlens), batches[5]]
    with pytest.raises(Exception, match="outside|batch 4"):
        dump_supervision(pool, crashing, tmp_path)
    before = _shards(tmp_path)
    k = len(before)
    assert k == 4 and list(before) == [shard_name(i) for i in range(k)]  # one writer: the prefix before the crash
    # a crash mid-write leaves only a temp file; one between a shard's rename and the manifest update
    # leaves a shard the manifest does not list
    (tmp_path / (shard_name(k) + ".tmp")).write_bytes(b"half a shard")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["batches"] = manifest["batches"][:-1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    resumed = dump_supervision(pool, batches, tmp_path, writers=2)
    assert resumed["last_run"]["written"] == 6 - k and resumed["last_run"]["skipped"] == k
    assert list(_shards(tmp_path)) == [shard_name(i) for i in range(6)] and not list(tmp_path.glob("*.tmp"))
    assert {n: v for n, v in _shards(tmp_path).items() if n in before} == before  # never rewritten
    assert [e["index"] for e in resumed["batches"]] == list(range(6)) and resumed["complete"]
    assert resumed["num_tokens"] == sum(b.num_tokens for b in batches)
    off = OfflineSupervision(tmp_path)
    for i, b in enumerate(batches):
        _assert_same(off.load(b), pool.forward_packed(b))
        assert load_file(tmp_path / shard_name(i))["input_ids"].equal(b.input_ids)

    state = _shards(tmp_path)
    again = dump_supervision(pool, batches, tmp_path)  # complete already: nothing to do
    assert again["last_run"] == {**again["last_run"], "written": 0, "skipped": 6} and _shards(tmp_path) == state

    # other data, or another target, on the same directory: refused, nothing touched
    with pytest.raises(DumpMismatchError, match="batch 0 differs"):
        dump_supervision(pool, _batches(6, seed=11), tmp_path)
    other = tmp_path / "other"  # a dump of another target (its weights' hash differs)
    other.mkdir()
    for name in ("target", "target.safetensors"):
        os.symlink(tmp_path / name, other / name)
    theirs = json.loads((tmp_path / "manifest.json").read_text())
    theirs["target"]["weights_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(theirs))
    with pytest.raises(DumpMismatchError, match="another target"):
        dump_supervision(pool, batches, other)
    with _exclusive(tmp_path), pytest.raises(RuntimeError, match="another dump_supervision"):
        dump_supervision(pool, batches, tmp_path)
    assert _shards(tmp_path) == state


def test_job_dumps_then_trains_from_the_dump(cluster, tmp_path, tiny_paths):
    """The job's config switch: `jobs/dump_supervision.py` writes shards, `offline.mode=from_dump` trains on them."""
    data = tmp_path / "tokens.jsonl"
    g = torch.Generator().manual_seed(5)
    with data.open("w") as f:
        for _ in range(40):
            n = int(torch.randint(8, 30, (1,), generator=g))
            ids = torch.randint(0, 1024, (n,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 3 + [1] * (n - 3)}) + "\n")
    common = [
        f"target.model_path={tiny_paths['llama']}",
        "target.engine=hf",
        "target.replicas=1",
        "data.format=pretokenized",
        f"data.paths=[{data}]",
        "data.max_length=64",
        "data.batch_tokens=128",
        "data.shuffle_buffer=0",
        "draft.vocab_size=256",
        "training.max_steps=4",
        "training.ttt_steps=2",
        "checkpoint.every=2",
        f"checkpoint.storage_path={tmp_path}",
        "logging.plot=false",
        "eval.enabled=false",
        f"offline.dir={tmp_path / 'sup'}",
    ]
    # joins this module's cluster through RAY_ADDRESS, as under `ray job submit` (and faster than its own Ray)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    def job(script: str, name: str, *extra: str) -> dict:
        cmd = [sys.executable, script, *common, f"checkpoint.name={name}", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    dumped = job("jobs/dump_supervision.py", "dump")
    off = OfflineSupervision(tmp_path / "sup")
    assert dumped["batches"] == len(off) == 4 and off.manifest["complete"]
    trained = job("jobs/train_eagle3.py", "from-dump", "offline.mode=from_dump")
    assert trained["steps"] == 4 and trained["engine"] == "offline" and Path(trained["export"]).exists()


# ------------------------------------------------------------------------------------------ the epoch cache


def _chat_source(tmp_path: Path, records: int = 48):
    """Pre-tokenized records in blocks of 16, reshuffled and repacked every epoch (greedy, 128 tokens a batch)."""
    from eagle_ray.data import make_batch_source

    data = tmp_path / "epochs.jsonl"
    g = torch.Generator().manual_seed(11)
    with data.open("w") as f:
        for _ in range(records):
            n = int(torch.randint(8, 30, (1,), generator=g))
            ids = torch.randint(0, 1024, (n,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 3 + [1] * (n - 3)}) + "\n")
    kw = dict(max_length=64, batch_tokens=128, shuffle_buffer=16, seed=3, workers=0)
    return make_batch_source("pretokenized", data, None, **kw)[0]


def test_later_epochs_are_pieces_of_the_first_epochs_batches(tmp_path):
    """`epoch_origins`: each sequence of a later epoch's (reshuffled, repacked) batch is a first-epoch batch's."""
    source = _chat_source(tmp_path).for_ranks()
    first = source.batches_per_epoch()
    batches = list(itertools.islice(source.rank_batches(0, 1), 3 * first))
    repacked, epochs = 0, []
    for g, batch in enumerate(batches):
        epoch, origins = source.epoch_origins(g)
        epochs.append(epoch)
        assert len(origins) == batch.num_sequences
        for k, (b, pos) in enumerate(origins):
            assert b < first and torch.equal(
                batch.input_ids[batch.sequence(k)], batches[b].input_ids[batches[b].sequence(pos)]
            )
        repacked += len({b for b, _ in origins}) > 1
    assert epochs[:first] == [0] * first and epochs == sorted(epochs) and epochs[-1] == 2
    assert repacked > first  # later epochs really mix the first epoch's batches


def _epoch_runs_config(first: int, **kw) -> DraftTrainConfig:
    # two epochs: 2 x first batches over 2 workers; one checkpoint, at the end (or where the run stops)
    return DraftTrainConfig(
        **{"max_steps": first, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": first, "log_every": 4, **kw}
    )


@pytest.fixture(scope="module")
def epoch_setup(tmp_path_factory):
    """The two-epoch runs' data (48 records, reshuffled and repacked every epoch), batches per epoch, and arguments."""
    tmp = tmp_path_factory.mktemp("epochs")
    source = _chat_source(tmp)
    first = source.batches_per_epoch()
    common = dict(
        storage_path=tmp / "runs", num_workers=WORKERS, backend="gloo", resources_per_worker={"CPU": 1},
        vocab_batches=first, progress="off",
    )  # fmt: skip
    return source, first, common


@pytest.fixture(scope="module")
def epoch_runs(pool, epoch_setup):
    """The same two-epoch run (2 workers) all online, and with the epoch cache, stopped in epoch 2 and resumed."""
    from eagle_ray.train import EpochCacheConfig

    source, first, common = epoch_setup
    online = train_draft(pool, source, _epoch_runs_config(first), name="online", **common)
    stop = first // 2 + 2  # both ranks well into epoch 2
    cached = {"name": "cached", "cache": EpochCacheConfig(), **common}
    stopped = train_draft(pool, source, _epoch_runs_config(first, stop_at_step=stop), **cached)
    resumed = train_draft(pool, source, _epoch_runs_config(first), **cached)
    return source, first, online, stop, stopped, resumed


def test_epoch_two_from_the_cache_trains_as_online(epoch_runs):
    source, first, online, _, _, cached = epoch_runs
    assert [r["step"] for r in cached.history] == list(range(1, first + 1))
    for mine, ref in zip(cached.history, online.history, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), mine["step"]
        assert mine["samples"] == ref["samples"] and mine["tokens"] == ref["tokens"]
    tokens = cached.history[-1]["tokens"]
    epoch1 = sum(b.num_tokens for b in itertools.islice(source.batches_from(0), first))
    # the target computed epoch 1 once; epoch 2 came from the files (every rank reading both ranks' files)
    assert sum(r["target_tokens"] for r in online.history) == tokens
    assert sum(r["target_tokens"] for r in cached.history) == epoch1
    assert sum(r["cached_tokens"] for r in cached.history) == tokens - epoch1 > 0
    held = cached.cache
    assert (
        held["complete"] and held["batches"] == first and held["tokens"] == epoch1 and held["full_from_batch"] is None
    )
    assert held["bytes_per_token"] > 4 * 64 * 4  # 4H float32 values a token (tiny H=64), plus ids and headers
    assert len(OfflineSupervision(held["dir"])) == first  # the cache is a dump: from_dump reads it
    assert online.cache is None


def test_a_run_stopped_in_epoch_two_resumes_exactly(epoch_runs):
    """Stopped in epoch 2 and resumed: the same batches, step for step, as the unstopped (online) run, the resumed
    part read from the cache alone; its losses are the online run's (checked above, step for step)."""
    from eagle_ray.train.sample_audit import audit_run

    _, first, online, stop, stopped, resumed = epoch_runs
    assert stopped.steps == stop and stopped.export_dir is None and resumed.steps == first
    assert [r["target_tokens"] for r in resumed.history[stop:]] == [0] * (first - stop)
    resumed_tokens = resumed.history[-1]["tokens"] - resumed.history[stop - 1]["tokens"]
    assert sum(r["cached_tokens"] for r in resumed.history[stop:]) == resumed_tokens > 0
    run, ref = audit_run(resumed.export_dir.parent, WORKERS), audit_run(online.export_dir.parent, WORKERS)
    assert run.ok and run.restarts == 1 and run.samples == ref.samples, run.problems
    assert resumed.history[stop]["loss"] == pytest.approx(online.history[stop]["loss"], rel=1e-5)


def test_the_cache_budget_defaults_to_most_of_the_free_disk_and_says_what_epoch_one_needs(pool, tmp_path, caplog):
    """No `max_bytes`: 80% of the free space where the cache lives (a run's disk also holds its checkpoints). The
    start-up line gives an upper bound of epoch 1's size; a budget below it warns with the share it holds."""
    import logging
    import shutil

    from eagle_ray.train import EpochCacheConfig
    from eagle_ray.train.trainer import _epoch_cache

    source = _chat_source(tmp_path)
    first = source.batches_per_epoch()
    need = first * source.batch_tokens * pool.info.bytes_per_token
    with caplog.at_level(logging.INFO, logger="eagle_ray.train.trainer"):
        spec = _epoch_cache(EpochCacheConfig(), pool, source, 2 * first, tmp_path / "default")
        free = shutil.disk_usage(spec["dir"]).free
        assert 0.75 * free < spec["max_bytes"] < 0.85 * free
        assert f"at most {need / 1e9:.2f} GB" in caplog.text and "80% of the free space" in caplog.text
        assert "the pool serves the rest" not in caplog.text or spec["max_bytes"] < need
        spec = _epoch_cache(EpochCacheConfig(max_bytes=need // 4), pool, source, 2 * first, tmp_path / "small")
    assert spec["max_bytes"] == need // 4 and "its budget holds about 25% of epoch 1" in caplog.text
    assert _epoch_cache(EpochCacheConfig(), pool, source, first, tmp_path / "one") is None  # one epoch: no cache


def test_the_first_epoch_is_written_ahead_of_training(pool, tmp_path):
    """While training holds its first batch, the rank's writer puts its whole first epoch through the pool into the
    cache: every file is there, the writer says it is through (`done_rank0.json`), and no result is held in memory
    (the client's byte budget is free). Training then reads both epochs from the files, each batch once, as the
    pool computes it; the target computed epoch 1 once."""
    from eagle_ray.train.epoch_cache import CachedSupply, EpochCache, init_epoch_cache, marker
    from eagle_ray.train.reader import PoolSupply, RankReader

    source = _chat_source(tmp_path).for_ranks()
    first = source.batches_per_epoch()
    batches = list(itertools.islice(source.rank_batches(0, 1), 2 * first))
    root = init_epoch_cache(tmp_path / "cache", pool)
    supply = CachedSupply(PoolSupply(pool), EpochCache(root, first, None, 0, 1), source, 0, 1, 0)
    served = []
    for step, sup, _ in RankReader(supply, iter(batches)):
        deadline = time.monotonic() + 120
        while step == 0 and not (marker(root, "done", 0).exists() and pool.stats()["held_bytes"] == 0):
            assert time.monotonic() < deadline, "the first epoch was not written ahead of training"
            time.sleep(0.05)
        if step == 0:
            assert sorted(root.glob("batch_*.safetensors")) == [root / shard_name(i) for i in range(first)]
        served.append((step, sup))
    assert [s for s, _ in served] == list(range(2 * first))
    epoch1 = sum(b.num_tokens for b in batches[:first])
    assert supply.tokens == epoch1 and supply.missed == 0
    assert supply.cached_tokens == sum(b.num_tokens for b in batches[first:])
    for (_, sup), batch in zip(served, batches, strict=True):
        ref = pool.forward_packed(batch)
        assert torch.equal(sup.input_ids.long(), batch.input_ids.long())
        torch.testing.assert_close(sup.aux_hidden_states, ref.aux_hidden_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sup.last_hidden_states, ref.last_hidden_states, rtol=1e-5, atol=1e-5)


def test_a_full_epoch_cache_falls_back_to_the_pool_and_says_so_once(pool, tmp_path, caplog):
    """A rank whose share of `max_bytes` fills up caches no more; the later epoch's batches that need what it did
    not cache come from the pool, equal to what the pool computes for them."""
    from eagle_ray.train.epoch_cache import CachedSupply, EpochCache, init_epoch_cache
    from eagle_ray.train.reader import PoolSupply, RankReader

    source = _chat_source(tmp_path).for_ranks()
    first = source.batches_per_epoch()
    batches = list(itertools.islice(source.rank_batches(0, 1), 2 * first))
    per_token = 4 * pool.info.hidden_size * 4 + 8 + 8  # float32 aux + last hidden, int64 id and mask
    budget = per_token * sum(b.num_tokens for b in batches[: first // 2])  # about half of epoch 1
    root = init_epoch_cache(tmp_path / "cache", pool)
    supply = CachedSupply(PoolSupply(pool), EpochCache(root, first, budget, 0, 1), source, 0, 1, 0)
    with caplog.at_level("WARNING", logger="eagle_ray.train.epoch_cache"):
        served = [(step, sup) for step, sup, _ in RankReader(supply, iter(batches))]
    full = [r for r in caplog.records if "epoch cache full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    held = sorted(int(p.name[6:14]) for p in root.glob("batch_*.safetensors"))
    assert 0 < len(held) < first and held == list(range(len(held)))  # the first batches, then nothing
    assert (root / "full_rank0.json").exists()
    later = batches[first:]
    hits = [b for g, b in enumerate(later, first) if all(o < len(held) for o, _ in source.epoch_origins(g)[1])]
    assert supply.missed == len(later) - len(hits) > 0 and supply.cached_tokens == sum(b.num_tokens for b in hits)
    assert supply.tokens == sum(b.num_tokens for b in batches) - supply.cached_tokens
    assert [s for s, _ in served] == list(range(2 * first))
    for (_, sup), batch in zip(served[first:], later, strict=True):  # cache or pool: the pool's supervision
        ref = pool.forward_packed(batch)
        assert torch.equal(sup.input_ids.long(), batch.input_ids.long())
        torch.testing.assert_close(sup.aux_hidden_states, ref.aux_hidden_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sup.last_hidden_states, ref.last_hidden_states, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ a sweep (fan-out)

# arm 0 is the epoch runs' own config: the online run is its "alone"; checkpoint_every changes no loss
SWEEP = [{}, {"lr": 1e-2, "seed": 1}, {"lr": 1e-3, "seed": 2, "ttt_steps": 3, "step_decay": 0.5}]


def _arm_losses(result, arm: int) -> list[float]:
    return [r["arms"][arm]["loss"] if "arms" in r else r["loss"] for r in result.history]


@pytest.fixture(scope="module")
def swept(pool, epoch_setup):
    """The epoch runs' two epochs as a sweep of three arms, through the epoch cache, a checkpoint every 3 steps; the
    pool "released" to its one replica once the cache is complete (it stays: the other tests use it)."""
    from eagle_ray.train import EpochCacheConfig

    source, first, common = epoch_setup
    config = _epoch_runs_config(first, checkpoint_every=3)
    cache = EpochCacheConfig()
    return train_draft(pool, source, config, name="sweep", cache=cache, sweep=SWEEP, release_after_cache=1, **common)


def test_each_arm_of_a_sweep_trains_as_it_would_alone(pool, epoch_setup, epoch_runs, swept):
    """Three arms, one stream: the target computed epoch 1 once for all three (epoch 2 from the cache), and an arm's
    losses, checkpoints and export are those of the same config trained alone: arm 0's (the online run) and arm 2's,
    which differs from it in every field this sweep varies (arm 1 only in two of them, lr and seed)."""
    (source, first, common), online = epoch_setup, epoch_runs[2]
    h = swept.history
    assert [r["step"] for r in h] == list(range(1, first + 1)) and h[-1]["arm_restarts"] == 0
    epoch1 = sum(b.num_tokens for b in itertools.islice(source.batches_from(0), first))
    assert sum(r["target_tokens"] for r in h) == epoch1 and swept.cache["complete"]
    assert [r["loss"] for r in h] == _arm_losses(swept, 0)  # arm 0 at the top level, as a run of one draft reports
    assert swept.exports == [swept.export_dir.parent / f"arm{k}" for k in range(3)] and swept.export_dir.name == "arm0"
    alone = {0: online, 2: train_draft(pool, source, _epoch_runs_config(first, **SWEEP[2]), name="alone2", **common)}
    for k, ref in alone.items():
        assert _arm_losses(swept, k) == pytest.approx(_arm_losses(ref, 0), rel=1e-5, abs=1e-6), k
        mine, theirs = load_draft(swept.exports[k]).state_dict(), load_draft(ref.export_dir).state_dict()
        assert mine.keys() == theirs.keys(), k
        for name, t in mine.items():
            torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-6, msg=f"arm {k}: {name}")
    assert len({tuple(_arm_losses(swept, k)) for k in range(3)}) == 3  # the arms really differ


def test_a_sweep_releases_the_pool_before_it_trains_through_epoch_one(epoch_setup, epoch_runs, swept):
    """Three arms a step: training is slower than the pool, whose results of epoch 1 are all written while training
    is still in it; the release comes then, not after epoch 1. Every sample once, as in the online run."""
    from eagle_ray.train.sample_audit import audit_run

    _, first, _ = epoch_setup
    online = epoch_runs[2]
    released = swept.cache["released_at_step"]
    assert released is not None and released < -(-first // WORKERS), (released, first)
    run, ref = audit_run(swept.export_dir.parent.parent, WORKERS), audit_run(online.export_dir.parent, WORKERS)
    assert run.ok and run.samples == ref.samples, run.problems
    assert _arm_losses(swept, 0) == pytest.approx(_arm_losses(online, 0), rel=1e-5, abs=1e-6)


def test_an_arm_that_fails_catches_up_from_the_epoch_cache_and_the_others_go_on(pool, epoch_setup, swept, tmp_path):
    """Arm 1's forward raises on rank 0 in its 5th step (0-based step 4; the last checkpoint was after step 3): every
    rank puts it back to that checkpoint and replays steps 3 and 4 for it from the epoch cache, so from step 5 on it
    trains exactly as in the clean sweep; arms 0 and 2 never notice."""
    from eagle_ray.testing.faults import plan_arm_fault
    from eagle_ray.train import EpochCacheConfig

    source, first, common = epoch_setup
    common = {**common, "storage_path": tmp_path}
    plan_arm_fault(tmp_path / "faulty", 4, arm=1)
    config = _epoch_runs_config(first, checkpoint_every=3)
    run = train_draft(pool, source, config, name="faulty", sweep=SWEEP, cache=EpochCacheConfig(), **common)
    assert (tmp_path / "faulty" / "injected_arm1_failure_step4").exists()
    h = run.history
    assert [r["step"] for r in h] == list(range(1, first + 1)) and h[-1]["arm_restarts"] == 1
    assert [r["arms"][1]["restarts"] for r in h] == [0] * 4 + [1] * (first - 4)
    assert [r["arms"][1]["replayed"] for r in h] == [0] * 4 + [2] * (first - 4)
    assert h[4]["arms"][1]["failed"] and math.isnan(h[4]["arms"][1]["loss"])
    for k in (0, 2):
        assert _arm_losses(run, k) == pytest.approx(_arm_losses(swept, k), rel=1e-5, abs=1e-6), k
    ref = _arm_losses(swept, 1)
    assert _arm_losses(run, 1)[:4] + _arm_losses(run, 1)[5:] == pytest.approx(ref[:4] + ref[5:], rel=1e-5, abs=1e-6)
    assert run.steps == first and len(run.exports) == 3
    mine, theirs = load_draft(run.exports[1]).state_dict(), load_draft(swept.exports[1]).state_dict()
    for name, t in mine.items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_fp8_epoch_cache_holds_a_quarter_of_the_bytes_and_reads_back_within_fp8s_precision(pool, tmp_path):
    """`cache.fp8`: the hidden states as e4m3 with a float32 scale per token. A later epoch reads every batch from
    the files, each value within e4m3's rounding (3 mantissa bits: half an ulp is 1/16 of the value) of the pool's,
    or of the token's own scale for values near zero; ids and masks exact. The cache is still a dump: from_dump
    reads it, decoded the same way."""
    from eagle_ray.train.epoch_cache import CachedSupply, EpochCache, finish_epoch_cache, init_epoch_cache
    from eagle_ray.train.reader import PoolSupply, RankReader

    def within_fp8(got: torch.Tensor, want: torch.Tensor) -> bool:
        floor = want.abs().amax(dim=-1, keepdim=True) / 448 * 2**-9  # e4m3's smallest step at the token's scale
        return bool(((got - want).abs() <= want.abs() / 16 + floor).all()) and not torch.equal(got, want)

    source = _chat_source(tmp_path).for_ranks()
    first = source.batches_per_epoch()
    batches = list(itertools.islice(source.rank_batches(0, 1), 2 * first))
    root = init_epoch_cache(tmp_path / "cache", pool)
    supply = CachedSupply(PoolSupply(pool), EpochCache(root, first, None, 0, 1, fp8=True), source, 0, 1, 0)
    served = [sup for _, sup, _ in RankReader(supply, iter(batches))]
    assert supply.missed == 0 and supply.cached_tokens == sum(b.num_tokens for b in batches[first:])
    tokens = sum(b.num_tokens for b in batches[:first])
    on_disk = sum(p.stat().st_size for p in root.glob("batch_*.safetensors"))
    fp32 = tokens * pool.info.bytes_per_token
    assert on_disk < 0.35 * fp32, (on_disk, fp32)  # 4H bytes + 2 scales + ids and masks a token, vs 16H bytes
    dump = OfflineSupervision(finish_epoch_cache(root, first)["dir"])
    for sup, batch in zip(served[first:], batches[first:], strict=True):
        ref = pool.forward_packed(batch)
        assert torch.equal(sup.input_ids.long(), batch.input_ids.long())
        assert within_fp8(sup.aux_hidden_states, ref.aux_hidden_states)  # rounded (not equal), within e4m3's step
        assert within_fp8(sup.last_hidden_states, ref.last_hidden_states)
    for batch in batches[:first]:
        ref, got = pool.forward_packed(batch), dump.load(batch)
        assert within_fp8(got.aux_hidden_states, ref.aux_hidden_states) and got.aux_hidden_states.dtype == torch.float32


def test_training_from_the_dump_matches_training_from_the_pool(pool, epoch_setup, epoch_runs, tmp_path):
    """The online epoch run's two epochs of batches dumped, the pool shut down, and the same run trained again from
    the dump, each rank reading its own batches' files: the same losses, step for step."""
    source, first, common = epoch_setup
    online = epoch_runs[2]
    dump_supervision(pool, list(itertools.islice(source.batches_from(0), 2 * first)), tmp_path / "dump")
    pool.shutdown()  # from here on no target runs anywhere
    assert pool.stats()["replicas"] == []
    common = {**common, "storage_path": tmp_path / "runs"}
    offline = train_draft(
        OfflineSupervision(tmp_path / "dump"), source, _epoch_runs_config(first), name="offline", **common
    )
    assert [r["step"] for r in offline.history] == list(range(1, first + 1))
    for mine, ref in zip(offline.history, online.history, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-6), mine["step"]
        assert mine["samples"] == ref["samples"]
    assert offline.history[-1]["samples"] == online.history[-1]["samples"] > 0
    assert offline.export_dir is not None and (offline.export_dir / "config.json").exists()
