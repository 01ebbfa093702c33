"""Build a tiny target (or load yours) and print the EAGLE-3 supervision both engines produce.

    python jobs/supervision_summary.py                       # tiny Llama, HF + SGLang, fp32
    python jobs/supervision_summary.py --model-path /ckpt --engines sglang --dtype bfloat16

Prints, per engine: seconds from `from_pretrained` to the end of the first batch, tokens/s
on a second batch, shapes, bytes shipped per token, and the max abs difference to transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eagle_ray import PackedBatch, build_tiny_target, load_target  # noqa: E402
from eagle_ray.tiny import CACHE_DIR  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="HF checkpoint directory (default: a tiny target built locally)")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen3"], help="tiny target architecture")
    have_sglang = importlib.util.find_spec("sglang") is not None
    p.add_argument(
        "--engines",
        default="hf,sglang" if have_sglang else "hf",
        help="comma-separated: hf, sglang (default: %(default)s)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tp-size", type=int, default=1, help="SGLang tensor-parallel ranks")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    path = args.model_path or str(build_tiny_target(CACHE_DIR / f"tiny-{args.arch}", args.arch))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.max_len // 4, args.max_len + 1, (args.sequences,), generator=g).tolist()
    print(f"target: {path}\nbatch: {len(lengths)} sequences, {sum(lengths)} tokens (lengths {lengths})")
    results: dict[str, dict] = {}
    reference = None
    for name in args.engines.split(","):
        kwargs = {"tp_size": args.tp_size} if name == "sglang" else {}
        t0 = time.perf_counter()
        target = load_target(name, path, dtype=dtype, **kwargs)
        vocab = target.info.vocab_size
        ids = [
            torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(args.seed + i))
            for i, n in enumerate(lengths)
        ]
        batch = PackedBatch.from_sequences(ids)
        sup = target.forward_packed(batch)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        target.forward_packed(batch)
        tps = batch.num_tokens / (time.perf_counter() - t1)
        info = target.info
        row = {
            "load_to_first_batch_s": round(first, 2),
            "tokens_per_s": round(tps),
            "aux": tuple(sup.aux_hidden_states.shape),
            "last": tuple(sup.last_hidden_states.shape),
            "dtype": str(info.dtype).removeprefix("torch."),
            "aux_layer_ids": info.aux_layer_ids,
            "bytes_per_token": info.bytes_per_token,
            "kv_capacity_tokens": info.kv_capacity_tokens,
        }
        if reference is None:
            reference = (name, sup)
        else:
            ref_name, ref = reference
            row[f"max_abs_diff_vs_{ref_name}"] = {
                "aux": (sup.aux_hidden_states.float() - ref.aux_hidden_states.float()).abs().max().item(),
                "last": (sup.last_hidden_states.float() - ref.last_hidden_states.float()).abs().max().item(),
            }
        target.close()
        results[name] = row
        print(f"\n[{name}]")
        for k, v in row.items():
            print(f"  {k:>24}: {v}")
    return results


if __name__ == "__main__":
    main()
