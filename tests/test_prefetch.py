"""`ahead`: the device prefetch's threading, run on the CPU with a plain move (the CUDA copy needs a GPU)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eagle_ray.contract import Supervision
from eagle_ray.train.prefetch import ahead, device_batches


def sup(i: int) -> Supervision:
    t = torch.full((3,), i)
    return Supervision(t, t, torch.tensor([0, 3]), t[:, None].float(), t[:, None].float())


def reader(n: int, log: list):
    for i in range(n):
        log.append(("read", i))
        yield i, sup(i), {"i": i}


def test_items_arrive_in_order_moved_one_ahead_in_another_thread():
    log: list = []
    threads = set()

    def move(s: Supervision):
        threads.add(threading.current_thread().name)
        log.append(("moved", int(s.input_ids[0])))
        return lambda: Supervision(
            s.input_ids + 100, s.loss_mask, s.cu_seqlens, s.aux_hidden_states, s.last_hidden_states
        )

    got = []
    for step, s, meta in ahead(reader(4, log), move):
        time.sleep(0.05)  # training: the next item is read and moved meanwhile
        got.append((step, int(s.input_ids[0]), meta["i"]))
        if step < 3:
            assert ("moved", step + 1) in log  # one ahead of the consumer
    assert got == [(i, i + 100, i) for i in range(4)]
    assert threads == {"eagle-ray-device-prefetch"}


def test_errors_reach_the_consumer_and_closing_stops_the_reader():
    def failing():
        yield 0, sup(0), {}
        raise RuntimeError("shard lost")

    it = ahead(failing(), lambda s: lambda: s)
    assert next(it)[0] == 0
    with pytest.raises(RuntimeError, match="shard lost"):
        next(it)

    log: list = []
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                log.append(i)
                yield i, sup(i), {}
                i += 1
        finally:
            closed.set()

    gen = ahead(endless(), lambda s: lambda: s)
    assert [next(gen)[0] for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert closed.wait(5), "the reader was never closed"
    assert len(log) <= 5  # at most one item read ahead and one being handed over


def test_off_cuda_the_reader_passes_through():
    items = [(0, sup(0), {})]
    assert list(device_batches(items, torch.device("cpu"))) == items
