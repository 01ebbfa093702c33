"""Stream records out of JSON Lines files and JSON arrays larger than memory, resumably.

JSONL is read line by line; a JSON array element by element with `json.JSONDecoder.raw_decode`
over a text buffer refilled in chunks (so the 125 MB ShareGPT file is never `json.load`ed). A
file is an array when its first non-blank byte is `[`, else JSON Lines, whatever its suffix.

Every record comes with `after`, the reader's state once that record is consumed (file, byte
offset, line, element index). `read_records(paths, start=after)` resumes there and reads exactly
what a reader that never stopped would have read next: the block index relies on this.

A broken JSON array cannot be resynchronised (where would the next element start?), so a syntax
error or a truncated tail yields one error record and ends that file; a bad JSONL line is one
error record and reading goes on.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_CHUNK = 1 << 20
MAX_RECORD_CHARS = 64 << 20  # an element this large that still does not parse is treated as corrupt
_BOM = codecs.BOM_UTF8
_WS = " \t\n\r"
_TRUNCATED = ("truncated_file", "the file ends inside the JSON array")


@dataclass(frozen=True)
class Position:
    """Where a reader resumes: before anything of `file` (offset 0) or just after a record."""

    file: int = 0  # index into the paths
    offset: int = 0  # byte offset
    line: int = 1  # 1-based line at that offset
    index: int = 0  # records (array elements / non-blank lines) of this file before it

    def to_list(self) -> list[int]:
        return [self.file, self.offset, self.line, self.index]


@dataclass(frozen=True)
class RawRecord:
    where: str  # "path:line" (JSONL) or "path:line [element i]" (array): for messages
    value: Any  # the parsed JSON value, None on error
    error: tuple[str, str] | None  # (reason, detail) when the record could not be parsed
    after: Position  # resume here to read the record after this one


def read_records(
    paths: Sequence[str | Path], start: Position | None = None, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[RawRecord]:
    """Every record of every file in order, from `start` (default: the beginning)."""
    start = start or Position()
    for f in range(start.file, len(paths)):
        pos = start if f == start.file else Position(f)
        with open(paths[f], "rb") as fh:
            array = _is_array(fh)
            if pos.offset == 0 and fh.read(len(_BOM)) == _BOM:
                pos = Position(f, len(_BOM), pos.line, pos.index)  # skip a BOM; offsets still count it
            fh.seek(pos.offset)
            reader = _array_records if array else _jsonl_records
            yield from reader(fh, str(paths[f]), pos, chunk_size)


def _is_array(fh: BinaryIO) -> bool:
    head = fh.read(4096).removeprefix(_BOM).lstrip()
    fh.seek(0)
    return head.startswith(b"[")


def _jsonl_records(fh: BinaryIO, path: str, pos: Position, chunk_size: int) -> Iterator[RawRecord]:
    offset, line, index = pos.offset, pos.line, pos.index
    for raw in fh:
        offset += len(raw)
        if raw.strip():  # blank lines are not records
            index += 1
            after = Position(pos.file, offset, line + 1, index)
            try:
                yield RawRecord(f"{path}:{line}", json.loads(raw), None, after)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield RawRecord(f"{path}:{line}", None, ("bad_json", str(e)), after)
        line += 1


class _ArrayReader:
    """A text window over the file: `buf[pos:]` is unread; `offset`/`line` are those of `buf[pos]`."""

    def __init__(self, fh: BinaryIO, pos: Position, chunk_size: int):
        self.fh, self.chunk = fh, chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")  # bytes round-trip exactly
        self.buf, self.pos, self.eof = "", 0, False
        self.offset, self.line = pos.offset, pos.line

    def fill(self, at_least: int = 0) -> None:
        data = self.fh.read(max(self.chunk, at_least))
        self.eof = not data
        self.buf = self.buf[self.pos :] + self.decoder.decode(data, final=self.eof)
        self.pos = 0

    def advance(self, end: int) -> None:
        text = self.buf[self.pos : end]
        self.offset += len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
        self.line += text.count("\n")
        self.pos = end

    def peek(self) -> str:
        """Next non-blank character ('' at end of file), consuming the blanks before it."""
        while True:
            end = self.pos
            while end < len(self.buf) and self.buf[end] in _WS:
                end += 1
            self.advance(end)
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self.fill()

    def value(self, decoder: json.JSONDecoder) -> Any:
        """Decode the value at `pos`, reading more until it is whole; raises ValueError."""
        while True:
            err = None
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                # a container or string ends with its closing character; a number cut by the window
                # ("1." of "1.5") would decode short, so a scalar needs more text after it
                if self.eof or isinstance(value, dict | list | str) or end + 32 < len(self.buf):
                    self.advance(end)
                    return value
            except json.JSONDecodeError as e:
                err = e
                # more text cannot fix a bad character well inside the window (a cut-off literal or
                # escape fails a few characters before the end; a cut-off string says "Unterminated")
                if self.eof or (not e.msg.startswith("Unterminated") and e.pos < len(self.buf) - 8):
                    raise
            if len(self.buf) - self.pos > MAX_RECORD_CHARS:
                raise ValueError(f"element over {MAX_RECORD_CHARS} characters does not parse: {err}")
            self.fill(at_least=len(self.buf) - self.pos)  # double the window: no quadratic re-parsing


def _array_records(fh: BinaryIO, path: str, pos: Position, chunk_size: int) -> Iterator[RawRecord]:
    r = _ArrayReader(fh, pos, chunk_size)
    decoder = json.JSONDecoder()
    index = pos.index
    state = "open" if pos.offset <= len(_BOM) and index == 0 else "sep"
    end_of_file = Position(pos.file + 1)  # where reading goes on after this file, even a broken one

    def where() -> str:
        return f"{path}:{r.line} [element {index}]"

    while True:
        c = r.peek()
        if state == "open":
            if c != "[":
                yield RawRecord(where(), None, ("bad_json", "expected '[' to open the JSON array"), end_of_file)
                return
            r.advance(r.pos + 1)
            state = "first"
            continue
        if c == "]" and state in ("first", "sep"):
            r.advance(r.pos + 1)
            if r.peek():
                yield RawRecord(where(), None, ("bad_json", "data after the JSON array's closing ']'"), end_of_file)
            return
        if state == "sep":
            if c != ",":
                error = _TRUNCATED if c == "" else ("bad_json", f"expected ',' or ']', got {c!r}")
                yield RawRecord(where(), None, error, end_of_file)
                return
            r.advance(r.pos + 1)
            c = r.peek()
        if c == "":
            yield RawRecord(where(), None, _TRUNCATED, end_of_file)
            return
        here = where()
        try:
            value = r.value(decoder)
        except ValueError as e:
            yield RawRecord(here, None, _decode_error(r, e), end_of_file)
            return
        index += 1
        state = "sep"
        yield RawRecord(here, value, None, Position(pos.file, r.offset, r.line, index))


def _decode_error(r: _ArrayReader, e: ValueError) -> tuple[str, str]:
    """(reason, detail) with the file's own line: the decoder's positions are relative to its window."""
    if not isinstance(e, json.JSONDecodeError):
        return "bad_json", str(e)
    line = r.line + r.buf.count("\n", r.pos, e.pos)
    # at the end of the file with an unfinished element: the file was cut short
    truncated = r.eof and (e.pos >= len(r.buf) - 1 or e.msg.startswith("Unterminated"))
    return ("truncated_file" if truncated else "bad_json"), f"element does not parse: {e.msg} (line {line})"
