"""Dump the training job's supervision to disk: the train job with `offline.mode=dump`, appended last so it wins.

`jobs/dump_supervision.py` and `eagle-ray dump` both call `main`; train from the dump with the same config plus
`offline.mode=from_dump`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from eagle_ray.job.run import main as train_main

    return train_main([*(sys.argv[1:] if argv is None else argv), "offline.mode=dump"])
