"""The block index: what a pass over the data has found so far, small enough to keep.

The data is cut into blocks of `block_records` consecutive records (file order, bad records
included). Per block the index keeps where it starts and ends in the files and each record's
sample length (0: skipped), plus its stats: 4-ish bytes per record. Batch plans are a pure function
of those lengths (and the seed), so finding global batch i needs no tokenization once its block is
indexed, and reading it back costs one block.

With `path`, the index is also appended to a JSON Lines file, so a restarted job seeks as cheaply
as the run that wrote it. Its first line fingerprints everything the lengths depend on (files'
sizes and mtimes, tokenizer, template, lengths, block size); a mismatch starts a fresh index.
One writer per file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from eagle_ray.data.jsonstream import Position
from eagle_ray.data.stats import DataStats

log = logging.getLogger("eagle_ray.data")


@dataclass(frozen=True)
class Block:
    start: Position
    end: Position  # the next block's start
    lengths: tuple[int, ...]  # per record: tokens of its sample, 0 when it was skipped
    stats: DataStats

    @property
    def samples(self) -> int:
        return sum(1 for n in self.lengths if n)


class BlockIndex:
    def __init__(self, fingerprint: dict, path: str | Path | None = None):
        self.fingerprint, self.path = fingerprint, None if path is None else Path(path)
        self.blocks: list[Block] = []
        self.complete = False  # the last block holds the last record
        self.stats = DataStats()  # live: the sum over indexed blocks
        if self.path is not None:
            self._load()

    def next_start(self) -> Position:
        return self.blocks[-1].end if self.blocks else Position()

    def add(self, block: Block) -> None:
        self.blocks.append(block)
        self.stats.add(block.stats)
        self._write(
            {
                "start": block.start.to_list(),
                "end": block.end.to_list(),
                "lengths": list(block.lengths),
                "stats": block.stats.to_dict(),
            }
        )

    def finish(self) -> None:
        self.complete = self.stats.complete = True
        self._write({"complete": True})

    def _write(self, entry: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        header = {"fingerprint": self.fingerprint}
        if not lines or _loads(lines[0]) != header:
            if lines:
                log.info("block index %s was built for other data or settings: rebuilding it", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n")
            return
        for n, line in enumerate(lines[1:], start=2):
            entry = _loads(line)
            if entry is None:  # a line cut short by a crash: keep what is before it
                log.warning("block index %s: unreadable line %d; reindexing from there", self.path, n)
                self.path.write_text("\n".join(lines[: n - 1]) + "\n")
                return
            if entry.get("complete"):
                self.complete = self.stats.complete = True
            else:
                block = Block(
                    Position(*entry["start"]),
                    Position(*entry["end"]),
                    tuple(entry["lengths"]),
                    DataStats.from_dict(entry["stats"]),
                )
                self.blocks.append(block)
                self.stats.add(block.stats)


def _loads(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None
