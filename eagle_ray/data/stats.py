"""What the data pipeline did with each record, and what it does with a bad one.

Policy: a record that cannot become a training sample is never dropped silently. By default it is
skipped, counted under its reason in `DataStats.skipped`, and logged as a warning naming
`file:line` (plus the element index inside a JSON array): the first `max_warnings` in full, then
one line saying the rest are counted, not shown; a pass over the data ends with one line of counts
by reason (`DataStats.summary`). With `strict=True` the first one
raises `DataError` naming the same place. Routine clean-ups of chat data (`REPAIRS`) keep the record
and are counted in `DataStats.repaired`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger("eagle_ray.data")

SKIP_REASONS = {
    "bad_json": "the line or array element is not valid JSON (a broken JSON array ends that file)",
    "truncated_file": "the file ends inside its JSON array (the records before it are kept)",
    "bad_record": "not a JSON object, or a field has the wrong type",
    "missing_field": "no conversations/messages/input_ids, or a turn without its role or text",
    "empty_conversation": "the conversation holds no turns",
    "unknown_role": "a turn's role is none of user/human, assistant/gpt/chatgpt/bing/bard, system",
    "non_alternating": "user and assistant turns do not alternate, or a system turn is not first",
    "no_assistant_turn": "nothing to learn: no assistant turn after a user turn",
    "length_mismatch": "pre-tokenized input_ids and loss_mask differ in length",
    "bad_tokens": "pre-tokenized ids outside the vocabulary or not ints, or a loss mask value not 0/1",
    "bad_text": "the tokenizer or chat template could not encode the text",
    "too_short": "fewer than min_length tokens",
    "no_loss_tokens": "no loss token left after truncation to max_length",
}

REPAIRS = {
    "leading_assistant_dropped": "assistant turns before the first user turn (ShareGPT's split chunks) dropped",
    "trailing_user_dropped": "user turns after the last assistant turn dropped (they carry no loss)",
}


class DataError(ValueError):
    """A bad record in strict mode (or a dataset with no usable sample); `where` names file and line."""

    def __init__(self, reason: str, where: str, detail: str):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: [{reason}] {detail}")


_COUNTS = ("records", "samples", "tokens", "loss_tokens", "truncated")  # DataStats' plain counts


@dataclass
class DataStats:
    """Counts over every record read once (a replayed epoch or a rewind does not count again)."""

    records: int = 0  # records read, skipped ones included
    samples: int = 0  # sequences produced
    tokens: int = 0  # tokens in those sequences (after truncation)
    loss_tokens: int = 0
    truncated: int = 0  # kept sequences cut to max_length
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    repaired: Counter = field(default_factory=Counter)  # repair -> records
    complete: bool = False  # a whole pass over the data has been read

    def add(self, other: DataStats) -> None:
        for k in _COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.skipped.update(other.skipped)
        self.repaired.update(other.repaired)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (*_COUNTS, "complete")}
        return {**d, "skipped": dict(self.skipped), "repaired": dict(self.repaired)}

    @staticmethod
    def from_dict(d: dict) -> DataStats:
        return DataStats(**{**d, "skipped": Counter(d["skipped"]), "repaired": Counter(d["repaired"])})

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        repaired = ", ".join(f"{k} {v}" for k, v in sorted(self.repaired.items())) or "none"
        return (
            f"{self.records} records -> {self.samples} samples, {self.tokens} tokens ({self.loss_tokens} loss), "
            f"{self.truncated} truncated; skipped {sum(self.skipped.values())} ({skipped}); repaired: {repaired}"
            + ("" if self.complete else " [partial pass]")
        )


@dataclass
class Reporter:
    """Applies the policy: raise (strict) or count + warn (the first `max_warnings` skips, any reason)."""

    strict: bool = False
    max_warnings: int = 3
    warned: int = 0

    def skip(self, stats: DataStats, reason: str, where: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        if self.strict:
            raise DataError(reason, where, detail)
        stats.skipped[reason] += 1
        self.warned += 1
        if self.warned <= self.max_warnings:
            log.warning("skipped %s: [%s] %s", short_path(where), reason, detail)
        if self.warned == self.max_warnings:
            log.warning("further skipped records are counted by reason, not shown one by one")

    def replay(self, skips: int, events: Sequence[tuple[str, str, str]]) -> None:
        """A block's `skips`, already counted where it was read: warn about (strict: raise on) its first
        `events` (reason, where, detail) as `skip` would have there, and count the rest toward the cap.

        Blocks are read in other processes, in parallel; replaying them in block order here keeps one
        sequence of warnings, from this process's logger, the same as reading them here would give.
        """
        scratch = DataStats()  # the block's own stats hold the counts
        for reason, where, detail in events:
            self.skip(scratch, reason, where, detail)
        self.warned += skips - len(events)


def short_path(where: str) -> str:
    """`where` with an installed package's site-packages prefix cut: the packaged ShareGPT's path is 100 characters."""
    head, sep, tail = where.partition("site-packages/")
    return tail if sep else where
