"""benchmarks/gpu_bench.py: its FLOP counts by hand, and its smoke run where Ray and SGLang cannot be imported
(the lent GPU machine has neither)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from eagle_ray.draft.model import Eagle3DraftConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"

_spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


def test_prefill_flops_by_hand():
    # 10 weights, 2 layers, attention width 4, sequences of 3 and 5 tokens
    weights = 2 * 10 * (3 + 5)  # one multiply-add per weight per token
    attention = 2 * 2 * 4 * (3**2 + 5**2)  # per layer: QK^T + AV, each T^2 * width causal
    assert gpu_bench.prefill_flops(10, 2, 4, [3, 5]) == weights + attention == 704


def test_llama_8b_params_and_mfu():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = AutoModelForCausalLM.from_config(LlamaConfig(**gpu_bench.LLAMA_8B), dtype=torch.bfloat16)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # q o, k v, mlp, 2 norms
    assert gpu_bench.non_embedding_params(model) == 32 * per_layer + 4096 == 6_979_588_096
    # one 4096-token sequence in one second on an H100 SXM
    flops = gpu_bench.prefill_flops(6_979_588_096, 32, 4096, [4096])
    assert flops == 2 * 6_979_588_096 * 4096 + 2 * 32 * 4096**3
    assert abs(flops / 989.4e12 - 0.06223) < 1e-5  # 6.16e13 FLOPs: 6.2% MFU


# a draft small enough to count its FLOPs by hand
HAND_CONFIG = Eagle3DraftConfig(
    hidden_size=4,
    intermediate_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=2,
    vocab_size=10,
    draft_vocab_size=6,
    aux_layer_ids=[0, 1, 2],
)


def test_draft_train_flops_by_hand():
    c = HAND_CONFIG
    mid = 2 * 4 * (4 + 2 * 2) + 4 * 4 + 3 * 4 * 8  # q k v read 2H; o; gate up down
    fc = 2 * 3 * 12 * 4  # step 0 only, 3 slots
    step0 = 2 * 3 * mid + 2 * 2 * 4 * 6 + 2 * 4 * 9  # 2 slots with a target; causal over 3 tokens
    step1 = 2 * 3 * mid + 2 * 1 * 4 * 6 + 2 * 4 * (9 + 2 * 1 * 3)  # 1 slot left; one own-slot key each
    teacher = 2 * 2 * 4 * 10
    assert gpu_bench.draft_train_flops(c, [3], steps=2) == 3 * (fc + step0 + step1) + teacher


def test_min_ttt_flops_by_hand():
    c = HAND_CONFIG
    per_slot = 2 * 4 * (4 + 2 * 2) + 4 * 4 + 3 * 4 * 8 + 4 * 6  # q k v read 2H; o; gate up down; lm_head, every slot
    fc = 3 * 12 * 4  # step 0 only
    pairs = 3 * 4 // 2  # causal over 3 tokens, the diagonal included
    step0 = 3 * per_slot + 2 * 4 * pairs  # QK^T and PV: attention width 4 per (query, key) pair
    step1 = 3 * per_slot + 2 * 4 * (pairs + 3)  # one own-slot key per query from step 1
    # MACs x 2 FLOPs x 3 (forward + backward); gpu_bench uses ttt_bench's function, not a copy
    assert gpu_bench.min_ttt_flops(c, [3], steps=2) == 6 * (fc + step0 + step1) == 8784


def test_sharegpt_layouts_round_trip(tmp_path):
    ttt_bench = sys.modules["ttt_bench"]  # imported by gpu_bench
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(n, generator=g) < 0.6).long() for n in (5, 1, 9)]
    lay = {"name": "x", "max_length": 9, "batch_tokens": 16, "batch_index": 0, "seqlens": [5, 1, 9]}
    ttt_bench.write_layouts([{**lay, "loss_mask": torch.cat(masks)}], tmp_path / "l.json")
    [back] = ttt_bench.read_layouts(tmp_path / "l.json")
    assert back["seqlens"] == [5, 1, 9] and torch.equal(back["loss_mask"], torch.cat(masks))
    # the committed layouts gpu_bench's ShareGPT cases read: the three batches ttt_bench.py measures
    shipped = ttt_bench.read_layouts(ttt_bench.LAYOUTS)
    assert [(b["max_length"], b["batch_tokens"]) for b in shipped] == list(ttt_bench.SHAREGPT)
    assert all(max(b["seqlens"]) <= b["max_length"] and sum(b["seqlens"]) <= b["batch_tokens"] for b in shipped)


def test_peak_from_device_name(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4}
    for name, want in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, name=name: name)
        assert gpu_bench.peak_tflops(torch.device("cuda"), None)[0] == want
    assert gpu_bench.peak_tflops(torch.device("cpu"), 123.0) == (123.0, "--peak-tflops")


def test_smoke_run_without_ray(tmp_path):
    out = tmp_path / "smoke.json"
    argv = [str(SCRIPT), "--smoke", "--device", "cpu", "--peak-tflops", "1", "--out", str(out)]
    code = (
        "import runpy, sys; sys.modules['ray'] = None; sys.modules['sglang'] = None; "
        f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== draft: one TTT training step" in proc.stdout

    r = json.loads(out.read_text())
    assert r["errors"] == []
    assert r["env"]["torch"] == torch.__version__ and r["env"]["transformers"] and r["env"]["peak_bf16_tflops"] == 1
    assert r["settings"]["smoke"] and r["settings"]["ttt_steps"] == 7
    assert r["target"]["non_embedding_params"] > 0 and r["target"]["init_s"] > 0
    [case] = r["target"]["cases"]  # the smoke batch is ragged: the per-sequence reference runs too
    assert case["tokens"] == 128 and case["padded_tokens"] == 192
    for key in ("engine", "plain", "plain_per_sequence"):
        t = case[key]
        assert len(t["times_s"]) == t["repeats"] >= 1 and min(t["times_s"]) > 0
        assert t["min_s"] <= t["median_s"] <= t["max_s"]
        assert case[f"{key}_tokens_per_s"] > 0 and case[f"{key}_mfu"] > 0
    assert case["flops"] > 0 and case["engine_over_plain"] > 0
    assert any("scaled_dot_product" in op for op in case["attention_ops_engine"])
    step, ragged = r["draft"]["cases"]  # the uniform batch, then the first ShareGPT batch cut small
    for c in (step, ragged):
        assert c["ms_per_step"] > 0 and c["tokens_per_s"] > 0 and c["mfu"] > 0 and c["flops"] > 0
        assert c["mfu_min"] > 0 and c["min_flops"] > 0
        assert len(c["step"]["times_s"]) >= 1 and all(x == x for x in c["loss_first_last"])  # finite, not NaN
    assert ragged["name"].startswith("sharegpt-2048") and len(ragged["seqlens"]) == 3
    assert max(ragged["seqlens"]) <= 40 and 0 < ragged["loss_tokens"] <= ragged["tokens"]

    # the benchmark suite turns a GPU run's JSON into table rows (MFU against the 50% goal)
    spec = importlib.util.spec_from_file_location("suite", ROOT / "benchmarks" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    rows = suite.gpu_rows(out)
    names = [row["name"].split(": ")[1].split(",")[0] for row in rows]
    assert names == ["HF engine prefill MFU", "draft train step", "draft train step"]
    assert rows[0]["ratio_median"] == case["mfu"] and rows[0]["goal"] == 0.5
    assert rows[0]["meets_goal"] == (case["mfu"] >= 0.5) and rows[1]["ratio_median"] == step["ms_per_step"]
