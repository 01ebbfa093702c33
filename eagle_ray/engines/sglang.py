"""The SGLang engine: an in-process SGLang model runner per TP rank (the fast path).

This adapter owns settings and process layout only; every SGLang-private call lives in
`_sglang_runner`, imported lazily so this module imports without SGLang installed.

Tensor parallelism: rank 0 runs in the calling process (a Ray replica actor, or your
script); ranks 1..tp_size-1 are child processes. All ranks run every batch (their
collectives meet in the forward); only rank 0 returns tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed import TCPStore

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, plan_runs, resolve_aux_layer_ids
from eagle_ray.engines.base import UnsupportedTargetError, forward_in_runs
from eagle_ray.generation import GenerationParams
from eagle_ray.hf_checkpoint import checkpoint_dtype, embedding_and_lm_head, load_config

# On a machine without CUDA: SGLang's plain CPU path (not its AMX engine, which needs a CPU
# build of sgl-kernel) with a KV pool sized explicitly, since SGLang cannot size it from
# free device memory there. SGLang still refuses to start when free memory fell by more than
# 1 - mem_fraction_static while it loaded; other processes starting beside it (replicas, train
# workers) easily take 6% of a host's memory, so tolerate up to half.
CPU_DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "log_level": "error",  # SGLang's own verbosity: its start-up notices are for a server's operator
    "attention_backend": "torch_native",
    "mem_fraction_static": 0.5,
    "max_total_tokens": 8192,
    "disable_custom_all_reduce": True,
}
# On GPUs: leave half the memory to a colocated draft trainer, as SpecForge does.
GPU_DEFAULTS: dict[str, Any] = {"device": "cuda", "mem_fraction_static": 0.5, "log_level": "error"}
# Always: one whole-sequence prefill per batch, nothing cached between batches.
FIXED: dict[str, Any] = {
    "chunked_prefill_size": -1,
    "disable_radix_cache": True,
    "disable_cuda_graph": True,
    "skip_tokenizer_init": True,
    "enable_return_aux_hidden_states": True,
    "speculative_algorithm": "EAGLE3",
}

# SGLang keeps its config in process globals, so one process holds one live engine.
_live: SGLangEngine | None = None

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def _scoped_env(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hold_dist_port() -> tuple[TCPStore, dict[str, str]]:
    """Bind the ranks' rendezvous store on a port the kernel picks, and keep it bound.

    Every rank (rank 0 here, the others in child processes inheriting the environment) then
    joins as a *client*: torch's tcp:// rendezvous does that when TORCHELASTIC_USE_AGENT_STORE
    is set and MASTER_ADDR/MASTER_PORT name the endpoint. No port is guessed, so replicas
    sharing a node never race for one. Returns the store (keep it alive) and the env it needs.
    """
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    return store, env


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, parent_thread_is_main: bool = True) -> None:
    """Make this process (a TP rank >= 1) end when `parent_pid` (rank 0's process) dies, whatever it is doing.

    Called first thing in each rank's process. Ray SIGKILLs a replica actor on `ray.kill` and owner death, the OOM
    killer does, a crash ends it: a rank waiting on its pipe then sees EOF and leaves, but one blocked inside a
    collective never reads the pipe again (NCCL waits indefinitely; a wedged process notices nothing), and Ray
    reaps a dead worker's children only when its process-group cleanup is on and sees them: such a rank would
    outlive its replica, holding its GPU. On Linux the kernel SIGKILLs us when the parent dies
    (PR_SET_PDEATHSIG). It fires when the parent's *thread* that spawned us exits, so it is armed only when rank
    0 spawned the ranks from its main thread (a Ray actor builds its engine there); otherwise, and off Linux, a
    daemon thread polls the parent pid (it needs the GIL, which collectives release while they wait).
    """
    armed = False
    if parent_thread_is_main and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):  # no prctl in this libc: poll instead
            armed = False
    # the parent may have died before the signal was armed (a rank imports SGLang first: seconds); we were
    # re-parented then, and no signal will ever come
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(
            target=_exit_when_orphaned, args=(parent_pid,), name="eagle-ray-parent-watch", daemon=True
        ).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def architecture_of(model_path: str) -> str:
    """The checkpoint's `architectures[0]` (what SGLang's model registry maps to a model class)."""
    with open(os.path.join(model_path, "config.json")) as f:
        archs = json.load(f).get("architectures") or ["<no architectures in config.json>"]
    return archs[0]


def server_kwargs(
    model_path: str,
    aux_layer_ids: list[int],
    dtype: torch.dtype | None,
    tp_size: int,
    trust_remote_code: bool,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """SGLang ServerArgs keyword arguments: device defaults < user overrides < fixed settings."""
    from eagle_ray.engines._sglang_runner import sglang_aux_layer_ids

    device = overrides.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(GPU_DEFAULTS if device != "cpu" else CPU_DEFAULTS)
    kwargs.update(overrides)
    clash = {k: overrides[k] for k in FIXED if k in overrides and overrides[k] != FIXED[k]}
    if clash:
        raise ValueError(f"sglang_kwargs {clash} conflict with settings eagle_ray needs: {FIXED}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; use one of {list(_DTYPES)}")
    kwargs.update(FIXED)
    kwargs.update(
        model_path=model_path,
        tp_size=tp_size,
        trust_remote_code=trust_remote_code,
        dtype=_DTYPES.get(dtype, "auto"),
        return_aux_hidden_state_layer_ids=sglang_aux_layer_ids(aux_layer_ids),
    )
    return kwargs


class SGLangEngine:
    """An SGLang target with `tp_size` ranks. One forward at a time."""

    def __init__(
        self,
        model_path: str,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        tp_size: int = 1,
        trust_remote_code: bool = False,
        sglang_kwargs: dict[str, Any] | None = None,
    ):
        from eagle_ray.engines import _sglang_runner as sr

        global _live
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if _live is not None:
            raise RuntimeError(
                f"an SGLang engine for {_live.model_path} is still open in this process; close() it first "
                "(SGLang keeps its runtime config in process globals: one engine per process)"
            )
        self.model_path = model_path
        config = load_config(model_path, trust_remote_code)
        ids = resolve_aux_layer_ids(aux_layer_ids, config.num_hidden_layers)
        # SGLang's "auto" turns an fp32 checkpoint into fp16; transformers' keeps fp32. Follow transformers.
        dtype = dtype or checkpoint_dtype(config)
        kwargs = server_kwargs(model_path, ids, dtype, tp_size, trust_remote_code, dict(sglang_kwargs or {}))
        self.architecture = architecture_of(model_path)
        reason = sr.unsupported_reason(self.architecture, kwargs)
        if reason:
            raise UnsupportedTargetError(
                f"SGLang {sr.SGLANG_VERSION} cannot serve {self.architecture} ({model_path}) on {kwargs['device']} "
                f"with attention backend {kwargs.get('attention_backend') or 'auto'}: {reason}. Use engine='hf' "
                "(transformers runs it on any device) or a GPU where SGLang supports it; docs/targets.md has "
                "the matrix"
            )
        self._config = config
        self._store, env = hold_dist_port()
        port = int(env["MASTER_PORT"])
        self._workers: list[tuple[Any, Any]] = []
        self._broken: str | None = None
        # The rendezvous env exists only while the ranks meet: anything else this process starts
        # later (a Ray raylet, a trainer's own process group) must not inherit it.
        with _scoped_env(env):
            ctx = mp.get_context("spawn")  # a fresh interpreter per rank: SGLang state is process-global
            for r in range(1, tp_size):
                parent, child = ctx.Pipe()
                # rank r dies with this process, even when blocked in a collective (see die_with_parent)
                spawner = (os.getpid(), threading.current_thread() is threading.main_thread())
                proc = ctx.Process(
                    target=sr.tp_worker_main,
                    args=(child, kwargs, r, port, config.vocab_size, env, *spawner),
                    daemon=True,
                )
                proc.start()
                self._workers.append((proc, parent))
            try:
                self._rank = sr.build_rank(kwargs, 0, port, config.vocab_size)
                self._placements = self._collect("ready")
            except BaseException as e:
                self._kill_workers()
                self._store = None
                if isinstance(e, (UnsupportedTargetError, KeyboardInterrupt, SystemExit)):
                    raise
                # SGLang's own failures are often bare assertions deep in a layer: say what was being built
                raise RuntimeError(
                    f"SGLang {sr.SGLANG_VERSION} failed to build {self.architecture} ({model_path}) on "
                    f"{kwargs['device']} with tp_size={tp_size}, attention backend "
                    f"{kwargs.get('attention_backend') or 'auto'}: {type(e).__name__}: "
                    f"{str(e).strip() or '(no message)'}. engine='hf' runs any model transformers runs"
                ) from e
        rank = self._rank
        self.info = ModelInfo(
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            aux_layer_ids=tuple(ids),
            dtype=rank.runner.model_config.dtype,
            max_context=min(rank.context_len, rank.kv_capacity_tokens),
            kv_capacity_tokens=rank.kv_capacity_tokens,
        )
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None
        _live = self

    @property
    def broken(self) -> str | None:
        """Why this engine can no longer run (a TP rank failed mid-forward), or None."""
        return self._broken

    def ranks(self) -> list[dict[str, Any]]:
        """Per TP rank: process id and the device it drives."""
        from eagle_ray.engines._sglang_runner import rank_placement

        return [rank_placement(0)] + self._placements

    def _collect(self, expect: str) -> list[Any]:
        """Wait for every worker's reply to the last message; raise naming each rank that failed."""
        errors, replies = [], []
        for r, (proc, conn) in enumerate(self._workers, start=1):
            while not conn.poll(1.0):
                if not proc.is_alive():
                    break
            try:
                msg = conn.recv() if conn.poll(0) else ("died",)
            except EOFError:
                msg = ("died",)
            if msg[0] == "died":
                errors.append(f"TP rank {r} died (exit code {proc.exitcode})")
            elif msg[0] != expect:
                errors.append(f"TP rank {r}: {msg[1]}")
            else:
                replies.append(msg[1] if len(msg) > 1 else None)
        if errors:
            # a rank that failed mid-forward leaves the others inside a collective: no way back
            self._kill_workers()
            self._broken = "SGLang tensor-parallel ranks failed:\n" + "\n".join(errors)
            raise RuntimeError(self._broken)
        return replies

    def _on_all_ranks(self, message: tuple, local: Any) -> Any:
        """Send `message` to ranks >= 1, run `local()` on rank 0, and wait for every rank's reply."""
        if self._broken:
            raise RuntimeError(f"engine unusable after an earlier failure: {self._broken}")
        dead = [r for r, (proc, _) in enumerate(self._workers, start=1) if not proc.is_alive()]
        if dead:
            self._kill_workers()
            self._broken = f"TP ranks {dead} died between batches"
            raise RuntimeError(self._broken)
        try:
            for _, conn in self._workers:
                conn.send(message)
            result = local()
        except BaseException as e:
            if self._workers:  # the other ranks now wait in a collective rank 0 never joins
                self._kill_workers()
                self._broken = f"rank 0 failed mid-forward: {type(e).__name__}: {e}"
            raise
        self._collect("ok")
        return result

    def _run(self, batch: PackedBatch, return_logits: bool):
        aux, last, logits = self._on_all_ranks(
            ("forward", batch.input_ids, batch.cu_seqlens, return_logits),
            lambda: self._rank.forward(batch.input_ids, batch.cu_seqlens, return_logits),
        )
        ids, h = self.info.aux_layer_ids, self.info.hidden_size
        if tuple(aux.shape) != (batch.num_tokens, len(ids) * h):  # a layer it never reached is silently missing
            raise RuntimeError(
                f"SGLang returned aux states of shape {tuple(aux.shape)}, not [{batch.num_tokens}, {len(ids) * h}] "
                f"({len(ids)} aux layers {list(ids)} x hidden size {h}): it captured other layers than asked"
            )
        return aux, last, logits

    def generate(self, batch: PackedBatch, params: GenerationParams, first: int = 0) -> list[list[int]]:
        """Each prompt's continuation, decoded by SGLang's runner in batches that fit its KV pool.

        Sampling draws from torch's generator seeded with the batch's first request's seed on every rank: a shard
        re-run repeats itself. (SGLang seeds requests one by one only in its deterministic-inference mode.)
        """
        rank, out = self._rank, []
        lengths = [n + params.max_new_tokens for n in batch.seqlens]
        for start, stop in plan_runs(lengths, rank.kv_capacity_tokens, rank.max_requests):
            prompts = [batch.input_ids[batch.sequence(i)].tolist() for i in range(start, stop)]
            args = (prompts, params.max_new_tokens, params.temperature, params.top_p, list(params.stop_ids))
            seed = params.seed_of(first + start)

            def local(args=args, seed=seed) -> list[list[int]]:
                torch.manual_seed(seed)
                return rank.generate(*args)

            out += self._on_all_ranks(("generate", seed, *args), local)
        return out

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        # Batches larger than the KV pool (or the request pool) become several forwards.
        rank = self._rank
        return forward_in_runs(batch, return_logits, self._run, rank.kv_capacity_tokens, rank.max_requests)

    def _embedding_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        # From the checkpoint: under TP each rank holds only a vocabulary shard.
        if self._weights is None:
            embed, head = embedding_and_lm_head(self.model_path, self._config)
            self._weights = embed.to(self.info.dtype), head.to(self.info.dtype)
        return self._weights

    def input_embeddings(self) -> torch.Tensor:
        return self._embedding_and_head()[0]

    def lm_head_weight(self) -> torch.Tensor:
        return self._embedding_and_head()[1]

    def _kill_workers(self) -> None:
        for proc, _ in self._workers:
            proc.kill()
            proc.join(timeout=10)
        self._workers = []

    def close(self) -> None:
        global _live
        if getattr(self, "_rank", None) is None:
            return
        if _live is self:
            _live = None
        for _, conn in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close",))
        self._rank.close()
        self._rank = None
        for proc, _ in self._workers:
            proc.join(timeout=30)
        self._kill_workers()
        self._store = None


def verify_eagle3_export(draft_dir: str | os.PathLike) -> dict[str, Any]:
    """Check an exported EAGLE-3 draft against SGLang's own loader: build SGLang's `LlamaForCausalLMEagle3` from
    the export (on the CPU), load its tensors through SGLang's `load_weights`, and compare every parameter.

    Returns the report of `_sglang_runner.check_eagle3_draft_load`: `report["ok"]`, and per SGLang parameter
    whether it was loaded and equals the export, plus load errors, unused tensors and the hot-token map. Runs in
    this process when no SGLang engine is open here (and leaves none of its state behind), else in a fresh one.
    """
    return verify_eagle3_exports([draft_dir])[0]


def verify_eagle3_exports(draft_dirs: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """`verify_eagle3_export` for several exports, one report each; at most one fresh process for all of them."""
    dirs = [str(d) for d in draft_dirs]
    if _live is None:
        return _verify_in_this_process(dirs)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_verify_in_this_process, dirs).result()


def _verify_in_this_process(draft_dirs: list[str]) -> list[dict[str, Any]]:
    from eagle_ray.engines._sglang_runner import check_eagle3_draft_load

    return [check_eagle3_draft_load(d) for d in draft_dirs]
