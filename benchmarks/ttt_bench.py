"""EAGLE-3 draft training step on CPU: our packed TTT trainer against the padded one, NeMo AutoModel and SpecForge.

One training step = forward + backward of the TTT loss (7 TTT steps, fp32, no optimizer step) on the same
batches and shapes (draft H=256, 8 query / 2 KV heads of 32, intermediate 704, target vocabulary 8192, draft
vocabulary 2048: a fixed random subset, aux width 3H). Trainers:

- `packed`: ours, `eagle_ray.draft.ttt.ttt_loss` (packed tokens, no padding, no dense mask);
- `padded`: ours before, `eagle_ray.testing.padded_ttt.padded_ttt_loss` (rows padded to the longest, a dense
  boolean mask over (k+1)·S keys at step k);
- `nemo`: NeMo AutoModel 0.7.0's `Eagle3TrainerModule` + `LlamaEagle3DraftModel` (eager attention: no
  flash-attn on CPU) on NeMo's own packed rows (`build_packed_eagle3_dataset`, `_pack_collate`; uniform
  batches as plain rows), fed full target logits as its co-located target does;
- `specforge`: SpecForge 0.2.0's `OnlineEagle3Model` + `LlamaForCausalLMEagle3` with its flex-attention TTT;
  `specforge-sdpa`: the same with SpecForge's other CPU-capable backend (padded rows, additive masks).
  Both use SpecForge's own torch loss (`core.loss._compute_loss`) in place of its Triton kernel, which
  needs a GPU; see `SPECFORGE_NOTES` for what runs and what does not.

Every trainer's timed step includes its teacher: ours and SpecForge build the target distribution from the
last hidden states and the target lm_head inside the step, NeMo's step computes `last_hidden @ lm_head.T`
(full logits) first, as its target would, then runs its trainer on them.

Each (case, trainer) runs in a fresh subprocess: one warm-up step (under `FlopCounterMode`: the FLOPs every
matmul-like op of forward + backward executes), then `--reps` timed steps (median reported). Memory: the
process's peak RSS (`ru_maxrss`) after the steps minus its RSS just before the first one (inputs, weights
and teacher inputs already built, free heap returned with `malloc_trim`): what the step itself adds, at
its peak. Efficiency: measured FLOPs per real token ÷ `min_ttt_flops` per real token (1.0 = no work
beyond the algorithm's minimum; padding, masked-out attention and recomputation all count above it, and
so does each trainer's teacher, 2·H·V = 4.2 MFLOP per slot it covers, which the minimum leaves out).

Cases: uniform B x S (8x512, 4x1024, 2x2048, 1x4096, 1x8192, 1x16384, 1x32768) and the job's own ShareGPT
batches (`make_batch_source`: ShareGPT V3, Qwen's BPE, the job's shuffle buffer and seed; batch
`--sharegpt-batch` of max_length 2048 / 4096 / 8192 at 8192 / 16384 / 32768 batch tokens; Qwen ids are
folded into the 8192-token vocabulary, which changes no cost). Their layouts (lengths, loss-mask runs) are
written to `benchmarks/results/ttt_bench_sharegpt.json` for `gpu_bench.py`, which has no data packages.

    .venv/bin/python benchmarks/ttt_bench.py                                   # everything (hours on 2 cores)
    .venv/bin/python benchmarks/ttt_bench.py --cases uniform --max-tokens 2048 --reps 1 \\
        --trainers packed,padded,nemo --threads 1                              # ~8 min on 2 busy cores
    .venv/bin/python benchmarks/ttt_bench.py --cases sharegpt --max-tokens 2048 --reps 1 --threads 1  # ~8 min

`--max-tokens` keeps the cases whose S (uniform) or max_length (ShareGPT) is at most that many tokens.

`--threads` defaults to every core; on a machine shared with other work use `--threads 1`: torch's OpenMP
threads wait on each other at every op, and one preempted thread stalls them all (steps several times
slower and erratic). Timings are only as quiet as the machine: compare ratios from one run.

The eager peers (NeMo, SpecForge's sdpa backend) hold [rows, heads, T, T] scores per TTT step: they run
only up to `--nemo-max-tokens` real tokens and rows of `--nemo-max-row` slots; the padded baseline up to
`--padded-max-tokens` real tokens. Skipped pairs are printed and recorded with the reason.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
NEMO = ROOT / ".peers" / "nemo"  # nemo-automodel==0.7.0, installed --no-deps by .ci/setup
SPECFORGE = ROOT / ".peers" / "specforge"  # specforge==0.2.0, pip install --no-deps --target (see SPECFORGE_NOTES)
RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = RESULTS / "ttt_bench_sharegpt.json"

# Ray-free imports only: gpu_bench.py imports this module where Ray and the data packages are absent
from eagle_ray.contract import Supervision  # noqa: E402
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig  # noqa: E402

TTT_STEPS = 7
DRAFT_SHAPES = dict(
    hidden_size=256,
    intermediate_size=704,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=8192,
    draft_vocab_size=2048,
    aux_layer_ids=[1, 3, 5],
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)
UNIFORM = ((8, 512), (4, 1024), (2, 2048), (1, 4096), (1, 8192), (1, 16384), (1, 32768))
SHAREGPT = ((2048, 8192), (4096, 16384), (8192, 32768))  # (max_length, batch_tokens)
TRAINERS = ("packed", "padded", "nemo", "specforge", "specforge-sdpa")
EAGER_PEERS = ("nemo", "specforge", "specforge-sdpa")  # T^2 scores per row: --nemo-max-tokens / --nemo-max-row

SPECFORGE_NOTES = {
    "install": "pip download --no-deps specforge==0.2.0 -d /tmp/sf; "
    "pip install --no-deps --target .peers/specforge /tmp/sf/specforge-0.2.0-py3-none-any.whl",
    "imports": "specforge.modeling.draft.llama3_eagle and specforge.algorithms.eagle3.model import with --no-deps "
    "against this venv (torch 2.14.1, transformers 5.19; SpecForge pins torch 2.11.0, transformers 5.8.1): the "
    "modules they need (torch, transformers, triton, safetensors, huggingface_hub) are all here; the missing "
    "yunchang / sglang 0.5.14 / flash_attn are not imported on this path (flash_attn only warns)",
    "flex_attention": "OnlineEagle3Model(attention_backend='flex_attention') cannot train on CPU: torch's "
    "flex_attention refuses autograd on CPU, compiled (q_len > 128: SpecForge's torch.compile'd wrapper) or not: "
    "NotImplementedError: FlexAttention does not support backward on CPU. Please set the input requires_grad to "
    "False or use another device. (torch/nn/attention/flex_attention.py, _validate_device). Not a missing "
    "dependency: a limit of torch's CPU flex attention.",
    "loss": "SpecForge's training loss LogSoftmaxLoss (specforge/core/loss.py) is a Triton kernel; on CPU it fails "
    "with RuntimeError: 0 active drivers ([]). There should only be one. (triton/runtime/driver.py). Both "
    "specforge rows replace it with SpecForge's own torch reference of the same loss, core.loss._compute_loss "
    "(uncompiled), and change nothing else.",
    "sdpa": "specforge-sdpa: OnlineEagle3Model(attention_backend='sdpa'), SpecForge's eager TTT attention "
    "(matmul against step 0's keys + additive [B, 1, S, S] mask, one column per later step), on rows padded to "
    "the batch's longest conversation as its collator pads them; teacher from hidden states "
    "(target_hidden_for_compact: the compact-teacher path, no [B, S, V] tensor). Runs on CPU.",
}
NEMO_NOTES = (
    "NeMo's trainer gets full target logits (the live path: target_logits; it derives target_probs and the "
    "position mask itself), computed inside the timed step as last_hidden @ lm_head.T over every slot of its "
    "rows and shifted as HFEagle3TargetModel.generate_batch shifts them; ragged batches are NeMo's own packed "
    "rows (build_packed_eagle3_dataset at packed_sequence_size = the batch's max_length, _pack_collate), uniform "
    "batches plain [B, S] rows. attn_implementation='eager' (flash_attention_2 needs flash-attn and a GPU)."
)
MEMORY_MEASURE = (
    "peak RSS growth: ru_maxrss after the warm-up and timed steps minus the RSS just before the first step "
    "(fresh process per case and trainer, inputs and teacher inputs already built, malloc_trim first), MB"
)


def draft_config() -> Eagle3DraftConfig:
    return Eagle3DraftConfig(**DRAFT_SHAPES)


# ---------------------------------------------------------------------------------------------
# The algorithm's minimum


def min_ttt_flops(c: Any, seqlens: list[int], steps: int = TTT_STEPS) -> float:
    """The fewest FLOPs one TTT training step (forward + backward) can do on sequences `seqlens` (real tokens).

    `c`: the draft's shapes (an `Eagle3DraftConfig`). Multiply-accumulates (MACs) per TTT step over the
    N = sum(seqlens) real slots, padding never counted:
    - `fc` (aux width 3H -> H), step 0 only;
    - the draft layer: q/k/v from 2H (q to heads·d, k and v to kv_heads·d), o_proj (heads·d -> H), the MLP
      (3·H·I);
    - the draft lm_head H·D on every real slot (the loss only needs the loss-masked ones that still have a
      target; counting all of them keeps the formula independent of the data: a slight overcount);
    - attention, 2·heads·d MACs per attended (query, key) pair (QK^T and PV): the causal block of each
      document against step 0's keys, T(T+1)/2 pairs for T tokens (the diagonal included), plus one pair
      per earlier step at step k (the query's own slot in steps 1..k: k·N).
    Training = 3x the forward MACs (backward = 2x; `fc`'s backward needs no input gradient, the aux states
    being data, so a trainer's real count can dip just under 3x there), 2 FLOPs per MAC. Not counted:
    norms, rope, softmax and other elementwise work, the embedding lookup, the teacher (no grad: the target
    lm_head's H·V per loss slot, ~2·H·V FLOPs, which every trainer pays once).
    """
    h, inter, d = c.hidden_size, c.intermediate_size, c.draft_vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    n = sum(seqlens)
    pairs = sum(t * (t + 1) // 2 for t in seqlens)
    per_slot = 2 * h * (q + 2 * kv) + q * h + 3 * h * inter + h * d
    macs = n * c.aux_width * h
    for k in range(steps):
        macs += n * per_slot + 2 * q * (pairs + k * n)
    return 3.0 * 2.0 * macs


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Case:
    name: str
    kind: str  # "uniform" | "sharegpt"
    input_ids: torch.Tensor  # [N] long, ids < 8192
    loss_mask: torch.Tensor  # [N] long
    cu_seqlens: torch.Tensor  # [B+1] int64
    row_width: int  # NeMo's packed row width: S (uniform) or the batch's max_length
    info: dict[str, Any]

    @property
    def seqlens(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    @property
    def tokens(self) -> int:
        return int(self.cu_seqlens[-1])


def _case(name: str, kind: str, ids: torch.Tensor, mask: torch.Tensor, seqlens: list[int], width: int, **info) -> Case:
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    n, b, s = sum(seqlens), len(seqlens), max(seqlens)
    info.update(tokens=n, sequences=b, longest=s, loss_tokens=int(mask.sum()), padded_slots=b * s)
    info["padded_over_real"] = b * s / n
    return Case(name, kind, ids, mask, cu, width, info)


def uniform_case(b: int, s: int, vocab: int) -> Case:
    """B sequences of S random tokens, every slot in the loss."""
    g = torch.Generator().manual_seed(b * s)
    ids = torch.randint(0, vocab, (b * s,), generator=g)
    return _case(f"uniform {b}x{s}", "uniform", ids, torch.ones(b * s, dtype=torch.long), [s] * b, s)


def sharegpt_layouts(batch_index: int = 0, packing: str | None = None) -> list[dict[str, Any]]:
    """The job's ShareGPT batches (lengths, ids, loss masks), one per `SHAREGPT` setting: `make_batch_source`
    as `eagle_ray.job.run` builds it (Qwen's BPE, the job's template, shuffle buffer and seed; its packing
    unless `packing` is given: "greedy" or "best_fit", which the GPU configs use)."""
    from eagle_ray.job.config import DataConfig
    from eagle_ray.job.inputs import job_batch_source

    dc = DataConfig()
    packing = packing or dc.packing
    out = []
    for max_length, batch_tokens in SHAREGPT:
        src = job_batch_source(
            dc, "qwen", max_length=max_length, batch_tokens=batch_tokens, packing=packing, workers=0, max_warnings=0
        )
        it = src(batch_index)
        batch = next(it)
        it.close()
        out.append(
            dict(
                name=f"sharegpt {max_length}/{batch_tokens // 1024}k",
                max_length=max_length,
                batch_tokens=batch_tokens,
                batch_index=batch_index,
                packing=packing,
                seqlens=batch.seqlens,
                input_ids=batch.input_ids,
                loss_mask=batch.loss_mask,
            )
        )
    return out


def loss_runs(mask: list[int]) -> list[list[int]]:
    """[start, length] of each run of 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append([start, i - start])
            start = None
    return runs


def mask_from_runs(runs: list[list[int]], length: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.long)
    for start, n in runs:
        mask[start : start + n] = 1
    return mask


def write_layouts(layouts: list[dict[str, Any]], path: Path = LAYOUTS) -> None:
    """Lengths and loss-mask runs per sequence (no token ids: a draft step's cost does not depend on them)."""
    rows = []
    for lay in layouts:
        cu = [0, *torch.tensor(lay["seqlens"]).cumsum(0).tolist()]
        runs = [loss_runs(lay["loss_mask"][a:b].tolist()) for a, b in zip(cu[:-1], cu[1:], strict=True)]
        keys = ("name", "max_length", "batch_tokens", "batch_index", "packing", "seqlens")
        rows.append({k: lay[k] for k in keys if k in lay})
        rows[-1]["loss_runs"] = runs
    doc = {"source": "benchmarks/ttt_bench.py: make_batch_source('sharegpt', qwen, auto template)", "batches": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) + "\n")


def read_layouts(path: Path = LAYOUTS) -> list[dict[str, Any]]:
    """`write_layouts`' batches, each with `loss_mask` ([N] long) rebuilt from its runs."""
    batches = json.loads(path.read_text())["batches"]
    for b in batches:
        b["loss_mask"] = torch.cat([mask_from_runs(r, t) for r, t in zip(b["loss_runs"], b["seqlens"], strict=True)])
    return batches


def sharegpt_case(lay: dict[str, Any], vocab: int) -> Case:
    ids = lay["input_ids"] % vocab  # Qwen ids folded into the benchmark's vocabulary: the cost is the same
    extra = {k: lay[k] for k in ("max_length", "batch_tokens", "batch_index", "packing")}
    return _case(lay["name"], "sharegpt", ids, lay["loss_mask"].long(), lay["seqlens"], lay["max_length"], **extra)


# ---------------------------------------------------------------------------------------------
# The world every trainer shares: target weights, draft vocabulary, target states (all seeded)


@dataclass
class World:
    c: Eagle3DraftConfig
    embeddings: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H]
    draft_ids: torch.Tensor  # [D] ascending target ids
    aux: torch.Tensor  # [N, 3H] unshifted
    last: torch.Tensor  # [N, H] unshifted

    @staticmethod
    def make(c: Eagle3DraftConfig, tokens: int) -> World:
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(c.vocab_size, c.hidden_size, generator=g) * 0.02
        head = torch.randn(c.vocab_size, c.hidden_size, generator=g) * 0.02
        ids = torch.randperm(c.vocab_size, generator=g)[: c.draft_vocab_size].sort().values
        aux = torch.randn(tokens, c.aux_width, generator=g)
        last = torch.randn(tokens, c.hidden_size, generator=g)
        return World(c, emb, head, ids, aux, last)

    def draft(self) -> Eagle3Draft:
        return Eagle3Draft.from_target(self.c, self.embeddings, self.lm_head, self.draft_ids, seed=0)

    def supervision(self, case: Case) -> Supervision:
        return Supervision(case.input_ids, case.loss_mask, case.cu_seqlens, self.aux, self.last)


def padded_rows(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each packed slot when every sequence gets its own row of the longest's width."""
    lens = case.cu_seqlens.diff()
    rows = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    return rows, torch.arange(case.tokens) - case.cu_seqlens[:-1][rows]


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = x.new_zeros(*shape, *x.shape[1:])
    out[rows, cols] = x
    return out


# ---------------------------------------------------------------------------------------------
# Trainers: each builds its inputs and returns (step, trainable params, slots its layout computes on)

Step = Callable[[], float]


def ours_packed(w: World, case: Case, options: dict[str, Any]) -> tuple[Step, list, int]:
    from eagle_ray.draft.ttt import ttt_loss

    draft, sup = w.draft(), w.supervision(case)

    def step() -> float:
        loss, _ = ttt_loss(draft, sup, w.lm_head, steps=TTT_STEPS, **options)
        loss.backward()
        return float(loss)

    return step, list(draft.parameters()), case.tokens


def ours_padded(w: World, case: Case, options: dict[str, Any]) -> tuple[Step, list, int]:
    from eagle_ray.testing.padded_ttt import padded_ttt_loss

    draft, sup = w.draft(), w.supervision(case)

    def step() -> float:
        loss, _ = padded_ttt_loss(draft, sup, w.lm_head, steps=TTT_STEPS)
        loss.backward()
        return float(loss)

    return step, list(draft.parameters()), case.info["padded_slots"]


def _nemo_modules():
    if str(NEMO) not in sys.path:
        sys.path.insert(0, str(NEMO))
    import nemo_automodel.components.datasets.llm.eagle3 as data
    import nemo_automodel.components.speculative.eagle.core as core
    import nemo_automodel.components.speculative.eagle.draft_llama as draft_llama
    import nemo_automodel.components.speculative.eagle.target as target

    return data, core, draft_llama, target


def _llama_config(c: Eagle3DraftConfig, **extra: Any):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        num_hidden_layers=1,
        tie_word_embeddings=False,
    )
    d = cfg.to_dict()
    d.update(draft_vocab_size=c.draft_vocab_size, target_hidden_size=c.hidden_size, **extra)
    return LlamaConfig.from_dict(d)


def nemo_rows(case: Case) -> dict[str, torch.Tensor]:
    """NeMo's batch layout: its packer's rows for ragged batches, plain rows for uniform ones. `slot`: the
    packed slot at each row position (-1: padding), from packing the slot indices the same way."""
    if case.kind == "uniform":
        b, s = len(case.seqlens), case.row_width
        return {
            "input_ids": case.input_ids.view(b, s),
            "loss_mask": case.loss_mask.view(b, s),
            "attention_mask": torch.ones(b, s, dtype=torch.long),
            "slot": torch.arange(b * s).view(b, s),
        }
    data = _nemo_modules()[0]
    cu = case.cu_seqlens.tolist()
    spans = list(zip(cu[:-1], cu[1:], strict=True))

    def pack(ids: torch.Tensor, pad: int) -> dict[str, torch.Tensor]:
        docs = [{"input_ids": ids[a:b].tolist(), "loss_mask": case.loss_mask[a:b].tolist()} for a, b in spans]
        rows = data.build_packed_eagle3_dataset(docs, packed_sequence_size=case.row_width, pad_token_id=pad)
        return data._pack_collate(rows)

    batch = pack(case.input_ids, 0)
    batch["slot"] = pack(torch.arange(case.tokens), -1)["input_ids"]
    return batch


def nemo_trainer(w: World, case: Case, options: dict[str, Any]) -> tuple[Step, list, int]:
    _, core, draft_llama, target = _nemo_modules()
    c = w.c
    torch.manual_seed(0)
    extra = dict(architectures=["LlamaEagle3DraftModel"], attn_implementation="eager")
    cfg = _llama_config(c, fc_norm=False, norm_output=False, parallel_drafting=False, **extra)
    draft = draft_llama.LlamaEagle3DraftModel(cfg).to(torch.float32)
    draft.copy_embeddings_from_target(torch.nn.Embedding.from_pretrained(w.embeddings))
    draft.set_vocab_mapping(w.draft_ids)
    draft.freeze_embeddings()
    mask = torch.zeros(c.vocab_size, dtype=torch.bool)
    mask[w.draft_ids] = True
    trainer = core.Eagle3TrainerModule(
        draft, selected_token_ids=w.draft_ids, selected_token_mask=mask, ttt_steps=TTT_STEPS
    )
    rows = nemo_rows(case)
    slot = rows.pop("slot")
    real = slot >= 0
    aux = torch.zeros(*slot.shape, c.aux_width)
    last = torch.zeros(*slot.shape, c.hidden_size)
    aux[real], last[real] = w.aux[slot[real]], w.last[slot[real]]
    shift = target._shift_left_with_zero  # as HFEagle3TargetModel.generate_batch prepares its outputs

    def step() -> float:
        with torch.no_grad():
            logits = last @ w.lm_head.T  # the target's lm_head over every slot of the rows
        batch = target.Eagle3TargetBatch(
            aux_hidden_states=aux,
            logits=shift(logits),
            input_ids=shift(rows["input_ids"]),
            attention_mask=rows["attention_mask"],
            loss_mask=shift(rows["loss_mask"]),
            position_ids=rows.get("position_ids"),
            seq_lens=rows.get("seq_lens"),
            doc_remaining=rows.get("doc_remaining"),
        )
        metrics = trainer(**batch.to_trainer_inputs())
        metrics.loss.backward()
        return float(metrics.loss)

    return step, list(trainer.parameters()), slot.numel()


def _specforge_modules():
    if str(SPECFORGE) not in sys.path:
        sys.path.insert(0, str(SPECFORGE))
    import specforge.algorithms.eagle3.model as eagle3
    from specforge.core.loss import _compute_loss
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.utils import padding

    class TorchLoss:  # SpecForge's torch reference of its Triton LogSoftmaxLoss (same value, same gradient)
        apply = staticmethod(getattr(_compute_loss, "_torchdynamo_orig_callable", _compute_loss))

    eagle3.LogSoftmaxLoss = TorchLoss
    return eagle3, LlamaForCausalLMEagle3, padding


def specforge_trainer(w: World, case: Case, backend: str) -> tuple[Step, list, int]:
    eagle3, draft_cls, padding = _specforge_modules()
    c = w.c
    torch.manual_seed(0)
    draft = draft_cls(_llama_config(c), attention_backend=backend).to(torch.float32)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(w.embeddings)
        draft.lm_head.weight.copy_(w.lm_head[w.draft_ids])
        draft.t2d.zero_()
        draft.t2d[w.draft_ids] = True
        draft.d2t.copy_(w.draft_ids - torch.arange(c.draft_vocab_size))
    draft.embed_tokens.weight.requires_grad_(False)
    model = eagle3.OnlineEagle3Model(draft, length=TTT_STEPS, attention_backend=backend)
    rows, cols = padded_rows(case)
    shape = (len(case.seqlens), max(case.seqlens))
    ids, aux, last = (scatter_rows(x, rows, cols, shape) for x in (case.input_ids, w.aux, w.last))
    attn, loss_mask = (scatter_rows(x, rows, cols, shape) for x in (torch.ones_like(case.loss_mask), case.loss_mask))

    def step() -> float:
        # TargetHead.preprocess: ids and target hidden shifted left, loss mask [B, S, 1]; then forward_loss
        plosses = model(
            input_ids=padding(ids, left=False),
            attention_mask=attn,
            target=None,
            loss_mask=loss_mask[..., None],
            hidden_states=aux,
            target_hidden_for_compact=padding(last, left=False),
            target_head_weight=w.lm_head,
        )[0]
        loss = sum(0.8**i * p for i, p in enumerate(plosses))
        loss.backward()
        return float(loss)

    return step, [p for p in model.parameters() if p.requires_grad], shape[0] * shape[1]


def build_trainer(name: str, w: World, case: Case, options: dict[str, Any]) -> tuple[Step, list, int]:
    if name == "packed":
        return ours_packed(w, case, options)
    if name == "padded":
        return ours_padded(w, case, options)
    if name == "nemo":
        return nemo_trainer(w, case, options)
    return specforge_trainer(w, case, "flex_attention" if name == "specforge" else "sdpa")


# ---------------------------------------------------------------------------------------------
# One (case, trainer) in this process: the child side


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trim_heap() -> None:
    """Return freed heap to the OS, so the RSS before the step is what is live, not what was freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _causal_share(s_q: int, s_k: int, is_causal: bool) -> float:
    """The share of the S_q x S_k scores a causal kernel needs: S(S+1)/2 of S^2 (block skipping lands near it)."""
    return (s_q + 1) / (2 * s_q) if is_causal and s_q == s_k else 1.0


def _cpu_flash_fwd(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(q, k, v) * _causal_share(q[2], k[2], is_causal))


def _cpu_flash_bwd(dout, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return int(sdpa_backward_flop_count(dout, q, k, v) * _causal_share(q[2], k[2], is_causal))


def flop_counter():
    """`FlopCounterMode` that also counts PyTorch's fused CPU flash attention (SDPA's CPU kernel, which the
    counter does not know): by its shapes, as the counter counts the CUDA kernels, causal at S(S+1)/2 pairs."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
    }
    return FlopCounterMode(display=False, custom_mapping=custom)


def measure(step: Step, params: list, reps: int) -> dict[str, Any]:
    def clear() -> None:
        for p in params:
            p.grad = None

    trim_heap()
    rss0, peak0 = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    with flop_counter() as counter:  # the warm-up step, counted
        loss = step()
    warmup = time.perf_counter() - t
    times = []
    for _ in range(reps):
        clear()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "warmup_s_flop_counted": warmup,
        "flops": counter.get_total_flops(),
        "flops_by_op": {str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
        "rss_before_mb": rss0,
        "peak_growth_mb": peak - rss0,
        "peak_set_before_step": peak <= peak0,  # the step never raised the process peak: the growth is a floor
        "loss": loss,
    }


def child_main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    saved = torch.load(spec["case_file"], weights_only=False)
    case = Case(**saved)
    w = World.make(draft_config(), case.tokens)
    step, params, slots = build_trainer(spec["trainer"], w, case, spec["options"])
    result = measure(step, params, spec["reps"])
    result["layout_slots"] = slots
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: cases, subprocesses, tables, the results file


def skip_reason(trainer: str, case: Case, a: argparse.Namespace) -> str | None:
    info = case.info
    if trainer == "padded" and info["tokens"] > a.padded_max_tokens:
        gib = info["padded_slots"] * info["longest"] * TTT_STEPS / 2**30  # its boolean mask over 7 steps' keys
        return f"{info['tokens']} real tokens > --padded-max-tokens {a.padded_max_tokens} (dense mask ~{gib:.1f} GiB)"
    if trainer in EAGER_PEERS:
        width = case.row_width if trainer == "nemo" else info["longest"]
        rows = -(-info["tokens"] // width) if trainer == "nemo" else info["sequences"]
        c = draft_config()
        gib = rows * c.num_attention_heads * width * (width + TTT_STEPS) * 4 * TTT_STEPS / 2**30
        why = f"eager attention keeps [rows, heads, T, T] fp32 scores per TTT step: ~{gib:.1f} GiB or more"
        if info["tokens"] > a.nemo_max_tokens:
            return f"{info['tokens']} real tokens > --nemo-max-tokens {a.nemo_max_tokens}; {why}"
        if width > a.nemo_max_row:
            return f"rows of {width} slots > --nemo-max-row {a.nemo_max_row}; {why}"
    return None


def run_child(case_file: Path, trainer: str, a: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    spec = dict(case_file=str(case_file), trainer=trainer, reps=a.reps, threads=a.threads, options=options)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout_s}s (--timeout-s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    last = next((ln for ln in reversed(tail) if ln and not ln.startswith(" ")), "no output")
    code = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"error": f"{code}: {last}"[:600], "stderr_tail": "\n".join(tail[-25:])}


def add_derived(r: dict[str, Any], case: Case) -> None:
    n = case.tokens
    r["tokens_per_s"] = n / r["median_s"]
    r["slots_over_real"] = r["layout_slots"] / n
    r["flops_per_token"] = r["flops"] / n
    r["flops_over_min"] = r["flops"] / case.info["min_flops"]


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ours (packed) over each other trainer that ran in this case: step time and peak memory growth."""
    ours, out = results.get("packed", {}), {}
    if "median_s" not in ours:
        return out
    for other, r in results.items():
        if other != "packed" and "median_s" in r:
            out[f"time packed/{other}"] = ours["median_s"] / r["median_s"]
            if r["peak_growth_mb"] > 0:
                out[f"memory packed/{other}"] = ours["peak_growth_mb"] / r["peak_growth_mb"]
    return out


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_case(case: Case, results: dict[str, dict[str, Any]], ratio: dict[str, float]) -> None:
    i = case.info
    packing = f"{i['packing']} packing, " if "packing" in i else ""
    print(
        f"\n### {case.name}: {i['tokens']} real tokens, {i['sequences']} sequences (longest {i['longest']}), "
        f"{i['loss_tokens']} in the loss, padded slots / real {i['padded_over_real']:.2f}, {packing}"
        f"min {i['min_flops_per_token'] / 1e6:.1f} MFLOP/token\n"
    )
    print("| trainer | step s (median) | min-max s | real tok/s | peak +MB | slots/real | MFLOP/token | ÷ min | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "median_s" not in r:
            print(f"| {name} | {r.get('skipped') or r.get('error')} |||||||")
            continue
        print(
            f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_growth_mb']:.0f} | {r['slots_over_real']:.2f} | {r['flops_per_token'] / 1e6:.1f} "
            f"| {r['flops_over_min']:.2f} | {r['loss']:.3f} |"
        )
    if ratio:
        print("\n" + ", ".join(f"{k} = {v:.3f}" for k, v in ratio.items()))


def render(doc: dict[str, Any]) -> str:
    """The docs' tables of a results `doc` (`benchmarks/render.py`): per case, each trainer's step time and peak
    memory growth, ours per real token, and ours over each other trainer in the same run."""
    others = ["padded", "nemo", "specforge-sdpa"]
    head = (
        "| case | real tokens | ours s | ours tok/s | ours MB / 1k tokens | ours FLOPs ÷ min | "
        + " | ".join(f"{o} s" for o in others)
        + " | "
        + " | ".join(f"ours ÷ {o} (time, memory)" for o in others)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + 2 * len(others))]
    for c in doc["cases"]:
        t, ours = c["trainers"], c["trainers"].get("packed", {})
        if "median_s" not in ours:
            continue
        cells = [
            c["name"],
            str(c["tokens"]),
            f"{ours['median_s']:.2f}",
            f"{ours['tokens_per_s']:.0f}",
            f"{ours['peak_growth_mb'] / c['tokens'] * 1000:.0f}",
            f"{ours['flops_over_min']:.2f}",
        ]
        cells += [f"{t[o]['median_s']:.2f}" if "median_s" in t.get(o, {}) else "–" for o in others]
        for o in others:
            time, memory = c["ratios"].get(f"time packed/{o}"), c["ratios"].get(f"memory packed/{o}")
            cells.append("–" if time is None else f"{time:.2f}, {fmt(memory)}")
        lines.append("| " + " | ".join(cells) + " |")
    tail = f"\n\n`{doc['command']}` ({doc['date'][:10]}, torch {doc['torch']}, {doc['threads']} thread(s), fp32 CPU)"
    return "\n".join(lines) + tail


def make_cases(a: argparse.Namespace, vocab: int) -> list[Case]:
    cases = []
    if "uniform" in a.cases:
        cases += [uniform_case(b, s, vocab) for b, s in UNIFORM]
    if "sharegpt" in a.cases:
        layouts = sharegpt_layouts(a.sharegpt_batch, a.packing)
        if a.write_layouts:
            write_layouts(layouts)
        cases += [sharegpt_case(lay, vocab) for lay in layouts]
    cases = [c for c in cases if c.row_width <= a.max_tokens]  # S of a uniform case, max_length of a ShareGPT one
    c = draft_config()
    for case in cases:
        case.info["min_flops"] = min_ttt_flops(c, case.seqlens)
        case.info["min_flops_per_token"] = case.info["min_flops"] / case.tokens
    return cases


def git_state() -> str:
    """HEAD and whether the trainer's code differs from it (the draft is often measured mid-edit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "eagle_ray"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted eagle_ray changes" if dirty.stdout.strip() else "")


def packed_backend(options: dict[str, Any]) -> str:
    """The TTT attention backend `ttt_loss` resolves to on this CPU."""
    try:
        from eagle_ray.draft.attention import resolve_backend
    except ImportError:  # the padded-era trainer had no backends
        return "n/a"
    return resolve_backend(options.get("attention", "auto"), torch.device("cpu"))


def save(out: Path, doc: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="uniform,sharegpt", help="uniform and/or sharegpt")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"from {','.join(TRAINERS)}")
    p.add_argument("--max-tokens", type=int, default=32768, help="cases whose S (uniform) or max_length <= this")
    p.add_argument("--reps", type=int, default=3, help="timed steps after the warm-up (median reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per step")
    p.add_argument("--nemo-max-tokens", type=int, default=8192, help="eager peers: most real tokens")
    p.add_argument("--nemo-max-row", type=int, default=4096, help="eager peers: widest row (T^2 scores)")
    p.add_argument("--padded-max-tokens", type=int, default=8192, help="padded baseline: most real tokens")
    p.add_argument("--packed-attention", default=None, help="ttt_loss(attention=...): auto, torch or flex")
    p.add_argument("--packed-checkpoint", action="store_true", help="ttt_loss(checkpoint=True)")
    p.add_argument("--sharegpt-batch", type=int, default=0, help="which batch of the job's source")
    p.add_argument("--packing", choices=["greedy", "best_fit"], default=None, help="default: the job's")
    p.add_argument("--no-write-layouts", dest="write_layouts", action="store_false", help=f"keep {LAYOUTS.name}")
    p.add_argument("--timeout-s", type=int, default=3600, help="per (case, trainer) subprocess")
    p.add_argument("--out", type=Path, default=RESULTS / "ttt_bench.json")
    a = p.parse_args(argv)
    a.cases, a.trainers = a.cases.split(","), a.trainers.split(",")
    bad = [t for t in a.trainers if t not in TRAINERS]
    if bad:
        p.error(f"unknown trainers {bad}; choose from {TRAINERS}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    options = {"attention": a.packed_attention} if a.packed_attention else {}
    if a.packed_checkpoint:
        options["checkpoint"] = True
    c = draft_config()
    doc: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": a.threads,
        "ttt_steps": TTT_STEPS,
        "dtype": "float32",
        "draft_config": c.as_dict(),
        "packed_options": options,
        "packed_attention_backend": packed_backend(options),
        "memory": MEMORY_MEASURE,
        "min_flops": " ".join(min_ttt_flops.__doc__.split()),
        "nemo": NEMO_NOTES,
        "specforge": SPECFORGE_NOTES,
        "cases": [],
    }
    cases = make_cases(a, c.vocab_size)
    print(f"{len(cases)} cases x {a.trainers}, {a.threads} threads, {a.reps} reps; results in {a.out}", flush=True)
    flex_error = None  # SpecForge's flex path fails the same way on every case: run it once
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            case_file = Path(tmp) / "case.pt"
            torch.save({k: getattr(case, k) for k in Case.__dataclass_fields__}, case_file)
            row: dict[str, Any] = {"name": case.name, "kind": case.kind, **case.info, "trainers": {}}
            doc["cases"].append(row)
            for trainer in a.trainers:
                why = skip_reason(trainer, case, a)
                if trainer == "specforge" and flex_error:
                    why = f"fails as on {flex_error[0]}: {flex_error[1]}"
                if why:
                    r = {"skipped": why}
                else:
                    print(f"{case.name}: {trainer} ...", flush=True)
                    r = run_child(case_file, trainer, a, options if trainer == "packed" else {})
                    if "median_s" in r:
                        add_derived(r, case)
                    elif trainer == "specforge":
                        flex_error = (case.name, r.get("error", ""))
                print(f"{case.name}: {trainer}: " + (summary(r)), flush=True)
                row["trainers"][trainer] = r
                row["ratios"] = ratios(row["trainers"])
                save(a.out, doc)
            print_case(case, row["trainers"], row["ratios"])
    print(f"\nresults in {a.out}")
    return doc


def summary(r: dict[str, Any]) -> str:
    if "median_s" not in r:
        return "skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"]
    return (
        f"{r['median_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, +{r['peak_growth_mb']:.0f} MB, "
        f"{r['flops_over_min']:.2f}x min FLOPs"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        main()
