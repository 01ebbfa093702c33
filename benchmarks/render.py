"""Measured numbers live in `benchmarks/results/*.json`; the docs show them through this script, never retyped.

A doc holds a block per benchmark, between `<!-- render:NAME -->` and `<!-- /render:NAME -->`; this script
rewrites each block from NAME's results file with NAME's own `render(doc)` (from several results files,
`render(doc, doc2, ...)`; a third BLOCKS entry names a function other than `render`). `tests/test_rendered_docs.py`
fails when a block and its JSON disagree.

    .venv/bin/python benchmarks/render.py            # rewrite the blocks in README.md and docs/*.md
    .venv/bin/python benchmarks/render.py --check    # exit 1 if a block is stale
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# block name -> (the benchmark module that renders it, its results file or a tuple of them[, the render function])
BLOCKS = {
    "packing_fill": ("packing_fill", "packing_fill.json"),
    "ttt_bench": ("ttt_bench", "ttt_bench.json"),
    "job_trainer": ("job_trainer", "job_trainer.json"),
    "cluster_sim": ("cluster_sim", ("cluster_sim.json", "cluster_sim_direct.json")),
    "cluster_sim_one_plane": (
        "cluster_sim",
        ("cluster_sim_one_plane_before.json", "cluster_sim_one_plane_after.json"),
        "render_one_plane",
    ),
    "long_run": ("long_run", "long_run.json"),
    "suite": ("suite", "suite.json"),
    "driver_cpu": ("driver_cpu", "driver_cpu.json"),
    "epoch_cache": ("epoch_cache", "epoch_cache.json"),
    "fanout": ("fanout", "fanout.json"),
}
_BLOCK = re.compile(r"(<!-- render:(\w+) -->\n)(.*?)(<!-- /render:\2 -->)", re.S)


@functools.cache
def _module(module: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{module}", HERE / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def rendered(name: str) -> str:
    module, results, *fn = BLOCKS[name]
    mod = _module(module)
    files = (results,) if isinstance(results, str) else results
    docs = [json.loads((HERE / "results" / f).read_text()) for f in files]
    return getattr(mod, fn[0] if fn else "render")(*docs).rstrip("\n") + "\n"


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def update(text: str) -> str:
    def block(m: re.Match) -> str:
        if m.group(2) not in BLOCKS:
            raise KeyError(f"unknown rendered block {m.group(2)!r}; known: {sorted(BLOCKS)}")
        return m.group(1) + rendered(m.group(2)) + m.group(4)

    return _BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks")
    a = p.parse_args(argv)
    stale = []
    for path in docs():
        text = path.read_text()
        new = update(text)
        if new != text:
            stale.append(path)
            if not a.check:
                path.write_text(new)
    for path in stale:
        print(f"{'stale' if a.check else 'rewrote'}: {path.relative_to(ROOT)}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
