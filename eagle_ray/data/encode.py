"""One raw record -> one training sample (or a counted, reported skip)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from eagle_ray.data.jsonstream import RawRecord
from eagle_ray.data.records import RecordError, Tokens, parse_record
from eagle_ray.data.stats import DataStats, Reporter
from eagle_ray.data.templates import Encode


@dataclass(frozen=True)
class Sample:
    """One sequence. Compact arrays (4 + 1 bytes a token, not 36 + 8 as Python lists): a shuffle
    buffer of thousands of long conversations stays small."""

    input_ids: array  # array("i")
    loss_mask: array  # array("b"), 0 / 1
    where: str  # file:line of the record it came from


@dataclass(frozen=True)
class SampleEncoder:
    """Parse, template, truncate to `max_length`, check `min_length`; count everything in `stats`."""

    encode_chat: Encode | None  # a bound chat template; None for pre-tokenized data only
    vocab_size: int | None  # checks pre-tokenized ids when known
    kind: str = "auto"
    max_length: int | None = None
    min_length: int = 2

    def __call__(self, rec: RawRecord, stats: DataStats, report: Reporter) -> Sample | None:
        stats.records += 1
        try:
            ids, mask, repairs = self._tokens(rec)
        except RecordError as e:
            report.skip(stats, e.reason, rec.where, e.detail)
            return None
        if self.max_length is not None and len(ids) > self.max_length:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            if not any(mask):
                report.skip(stats, "no_loss_tokens", rec.where, f"no loss token in the first {self.max_length}")
                return None
            stats.truncated += 1
        if len(ids) < self.min_length:
            report.skip(stats, "too_short", rec.where, f"{len(ids)} tokens < min_length {self.min_length}")
            return None
        if not any(mask):
            report.skip(stats, "no_loss_tokens", rec.where, "the loss mask is all zeros")
            return None
        stats.samples += 1
        stats.repaired.update(repairs)  # counted for kept samples only
        stats.tokens += len(ids)
        stats.loss_tokens += sum(mask)
        return Sample(array("i", ids), array("b", mask), rec.where)

    def _tokens(self, rec: RawRecord) -> tuple[list[int], list[int], tuple[str, ...]]:
        if rec.error:
            raise RecordError(*rec.error)
        parsed = parse_record(rec.value, self.kind)
        if isinstance(parsed, Tokens):
            limit = self.vocab_size or 2**31  # without a tokenizer, at least what an int32 id holds
            if any(not 0 <= t < limit for t in parsed.input_ids):
                raise RecordError("bad_tokens", f"input_ids outside [0, {limit})")
            return parsed.input_ids, parsed.loss_mask, ()
        if self.encode_chat is None:
            raise RecordError("bad_record", "a chat record, but no tokenizer was given (pre-tokenized data only)")
        try:
            ids, mask = self.encode_chat(parsed.messages)
        except (ValueError, UnicodeError) as e:  # e.g. lone surrogates from a file that is not UTF-8
            raise RecordError("bad_text", f"{type(e).__name__}: {e}") from e
        return ids, mask, parsed.repairs
