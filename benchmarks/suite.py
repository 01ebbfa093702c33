"""The benchmark suite: one command, one table, every figure a ratio against a baseline from the same run.

    .venv/bin/python benchmarks/suite.py            # ~6-9 min on 2 CPU cores; table, JSON and PNG
    .venv/bin/python benchmarks/suite.py --quick    # one repeat, fewer sizes: a smoke run

1. transport      consumer actor `ray.get` + copy vs memcpy, 1-256 MB          (pool_bench.py)
2. pool overhead  1-replica pool vs the engine called directly, HF and SGLang  (pool_bench.py)
3. scaling        2 replicas vs 1, one thread each                            (pool_bench.py)
4. bytes/token    supervision vs full logits for real shapes; measured tiny    (bytes_per_token.py)
5. balance        draft-step time spent waiting, supply faster / slower        (pipeline_bench.py)
6. GPU            `benchmarks/gpu_bench.py` on a lent H100/H200 (no Ray there); its JSON, when present in
                  benchmarks/results/, joins the table.
Writes benchmarks/results/suite.json and suite.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
# ray, torch, eagle_ray and the part benchmarks are imported in `main`: `benchmarks/render.py` imports this module

RESULTS = ROOT / "benchmarks" / "results"


def _verdict(r: dict) -> str:
    if "meets_goal" not in r:
        return ""
    op = "<=" if r.get("goal_is") == "at most" else ">="
    return f"{op} {r['goal']:g}: {'met' if r['meets_goal'] else 'MISSED'}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'benchmark':<70} {'ratio':>8} {'spread':>15}  goal")
    for r in rows:
        spread = f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if r["repeats"] > 1 else ""
        print(f"{r['name']:<70} {r['ratio_median']:>8.3f} {spread:>15}  {_verdict(r)}")


_ROW_KEYS = {"name", "ratio_median", "ratio_min", "ratio_max", "repeats", "goal", "goal_is", "meets_goal"}


def _num(v: float) -> str:
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def _ratio(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 0.05 else f"{v:.2f}"


def render(doc: dict) -> str:
    """docs/benchmarks.md's table of a suite run (`suite.json`): each row's ratio, spread, goal and the figures
    behind it."""
    lines = ["| benchmark | ratio [spread] | goal | figures |", "|---|---|---|---|"]
    for r in doc["rows"]:
        ratio = _ratio(r["ratio_median"])
        if r["repeats"] > 1:
            ratio += f" [{_ratio(r['ratio_min'])}–{_ratio(r['ratio_max'])}]"
        goal = ""
        if "goal" in r:
            op = "≤" if r.get("goal_is") == "at most" else "≥"
            goal = f"{op} {r['goal']:g} " + ("met" if r["meets_goal"] else "**missed**")
        elif "supply / demand" in r:
            goal = f"(expected ≈ 1 − supply/demand = {1 - r['supply / demand']:.2f})"
        figures = "; ".join(f"{k} {_num(v)}" for k, v in r.items() if k not in _ROW_KEYS and v is not None)
        lines.append(f"| {r['name']} | {ratio} | {goal} | {figures} |")
    m = doc["meta"]
    return "\n".join(lines) + (
        f"\n\n({'`--quick` run, ' if m['quick'] else ''}{m['seconds']:.0f} s on {m['cpus']} CPU cores, torch "
        f"{m['torch']}; ratios are the median of the repeats, spread min–max; `benchmarks/results/suite.json`)"
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = [r for r in rows if "goal" in r]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(goals) + 1.5))
    for i, r in enumerate(goals):
        norm = r["goal"] / r["ratio_median"] if r.get("goal_is") == "at most" else r["ratio_median"] / r["goal"]
        color = "tab:green" if r["meets_goal"] else "tab:red"
        ax.barh(i, min(norm, 3.0), color=color)
        ax.text(min(norm, 3.0) + 0.02, i, f"{r['ratio_median']:.2f} (goal {r['goal']:g})", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(goals)), [r["name"][:60] for r in goals], fontsize=8)
    ax.set_xlabel("measured / goal (>= 1 meets it; capped at 3)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_rows(path: Path = RESULTS / "gpu_bench.json") -> list[dict]:
    """Table rows from a `gpu_bench.py` run made on a lent card (this machine has none)."""
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    card = d["env"]["device_name"]
    rows = []
    for c in d["target"]["cases"]:
        e = c["engine"]
        rows.append(
            {
                "name": f"GPU {card}: HF engine prefill MFU, {c['name']} ({c['tokens']} tokens)",
                "ratio_median": c["mfu"] if c["mfu"] is not None else float("nan"),
                "ratio_min": c["tokens"] / e["max_s"],
                "ratio_max": c["tokens"] / e["min_s"],
                "repeats": e["repeats"],
                "goal": 0.5,
                "goal_is": "at least",
                "meets_goal": bool(c["mfu"] is not None and c["mfu"] >= 0.5),
                "tokens/s": c["engine_tokens_per_s"],
                "engine / plain transformers": c["engine_over_plain"],
            }
        )
    for c in d["draft"]["cases"]:
        t = c["step"]
        rows.append(
            {
                "name": f"GPU {card}: draft train step, {c['name']} (ms/step)",
                "ratio_median": c["ms_per_step"],
                "ratio_min": 1e3 * t["min_s"],
                "ratio_max": 1e3 * t["max_s"],
                "repeats": t["repeats"],
                "tokens/s": c["tokens_per_s"],
                "mfu": c["mfu"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat, two sizes: a smoke run")
    p.add_argument("--engines", default="hf,sglang")
    p.add_argument("--parts", default="transport,engines,bytes,balance", help="which benchmarks to run")
    p.add_argument("--out", default=str(RESULTS / "suite.json"))
    args = p.parse_args(argv)
    import ray
    import torch
    from bytes_per_token import formula_rows, measured_row
    from pipeline_bench import pipeline_rows
    from pool_bench import engine_benchmarks, make_batches, transport

    from eagle_ray import PooledTargetModel, build_tiny_target
    from eagle_ray.ray_init import init_ray
    from eagle_ray.tiny import CACHE_DIR

    repeats = 1 if args.quick else 3
    sizes = [1, 16] if args.quick else [1, 4, 16, 64, 256]
    t0 = time.monotonic()
    init_ray(
        "local",
        num_cpus=4,  # logical: 1 + 2 replicas of one CPU each, or a replica and a draft worker
        object_store_memory=1536 * 2**20,  # room for a 256 MB object and its neighbours
        dashboard=False,
    )
    parts = set(args.parts.split(","))
    # wider than the test target so a forward is compute, not Python overhead, even on 2 CPUs
    shape = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    path = str(build_tiny_target(CACHE_DIR / "bench-llama-h256", "llama", **shape))
    batches = make_batches(8 if args.quick else 24, 8, 1024)
    rows: list[dict] = []
    try:
        if "transport" in parts:
            print("[suite] transport", flush=True)
            rows += transport(sizes, repeats)
        for engine in args.engines.split(",") if "engines" in parts else []:
            print(f"[suite] pool overhead and scaling: {engine}", flush=True)
            rows += engine_benchmarks(engine, path, batches, repeats)
        if "bytes" in parts:
            print("[suite] bytes per token", flush=True)
            rows += formula_rows()
            with PooledTargetModel.from_pretrained(
                path, engine="hf", replicas=1, dtype=torch.bfloat16, use_gpu=False, cpus_per_replica=1
            ) as pool:
                rows.append(measured_row(pool, batches[0]))
        if "balance" in parts:
            print("[suite] pipeline balance", flush=True)
            rows += pipeline_rows(steps=20 if args.quick else 40)
    finally:
        ray.shutdown()
    rows += gpu_rows()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seconds": time.monotonic() - t0, "quick": args.quick, "torch": torch.__version__, "cpus": 2}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"\n[suite] {meta['seconds']:.0f}s; wrote {out} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
