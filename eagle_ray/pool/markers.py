"""A replica's marker file: the tag of the shard it is running, written while it runs, read after its death.

When a replica dies, its clients read the file (from a task on its node) to learn which shard was running, so a death
is blamed on that shard alone (`replica.py`'s docstring). The tasks here are tiny and start a worker process each time
Ray has none idle: this module imports nothing heavy (no torch), so that start costs an import of Ray alone.
"""

from __future__ import annotations

import contextlib
import os

import ray

TAG_BYTES = 96  # a tag's room in the marker file: a client key, a shard id and an attempt


def write_tag(fd: int, tag: str) -> None:
    os.pwrite(fd, tag.encode().ljust(TAG_BYTES), 0)  # the page cache outlives the process


@ray.remote(num_cpus=0)
def running_at_death(marker: str) -> str:
    """The tag of the shard a dead replica was running ("" for none), read on its node."""
    with open(marker, "rb") as f:
        return f.read(TAG_BYTES).decode().strip()


@ray.remote(num_cpus=0)
def forget_marker(marker: str) -> None:
    """Delete a dead replica's marker file, on its node, once no client will read it (`pool/lifecycle.py`)."""
    with contextlib.suppress(FileNotFoundError):  # a replica shut down cleanly deletes its own
        os.unlink(marker)
