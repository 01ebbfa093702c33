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
  S10 teardown: `parallel_state.destroy_model_parallel()` + `destroy_distributed_environment()`.
"""

from __future__ import annotations

import gc
import logging
import os
import traceback
from array import array
from dataclasses import dataclass
from typing import Any

from eagle_ray.engines import _vllm_compat

_vllm_compat.install()  # before any sglang import: the rotary module imports vllm._custom_ops on CPU

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
from sglang.srt.layers.logits_processor import LogitsMetadata  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch  # noqa: E402
from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
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
    `hidden_states[i + 1]` in tests/test_engines.py. The one place this convention lives.
    """
    return list(aux_layer_ids)


def build_server_args(kwargs: dict[str, Any]) -> ServerArgs:  # S1
    args = ServerArgs(**kwargs)
    args.resolve_once()
    return args


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

    runner: ModelRunner
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

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, return_logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One EXTEND forward over whole sequences; returns (aux, last hidden, logits|None) on CPU."""
        runner = self.runner
        reqs = []
        cu = cu_seqlens.tolist()
        ids = input_ids.tolist()
        for i in range(len(cu) - 1):  # S6
            req = Req(
                rid=str(i),
                origin_input_text="",
                origin_input_ids=array("q", ids[cu[i] : cu[i + 1]]),
                sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
            )
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.extend_end = cu[i + 1] - cu[i]
            reqs.append(req)
        tree_cache = TreeCacheNamespace(
            page_size=get_schedule().page_size,
            device=runner.device,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
        )
        try:
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
            runner.req_to_token_pool.clear()  # S9
            runner.token_to_kv_pool_allocator.clear()

    def close(self) -> None:  # S10
        self.runner = None
        gc.collect()
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


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
    bootstrap.init_layer_runtime(model_config=model_config)
    runner = ModelRunner(  # S5
        model_config=model_config,
        mem_fraction_static=server_args.mem_fraction_static,
        gpu_id=gpu_id,
        nccl_port=dist_port,
        server_args=server_args,
    )
    runner.alloc_memory_pool()
    runner.init_attention_backends()
    runner.init_cuda_graphs()
    return RankRunner(runner, tp_rank, vocab_size)


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
    conn, kwargs: dict[str, Any], tp_rank: int, dist_port: int, vocab_size: int, rendezvous_env: dict[str, str]
) -> None:
    """Body of a TP-rank process (ranks >= 1): build, then run every batch rank 0 runs.

    Messages: ("forward", input_ids, cu_seqlens, return_logits) -> ("ok",) | ("error", text);
    ("close",) -> exits. Results stay with rank 0; this rank only takes part in the collectives.
    """
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
            rank.forward(msg[1], msg[2], msg[3])
            conn.send(("ok",))
        except Exception:
            conn.send(("error", traceback.format_exc()))
            # rank 0 may still wait in a collective this rank left: exiting breaks it out (gloo/NCCL
            # see the peer gone) instead of leaving it to the process-group timeout
            os._exit(1)
    rank.close()
