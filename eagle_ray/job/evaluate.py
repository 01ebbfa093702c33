"""Evaluate a draft export against a target: real greedy speculative decoding, measured acceptance. No Ray.

    eagle-ray evaluate --draft ~/eagle_ray_runs/eagle3-tiny/draft     # the train job's default run and target
    eagle-ray evaluate --draft D --target /ckpt/llama-3.1-8b --engine sglang --prompts 64 --json eval.json
    eagle-ray evaluate --draft D --target T --data held_out.jsonl --format messages

Prompts are held-out conversations (each up to its assistant turn) read by the training job's data pipeline;
`speculative_greedy` decodes them with the draft proposing and the target verifying, and checks the output
equals target-only greedy decoding. Prints its summary and, with --json, writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from eagle_ray.data.records import KINDS


class InputError(Exception):
    """Bad input named by path: reported as a usage error (exit 2), never as a traceback."""


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True, metavar="DIR", help="a draft export (written by save_draft)")
    p.add_argument("--target", metavar="PATH", help="HF checkpoint dir (default: the train job's tiny target)")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "sglang"], help="auto: sglang if installed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target dtype (default: its own)")
    p.add_argument("--tp-size", type=int, default=1, help="SGLang tensor-parallel ranks")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts to decode (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="chain length per verify (default: %(default)s)")
    p.add_argument("--data", action="append", metavar="FILE", help="chat data, repeatable (default: ShareGPT V3)")
    p.add_argument("--format", default="auto", choices=KINDS, help="data format (default: per record, by key)")
    p.add_argument("--tokenizer", help="'qwen' or a local tokenizer dir (default: the target's own, else qwen)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "chatml", "llama3", "tokenizer"])
    p.add_argument("--max-length", type=int, default=512, help="tokens a conversation is cut to")
    p.add_argument("--skip-batches", type=int, default=0, help="start the data at this batch (hold out)")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON here")
    args = p.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "num_draft_tokens", "tp_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return p, args


def load_export(path: str) -> Any:
    """The draft at `path`, or an InputError naming the path and what is wrong with it."""
    from eagle_ray.draft import load_draft
    from eagle_ray.draft.export import WEIGHTS

    d = Path(path)
    if not d.is_dir():
        raise InputError(f"--draft {path}: no such directory")
    absent = [n for n in ("config.json", WEIGHTS) if not (d / n).is_file()]
    if absent:
        raise InputError(f"--draft {path}: not a draft export (no {' or '.join(absent)}; save_draft writes both)")
    try:
        return load_draft(d, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:  # safetensors' and json's errors are ValueError/OSError kinds
        raise InputError(f"--draft {path}: not a draft export: {e}") from e


def _check_fit(draft: Any, info: Any, tokenizer: Any, model_path: str) -> None:
    c = draft.config
    if c.vocab_size != info.vocab_size or (c.target_hidden_size or c.hidden_size) != info.hidden_size:
        raise InputError(
            f"the draft is for a target with vocab {c.vocab_size}, hidden {c.target_hidden_size or c.hidden_size};"
            f" {model_path} has vocab {info.vocab_size}, hidden {info.hidden_size}"
        )
    if tokenizer.vocab_size > info.vocab_size:
        raise InputError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; {model_path} has {info.vocab_size}"
        )


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from eagle_ray.data import load_tokenizer, make_batch_source
    from eagle_ray.draft import speculative_greedy
    from eagle_ray.job.inputs import held_out_prompts, resolve_engine, tokenizer_spec
    from eagle_ray.target import load_target

    draft = load_export(args.draft)
    if args.target is not None and not (Path(args.target) / "config.json").is_file():
        raise InputError(f"--target {args.target}: not an HF checkpoint directory (no config.json)")
    try:
        tokenizer = load_tokenizer(tokenizer_spec(args.target, args.tokenizer))
        source, _ = make_batch_source(
            args.format,
            args.data,
            tokenizer,
            template=args.chat_template,
            max_length=args.max_length,
            epochs=1,  # each conversation once: a small file gives fewer prompts, never repeats
        )
        prompts = held_out_prompts(source, args.skip_batches, args.prompts)
    except (OSError, ValueError) as e:  # a missing data file, no usable record (DataError), a bad tokenizer
        raise InputError(str(e)) from e
    if not prompts:
        raise InputError(f"no prompts in {args.data or 'the ShareGPT data'} from batch {args.skip_batches} on")
    if args.target is None:
        from eagle_ray.tiny import default_target  # the train job's: its default exports fit it

        model_path = default_target(tokenizer)
    else:
        model_path = args.target
    engine = resolve_engine(args.engine)
    kwargs: dict[str, Any] = {"aux_layer_ids": list(draft.config.aux_layer_ids)}  # the layers the draft reads
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if engine == "sglang":
        kwargs["tp_size"] = args.tp_size
    with load_target(engine, model_path, **kwargs) as target:
        _check_fit(draft, target.info, tokenizer, model_path)
        spec = speculative_greedy(target, draft, prompts, args.max_new_tokens, args.num_draft_tokens)
    return {
        "draft": str(args.draft),
        "target": model_path,
        "engine": engine,
        "prompts": len(prompts),
        "prompts_requested": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "num_draft_tokens": args.num_draft_tokens,
        **spec.summary(),
    }


def print_result(r: dict[str, Any]) -> None:
    print("\n=== eagle_ray: draft evaluation ===")
    for key, v in r.items():
        print(f"{key:>22}: {v:.3f}" if isinstance(v, float) else f"{key:>22}: {v}")


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        result = evaluate(args)
    except InputError as e:
        parser.error(str(e))
    print_result(result)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'json':>22}: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
