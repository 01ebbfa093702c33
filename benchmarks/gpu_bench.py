"""GPU benchmark: the transformers engine's prefill and the EAGLE-3 draft's training step, 8B shapes.

Run on the lent GPU machine (one H100 or H200; torch + transformers, no Ray, no SGLang, no network),
from the repo root:

    python benchmarks/gpu_bench.py --out $OUT/gpu_bench.json

Smoke test anywhere (tiny shapes, same code path, a few seconds): `python benchmarks/gpu_bench.py --smoke`.

1. target: a Llama-3.1-8B-shaped model with random bf16 weights built on the GPU (no download,
   no disk), wrapped in `HFEngine`; `forward(PackedBatch, return_logits=False)` on packed batches
   of 16k-36k tokens (uniform and ragged lengths). Baselines, timed in the same rounds: the plain
   decoder forward (`output_hidden_states=True`) on the same padded rectangle, inputs already on
   the GPU, no host copies; for ragged batches also each sequence alone (no padding, causal SDPA).
   Reports tokens/s, MFU (useful FLOPs, `prefill_flops`) and the SDPA kernel each forward used.
2. draft: an `Eagle3Draft` shaped for the 8B target (draft vocab 32000) trained as the trainer
   does (`TTTObjective`, 7 TTT steps, bf16 autocast, AdamW, grad clip) on random supervision
   already on the GPU: uniform batches, and the job's ragged ShareGPT batches (lengths and loss
   masks of `ttt_bench.py`'s batches, read from `results/ttt_bench_sharegpt.json`: no data
   packages here; random ids, which change no cost). Reports ms/step, tokens/s, MFU
   (`draft_train_flops`) and MFU against the algorithm's minimum (`ttt_bench.min_ttt_flops`, the
   formula `ttt_bench.py` divides its CPU FLOP counts by).

Time budget: < 6 min on an H100. Expected: imports and CUDA start ~20 s, 8B init a few s, target
cases ~60 s, draft cases ~60 s (the ShareGPT ones compile flex attention for their layouts). Each
phase has a deadline (target: 45% of `--budget-s`, default 330 s; draft: the rest); repeats stop
early when the next round would pass it, and cases that no longer fit are skipped (recorded as such).
Results are written after every case, and a watchdog writes them and exits at `--budget-s` + 25 s
whatever is running.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts imports too

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Ray-free imports only: this runs where `import ray` fails
from eagle_ray.contract import PackedBatch, Supervision, default_aux_layer_ids  # noqa: E402
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig  # noqa: E402
from eagle_ray.draft.ttt import TTTObjective  # noqa: E402
from eagle_ray.engines.hf import HFEngine  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from ttt_bench import LAYOUTS, min_ttt_flops, read_layouts  # noqa: E402

# Dense bf16 peak (no sparsity), TFLOP/s; the first name contained in the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4), ("H200", 989.4))

LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = {
    **LLAMA_8B,
    **dict(hidden_size=64, num_hidden_layers=8, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    **dict(vocab_size=512, max_position_embeddings=1024),
}


def ragged(n: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


FULL = {
    "target_config": LLAMA_8B,
    "target_batches": {"16x1024": [1024] * 16, "8x4096": [4096] * 8, "ragged16_512-4096": ragged(16, 512, 4096, 0)},
    "engine_max_batch_tokens": 16 * 4096,  # every batch above is one engine run (padded rows x longest)
    "draft_vocab_size": 32000,
    "draft_batches": {"8x1024": [1024] * 8, "4x4096": [4096] * 4},
    "draft_sharegpt": True,  # ttt_bench.py's ShareGPT batches (max_length 2048 / 4096 / 8192), from LAYOUTS
    "sharegpt_clip": None,  # smoke: at most (sequences, tokens per sequence) of the first batch
    "ttt_steps": 7,
    "warmup": 1,
    "repeats": 5,
    "budget_s": 330.0,
    "min_case_s": 15.0,  # a case is skipped when less than this is left of its phase
}
SMOKE = dict(
    FULL,
    target_config=TINY,
    target_batches={"ragged4": [16, 48, 24, 40]},  # ragged: every timed path runs
    engine_max_batch_tokens=4 * 48,
    draft_vocab_size=128,
    draft_batches={"3x32": [32] * 3},
    sharegpt_clip=(3, 40),  # the first ShareGPT batch's first 3 sequences, each cut to its last 40 tokens
    repeats=2,
    budget_s=120.0,
    min_case_s=0.0,
)


# ---------------------------------------------------------------------------------------------
# FLOPs


def prefill_flops(params: int, num_layers: int, attn_width: int, seqlens: list[int]) -> float:
    """Useful FLOPs of one causal prefill of `seqlens` (padding and masked-out work not counted).

    Weights: 2 * params per token (one multiply-add per weight), `params` = the non-embedding
    parameters that run per token (decoder layers and final norm; no embedding lookup, no lm_head).
    Attention, per layer and sequence of T tokens: QK^T and AV each 2 * T^2 * attn_width for the
    full square, half of that causal, so 2 * T^2 * attn_width together; attn_width = heads * head_dim
    (GQA shares K and V, not these products).
    """
    return 2.0 * params * sum(seqlens) + 2.0 * num_layers * attn_width * sum(t * t for t in seqlens)


def non_embedding_params(model: torch.nn.Module) -> int:
    """The decoder's parameters less its embedding: what `prefill_flops` counts (no lm_head)."""
    decoder = model.get_decoder()
    return sum(p.numel() for p in decoder.parameters()) - decoder.get_input_embeddings().weight.numel()


def draft_train_flops(c: Eagle3DraftConfig, seqlens: list[int], steps: int) -> float:
    """Useful FLOPs of one TTT training step on unshifted sequences `seqlens`, all tokens loss-masked.

    Per TTT step k over the N slots: the mid layer's matmuls (q/k/v read 2H; o; gate/up/down),
    `fc` (3H -> H) at step 0 only, and the draft lm_head (H -> D) on the M_k slots still holding a
    target (M_k = sum max(T - 1 - k, 0): shifting drops one slot per sequence per step). Attention:
    step 0 is causal within each sequence (2 * T^2 * attn_width, as `prefill_flops`); step k adds k
    own-slot keys per query (4 * k * N * attn_width). Training = 3x forward (backward = 2x). The
    teacher (no grad) runs the target lm_head (H -> V) once over M_0 slots. Elementwise work (norms,
    rope, softmax) is not counted; the padded [B, S, S * (k + 1)] attention actually executed is
    reported separately (`draft_attention_executed_flops`).
    """
    h, attn, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mid = 2 * h * (attn + 2 * kv) + attn * h + 3 * h * c.intermediate_size
    n, sq = sum(seqlens), sum(t * t for t in seqlens)
    fwd = 2.0 * n * c.aux_width * h
    for k in range(steps):
        m = sum(max(t - 1 - k, 0) for t in seqlens)
        fwd += 2.0 * n * mid + 2.0 * m * h * c.draft_vocab_size + 2.0 * attn * (sq + 2 * k * n)
    teacher = 2.0 * sum(max(t - 1, 0) for t in seqlens) * h * c.vocab_size
    return 3.0 * fwd + teacher


def draft_attention_executed_flops(c: Eagle3DraftConfig, seqlens: list[int], steps: int) -> float:
    """Attention FLOPs as `Attention.forward` runs them: dense over the padded [B, S] layout, step k
    against S * (k + 1) keys (masked, not skipped); x3 for training."""
    b, s, attn = len(seqlens), max(seqlens), c.num_attention_heads * c.head_dim
    return 3.0 * sum(4.0 * b * s * s * (k + 1) * attn for k in range(steps))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown device"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"table: {key}"
    return None, f"no peak known for {name!r}; pass --peak-tflops"


# ---------------------------------------------------------------------------------------------
# Timing, progress, results


class Bench:
    """Clock, deadlines, progress lines and the results record (saved after every case)."""

    def __init__(self, out: Path, device: torch.device, settings: dict[str, Any]):
        self.out, self.device, self.settings = out, device, settings
        self.results: dict[str, Any] = {"settings": settings, "errors": []}
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - T0

    def log(self, msg: str) -> None:
        print(f"[{self.now():6.1f}s] {msg}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        with self._lock:
            self.results["elapsed_s"] = self.now()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=str))
            tmp.replace(self.out)

    def rounds(self, fns: dict[str, Callable[[], Any]], deadline: float) -> dict[str, dict[str, Any]]:
        """Time each fn: `warmup` untimed calls each, then rounds calling every fn once (so ratios
        compare the same moments), up to `repeats` rounds; at least one, no new one past `deadline`."""
        warm = {}
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(self.settings["warmup"]):
                fn()
            self.sync()
            warm[name] = time.perf_counter() - t
        times: dict[str, list[float]] = {name: [] for name in fns}
        last = sum(warm.values()) / max(self.settings["warmup"], 1)
        for r in range(self.settings["repeats"]):
            if r and self.now() + last > deadline:
                break
            start = time.perf_counter()
            for name, fn in fns.items():
                self.sync()
                t = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - t)
            last = time.perf_counter() - start
        return {
            name: {
                "warmup_s": warm[name],
                "times_s": ts,
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "repeats": len(ts),
                "cut_short": len(ts) < self.settings["repeats"],
            }
            for name, ts in times.items()
        }

    def case(self, phase: str, name: str, deadline: float, run: Callable[[], dict[str, Any]]) -> None:
        """Run one case unless its phase is out of time; record its result or its error, then save."""
        cases = self.results[phase].setdefault("cases", [])
        if self.now() > deadline - self.settings["min_case_s"]:
            self.log(f"{phase} {name}: skipped, {deadline - self.now():.0f}s left of the phase")
            cases.append({"name": name, "skipped": "out of time"})
            return self.save()
        self.log(f"{phase} {name} ...")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            row = {"name": name, **run()}
            if self.device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        except Exception as e:  # an OOM or a kernel refusing a shape must not lose the other cases
            row = {"name": name, "error": f"{type(e).__name__}: {e}"[:2000]}
            self.results["errors"].append(f"{phase} {name}: {row['error'][:300]}")
        cases.append(row)
        self.log(f"{phase} {name}: " + summary(row))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()


def summary(row: dict[str, Any]) -> str:
    if "error" in row or "skipped" in row:
        return row.get("error") or row["skipped"]
    key = "engine" if "engine" in row else "step"
    t = row[key]
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
    return f"{key} {t['median_s'] * 1e3:.1f} ms (min {t['min_s'] * 1e3:.1f}, max {t['max_s'] * 1e3:.1f}){mfu}"


def attention_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """Which SDPA backend ran: the aten attention ops of one call, counted (CPU-side profile)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    keys = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention")
    return {e.key: e.count for e in prof.key_averages() if any(k in e.key for k in keys)}


def random_batch(
    seqlens: list[int], vocab: int, seed: int, loss_masks: list[torch.Tensor] | None = None
) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    return PackedBatch.from_sequences([torch.randint(0, vocab, (t,), generator=g) for t in seqlens], loss_masks)


def draft_cases(s: dict[str, Any]) -> list[tuple[str, list[int], list[torch.Tensor] | None]]:
    """(name, lengths, loss masks or None: every slot) of each draft case: the uniform batches, then the
    ShareGPT batches `ttt_bench.py` wrote (lengths and loss masks; cut to `sharegpt_clip` in the smoke run)."""
    cases: list[tuple[str, list[int], list[torch.Tensor] | None]] = [
        (name, seqlens, None) for name, seqlens in s["draft_batches"].items()
    ]
    if not s["draft_sharegpt"]:
        return cases
    seqs, width = s["sharegpt_clip"] or (None, None)
    for b in read_layouts(LAYOUTS)[: 1 if seqs else None]:
        masks = list(b["loss_mask"].split(b["seqlens"]))[:seqs]
        masks = [m[-width:] for m in masks] if width else masks  # a conversation's end: its last reply, in the loss
        cases.append((b["name"].replace(" ", "-"), [m.numel() for m in masks], masks))
    return cases


# ---------------------------------------------------------------------------------------------
# 1. Target: HF engine prefill vs the plain transformers forward


def bench_target(bench: Bench, deadline: float, peak: float | None) -> None:
    s, device = bench.settings, bench.device
    cfg = LlamaConfig(**s["target_config"])
    res = bench.results["target"] = {"config": s["target_config"]}
    bench.log(f"target: building {cfg.num_hidden_layers}-layer, hidden {cfg.hidden_size} model in bf16 on {device}")
    t = time.perf_counter()
    with torch.device(device):  # weights are created (and randomly initialized) on the device: no CPU copy
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    bench.sync()
    res["init_s"] = time.perf_counter() - t
    engine = HFEngine(model, device=str(device), max_batch_tokens=s["engine_max_batch_tokens"])
    decoder = model.get_decoder()
    params = non_embedding_params(model)
    attn_width = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    res.update(
        non_embedding_params=params,
        total_params=sum(p.numel() for p in model.parameters()),
        attn_implementation=model.config._attn_implementation,
        aux_layer_ids=list(engine.info.aux_layer_ids),
        engine_max_batch_tokens=engine.max_batch_tokens,
    )
    bench.log(f"target: built in {res['init_s']:.1f}s, {params / 1e9:.2f}B non-embedding params")
    bench.save()
    hidden_ids = [i + 1 for i in engine.info.aux_layer_ids]  # hidden_states[0] is the embedding output

    for name, seqlens in s["target_batches"].items():

        def run(seqlens: list[int] = seqlens) -> dict[str, Any]:
            batch = random_batch(seqlens, cfg.vocab_size, seed=len(seqlens))
            # the same padded rectangle the engine builds internally, already on the device
            lens = batch.cu_seqlens.diff()
            rows = torch.arange(int(lens.max())) < lens[:, None]
            ids = torch.zeros(rows.shape, dtype=torch.long)
            ids[rows] = batch.input_ids
            ids, mask = ids.to(device), rows.long().to(device)
            singles = [batch.input_ids[batch.sequence(i)].to(device)[None] for i in range(batch.num_sequences)]

            @torch.no_grad()
            def plain() -> Any:
                # the engine's hooks also fire here; they only keep a reference
                out = decoder(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                return [out.hidden_states[i] for i in hidden_ids], out.last_hidden_state

            @torch.no_grad()
            def per_sequence() -> None:
                for one in singles:  # no mask: SDPA's is_causal path, no padding
                    decoder(input_ids=one, use_cache=False)

            fns = {"engine": lambda: engine.forward(batch, return_logits=False), "plain": plain}
            padded = rows.numel()
            if padded > batch.num_tokens:
                fns["plain_per_sequence"] = per_sequence
            timings = bench.rounds(fns, deadline)
            flops = prefill_flops(params, cfg.num_hidden_layers, attn_width, seqlens)
            row: dict[str, Any] = {
                "seqlens": seqlens,
                "tokens": batch.num_tokens,
                "padded_tokens": padded,
                "padding_fraction": 1 - batch.num_tokens / padded,
                "flops": flops,
                "d2h_bytes": batch.num_tokens * engine.info.bytes_per_token,
                **timings,
            }
            for key, t in timings.items():
                row[f"{key}_tokens_per_s"] = batch.num_tokens / t["median_s"]
                row[f"{key}_mfu"] = flops / t["median_s"] / (peak * 1e12) if peak else None
            row["mfu"] = row["engine_mfu"]
            row["engine_over_plain"] = timings["engine"]["median_s"] / timings["plain"]["median_s"]
            row["attention_ops_engine"] = attention_ops(fns["engine"])
            return row

        bench.case("target", name, deadline, run)
    engine.close()


# ---------------------------------------------------------------------------------------------
# 2. Draft: one TTT training step, as the trainer runs it


def bench_draft(bench: Bench, deadline: float, peak: float | None) -> None:
    s, device = bench.settings, bench.device
    tc = s["target_config"]
    h, vocab = tc["hidden_size"], tc["vocab_size"]
    cfg = Eagle3DraftConfig.from_target(
        LlamaConfig(**tc), s["draft_vocab_size"], default_aux_layer_ids(tc["num_hidden_layers"])
    )
    res = bench.results["draft"] = {"config": cfg.as_dict(), "ttt_steps": s["ttt_steps"]}
    bench.log(f"draft: building (hidden {cfg.hidden_size}, draft vocab {cfg.draft_vocab_size}) on {device}")
    t = time.perf_counter()
    g = torch.Generator(device).manual_seed(0)
    # random stand-ins for the target's embeddings and lm_head (bf16, as the pool ships them)
    embeddings = torch.randn(vocab, h, generator=g, device=device, dtype=torch.bfloat16) * 0.02
    lm_head = torch.randn(vocab, h, generator=g, device=device, dtype=torch.bfloat16) * 0.02
    draft_ids = torch.randperm(vocab, generator=g, device=device)[: cfg.draft_vocab_size].sort().values
    with torch.device(device):
        draft = Eagle3Draft.from_target(cfg, embeddings, lm_head, draft_ids)  # fp32 master weights
    del embeddings
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)  # the trainer's defaults
    objective = TTTObjective(draft, s["ttt_steps"])
    cuda = device.type == "cuda"
    bench.sync()
    res.update(init_s=time.perf_counter() - t, trainable_params=sum(p.numel() for p in params))
    res["param_dtype"] = str(draft.fc.weight.dtype)  # fp32 master weights, as the trainer keeps them
    bench.log(f"draft: built in {res['init_s']:.1f}s, {res['trainable_params'] / 1e6:.0f}M trainable params")

    for name, seqlens, masks in draft_cases(s):

        def run(seqlens: list[int] = seqlens, masks: list[torch.Tensor] | None = masks) -> dict[str, Any]:
            n = sum(seqlens)
            batch = random_batch(seqlens, vocab, seed=n, loss_masks=masks)
            cu = batch.cu_seqlens.to(device)
            aux = torch.randn(n, cfg.aux_width, generator=g, device=device, dtype=torch.bfloat16)
            last = torch.randn(n, h, generator=g, device=device, dtype=torch.bfloat16)
            sup = Supervision(batch.input_ids.to(device), batch.loss_mask.to(device), cu, aux, last)
            losses = []

            def step() -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # as train/loop.py
                    loss, _ = objective(sup, lm_head)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
                losses.append(loss.detach())

            timings = bench.rounds({"step": step}, deadline)
            flops = draft_train_flops(cfg, seqlens, s["ttt_steps"])
            minimum = min_ttt_flops(cfg, seqlens, s["ttt_steps"])
            median = timings["step"]["median_s"]
            return {
                "seqlens": seqlens,
                "tokens": n,
                "loss_tokens": int(batch.loss_mask.sum()),
                "padded_over_real": len(seqlens) * max(seqlens) / n,
                "flops": flops,
                "min_flops": minimum,
                "mfu_min": minimum / median / (peak * 1e12) if peak else None,
                "attention_flops_executed": draft_attention_executed_flops(cfg, seqlens, s["ttt_steps"]),
                **timings,
                "ms_per_step": median * 1e3,
                "tokens_per_s": n / median,
                "mfu": flops / median / (peak * 1e12) if peak else None,
                "loss_first_last": [float(losses[0]), float(losses[-1])],
                "attention_ops_step": attention_ops(step),
            }

        bench.case("draft", name, deadline, run)


# ---------------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]], failed: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n== {title} ==")
    for r in [header, *rows]:
        print(r[0].ljust(widths[0]) + "".join(x.rjust(w + 2) for x, w in zip(r[1:], widths[1:], strict=True)))
    for line in failed:
        print(line)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(results: dict[str, Any]) -> None:
    ms = lambda t, key="median_s": num(t[key] * 1e3) if t else "-"  # noqa: E731
    cases = results.get("target", {}).get("cases", [])
    table(
        "target: HFEngine.forward vs the plain decoder forward on the same padded batch (median of rounds)",
        ["batch", "tokens", "pad", "engine ms", "tok/s", "MFU", "plain ms", "MFU", "eng/plain", "per-seq ms"],
        [
            [
                r["name"],
                str(r["tokens"]),
                pct(r["padding_fraction"]),
                ms(r["engine"]),
                num(r["engine_tokens_per_s"], 0),
                pct(r["engine_mfu"]),
                ms(r["plain"]),
                pct(r["plain_mfu"]),
                num(r["engine_over_plain"], 2),
                ms(r.get("plain_per_sequence")),
            ]
            for r in cases
            if "engine" in r
        ],  # fmt: skip
        [f"{r['name']}: {summary(r)}" for r in cases if "engine" not in r],
    )
    cases = results.get("draft", {}).get("cases", [])
    table(
        f"draft: one TTT training step ({results['settings']['ttt_steps']} TTT steps, AdamW, bf16 autocast on CUDA)",
        ["batch", "tokens", "pad/real", "ms/step", "min ms", "max ms", "tok/s", "MFU", "MFU(min)", "peak GiB"],
        [
            [
                r["name"],
                str(r["tokens"]),
                num(r.get("padded_over_real"), 2),
                ms(r["step"]),
                ms(r["step"], "min_s"),
                ms(r["step"], "max_s"),
                num(r["tokens_per_s"], 0),
                pct(r["mfu"]),
                pct(r.get("mfu_min")),
                num(r.get("peak_memory_gib")),
            ]
            for r in cases
            if "step" in r
        ],  # fmt: skip
        [f"{r['name']}: {summary(r)}" for r in cases if "step" not in r],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_bench.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds, any device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the device name)")
    p.add_argument("--budget-s", type=float, default=None, help="whole-run budget, imports included")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip", choices=["target", "draft"], action="append", default=[])
    a = p.parse_args()

    settings = dict(SMOKE if a.smoke else FULL, smoke=a.smoke, skip=a.skip)
    settings.update({k: v for k, v in (("budget_s", a.budget_s), ("repeats", a.repeats)) if v is not None})
    device = torch.device(a.device)
    if a.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: a second thread only fights other work for the cores
    bench = Bench(a.out, device, settings)
    peak, peak_source = peak_tflops(device, a.peak_tflops)
    bench.results["env"] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "sdpa_backends_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
    }
    budget = settings["budget_s"]

    def watchdog() -> None:  # a hung or very slow call must not cost the results so far
        print(f"watchdog: over budget at {bench.now():.0f}s, results so far in {bench.out}", flush=True)
        try:
            bench.results["errors"].append(f"watchdog: killed at {bench.now():.0f}s (budget {budget:.0f}s)")
            bench.save()
        finally:
            os._exit(3)

    timer = threading.Timer(max(budget + 25 - bench.now(), 1.0), watchdog)
    timer.daemon = True
    timer.start()
    bench.log(f"{bench.results['env']['device_name']} | peak {peak} TFLOP/s ({peak_source}) | budget {budget:.0f}s")
    bench.save()
    for phase, fn, deadline in (("target", bench_target, 0.45 * budget), ("draft", bench_draft, budget)):
        if phase in a.skip:
            continue
        try:
            fn(bench, deadline, peak)
        except Exception as e:  # e.g. the 8B build running out of memory: the other phase still runs
            bench.results["errors"].append(f"{phase}: {type(e).__name__}: {e}"[:2000])
            bench.log(f"{phase} failed: {type(e).__name__}: {e}")
        gc.collect()  # the phase's model is unreachable now; free its memory before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bench.save()
    timer.cancel()
    bench.save()
    print_table(bench.results)
    print(f"\n{len(bench.results['errors'])} errors; results in {bench.out} ({bench.now():.0f}s)")


if __name__ == "__main__":
    main()
