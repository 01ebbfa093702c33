"""Pool benchmarks (run by `benchmarks/suite.py`): each figure is a ratio against a baseline from the same run.

1. transport: a consumer actor `ray.get`s a supervision record from the object store
   (zero-copy) and reads every byte, vs a plain memcpy of the same bytes in that actor.
2. pool overhead: a 1-replica pool streaming batches (consumer reads each result) vs the
   same engine called directly on the same batches, each on one thread.
3. replica scaling: 2 replicas vs 1, each limited to one thread.
Each returns table rows (`ratio_row`): median and spread over repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eagle_ray import PackedBatch, Supervision, load_target  # noqa: E402
from eagle_ray.pool import PooledTargetModel  # noqa: E402


@ray.remote(num_cpus=0)
class Producer:
    def make(self, tokens: int, hidden: int) -> Supervision:
        cu = torch.tensor([0, tokens])
        ids = torch.zeros(tokens, dtype=torch.long)
        return Supervision(ids, ids.clone(), cu, torch.randn(tokens, 3 * hidden), torch.randn(tokens, hidden))


@ray.remote(num_cpus=0)
class Consumer:
    def read(self, refs: list) -> tuple[float, float, float, int]:
        """Seconds for: get (zero-copy view); get + copy out of the store; memcpy of the same bytes.

        Both copies go into memory touched beforehand, so neither pays first-touch page faults (which
        made the memcpy baseline swing 2x between runs when it wrote fresh pages).
        """
        meta = ray.get(refs[1])  # shapes, to touch the destination memory before the clock starts
        dst = [torch.zeros(shape) for shape in meta]
        t0 = time.perf_counter()
        sup = ray.get(refs[0])
        view_s = time.perf_counter() - t0
        parts = (sup.aux_hidden_states, sup.last_hidden_states)
        for d, t in zip(dst, parts, strict=True):
            d.copy_(t)
        get_copy_s = time.perf_counter() - t0
        src = [t.clone() for t in parts]  # private, touched memory: the memcpy baseline's source
        t0 = time.perf_counter()
        for d, t in zip(dst, src, strict=True):
            d.copy_(t)
        copy_s = time.perf_counter() - t0
        return view_s, get_copy_s, copy_s, sum(t.numel() * t.element_size() for t in src)

    def consume(self, refs: list) -> int:
        return sum(ray.get(r).num_tokens for r in refs)


def transport(sizes_mb: list[int], repeats: int) -> list[dict]:
    producer, consumer = Producer.remote(), Consumer.remote()
    # warm-up: imports in the consumer
    ray.get(consumer.read.remote([producer.make.remote(16, 64), ray.put([(16, 192), (16, 64)])]))
    rows = []
    for mb in sizes_mb:
        hidden = 1024
        tokens = max(1, mb * 2**20 // (16 * hidden))  # fp32: 16H bytes per token
        ratios, gbps, mem, view, get_ms = [], [], [], [], []
        for _ in range(repeats):
            ref = producer.make.remote(tokens, hidden)
            ray.wait([ref])
            shapes = ray.put([(tokens, 3 * hidden), (tokens, hidden)])
            view_s, get_copy_s, copy_s, nbytes = ray.get(consumer.read.remote([ref, shapes]))
            del ref
            gbps.append(nbytes / get_copy_s / 1e9)
            mem.append(nbytes / copy_s / 1e9)
            view.append(nbytes / view_s / 1e9)
            get_ms.append(1e3 * view_s)  # the fixed cost of one get, whatever the size
            ratios.append(copy_s / get_copy_s)
        rows.append(
            ratio_row(
                f"transport {mb} MB (get+copy / memcpy)",
                ratios,
                goal=0.8,
                extra={"GB/s": gbps, "memcpy GB/s": mem, "get ms": get_ms, "zero-copy get GB/s": view},
            )
        )
    return rows


def make_batches(n: int, seqs: int, vocab: int, seed: int = 0) -> list[PackedBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(64, 192, (seqs,), generator=g).tolist()
        out.append(PackedBatch.from_sequences([torch.randint(0, vocab, (k,), generator=g) for k in lens]))
    return out


def pool_tps(pool: PooledTargetModel, batches: list[PackedBatch], consumer) -> float:
    t0 = time.perf_counter()
    refs, tokens = [], 0
    for r in pool.stream(batches):
        refs.append(r.ref)
        if len(refs) == 8:
            tokens += ray.get(consumer.consume.remote(refs))
            refs = []
    if refs:
        tokens += ray.get(consumer.consume.remote(refs))
    return tokens / (time.perf_counter() - t0)


def engine_benchmarks(engine: str, path: str, batches: list[PackedBatch], repeats: int) -> list[dict]:
    """Direct engine (this process, one thread) vs 1-replica pool vs 2-replica pool (one thread each)."""
    torch.set_num_threads(1)
    direct = load_target(engine, path)
    consumer = Consumer.remote()
    ray.get(consumer.consume.remote([]))
    kw = dict(engine=engine, use_gpu=False, cpus_per_replica=1)
    pool1 = PooledTargetModel.from_pretrained(path, replicas=1, **kw)
    pool2 = PooledTargetModel.from_pretrained(path, replicas=2, **kw)
    direct.forward_packed(batches[0])  # warm-up
    pool_tps(pool1, batches[:4], consumer)
    pool_tps(pool2, batches[:4], consumer)
    overhead, scaling, base = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = sum(direct.forward_packed(b).num_tokens for b in batches) / (time.perf_counter() - t0)
        p1 = pool_tps(pool1, batches, consumer)
        p2 = pool_tps(pool2, batches, consumer)
        overhead.append(p1 / d)
        scaling.append(p2 / p1)
        base.append(d)
    for x in (pool1, pool2, direct):
        x.shutdown() if hasattr(x, "shutdown") else x.close()
    return [
        ratio_row(f"{engine}: pool(1) / direct tokens/s", overhead, goal=0.95, extra={"direct tokens/s": base}),
        ratio_row(f"{engine}: 2 replicas / 1 replica tokens/s", scaling, goal=1.8),
    ]


def ratio_row(
    name: str, ratios: list[float], goal: float | None = None, extra: dict | None = None, at_most: bool = False
) -> dict:
    """A table row: median and spread of `ratios`; the goal is a floor (or a ceiling with `at_most`)."""
    row = {
        "name": name,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "repeats": len(ratios),
    }
    if goal is not None:
        row["goal"] = goal
        row["goal_is"] = "at most" if at_most else "at least"
        row["meets_goal"] = row["ratio_median"] <= goal if at_most else row["ratio_median"] >= goal
    for k, v in (extra or {}).items():
        row[k] = statistics.median(v)
    return row
