"""Pipeline balance: the fraction of each draft step spent waiting for supervision, on the real path
(a shared pool -> the Ray Train worker's own client), with supply faster and slower than demand.

Supply is one HF replica (one thread) of a tiny Llama; demand is one draft worker (one thread). The
target's depth sets the balance: 8 layers make supervision cheap next to a draft step (7 TTT steps),
384 layers make it dearer. Supply and demand rates are measured alone in the same run, so the table
says which side was faster.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from eagle_ray import DraftTrainConfig, PooledTargetModel, build_tiny_target, serve_pool, train_draft
from eagle_ray.tiny import CACHE_DIR, markov_batches

WARMUP_STEPS = 5  # the first steps pay for imports and the first shards; not the steady state


def _supply_tokens_per_s(pool: PooledTargetModel, batches) -> float:
    t0 = time.perf_counter()
    tokens = sum(r.num_tokens for r in pool.stream(batches))
    return tokens / (time.perf_counter() - t0)


def _run(layers: int, steps: int, root: Path, cache: Path) -> dict:
    path = str(build_tiny_target(cache / f"pipeline-llama-l{layers}", "llama", num_hidden_layers=layers))
    batches = markov_batches(16)
    with serve_pool(f"balance-l{layers}", path, engine="hf", replicas=1, cpus_per_replica=1, use_gpu=False) as pool:
        _supply_tokens_per_s(pool, batches[:2])  # warm-up
        supply = _supply_tokens_per_s(pool, batches)
        result = train_draft(
            pool,
            batches,
            DraftTrainConfig(max_steps=steps, lr=1e-3, checkpoint_every=steps, log_every=steps),
            storage_path=root,
            name=f"balance-l{layers}",
            num_workers=1,
            backend="gloo",
            resources_per_worker={"CPU": 1},
        )
    rows = [r for r in result.history if r["step"] > WARMUP_STEPS]
    windows = [rows[i : i + 5] for i in range(0, len(rows) - 4, 5)]  # spread over 5-step windows
    frac = [sum(r["wait_s"] for r in w) / sum(r["step_s"] for r in w) for w in windows]
    busy = sum(r["step_s"] - r["wait_s"] for r in rows)
    demand = sum(b.num_tokens for b in batches) / len(batches) * len(rows) / busy  # tokens/s if never waiting
    return {
        "wait_fraction": sum(r["wait_s"] for r in rows) / sum(r["step_s"] for r in rows),
        "window_min": min(frac),
        "window_max": max(frac),
        "windows": len(frac),
        "supply tokens/s": supply,
        "demand tokens/s": demand,
        "supply / demand": supply / demand,
    }


def pipeline_rows(steps: int = 40) -> list[dict]:
    torch.set_num_threads(1)
    cache = CACHE_DIR
    out = []
    with tempfile.TemporaryDirectory(prefix="eagle_ray_balance_") as tmp:
        for layers, label in ((8, "supply faster"), (384, "supply slower")):
            m = _run(layers, steps, Path(tmp), cache)
            # the goal is for supply >= demand; with supply slower, waiting is expected (about 1 - supply/demand)
            goal = {"goal": 0.05, "goal_is": "at most"} if label == "supply faster" else {}
            out.append(
                {
                    "name": f"pipeline wait / step time, {label} (target {layers} layers)",
                    "ratio_median": m["wait_fraction"],
                    "ratio_min": m["window_min"],
                    "ratio_max": m["window_max"],
                    "repeats": m["windows"],
                    **goal,
                    **({"meets_goal": m["wait_fraction"] <= goal["goal"]} if goal else {}),
                    **{k: v for k, v in m.items() if k.endswith("tokens/s") or k == "supply / demand"},
                }
            )

    return out
