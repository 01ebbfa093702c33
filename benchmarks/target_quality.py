"""How repetitive a target's greedy text is: the distinct 4-gram ratio of its continuations of held-out prompts.

    .venv/bin/python benchmarks/target_quality.py                      # the job's default tiny target
    .venv/bin/python benchmarks/target_quality.py --target DIR [--target DIR2 ...] --prompts 16 --new 64

1.0: no 4-gram repeats; a target that loops ("the the the") scores near 0, and a draft then learns the loop,
not the language: acceptance means little. Prints one row per target, with its first continuation.
"""

from __future__ import annotations

import argparse
import time

import torch

from eagle_ray.data import load_tokenizer, make_batch_source
from eagle_ray.draft.decode import target_decode
from eagle_ray.engines.hf import HFEngine
from eagle_ray.job.inputs import held_out_prompts
from eagle_ray.tiny import default_target, distinct_ngram_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", help="HF checkpoint dir, repeatable (default: the default target)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--skip-batches", type=int, default=200, help="where the held-out prompts start")
    args = p.parse_args()
    tok = load_tokenizer("qwen")
    source, _ = make_batch_source("auto", None, tok, template="auto", max_length=512, epochs=1)
    prompts = held_out_prompts(source, args.skip_batches, args.prompts)
    print(f"{'target':<70} {'4-gram ratio':>12} {'s':>6}")
    for path in args.target or [default_target(tok)]:
        engine = HFEngine(path, dtype=torch.float32)
        t0 = time.perf_counter()
        outs = target_decode(engine, prompts, args.new)
        print(f"{path:<70} {distinct_ngram_ratio(outs):>12.3f} {time.perf_counter() - t0:>6.1f}")
        print(f"  e.g. {tok.decode(outs[0][:48])!r}")


if __name__ == "__main__":
    main()
