"""Dump a target pool's EAGLE-3 supervision to disk, to train drafts later without a live pool.

    python jobs/dump_supervision.py                                   # tiny target, local Ray, 8 batches
    python jobs/dump_supervision.py --target /ckpt/Llama-3.1-8B-Instruct --engine sglang \\
        --replicas 8 --out /data/sup --num-batches 10000              # on a cluster: ray job submit -- ...

Rerun the same command after a crash: finished batches are verified and skipped, the rest dumped.
Train from the dump with `train_draft(OfflineSupervision(out), same batches, ...)`.

Data: for now, synthetic `markov_sequences` batches (deterministic per batch index, so a rerun sees
the same data); the chat-data pipeline replaces `job_batches`. Options live in `DumpJob` so a
`--config` file can fill the same dataclass later.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eagle_ray import PackedBatch, PooledTargetModel, build_tiny_target  # noqa: E402
from eagle_ray.offline import dump_supervision  # noqa: E402
from eagle_ray.pool.pooled import RAY_SYSTEM_CONFIG, ZERO_COPY_ENV  # noqa: E402
from eagle_ray.tiny import markov_sequences  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("EAGLE_RAY_CACHE", Path.home() / ".cache" / "eagle_ray"))


@dataclass
class DumpJob:
    target: str | None = None  # HF checkpoint directory; None: a tiny Llama built in the cache
    engine: str = "sglang" if importlib.util.find_spec("sglang") else "hf"
    replicas: int = 1
    tp_size: int = 1
    dtype: str | None = None  # None: the checkpoint's own
    cpus_per_replica: float | None = None
    out: str | None = None  # None: <cache>/supervision-<target name>
    num_batches: int = 8
    sequences_per_batch: int = 8
    min_len: int = 20
    max_len: int = 60
    seed: int = 2
    progress_every: int = 10
    ray_address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray


def parse_args(argv: list[str] | None = None) -> DumpJob:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DumpJob()
    p.add_argument("--target", help="HF checkpoint directory (default: a tiny Llama built locally)")
    p.add_argument("--engine", choices=["hf", "sglang"], default=defaults.engine)
    p.add_argument("--replicas", type=int, default=defaults.replicas)
    p.add_argument("--tp-size", type=int, default=defaults.tp_size)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--cpus-per-replica", type=float)
    p.add_argument("--out", help="dump directory (default: <cache>/supervision-<target>)")
    p.add_argument("--num-batches", type=int, default=defaults.num_batches)
    p.add_argument("--sequences-per-batch", type=int, default=defaults.sequences_per_batch)
    p.add_argument("--min-len", type=int, default=defaults.min_len)
    p.add_argument("--max-len", type=int, default=defaults.max_len)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--progress-every", type=int, default=defaults.progress_every, help="batches per progress line")
    p.add_argument("--ray-address", help="default: $RAY_ADDRESS, else a new local Ray ('auto': the running one)")
    args = vars(p.parse_args(argv))
    return DumpJob(**{f.name: args[f.name] for f in fields(DumpJob)})


def job_batches(job: DumpJob, vocab_size: int) -> Iterator[PackedBatch]:
    """Placeholder data: batch i depends only on (seed, i), so reruns and trainers regenerate it exactly."""
    for i in range(job.num_batches):
        seqs = markov_sequences(
            job.sequences_per_batch, (job.min_len, job.max_len), vocab_size, seed=job.seed * 1_000_003 + i
        )
        yield PackedBatch.from_sequences(seqs)


def init_ray(address: str | None) -> None:
    """Join the given cluster, or start a private local one; never stumble into another local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", _system_config=RAY_SYSTEM_CONFIG, runtime_env={"env_vars": ZERO_COPY_ENV})
    else:  # a running cluster keeps its own system config; replicas set the zero-copy env themselves
        ray.init(address=address)


def run(job: DumpJob) -> dict:
    target = job.target or str(build_tiny_target(DEFAULT_CACHE / "tiny-llama", "llama"))
    out = Path(job.out or DEFAULT_CACHE / f"supervision-{Path(target).name}")
    print(f"target: {target} ({job.engine}, {job.replicas} replicas, tp {job.tp_size})\ndump: {out}", flush=True)
    if not ray.is_initialized():
        init_ray(job.ray_address)
    with PooledTargetModel.from_pretrained(
        target,
        engine=job.engine,
        replicas=job.replicas,
        tp_size=job.tp_size,
        dtype=getattr(torch, job.dtype) if job.dtype else None,
        cpus_per_replica=job.cpus_per_replica,
    ) as pool:
        batches = job_batches(job, pool.info.vocab_size)
        manifest = dump_supervision(pool, batches, out, job.num_batches, progress_every=job.progress_every)
    summary = {k: manifest[k] for k in ("num_batches", "num_tokens", "num_sequences", "bytes", "complete", "last_run")}
    summary["info"] = manifest["info"]
    print(f"\nsupervision dump: {out}\nmanifest: {out / 'manifest.json'}\n{json.dumps(summary, indent=1)}")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
