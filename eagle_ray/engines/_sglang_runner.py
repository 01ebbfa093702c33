"""Every SGLang-private import and call eagle_ray relies on, in one module, for sglang==0.5.23.

Imported lazily by `eagle_ray.engines.sglang` (and by each TP-rank process), so the rest
of the package imports without SGLang. The maintained upstream reference for building a
runner in-process and running one EXTEND batch is `sglang/benchmark/one_batch.py`
(`load_model`, `extend`, `_TorchBenchRunner.clear`); each seam below names what it relies on.

Seams (all 0.5.23):
  S1 `ServerArgs(...)` fields: enable_return_aux_hidden_states + speculative_algorithm="EAGLE3"
     + return_aux_hidden_state_layer_ids capture aux states on the target without a draft;
     chunked_prefill_size=-1, disable_radix_cache, disable_cuda_graph; `resolve_once()`.
  S2 `runtime_context.publish(server_args, role="scheduler", ranks=SpawnRanks(...))`: the
     process-global config every SGLang layer reads; re-publish after teardown is supported.
  S3 `distributed.bootstrap.init_parallel_runtime` / `init_layer_runtime`: torch.distributed
     and model-parallel groups (gloo on CPU), rendezvous at tcp://127.0.0.1:<dist_port> (the
     store eagle_ray already holds there, see `engines/sglang.py:hold_dist_port`).
  S4 `parallel_state.init_model_parallel_group`: on CPU we force `use_pynccl=False`; its
     default would build a `PyNcclCommunicator`, which needs a CUDA device.
  S5 `ModelRunner(...)` + `alloc_memory_pool()` / `init_attention_backends()` / `init_cuda_graphs()`.
  S6 `Req` + `ScheduleBatch.init_new(...).prepare_for_extend()` + `ForwardBatch.init_new(...,
     capture_hidden_mode=FULL)`: one EXTEND forward over whole sequences, no prefix cache.
  S7 `LogitsProcessorOutput.hidden_states` is the aux concat `[T, 3H]` and
     `.last_hidden_states` the post-norm final state `[T, H]` of every token.
  S8 all-position logits: `model.logits_processor._get_logits(last_hidden, model.lm_head, meta)`
     (vocab-parallel lm_head with its TP all-gather), sliced to the real vocabulary.
  S9 `req_to_token_pool.clear()` / `token_to_kv_pool_allocator.clear()` free the KV after a batch.
  S10 teardown: `parallel_state.destroy_model_parallel()` + `destroy_distributed_environment()`, and
     `eplb.expert_location.set_global_expert_location_metadata(None, allow_overwrite=True)`: a MoE model leaves its
     expert map in a process global that the next MoE build asserts is empty.

  S18 generation: `runner.sample(logits_output, forward_batch)` (the batch's `sampling_info`, built from each
     `Req`'s `SamplingParams` by `prepare_for_extend`), then per step `Req.output_ids` appended,
     `batch.output_ids` / `input_ids` set and `prepare_for_decode()`, as `one_batch.py`'s `decode` does.

Seams of the exported-draft check (`check_eagle3_draft_load`), also 0.5.23:
  S11 `ModelConfig.from_server_args(server_args, model_path=<draft dir>, is_draft_model=True)`: reads the export's
     config.json the way SGLang reads `speculative_draft_model_path` (a transformers `LlamaConfig`).
  S12 `model_loader.loader._initialize_model(model_config, LoadConfig())` under `set_default_torch_dtype`: builds
     the class SGLang's model registry maps `architectures` to, as `DefaultModelLoader.load_model` does. Needs S2
     and S3 (TP/PP groups: gloo, one rank) but no KV pool and no attention backend.
  S13 `LlamaForCausalLMEagle3.load_weights(iterable of (name, tensor))` (`srt/models/llama_eagle3.py`): renames
     `midlayer` -> `layers.0`, stacks q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, sets
     `hot_token_id = d2t + arange`, skips `t2d`, and SILENTLY skips any name it has no parameter for. Vocab-parallel
     parameters pad their rows to a multiple of 64 and zero the padding.

Seams of the target matrix (docs/targets.md; tests/test_targets.py), also 0.5.23:
  S14 `model.set_eagle3_layers_to_capture(ids)` (called from `init_attention_backends`) stores input-of-layer ids in
     `model.model.layers_to_capture`. Most models add 1 to every id. DeepSeek-V2/V3 and Kimi-K2 (`deepseek_v2.py`)
     add 1 only when the first id is 1 and take the ids raw otherwise; gpt-oss takes them raw when the largest is L.
     `ensure_capture` checks what was stored against our ids + 1 and sets it again where a quirk shifted it.
  S15 MLA models pick their attention path per backend in `deepseek_common.attention_backend_handler.
     AttentionBackendRegistry`. torch_native is not registered, so it gets the triton handler, whose MHA prefill
     reads a dense K from what is an MLA latent KV pool and fails. On the CPU we register torch_native for the
     absorbed MLA path, which torch_native computes (q/k width kv_lora_rank + rope dim, v width kv_lora_rank).
  S16 `ServerArgs.resolve_once()` rejects some models for some backends (gpt-oss needs a triton/FA3-class
     backend: `arg_groups/model_hook.py`); `MODEL_LIMITS` holds the defects found by running the rest.

Seam of a quiet log, also 0.5.23:
  S17 SGLang logs through the `sglang.*` loggers at the level of `ServerArgs.log_level` (our default "error", see
     `engines/sglang.py`), set here before `ServerArgs` exists because constructing it already logs (e.g. "Cuda
     graph is disabled because of using torch native attention backend"). On a CPU its AWQ, GGUF and FLA modules
     warn at import that they need CUDA or Triton (`UserWarning`s); a target forward uses none of them.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import traceback
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagle_ray.engines import _vllm_compat
from eagle_ray.engines.base import UnsupportedTargetError

_vllm_compat.install()  # before any sglang import: the rotary module imports vllm._custom_ops on CPU
# S17: before any sglang import
warnings.filterwarnings("ignore", message="Only CUDA, ", category=UserWarning)
warnings.filterwarnings("ignore", message="Triton is not supported on current platform", category=UserWarning)
logging.getLogger("sglang").setLevel(logging.ERROR)

import sglang  # noqa: E402
import torch  # noqa: E402

SGLANG_VERSION = "0.5.23"
if sglang.__version__ != SGLANG_VERSION:
    raise ImportError(
        f"eagle_ray's SGLang engine is written against sglang=={SGLANG_VERSION}, found {sglang.__version__}; "
        f"install it with `pip install eagle-ray[sglang]`"
    )

from sglang.benchmark.one_batch import TreeCacheNamespace, _init_process_global_configs  # noqa: E402
from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.distributed import bootstrap, parallel_state  # noqa: E402
from sglang.srt.eplb.expert_location import set_global_expert_location_metadata  # noqa: E402
from sglang.srt.layers.logits_processor import LogitsMetadata  # noqa: E402
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch  # noqa: E402
from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang.srt.model_loader.loader import LoadConfig, _initialize_model  # noqa: E402
from sglang.srt.model_loader.utils import set_default_torch_dtype  # noqa: E402
from sglang.srt.runtime_context import SpawnRanks, get_device, get_schedule, publish, spawn_world_rank  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

log = logging.getLogger(__name__)


def sglang_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """Our "output of decoder layer i" ids -> SGLang's `return_aux_hidden_state_layer_ids`.

    SGLang's models capture the *input* of layer j (default [2, L//2, L-3]) and their
    `set_eagle3_layers_to_capture` adds 1 to the ids it is given, so passing our ids
    unchanged captures the output of layer i. Verified against transformers'
    `hidden_states[i + 1]` in tests/test_engines.py and tests/test_targets.py. The one place
    this convention lives; models that shift ids by a rule of their own are re-set by
    `ensure_capture` (S14), which checks what every model stored.
    """
    return list(aux_layer_ids)


def build_server_args(kwargs: dict[str, Any]) -> ServerArgs:  # S1
    logging.getLogger("sglang").setLevel(str(kwargs.get("log_level", "error")).upper())  # S17
    args = ServerArgs(**kwargs)
    args.resolve_once()
    return args


def _llama4_limit(kwargs: dict[str, Any]) -> str | None:
    if kwargs["device"] != "cpu":
        return None
    return (
        "SGLang 0.5.23 runs Llama-4's experts on the CPU through `moe_forward_native` (srt/layers/moe/"
        "fused_moe_native.py), which raises NotImplementedError for Llama-4's router weight applied to the input, "
        "and its attention casts q/k to bfloat16 outside CUDA (srt/models/llama4.py), so fp32 fails before that. "
        "It needs a CUDA GPU (the fused MoE kernels)"
    )


def _gemma3_limit(kwargs: dict[str, Any]) -> str | None:
    return (
        "SGLang 0.5.23's Gemma-3 (srt/models/gemma3_causal.py, Gemma3TextModel.forward) captures the aux states "
        "before each layer's deferred residual add: the previous layer's feed-forward output, not the residual "
        "stream (on the tiny Gemma-3 they differ from transformers' hidden_states by up to 11, while its last "
        "hidden state matches to 3e-6). Its EAGLE-3 serving captures the same states, on every device"
    )


# S16: architecture -> the reason SGLang cannot serve it as a supervision source with these server kwargs, or None
MODEL_LIMITS = {"Llama4ForCausalLM": _llama4_limit, "Gemma3ForCausalLM": _gemma3_limit}


def unsupported_reason(architecture: str, kwargs: dict[str, Any]) -> str | None:
    """Why SGLang cannot give this architecture's supervision with these settings (None: it can)."""
    limit = MODEL_LIMITS.get(architecture)
    reason = limit(kwargs) if limit else None
    if reason:
        return reason
    try:
        build_server_args(kwargs)  # S16: SGLang's own model/backend checks
    except (AssertionError, ValueError, NotImplementedError) as e:
        return f"SGLang's ServerArgs rejects it: {str(e).strip() or type(e).__name__}"
    return None


def _use_mla_on_torch_native() -> None:  # S15
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry,
        _dispatch_mla_subtype,
    )

    AttentionBackendRegistry.register("torch_native", _dispatch_mla_subtype)


def ensure_capture(model: torch.nn.Module, aux_layer_ids: list[int]) -> None:  # S14
    """Make the model capture the output of each aux layer it was given (the input of layer i + 1), or raise.

    `aux_layer_ids` as passed to SGLang (`return_aux_hidden_state_layer_ids`, see `sglang_aux_layer_ids`).
    """
    want = [i + 1 for i in aux_layer_ids]
    inner = getattr(model, "model", None)

    def stored() -> list[int] | None:
        ids = getattr(inner, "layers_to_capture", None)
        return None if ids is None else [int(i) for i in ids]

    if stored() is None:
        raise UnsupportedTargetError(
            f"SGLang's {type(model).__name__} keeps no `model.layers_to_capture`: eagle_ray cannot check which layers "
            "it captures; use engine='hf'"
        )
    if stored() != want:  # DeepSeek: +1 only when the first id is 1, so ours + 1 is taken raw
        model.set_eagle3_layers_to_capture(want)
    if stored() != want:
        raise UnsupportedTargetError(
            f"SGLang 0.5.23's {type(model).__name__} cannot capture aux_layer_ids {aux_layer_ids}: it stored "
            f"input-of-layer ids {stored()}, not {want} (its set_eagle3_layers_to_capture shifts ids by a rule of its "
            "own). Choose aux_layer_ids whose first id is at least 1, or use engine='hf'"
        )


def cpu_bind_groups(n: int) -> str:
    """Split this process's CPUs into n '|'-separated groups (round-robin when fewer CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    groups = [cpus[r::n] or [cpus[r % len(cpus)]] for r in range(n)]
    return "|".join(",".join(map(str, g)) for g in groups)


_original_init_group = parallel_state.init_model_parallel_group


def _init_group_without_pynccl(*args, **kwargs):  # S4
    kwargs["use_pynccl"] = False
    return _original_init_group(*args, **kwargs)


@dataclass
class RankRunner:
    """One TP rank's in-process SGLang model runner."""

    runner: ModelRunner | None
    tp_rank: int
    vocab_size: int

    @property
    def kv_capacity_tokens(self) -> int:
        return int(self.runner.max_total_num_tokens)

    @property
    def max_requests(self) -> int:
        return int(self.runner.req_to_token_pool.size)

    @property
    def context_len(self) -> int:
        return int(self.runner.model_config.context_len)

    def _extend_batch(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> ScheduleBatch:
        """S6: an EXTEND batch of whole sequences, no prefix cache (the KV pools are cleared after each use)."""
        runner, reqs = self.runner, []
        for i, (ids, sp) in enumerate(zip(prompts, sampling, strict=True)):
            req = Req(rid=str(i), origin_input_text="", origin_input_ids=array("q", ids), sampling_params=sp)
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.extend_end = len(ids)
            reqs.append(req)
        tree_cache = TreeCacheNamespace(
            page_size=get_schedule().page_size,
            device=runner.device,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
        )
        batch = ScheduleBatch.init_new(
            reqs=reqs,
            req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
            tree_cache=tree_cache,
            model_config=runner.model_config,
            enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE,
        )
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
            batch.prefill_input_ids_cpu = None
        return batch

    def _clear(self) -> None:  # S9
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, return_logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One EXTEND forward over whole sequences; returns (aux, last hidden, logits|None) on CPU."""
        runner = self.runner
        cu, ids = cu_seqlens.tolist(), input_ids.tolist()
        prompts = [ids[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]
        try:
            batch = self._extend_batch(prompts, [SamplingParams(temperature=0, max_new_tokens=1) for _ in prompts])
            fb = ForwardBatch.init_new(
                batch, runner, capture_hidden_mode=CaptureHiddenMode.FULL, return_hidden_states_before_norm=False
            )
            out = runner.forward(fb).logits_output
            aux, last = out.hidden_states, out.last_hidden_states  # S7
            logits = None
            if return_logits:  # S8
                model = runner.model
                meta = LogitsMetadata.from_forward_batch(fb)
                logits = model.logits_processor._get_logits(last, model.lm_head, meta, use_logits_buffer=False)
                logits = logits[:, : self.vocab_size].cpu()
            # clone: the runner may reuse its output buffers on the next forward
            return aux.to("cpu", copy=True), last.to("cpu", copy=True), logits
        finally:
            self._clear()

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int]
    ) -> list[list[int]]:
        """S18: extend, then one decode step per new token for the whole batch (`one_batch.py`'s `extend` and
        `decode`), sampling with SGLang's own sampler; each answer is cut after its first stop id."""
        runner, stop = self.runner, set(stop_ids)
        sampling = [
            SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens) for _ in prompts
        ]
        try:
            batch = self._extend_batch(prompts, sampling)
            fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
            nxt = runner.sample(runner.forward(fb).logits_output, fb)
            out = [[t] for t in nxt.tolist()]
            for _ in range(max_new_tokens - 1):
                if all(o[-1] in stop or stop & set(o) for o in out):
                    break
                for req, t in zip(batch.reqs, nxt.tolist(), strict=True):
                    req.output_ids.append(t)
                batch.output_ids = nxt
                batch.input_ids = nxt.to(torch.int64)
                batch.prepare_for_decode()
                fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
                nxt = runner.sample(runner.forward(fb).logits_output, fb)
                for o, t in zip(out, nxt.tolist(), strict=True):
                    o.append(t)
        finally:
            self._clear()
        return [o[: next((k + 1 for k, t in enumerate(o) if t in stop), len(o))] for o in out]

    def close(self) -> None:  # S10
        self.runner = None
        gc.collect()
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
        set_global_expert_location_metadata(None, allow_overwrite=True)


def build_rank(kwargs: dict[str, Any], tp_rank: int, dist_port: int, vocab_size: int) -> RankRunner:
    """Build this process's TP rank. Every rank of the group calls this at the same time."""
    server_args = build_server_args(kwargs)
    device = kwargs["device"]
    gpu_id = tp_rank  # index among the devices this process sees (Ray sets CUDA_VISIBLE_DEVICES)
    if device == "cpu" and int(kwargs.get("tp_size", 1)) > 1:
        # S3: on CPU, SGLang picks rank r's threads from SGLANG_CPU_OMP_THREADS_BIND group r
        # (gpu_id is the group index); unset, it demands one NUMA node per rank.
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_bind_groups(int(kwargs["tp_size"])))
    publish(  # S2
        server_args,
        role="scheduler",
        ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=tp_rank, pp_rank=0), gpu_id=gpu_id),
    )
    _init_process_global_configs()
    model_config = ModelConfig.from_server_args(server_args)
    parallel_state.init_model_parallel_group = _init_group_without_pynccl if device == "cpu" else _original_init_group
    bootstrap.init_parallel_runtime(  # S3
        server_args=server_args, device=get_device().device, dist_port=dist_port
    )
    rank = RankRunner(None, tp_rank, vocab_size)
    try:
        bootstrap.init_layer_runtime(model_config=model_config)
        rank.runner = runner = ModelRunner(  # S5
            model_config=model_config,
            mem_fraction_static=server_args.mem_fraction_static,
            gpu_id=gpu_id,
            nccl_port=dist_port,
            server_args=server_args,
        )
        if kwargs.get("attention_backend") == "torch_native":
            _use_mla_on_torch_native()
        runner.alloc_memory_pool()
        runner.init_attention_backends()
        ensure_capture(runner.model, list(kwargs["return_aux_hidden_state_layer_ids"]))
        runner.init_cuda_graphs()
    except BaseException:
        rank.close()  # the process-global parallel state, so that this process can build another engine
        raise
    return rank


def rank_placement(tp_rank: int) -> dict[str, Any]:
    """Where a rank runs: its process and the device it drives (physical id under CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    return {
        "tp_rank": tp_rank,
        "pid": os.getpid(),
        "device_index": tp_rank,
        "device_id": devices[tp_rank] if devices and tp_rank < len(devices) else None,
    }


def tp_worker_main(
    conn,
    kwargs: dict[str, Any],
    tp_rank: int,
    dist_port: int,
    vocab_size: int,
    rendezvous_env: dict[str, str],
    parent_pid: int | None = None,
    parent_thread_is_main: bool = True,
) -> None:
    """Body of a TP-rank process (ranks >= 1): build, then run every batch rank 0 runs.

    Messages: ("forward", input_ids, cu_seqlens, return_logits) or ("generate", seed, *generate's arguments)
    -> ("ok",) | ("error", text);
    ("close",) -> exits. Results stay with rank 0; this rank only takes part in the collectives.
    `parent_pid` (rank 0's process; default: the multiprocessing parent) and `parent_thread_is_main` (did rank 0
    spawn us from its main thread) tie this process's life to rank 0's: see `sglang.die_with_parent`.
    """
    import multiprocessing

    from eagle_ray.engines.sglang import die_with_parent  # lazily, as that module imports this one

    # first: a rank blocked in a collective must not outlive rank 0 (Ray SIGKILLs replica actors)
    die_with_parent(parent_pid or multiprocessing.parent_process().pid, parent_thread_is_main)
    try:
        rank = build_rank(kwargs, tp_rank, dist_port, vocab_size)
        for k in rendezvous_env:  # inherited for the rendezvous only
            os.environ.pop(k, None)
        conn.send(("ready", rank_placement(tp_rank)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # parent gone
            break
        if msg[0] == "close":
            break
        try:
            if msg[0] == "generate":
                torch.manual_seed(msg[1])  # the seed rank 0 sampled with: every rank samples the same tokens
                rank.generate(*msg[2:])
            else:
                rank.forward(msg[1], msg[2], msg[3])
            conn.send(("ok",))
        except Exception:
            conn.send(("error", traceback.format_exc()))
            # rank 0 may still wait in a collective this rank left: exiting breaks it out (gloo/NCCL
            # see the peer gone) instead of leaving it to the process-group timeout
            os._exit(1)
    rank.close()
    # skip interpreter teardown: with torch and SGLang loaded it spends seconds in C++ destructors, time a
    # stopping job lacks (`ray job stop` SIGKILLs after 3 s); nothing but stdio is left to flush
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# Exported EAGLE-3 draft: load it into SGLang's own draft class on the CPU (S11-S13) and compare every parameter.
# ---------------------------------------------------------------------------------------------------------------

EAGLE3_DRAFT_ARCH = "LlamaForCausalLMEagle3"
_SPECIAL_EXPORT_TENSORS = ("d2t", "t2d")  # S13: d2t becomes hot_token_id, t2d is skipped by SGLang
_STACKED = {  # S13: SGLang parameter -> the export tensors it concatenates (dim 0), in order
    ".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."),
    ".gate_up_proj.": (".gate_proj.", ".up_proj."),
}


def _export_sources(param_name: str) -> list[str]:
    """The export tensor name(s) an SGLang draft parameter is loaded from: S13's renaming, inverted."""
    name = param_name.removeprefix("model.").replace("layers.0.", "midlayer.")
    for stacked, parts in _STACKED.items():
        if stacked in name:
            return [name.replace(stacked, part) for part in parts]
    return [name]


def _read_export(draft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_file = draft_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{draft_dir}: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("architectures") != [EAGLE3_DRAFT_ARCH]:
        raise ValueError(f"{config_file}: architectures is {config.get('architectures')}, want [{EAGLE3_DRAFT_ARCH!r}]")
    files = sorted(draft_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{draft_dir}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return config, weights


def _dtype_name(config: dict[str, Any]) -> str:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if str(dtype) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"draft config dtype {dtype!r} unsupported; use float32, bfloat16 or float16")
    return str(dtype)


def _load_one_by_one(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, list]:
    """Feed each export tensor alone through S13 into a NaN-filled model.

    Returns (param -> export names that filled some of it, export name -> load error, export names that filled
    nothing). A parameter is "touched" by a tensor when its NaN count drops.
    """
    params = dict(model.named_parameters())
    for p in params.values():
        if p.is_floating_point():
            p.data.fill_(math.nan)
    nan_left = {n: int(torch.isnan(p).sum()) for n, p in params.items()}
    filled_by: dict[str, list[str]] = {n: [] for n in params}
    errors: dict[str, str] = {}
    unused: list[str] = []
    for name, tensor in weights.items():
        try:
            model.load_weights([(name, tensor)])
        except Exception as e:  # a mis-shaped tensor trips an assertion in SGLang's weight loaders
            errors[name] = f"{type(e).__name__}: {e}".strip()
        touched = []
        for n in [n for n, left in nan_left.items() if left]:
            left = int(torch.isnan(params[n]).sum())
            if left < nan_left[n]:
                touched.append(n)
                filled_by[n].append(name)
            nan_left[n] = left
        if not touched and name not in errors and name not in _SPECIAL_EXPORT_TENSORS:
            unused.append(name)
    return filled_by, errors, unused


def _compare_param(
    param: torch.Tensor, sources: list[str], weights: dict[str, torch.Tensor], vocab_parallel: bool
) -> dict[str, Any]:
    """One SGLang parameter against the export tensor(s) it should hold."""
    missing = [s for s in sources if s not in weights]
    if missing:
        return {"match": False, "missing_export_tensors": missing}
    parts = [weights[s] for s in sources]
    if len({p.shape[1:] for p in parts}) > 1:
        return {"match": False, "expected_shape": [list(p.shape) for p in parts]}
    want = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    got = param.detach()
    entry: dict[str, Any] = {}
    rows = want.shape[0] if want.dim() else 0
    if vocab_parallel and got.dim() == want.dim() and got.shape[0] > rows and got.shape[1:] == want.shape[1:]:
        # S13: vocab-parallel padding rows; SGLang zeroes them
        entry["padding_rows_zero"] = bool((got[rows:] == 0).all())
        got = got[:rows]
    if got.shape != want.shape:
        return {**entry, "match": False, "expected_shape": list(want.shape)}
    want = want.to(got.dtype)
    diff = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    return {**entry, "match": torch.equal(got, want) and entry.get("padding_rows_zero", True), "max_abs_diff": diff}


def _hot_token_report(model, weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, Any]:
    d2t, t2d = weights.get("d2t"), weights.get("t2d")
    hot = model.get_hot_token_id()
    report: dict[str, Any] = {"d2t_present": d2t is not None, "ids": None if hot is None else hot.detach().cpu()}
    if d2t is None or hot is None:
        return {**report, "match": False}
    ids = hot.detach().cpu()
    report["match"] = torch.equal(ids, d2t + torch.arange(d2t.shape[0], dtype=d2t.dtype))
    report["in_range"] = bool(((ids >= 0) & (ids < vocab_size)).all())
    report["unique"] = ids.unique().numel() == ids.numel()
    if t2d is not None:  # t2d marks exactly the hot target ids
        report["t2d_consistent"] = (
            t2d.shape == (vocab_size,) and bool(t2d[ids.clamp(0, vocab_size - 1)].all()) and int(t2d.sum()) == len(ids)
        )
    return report


@torch.no_grad()
def check_eagle3_draft_load(draft_dir: str) -> dict[str, Any]:
    """Load an exported EAGLE-3 draft into SGLang's own `LlamaForCausalLMEagle3` on the CPU, and compare.

    Builds the model from the export's config.json as SGLang's draft worker would (S11, S12), fills every
    parameter with NaN, feeds the export's tensors one at a time through the model's own `load_weights` (S13),
    then compares each parameter with the export tensor(s) it should hold (q/k/v and gate/up concatenated for the
    stacked ones) and `hot_token_id` with `d2t + arange`. The 1-rank parallel state it needs is torn down again,
    so an SGLang engine can be built in this process afterwards; no engine may be open while it runs.

    Returns a report; `report["ok"]` is True only when every parameter was loaded and equals the export, no
    tensor failed to load or went unused, and the hot-token map round-trips.
    """
    from eagle_ray.engines import sglang as adapter  # lazily, as that module imports this one

    if adapter._live is not None:
        raise RuntimeError(
            f"an SGLang engine for {adapter._live.model_path} is open in this process; SGLang's runtime config is "
            "process-global, so run the draft check in another process (verify_eagle3_export does)"
        )
    path = Path(draft_dir)
    config, weights = _read_export(path)
    dtype = _dtype_name(config)
    kwargs = {
        **adapter.CPU_DEFAULTS,
        "model_path": str(path),
        "dtype": dtype,
        "skip_tokenizer_init": True,
        "disable_cuda_graph": True,
    }
    server_args = build_server_args(kwargs)  # S1
    _store, env = adapter.hold_dist_port()  # held (bound) until we return
    saved_init_group = parallel_state.init_model_parallel_group
    model = None
    try:
        with adapter._scoped_env(env):
            publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))  # S2
            _init_process_global_configs()
            model_config = ModelConfig.from_server_args(server_args, model_path=str(path), is_draft_model=True)  # S11
            parallel_state.init_model_parallel_group = _init_group_without_pynccl  # S4
            try:
                bootstrap.init_parallel_runtime(  # S3
                    server_args=server_args, device="cpu", dist_port=int(env["MASTER_PORT"])
                )
                bootstrap.init_layer_runtime(model_config=model_config)
                with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):  # S12
                    model = _initialize_model(model_config, LoadConfig())
                report = _draft_report(model, model_config, weights, dtype)
            finally:
                model = None
                gc.collect()
                parallel_state.destroy_model_parallel()  # S10
                parallel_state.destroy_distributed_environment()
    finally:
        parallel_state.init_model_parallel_group = saved_init_group
    report["draft_dir"] = str(path)
    return report


def _draft_report(model, model_config: ModelConfig, weights: dict[str, torch.Tensor], dtype: str) -> dict[str, Any]:
    if type(model).__name__ != EAGLE3_DRAFT_ARCH:
        raise ValueError(f"SGLang built {type(model).__name__} from the export, not {EAGLE3_DRAFT_ARCH}")
    filled_by, errors, unused = _load_one_by_one(model, weights)  # S13
    params: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        sources = _export_sources(name)
        entry = {
            "shape": list(param.shape),
            "sources": sources,
            "loaded_from": filled_by[name],
            "loaded": not bool(torch.isnan(param).any()),
        }
        owner = model.get_submodule(name.rpartition(".")[0])
        entry.update(_compare_param(param, sources, weights, isinstance(owner, VocabParallelEmbedding)))
        entry["ok"] = entry["loaded"] and entry["match"] and sorted(entry["loaded_from"]) == sorted(sources)
        params[name] = entry
    hf = model_config.hf_config
    attn = model.model.layers[0].self_attn
    hot = _hot_token_report(model, weights, hf.vocab_size)
    ok = all(p["ok"] for p in params.values()) and not errors and not unused and hot["match"]
    return {
        "ok": ok,
        "sglang_version": sglang.__version__,
        "model_class": type(model).__name__,
        "dtype": dtype,
        "config": {  # as SGLang read it
            "hidden_size": hf.hidden_size,
            "target_hidden_size": model.model.hidden_size_in,
            "num_aux_hidden_states": model.model.num_aux_hidden_states,
            "num_attention_heads": attn.total_num_heads,
            "num_key_value_heads": attn.total_num_kv_heads,
            "head_dim": attn.head_dim,
            "vocab_size": hf.vocab_size,
            "draft_vocab_size": hf.draft_vocab_size,
            "eagle_aux_hidden_state_layer_ids": (getattr(hf, "eagle_config", None) or {}).get(
                "eagle_aux_hidden_state_layer_ids"
            ),
        },
        "params": params,
        "not_loaded": [n for n, p in params.items() if not p["loaded"]],
        "mismatched": [n for n, p in params.items() if p["loaded"] and not p["ok"]],
        "load_errors": errors,
        "unused_export_tensors": unused,
        "hot_token_id": hot,
    }
