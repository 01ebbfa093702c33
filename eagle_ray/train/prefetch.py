"""The next batch onto the GPU while the current step trains.

On CUDA, a thread of its own takes each `(step, supervision, meta)` from the reader, pins the supervision and
copies it to the device on a side stream, one batch ahead; the training thread only waits on the copy's event.
Elsewhere the reader's batches pass through untouched (the trainer moves them; on the CPU there is nothing to
overlap). The threading is `ahead()`, tested on the CPU with a plain move; the CUDA move itself cannot run on a
machine without a GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace
from typing import Any

import torch

from eagle_ray.contract import Supervision

Item = tuple[int, Supervision, dict[str, Any]]


def device_batches(reader: Iterable[Item], device: torch.device) -> Iterator[Item]:
    if device.type != "cuda":
        return iter(reader)
    stream = torch.cuda.Stream(device)

    def move(sup: Supervision | None) -> Callable[[], Supervision | None]:
        if sup is None:  # a skipped batch's step: nothing to move
            return lambda: None
        with torch.cuda.stream(stream):
            moved = {
                f.name: t.pin_memory().to(device, non_blocking=True)
                for f in fields(sup)
                if isinstance(t := getattr(sup, f.name), torch.Tensor)
            }
        done = torch.cuda.Event()
        done.record(stream)

        def ready() -> Supervision:  # in the training thread: its stream waits for the copy, then owns the memory
            torch.cuda.current_stream(device).wait_event(done)
            for t in moved.values():
                t.record_stream(torch.cuda.current_stream(device))
            return replace(sup, **moved)

        return ready

    return ahead(reader, move)


def hand(out: queue.Queue, stop: threading.Event, record: tuple) -> bool:
    """A producer thread's put of `record` for its consumer, unless the consumer has gone (`stop`: then False)."""
    while not stop.is_set():
        try:
            out.put(record, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def ahead(reader: Iterable[Item], move: Callable[[Supervision], Callable[[], Supervision]]) -> Iterator[Item]:
    """`reader`'s items, each `move`d in a thread one item ahead; `move` returns what finishes the move in the
    consumer's thread. Errors reach the consumer; closing the generator stops the thread after its current item
    (and the thread then closes the reader)."""
    out: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def serve() -> None:
        it = iter(reader)
        try:
            for step, sup, meta in it:
                record = ("item", step, move(sup), meta)
                del sup  # the reader's host copy may leave its budget once moved
                if not hand(out, stop, record):
                    return
            hand(out, stop, ("end",))
        except BaseException as e:  # surfaced in the consumer, not lost in a thread
            hand(out, stop, ("error", e))
        finally:
            if hasattr(it, "close"):
                it.close()

    thread = threading.Thread(target=serve, name="eagle-ray-device-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            record = out.get()
            if record[0] == "end":
                return
            if record[0] == "error":
                raise record[1]
            _, step, finish, meta = record
            yield step, finish(), meta
    finally:
        # never wait here: the thread may be inside the reader's next(), which can block until its timeout; it
        # sees `stop` once that returns and closes the reader itself
        stop.set()
