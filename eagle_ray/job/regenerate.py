"""Regenerate training conversations with the target's own answers, on a pool of target replicas.

    eagle-ray regenerate --out regen.jsonl                           # ShareGPT on the train job's tiny target
    eagle-ray regenerate --target /ckpt/llama-3.1-8b --replicas 8 --data chats.jsonl --out regen.jsonl
    eagle-ray train data.format=messages data.paths=[regen.jsonl]    # then train on it

Each assistant turn is replaced by the target's answer to the conversation before it, in which the earlier
assistant turns are already the target's own (SpecForge's `regenerate_train_data.py` semantics: a served chat
sees its own earlier answers, so the draft learns the distribution it will be asked to predict). System and
user turns are kept as they are. NeMo AutoModel's `regenerate` does the same per turn. Requests go to the pool
(`PooledTargetModel.generate`: exactly once, through failover), a block of conversations at a time, turn by turn.

The output is `messages` JSONL, one conversation per line with its `source` (file:line) and `record` (its index
among the usable input records), read by the training job's data pipeline as any other. The job is resumable:
blocks are appended whole and synced; a rerun drops a torn last line, skips the records already written and goes
on, so a crash rewrites nothing and duplicates nothing. A conversation whose first prompt plus `--max-new-tokens`
exceeds `--max-length` is skipped and counted; one that runs out of room later keeps its regenerated turns.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from eagle_ray.data.records import KINDS, Message

log = logging.getLogger("eagle_ray.regenerate")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE", help="messages JSONL to write (appended on resume)")
    p.add_argument("--target", metavar="PATH", help="HF checkpoint dir (default: the train job's tiny target)")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "sglang"], help="auto: sglang if installed")
    p.add_argument("--replicas", type=int, default=1, help="target replicas (default: %(default)s)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--data", action="append", metavar="FILE", help="chat data, repeatable (default: ShareGPT V3)")
    p.add_argument("--format", default="auto", choices=KINDS, help="data format (default: per record, by key)")
    p.add_argument("--tokenizer", help="'qwen' or a local tokenizer dir (default: the target's own, else qwen)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "chatml", "llama3", "tokenizer"])
    p.add_argument("--max-records", type=int, help="input records to read (default: all)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens a conversation may grow to")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="record k's turn t samples with a seed of its own")
    p.add_argument("--block", type=int, default=64, help="conversations per block (default: %(default)s)")
    p.add_argument("--ray-address", help="a running cluster (default: a local one)")
    args = p.parse_args(argv)
    from eagle_ray.job.inputs import resolve_engine

    args.engine = resolve_engine(args.engine)
    for name in ("replicas", "max_length", "max_new_tokens", "block"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_records is not None and args.max_records < 1:
        p.error(f"--max-records must be >= 1, got {args.max_records}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}")
    return p, args


def resume_point(out: Path) -> int:
    """Records already written to `out` (the next one to write); a torn last line is cut off first."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", out, len(data) - len(whole))
        with open(out, "r+b") as fh:
            fh.truncate(len(whole))
    lines = whole.splitlines()
    return json.loads(lines[-1])["record"] + 1 if lines else 0


def prompt_ids(encode: Any, messages: list[Message]) -> list[int]:
    """The token ids a server is given to answer after `messages`: the conversation and the assistant header."""
    ids, mask = encode([*messages, ("assistant", "")])
    return ids[: len(mask) - 1 - mask[::-1].index(1)]  # cut at the empty turn's end token, its only loss token


def regenerate_block(
    pool: Any, encode: Any, tokenizer: Any, convs: list[list[Message]], firsts: list[int], args: Any, stop: tuple
) -> tuple[list[list[Message] | None], Counter]:
    """The conversations with every assistant turn the target's own (None: no turn fit), and counts."""
    from eagle_ray.generation import GenerationParams

    counts: Counter = Counter()
    out: list[list[Message]] = [[] for _ in convs]
    at = [0] * len(convs)  # next original message to take
    live = set(range(len(convs)))
    turn = 0
    while live:
        prompts, who = [], []
        for c in sorted(live):
            msgs = convs[c]
            while at[c] < len(msgs) and msgs[at[c]][0] != "assistant":
                out[c].append(msgs[at[c]])
                at[c] += 1
            ids = prompt_ids(encode, out[c]) if at[c] < len(msgs) else None
            if ids is None or len(ids) + args.max_new_tokens > args.max_length:
                if ids is not None:
                    counts["out_of_room" if turn else "too_long"] += 1
                live.discard(c)
                continue
            prompts.append(ids)
            who.append(c)
        if not prompts:
            break
        # a seed per (record, turn): a rerun of the block, or of a shard on another replica, gives the same answers
        seeds = tuple(args.seed + firsts[c] * 4096 + turn for c in who)
        params = GenerationParams(args.max_new_tokens, args.temperature, args.top_p, stop_ids=stop, seeds=seeds)
        for answer, c in zip(pool.generate(prompts, params), who, strict=True):
            _take(out[c], tokenizer, answer, stop, counts)
        for c in who:
            at[c] += 1  # past the original assistant turn
            if at[c] >= len(convs[c]):  # the conversation is done
                live.discard(c)
        turn += 1
        counts["turns"] += len(who)
    return [o if any(r == "assistant" for r, _ in o) else None for o in out], counts


def _take(messages: list[Message], tokenizer: Any, answer: list[int], stop: tuple, counts: Counter) -> None:
    finished = bool(answer) and answer[-1] in stop
    counts["tokens"] += len(answer)
    counts["unfinished" if not finished else "finished"] += 1
    messages.append(("assistant", tokenizer.decode(answer[:-1] if finished else answer)))


def regenerate_file(pool: Any, tokenizer: Any, args: Any) -> dict[str, Any]:
    """Regenerate `args.data` (format, max_records, chat_template) into `args.out` on `pool`, resuming.

    `args` has this job's option names (the train job's `regenerate:` section passes its own, the same).
    """
    from eagle_ray.data.sharegpt import iter_conversations
    from eagle_ray.data.stats import DataStats
    from eagle_ray.data.templates import get_template
    from eagle_ray.job.inputs import end_tokens

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    encode = get_template(args.chat_template, tokenizer=tokenizer).bind(tokenizer)
    stop = tuple(end_tokens(tokenizer))
    start = resume_point(out)
    if start:
        log.info("resuming %s: %d records already written", out, start)
    stats = DataStats()
    convs = iter_conversations(args.data, kind=args.format, stats=stats, max_records=args.max_records)
    totals: Counter = Counter()
    written, t0 = 0, time.monotonic()
    todo = ((k, where, list(conv.messages)) for k, (where, conv) in enumerate(convs) if k >= start)
    while block := list(itertools.islice(todo, args.block)):
        written += _write_block(pool, encode, tokenizer, block, args, stop, out, totals)
        _progress(written + start, totals, t0)
    return {
        "out": str(out),
        "resumed_at": start,
        "records_written": written,
        "records_read": stats.records,
        "data": stats.summary(),
        **dict(totals),
        "wall_s": time.monotonic() - t0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from eagle_ray.data import load_tokenizer
    from eagle_ray.job.inputs import tokenizer_spec
    from eagle_ray.pool import PooledTargetModel
    from eagle_ray.ray_init import init_ray

    tokenizer = load_tokenizer(tokenizer_spec(args.target, args.tokenizer))
    if args.target is None:
        from eagle_ray.tiny import default_target

        model_path = default_target(tokenizer)
    else:
        model_path = args.target
    started_ray = not ray.is_initialized()  # a caller's Ray (tests, a notebook) is used as is and left running
    if started_ray:
        need = int(args.replicas * args.cpus_per_replica + 0.999)
        init_ray(args.ray_address, num_cpus=max(os.cpu_count() or 1, need))
    pool = PooledTargetModel(
        model_path, engine=args.engine, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica
    )
    try:
        return {"target": model_path, "engine": pool.engine_name, **regenerate_file(pool, tokenizer, args)}
    finally:
        pool.shutdown()
        if started_ray:
            ray.shutdown()


def _write_block(pool, encode, tokenizer, block, args, stop, out: Path, totals: Counter) -> int:
    firsts = [k for k, _, _ in block]
    regen, counts = regenerate_block(pool, encode, tokenizer, [m for _, _, m in block], firsts, args, stop)
    totals.update(counts)
    lines = []
    for (k, where, _), msgs in zip(block, regen, strict=True):
        if msgs is None:
            continue
        while msgs[-1][0] != "assistant":
            msgs = msgs[:-1]
        rec = {"messages": [{"role": r, "content": c} for r, c in msgs], "source": where, "record": k}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if lines:
        with open(out, "a", encoding="utf-8") as fh:  # whole blocks, synced: a crash tears at most the last line
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
    return len(lines)


def _progress(done: int, totals: Counter, t0: float) -> None:
    dt = max(time.monotonic() - t0, 1e-9)
    log.info(
        "regenerated %d records (%d turns, %d tokens, %.0f tokens/s)",
        done,
        totals["turns"],
        totals["tokens"],
        totals["tokens"] / dt,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser, args = parse_args(argv)
    if args.data:
        missing = [d for d in args.data if not Path(d).is_file()]
        if missing:
            parser.error(f"--data {missing[0]}: no such file")
    if args.target is not None and not (Path(args.target) / "config.json").is_file():
        parser.error(f"--target {args.target}: not an HF checkpoint directory (no config.json)")
    result = run(args)
    print("\n=== eagle_ray: regeneration done ===")
    for key, v in result.items():
        print(f"{key:>18}: {v:.1f}" if isinstance(v, float) else f"{key:>18}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
