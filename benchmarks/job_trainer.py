"""The no-argument job's trainer step, packed against padded, on the job's own shapes and batches.

The draft the job trains on its default tiny target (qwen3 shape: H 64, 4/4 heads... as `tiny_config` gives,
Qwen's 151,872-token vocabulary, draft vocabulary 8192) and the job's own ShareGPT batches (`configs/tiny.yaml`:
max_length 512, 1024 tokens per batch). Random target states (the trainer's cost does not depend on them); the
same batches through both trainers, alternating, one process: forward + backward of the TTT loss, no optimizer.
The job's `trainer tok/s` line also waits on the pool; this is the trainer's side of it.

    .venv/bin/python benchmarks/job_trainer.py            # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from eagle_ray.contract import Supervision
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import ttt_loss
from eagle_ray.job.config import load_job_config
from eagle_ray.job.inputs import job_batch_source
from eagle_ray.testing.padded_ttt import padded_ttt_loss
from eagle_ray.tiny import tiny_config

RESULTS = Path(__file__).resolve().parent / "results" / "job_trainer.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    job = load_job_config(None)
    src = job_batch_source(job.data, "qwen", workers=0, max_warnings=0)
    it = src(0)
    batches = [next(it) for _ in range(a.batches)]
    vocab = -(-151_646 // 64) * 64  # the default target's vocabulary, as `tiny.default_target` rounds Qwen's
    target = tiny_config("qwen3", vocab_size=vocab, max_position_embeddings=4096)
    config = Eagle3DraftConfig.from_target(target, job.draft.vocab_size, [1, 3, 4])
    g = torch.Generator().manual_seed(0)
    h = config.hidden_size
    emb, head = torch.randn(vocab, h, generator=g), torch.randn(vocab, h, generator=g) * 0.1
    draft = Eagle3Draft.from_target(config, emb, head, torch.arange(config.draft_vocab_size))
    sups = [
        Supervision(
            b.input_ids,
            b.loss_mask,
            b.cu_seqlens,
            torch.randn(b.num_tokens, config.aux_width, generator=g),
            torch.randn(b.num_tokens, h, generator=g),
        )
        for b in batches
    ]
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for sup in sups:
        for name, fn in (("packed", ttt_loss), ("padded", padded_ttt_loss)):
            t = time.perf_counter()
            loss, _ = fn(draft, sup, head, steps=job.training.ttt_steps)
            loss.backward()
            times[name].append(time.perf_counter() - t)
            draft.zero_grad(set_to_none=True)
    tokens = sum(s.num_tokens for s in sups)
    doc = {
        "command": "benchmarks/job_trainer.py",
        "batches": a.batches,
        "threads": a.threads,
        "tokens": tokens,
        "padded_slots_over_real": sum(int(s.cu_seqlens.diff().max()) * (s.cu_seqlens.numel() - 1) for s in sups)
        / tokens,
        **{f"{k}_tokens_per_s": tokens / sum(v) for k, v in times.items()},
        **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
    }
    doc["packed_over_padded_time"] = sum(times["packed"]) / sum(times["padded"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))
    return doc


def render(doc: dict) -> str:
    return (
        "| trainer | tokens/s | median step s |\n|---|---|---|\n"
        f"| packed | {doc['packed_tokens_per_s']:.0f} | {doc['packed_median_s']:.3f} |\n"
        f"| padded | {doc['padded_tokens_per_s']:.0f} | {doc['padded_median_s']:.3f} |\n\n"
        f"packed / padded time {doc['packed_over_padded_time']:.2f}; padded slots / real tokens "
        f"{doc['padded_slots_over_real']:.2f} ({doc['batches']} batches, {doc['tokens']} tokens, "
        f"{doc['threads']} thread; `{doc['command']}`)"
    )


if __name__ == "__main__":
    main()
