"""Offline supervision: dump a pool's supervision to disk once, then train from the dump without a pool.

    pool = serve_pool("dump", model_path, replicas=4)
    manifest = dump_supervision(pool, batches, "/data/sup", num_batches=10_000, writers=4)   # resumable
    result = train_draft(OfflineSupervision("/data/sup"), batches, DraftTrainConfig(...), ...)

Writing: `writers` Ray tasks, each a client of the pool, stream their share of the batches (batch i goes to
writer i % writers) straight to the replicas and write each batch's file themselves; the driver writes the
target's files and the manifest, and no supervision passes through it. Reading: each training rank opens the
dump (on storage every rank can read) and loads its own batches' files (`train/reader.py`'s `DumpSupply`).

A dump directory holds:
  batch_{index:08d}.safetensors  one per batch: input_ids, loss_mask, cu_seqlens, aux_hidden_states,
                                 last_hidden_states (unshifted, exactly what the pool returned); its
                                 header metadata names the batch index, its size and content hash
  target.safetensors             embed_tokens [V, H], lm_head [V, H]
  target/config.json             the target's config.json (so `load_config(model_path)` works)
  manifest.json                  format version, ModelInfo, target facts, one entry per batch

Every file is written to `<name>.tmp` and renamed into place, so a crash never leaves a half file
under a real name. A shard file is the commit record of its batch: the manifest is written at the end
from the shards on disk, and a shard that a crash left out of the manifest is taken back from its own header.

Batches are identified by content (a hash of input_ids, loss_mask and cu_seqlens), not by position:
a resumed dump verifies each batch it skips against its shard, and `OfflineSupervision` serves any
batch sequence whose batches were dumped (epochs, a resumed trainer's rewind), refusing any other.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, validate_packed

log = logging.getLogger(__name__)

FORMAT = "eagle_ray.offline_supervision"
VERSION = 1
SHARD_FIELDS = ("input_ids", "loss_mask", "cu_seqlens", "aux_hidden_states", "last_hidden_states")
HIDDEN = ("aux_hidden_states", "last_hidden_states")  # what fp8 storage quantises; ids and masks stay exact
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value: each token's largest magnitude is scaled to it
# fields that name the model rather than the replica shape it ran on (those may differ between runs)
_IDENTITY = ("hidden_size", "vocab_size", "num_layers", "aux_layer_ids", "dtype")


class DumpMismatchError(ValueError):
    """The dump directory holds different data (or a different target) than the caller's."""


class MissingSupervisionError(LookupError):
    """A batch asked of `OfflineSupervision` is not in the dump."""


# ---------------------------------------------------------------------------------------------
# Format helpers


def shard_name(index: int) -> str:
    return f"batch_{index:08d}.safetensors"


def content_hash(batch: PackedBatch) -> str:
    """sha256 over the batch's canonical (int64) tensors; the sizes lead so no two layouts collide."""
    h = hashlib.sha256(f"{batch.num_tokens},{batch.num_sequences};".encode())
    for t in (batch.input_ids, batch.loss_mask, batch.cu_seqlens):
        h.update(t.to(torch.long).contiguous().numpy().tobytes())
    return h.hexdigest()


def _weights_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _info_to_json(info: ModelInfo) -> dict[str, Any]:
    d = asdict(info)
    d["aux_layer_ids"] = list(info.aux_layer_ids)
    d["dtype"] = str(info.dtype).removeprefix("torch.")
    return d


def _info_from_json(d: dict[str, Any]) -> ModelInfo:
    kw = {f.name: d[f.name] for f in fields(ModelInfo)}
    return ModelInfo(**{**kw, "aux_layer_ids": tuple(kw["aux_layer_ids"]), "dtype": getattr(torch, kw["dtype"])})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path, fsync: bool) -> None:
    """Rename a fully written temp file into place: readers see the whole file or none."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if fsync:
        _fsync_dir(final.parent)


def write_json(path: Path, obj: Any, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    _commit(tmp, path, fsync)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{root}: no manifest.json (not a supervision dump, or its first write crashed)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return manifest


def _entry_from_header(path: Path) -> dict[str, Any]:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return {
        "index": int(meta["batch_index"]),
        "file": path.name,
        "num_tokens": int(meta["num_tokens"]),
        "num_sequences": int(meta["num_sequences"]),
        "content_hash": meta["content_hash"],
        "bytes": path.stat().st_size,
    }


def entries_matching_disk(root: Path, manifest: dict[str, Any], strict: bool) -> dict[int, dict[str, Any]]:
    """Per-batch entries agreeing with the shard files on disk (the files are the truth).

    A shard missing from the manifest (a crash between its rename and the manifest update) is
    taken from its header. A listed shard whose file is gone is an error when `strict` (reading),
    else dropped so the dump recomputes it.
    """
    entries = {e["index"]: e for e in manifest["batches"]}
    on_disk = {p.name for p in root.glob("batch_*.safetensors")}
    for i, e in list(entries.items()):
        if e["file"] not in on_disk:
            if strict:
                raise FileNotFoundError(f"{root}: the manifest lists batch {i} but {e['file']} is missing")
            log.warning("%s: %s is listed but missing; it will be dumped again", root, e["file"])
            del entries[i]
    listed = {e["file"] for e in entries.values()}
    for name in sorted(on_disk - listed):
        e = _entry_from_header(root / name)
        if e["file"] != shard_name(e["index"]):
            raise ValueError(f"{root / name}: its header says batch {e['index']}")
        entries[e["index"]] = e
    return dict(sorted(entries.items()))


# ---------------------------------------------------------------------------------------------
# Writing


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One writer per dump directory: a second dump_supervision on it fails instead of interleaving."""
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{root}: another dump_supervision is writing this directory") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _target_facts(pool: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    embed = pool.get_input_embeddings().weight.detach().contiguous()
    head = pool.get_lm_head_weight().detach().contiguous()
    if head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr():
        head = head.clone()  # tied embeddings: safetensors refuses tensors that share memory
    facts = {
        "model_path": str(pool.model_path),
        "engine": getattr(pool, "engine_name", None),
        "weights_sha256": _weights_hash(embed, head),
    }
    return facts, embed, head


def init_or_check(root: Path, pool: Any, fsync: bool) -> dict[str, Any]:
    """Start a dump (target files, then the manifest) or check that `pool` serves the dumped target. Called before
    any writer starts: temp files left are a crash's, never real, and go."""
    for stale in [*root.glob("*.tmp"), *(root / "target").glob("*.tmp")]:
        stale.unlink()
    info = _info_to_json(pool.info)
    facts, embed, head = _target_facts(pool)
    src = Path(pool.model_path) / "config.json"
    if (root / "manifest.json").exists():
        manifest = read_manifest(root)
        config = json.loads((root / "target" / "config.json").read_text())
        mine = {k: info[k] for k in _IDENTITY}, facts["weights_sha256"]
        theirs = {k: manifest["info"][k] for k in _IDENTITY}, manifest["target"]["weights_sha256"]
        if mine != theirs or (src.exists() and json.loads(src.read_text()) != config):
            raise DumpMismatchError(
                f"{root} holds supervision of another target ({manifest['target']['model_path']}, "
                f"{theirs[0]}) than this pool serves ({pool.model_path}, {mine[0]})"
            )
        return manifest
    if any(root.glob("batch_*.safetensors")):
        raise DumpMismatchError(f"{root} holds batch shards but no manifest.json; refusing to guess their target")
    (root / "target").mkdir(exist_ok=True)
    tmp = root / "target" / "config.json.tmp"
    if src.exists():
        shutil.copyfile(src, tmp)  # verbatim: load_config(model_path) reads the same config
    else:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(pool.model_path).to_json_file(tmp)
    _commit(tmp, root / "target" / "config.json", fsync)
    save_file({"embed_tokens": embed, "lm_head": head}, root / "target.safetensors.tmp", metadata={"format": FORMAT})
    _commit(root / "target.safetensors.tmp", root / "target.safetensors", fsync)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "info": info,
        "target": {**facts, "config": json.loads((root / "target" / "config.json").read_text())},
        "batches": [],
    }
    write_json(root / "manifest.json", manifest, fsync)  # last: its presence means "initialised"
    return manifest


def write_shard(
    root: Path, index: int, sup: Supervision, digest: str, fsync: bool, fp8: bool = False
) -> dict[str, Any]:
    """One batch's file. `fp8`: the hidden states as float8 (e4m3) with a float32 scale per token (`<field>_scale`),
    a quarter of fp32's bytes and half of bf16's; `decoded` turns them back into the target's dtype."""
    final = root / shard_name(index)
    if final.exists():  # the resume filter skips existing shards; reaching here is a bug, never overwrite
        raise RuntimeError(f"internal error: {final} exists already")
    meta = {
        "format": FORMAT,
        "batch_index": str(index),
        "num_tokens": str(sup.num_tokens),
        "num_sequences": str(sup.cu_seqlens.numel() - 1),
        "content_hash": digest,
        "dtype": str(sup.aux_hidden_states.dtype).removeprefix("torch."),
    }
    tensors = {k: getattr(sup, k).contiguous() for k in SHARD_FIELDS}
    if fp8:
        for k in HIDDEN:
            x = tensors[k].float()
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / FP8_MAX
            tensors[k], tensors[f"{k}_scale"] = (x / scale).to(torch.float8_e4m3fn), scale
    tmp = final.with_name(final.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    _commit(tmp, final, fsync)
    return _entry_from_header(final)


def decoded(fields: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """A shard's tensors (or the same rows of each) as the target computed them: fp8 fields scaled back to the
    dtype its header names (`write_shard`); a file without scales is returned as it is."""
    dtype = getattr(torch, meta["dtype"])
    for k in HIDDEN:
        scale = fields.pop(f"{k}_scale", None)
        if scale is not None:
            fields[k] = (fields[k].float() * scale).to(dtype)
    return fields


def summarise(
    manifest: dict[str, Any], entries: dict[int, dict[str, Any]], num_batches: int, **extra: Any
) -> dict[str, Any]:
    """The manifest to write: the dump's fixed facts, whether it holds batches 0..`num_batches`-1, run facts
    (`extra`) and every batch, by index."""
    rows = [entries[i] for i in sorted(entries)]
    return {
        **{k: manifest[k] for k in ("format", "version", "info", "target")},
        "complete": all(i in entries for i in range(num_batches)),
        **extra,
        "num_batches": len(rows),
        "num_tokens": sum(e["num_tokens"] for e in rows),
        "num_sequences": sum(e["num_sequences"] for e in rows),
        "bytes": sum(e["bytes"] for e in rows),
        "batches": rows,
    }


def dump_supervision(
    pool: Any,
    data: Sequence[PackedBatch] | Any,
    out_dir: str | Path,
    num_batches: int | None = None,
    *,
    writers: int = 1,
    stall_timeout_s: float = 600.0,
    fsync: bool = True,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Write the supervision of the first `num_batches` batches of `data` (all of a list if None; a
    `ChatBatchSource`'s first epoch) to `out_dir`, on storage the writers (and later the trainers) can reach.

    `pool`: a `serve_pool` pool; `writers` Ray tasks connect to it and write batch i in writer i % writers.
    Resumable: batches whose shard exists are verified (content hash) and skipped, never recomputed or
    rewritten; a batch that differs from its shard raises `DumpMismatchError`, as does a pool serving
    another target. Returns the manifest, with `last_run` counts (written, skipped, seconds, bytes).
    """
    from eagle_ray.data.source import ChatBatchSource
    from eagle_ray.pool import PoolClient
    from eagle_ray.train.reader import rank_source

    if not isinstance(pool, PoolClient):
        raise TypeError("dump_supervision writes from clients of a shared pool: serve_pool(name, model_path, ...)")
    if writers < 1:
        raise ValueError(f"writers must be >= 1, got {writers}")
    source = rank_source(data)
    if not isinstance(data, ChatBatchSource):  # a list is dumped once, never cycled
        num_batches = min(num_batches if num_batches is not None else len(source.batches), len(source.batches))
    elif num_batches is None:
        num_batches = data.batches_per_epoch()
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        manifest = init_or_check(root, pool, fsync)
        done = {i: e["content_hash"] for i, e in entries_matching_disk(root, manifest, strict=False).items()}
        t0 = time.monotonic()
        # no CPU reserved: a writer mostly waits on the pool, and a cluster whose CPUs the replicas (and trainers)
        # hold would otherwise never start it
        task = ray.remote(num_cpus=0)(_write_share).options(scheduling_strategy="SPREAD")
        shares = [
            task.remote(str(root), pool.name, source, w, writers, num_batches, done, fsync, stall_timeout_s)
            for w in range(writers)
        ]
        try:
            runs = ray.get(shares)
        except BaseException:
            for ref in shares:  # the other writers stop too; what they committed stays (resume verifies it)
                ray.cancel(ref)
            raise
        finally:
            entries = entries_matching_disk(root, manifest, strict=False)  # what the writers committed
            write_json(root / "manifest.json", summarise(manifest, entries, num_batches), fsync)
        run = {k: sum(r[k] for r in runs) for k in runs[0]}
        run["seconds"] = round(time.monotonic() - t0, 3)
        if progress:
            rate = run["tokens_written"] / max(run["seconds"], 1e-9)
            progress(
                f"[eagle_ray] dump done: {len(entries)}/{num_batches} batches ({run['written']} written, "
                f"{run['skipped']} resumed) {run['tokens_written']} tokens {rate:,.0f} tok/s "
                f"{run['bytes_written'] / 2**20:,.1f} MiB written"
            )
        final = summarise(manifest, entries, num_batches, requested_batches=num_batches)
        final["last_run"] = run
        write_json(root / "manifest.json", final, fsync)
        return final


def _write_share(
    root: str,
    pool_name: str,
    source: Any,
    writer: int,
    writers: int,
    count: int,
    done: dict[int, str],
    fsync: bool,
    stall_timeout_s: float,
) -> dict[str, int]:
    """A writer task: batches `writer`, `writer + writers`... below `count`, streamed by its own pool client."""
    from eagle_ray.pool import connect_pool
    from eagle_ray.train.reader import PoolSupply

    out = Path(root)
    run = {"written": 0, "skipped": 0, "bytes_written": 0, "tokens_written": 0}
    todo: list[tuple[int, str]] = []  # (batch index, content hash) of the batches streamed, in order

    def missing() -> Iterator[PackedBatch]:
        for index, batch in zip(range(writer, count, writers), source.rank_batches(writer, writers), strict=False):
            digest = content_hash(batch)
            if index in done:
                if done[index] != digest:
                    raise DumpMismatchError(
                        f"batch {index} differs from {out / shard_name(index)} (content hash "
                        f"{digest[:12]} != {done[index][:12]}): not the data this dump holds"
                    )
                run["skipped"] += 1
                continue
            todo.append((index, digest))
            yield batch

    client = connect_pool(pool_name)
    try:
        for s in PoolSupply(client, timeout_s=stall_timeout_s).serve(missing(), depth=2, world=writers):
            index, digest = todo[s.index]
            if s.error:
                raise RuntimeError(f"batch {index}: the pool gave up on it: {s.error}")
            if not (torch.equal(s.sup.input_ids, s.batch.input_ids.long()) and s.sup.num_tokens == s.batch.num_tokens):
                raise RuntimeError(f"batch {index}: the pool returned supervision of other tokens")
            entry = write_shard(out, index, s.sup, digest, fsync)
            run["written"] += 1
            run["bytes_written"] += entry["bytes"]
            run["tokens_written"] += s.batch.num_tokens
            s = None  # its results leave the client's budget
    finally:
        client.close()
    return run


# ---------------------------------------------------------------------------------------------
# Reading: where each training rank (`train/reader.py`'s DumpSupply) loads its own batches


class OfflineSupervision:
    """A finished (or partial) dump, read where it lies: its target (info, config, weights) and each batch's
    supervision, looked up by content hash (`load`). Each training rank opens one and reads its own batches."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.manifest = read_manifest(self.root)
        self.info: ModelInfo = _info_from_json(self.manifest["info"])
        self.model_path = str(self.root / "target")  # holds the target's config.json
        self.entries = entries_matching_disk(self.root, self.manifest, strict=True)
        self._by_hash: dict[str, dict[str, Any]] = {}
        for e in self.entries.values():
            self._by_hash.setdefault(e["content_hash"], e)  # equal content, equal supervision: either will do
        if not self.manifest.get("complete"):
            log.warning("%s: the dump is incomplete (%d batches); resume it to add the rest", self.root, len(self))

    def __len__(self) -> int:
        return len(self.entries)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embedding, lm_head weight) of the dumped target, as a pool's `weights_ref()` object holds them."""
        t = load_file(self.root / "target.safetensors")
        return t["embed_tokens"], t["lm_head"]

    def load(self, batch: PackedBatch) -> Supervision:
        """The dumped supervision of `batch` (checked token for token against it)."""
        batch = validate_packed(batch, self.info.vocab_size)
        digest = content_hash(batch)
        entry = self._by_hash.get(digest)
        if entry is None:
            raise MissingSupervisionError(
                f"a batch ({batch.num_sequences} sequences, {batch.num_tokens} tokens, content hash "
                f"{digest[:12]}) is not in the dump at {self.root} ({len(self)} batches"
                f"{'' if self.manifest.get('complete') else ', incomplete'}); dump it first"
            )
        with safe_open(self.root / entry["file"], "pt") as f:
            t = decoded({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
        if not all(torch.equal(t[k], getattr(batch, k)) for k in ("input_ids", "loss_mask", "cu_seqlens")):
            raise DumpMismatchError(f"{self.root / entry['file']} does not hold that batch despite its hash")
        return Supervision(**{k: t[k] for k in SHARD_FIELDS})
