"""eagle_ray.data in Ray tasks: the same batches, stats, warnings and errors as in the driver, from other processes.

One private local Ray for the module (2 logical CPUs: two data tasks at once, as many as the cores). The
tokenizer counts its calls: in the driver it is never called when tasks prepare the data (each task has its
own copy), and the tasks name their processes (`source.task_pids`).
"""

from __future__ import annotations

import logging
import os
import random
from itertools import islice

import pytest
import torch
from test_data import BAD_ROWS, WORDS, CountingTokenizer, seqs, sharegpt, write_jsonl

from eagle_ray.data import DataError, load_tokenizer, make_batch_source


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(shared_ray):
    # the tasks unpickle CountingTokenizer from this directory's test_data module (on the shared Ray's path)
    yield


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """50 conversations and 3 bad records: with blocks of 6, nine blocks and a short last one."""
    rng = random.Random(1)
    rows = []
    for i in range(50):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [("human", f"q{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 30))))]
            turns += [("gpt", f"a{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 60))))]
        rows.append(sharegpt(turns))
    rows[8:8] = [BAD_ROWS[1], BAD_ROWS[2]]
    rows.insert(40, BAD_ROWS[4])
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", rows)


def run(path, tok, workers: int, index: int = 0, caplog=None, **kw):
    """(batches from `index` on, the source, its eagle_ray.data log lines) with the data prepared in the
    driver (workers=0) or in Ray tasks."""
    src, _ = make_batch_source("auto", path, tok, "chatml", workers=workers, **kw)
    if hasattr(tok, "calls"):
        tok.calls = 0  # the index's fingerprint encodes a probe text here
    if caplog is None:
        return list(src(index)), src, []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eagle_ray.data"):
        batches = list(src(index))
    return batches, src, [r.getMessage() for r in caplog.records if r.name == "eagle_ray.data"]


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
        assert torch.equal(x.cu_seqlens, y.cu_seqlens)


@pytest.mark.parametrize("shuffle", [0, 6])
def test_tasks_serve_the_driver_batches_stats_and_warnings(chats, qwen, caplog, shuffle):
    kw = dict(batch_tokens=256, shuffle_buffer=shuffle, block_records=None if shuffle else 6, seed=2, epochs=2)
    here, src0, lines0 = run(chats, qwen, 0, caplog=caplog, **kw)
    counting = CountingTokenizer(qwen)
    there, src, lines = run(chats, counting, 3, caplog=caplog, **kw)
    same_batches(there, here)
    assert len(seqs(here)) == 2 * 50
    assert src.stats.to_dict() == src0.stats.to_dict() and src.stats.complete
    assert src.index.blocks == src0.index.blocks  # starts, ends, lengths, stats: what index_path would hold
    assert lines == lines0 and sum(m.startswith("data, one full pass") for m in lines) == 1
    assert [m.split(": [")[0] for m in lines if m.startswith("skipped ")] == [
        f"skipped {chats}:{n}" for n in (9, 10, 41)
    ]
    assert counting.calls == 0 and src.task_pids and os.getpid() not in src.task_pids  # all encoding elsewhere
    assert src0.task_pids == set()


def test_seek_into_unindexed_data_and_from_a_saved_index(chats, qwen, caplog, tmp_path):
    kw = dict(batch_tokens=256, shuffle_buffer=6, seed=3, epochs=2)
    full, _, _ = run(chats, qwen, 0, **kw)
    k = len(full) // 2 + 3  # inside the second epoch
    here, _, lines0 = run(chats, qwen, 0, k, caplog=caplog, **kw)
    there, src, lines = run(chats, qwen, 2, k, caplog=caplog, index_path=tmp_path / "index.jsonl", **kw)
    same_batches(here, full[k:])
    same_batches(there, full[k:])
    assert lines == lines0 and src.stats.complete
    counting = CountingTokenizer(qwen)
    resumed, src2, lines2 = run(chats, counting, 2, k, caplog=caplog, index_path=tmp_path / "index.jsonl", **kw)
    same_batches(resumed, full[k:])  # a restarted job: the index from disk, no pass over the data
    assert src2.stats.to_dict() == src.stats.to_dict() and lines2 == [] and counting.calls == 0
    assert len(src2.task_pids) >= 1


def test_default_is_tasks_once_ray_is_up_and_a_closed_stream_leaves_nothing_wrong(chats, qwen):
    kw = dict(batch_tokens=256, block_records=6, epochs=2)
    full, _, _ = run(chats, qwen, 0, **kw)
    src, _ = make_batch_source("auto", chats, qwen, "chatml", **kw)  # workers=None
    first = list(islice(src(0), 5))  # closed early: its blocks in flight are kept for the next stream
    same_batches(first, full[:5])
    same_batches(list(src(0)), full)
    same_batches(list(src(len(full) - 2)), full[-2:])
    assert src.task_pids and os.getpid() not in src.task_pids
    assert 2 * src.batches_per_epoch() == len(full)


def test_max_records_counting_and_strict_in_tasks(chats, qwen):
    kw = dict(batch_tokens=256, block_records=5, max_records=20, epochs=1)  # 4 full blocks, then the end
    here, src0, _ = run(chats, qwen, 0, **kw)
    there, src, _ = run(chats, qwen, 2, **kw)
    same_batches(there, here)
    assert src.stats.records == 20 and src.stats.to_dict() == src0.stats.to_dict()
    kw["max_records"] = 33  # a short last block
    counted = [make_batch_source("auto", chats, qwen, "chatml", workers=w, **kw)[0] for w in (0, 2)]
    assert counted[0].batches_per_epoch() == counted[1].batches_per_epoch() and counted[1].stats.records == 33
    errors = []
    for workers in (0, 2):
        with pytest.raises(DataError, match=rf"{chats}:9: \[bad_json\]") as e:
            run(chats, qwen, workers, batch_tokens=256, block_records=4, strict=True)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
