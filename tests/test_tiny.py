"""The tiny targets' build: pretraining shows its progress (the job's default target takes minutes to build)."""

from __future__ import annotations

import json
import logging

from eagle_ray.tiny import _progress, build_tiny_target, markov_sequences, pretrain_tiny_target


def test_pretraining_reports_every_step_and_runs_once(tmp_path):
    path = build_tiny_target(tmp_path / "t", "llama")
    seen: list[tuple[int, float]] = []
    stats = pretrain_tiny_target(
        path, markov_sequences(16, 24), steps=4, batch_size=4, on_step=lambda n, x: seen.append((n, x))
    )
    assert [n for n, _ in seen] == [1, 2, 3, 4] and seen[0][1] == stats["first_loss"]
    assert json.loads((path / "pretrained.json").read_text()) == stats
    again: list = []
    assert pretrain_tiny_target(path, [], steps=4, on_step=again.append) == stats and again == []  # cached


def test_progress_in_job_logs_is_a_line_every_tenth_of_the_way(caplog):
    with caplog.at_level(logging.INFO, logger="eagle_ray.tiny"), _progress(20, "tiny target") as step:
        for n in range(1, 21):
            step(n, 10.0 - n / 10)
    lines = [m for m in caplog.messages if m.startswith("tiny target: step")]
    assert (
        lines[0] == "tiny target: step 2/20 loss 9.80"
        and len(lines) == 10
        and lines[-1].startswith("tiny target: step 20/20")
    )


def test_a_lumped_head_trains_the_frequent_tokens_and_saves_one_shared_row_for_the_rest(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_target(tmp_path / "t", "llama")
    text = markov_sequences(64, 24, seed=1)
    counts = torch.bincount(torch.cat(text), minlength=1024)
    before = AutoModelForCausalLM.from_pretrained(path).lm_head.weight.detach().clone()
    stats = pretrain_tiny_target(path, text, steps=30, batch_size=8, lr=3e-3, head_vocab=512, schedule=True)
    head = AutoModelForCausalLM.from_pretrained(path).lm_head.weight.detach()
    kept = counts.argsort(descending=True)[:512]
    rest = torch.ones(1024, dtype=torch.bool)
    rest[kept] = False
    assert torch.equal(head[rest], head[rest][:1].expand(int(rest.sum()), -1))  # one shared row for the rest
    assert not torch.equal(head[kept], before[kept])  # the frequent tokens' rows trained
    assert stats["last_loss"] < stats["first_loss"]


def test_distinct_ngram_ratio():
    from eagle_ray.tiny import distinct_ngram_ratio

    assert distinct_ngram_ratio([[1, 2, 3, 4, 5]]) == 1.0
    assert distinct_ngram_ratio([[7] * 10]) == 1 / 7  # "the the the ...": one 4-gram, 7 times
    assert distinct_ngram_ratio([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.5 and distinct_ngram_ratio([[1, 2]]) == 0.0
