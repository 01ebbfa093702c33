"""Every measured table in README.md and docs/ is its results JSON as `benchmarks/render.py` renders it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render():
    spec = importlib.util.spec_from_file_location("_render", ROOT / "benchmarks" / "render.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_rendered_blocks_match_their_results():
    render = _render()
    seen = set()
    for path in render.docs():
        text = path.read_text()
        seen |= {m.group(2) for m in render._BLOCK.finditer(text)}
        assert render.update(text) == text, f"{path.name} is stale: run .venv/bin/python benchmarks/render.py"
    assert set(render.BLOCKS) <= seen, f"blocks in no doc: {sorted(set(render.BLOCKS) - seen)}"


def test_a_changed_number_is_caught():
    render = _render()
    text = next(t for t in (p.read_text() for p in render.docs()) if "<!-- render:packing_fill -->" in t)
    m = next(m for m in render._BLOCK.finditer(text) if m.group(2) == "packing_fill")
    tampered = text[: m.start(3)] + m.group(3).replace("0.9", "0.8", 1) + text[m.end(3) :]
    assert tampered != text and render.update(tampered) == text
