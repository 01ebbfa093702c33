"""Satisfies SGLang's `from vllm._custom_ops import rotary_embedding` on non-CUDA devices.

SGLang 0.5.23's rotary-embedding module (`srt/layers/rotary_embedding/base.py`) imports
that symbol when the device is neither CUDA nor HIP, but on the CPU path it never calls
it (SGLang's native rotary runs instead). Installing vLLM for one unused import would pull
in a second CUDA stack, so we register a stand-in module that raises if it is ever called.
A real vLLM, when installed, is left alone.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _rotary_embedding(*args, **kwargs):
    raise NotImplementedError(
        "eagle_ray's vllm._custom_ops stand-in was called: this SGLang device path needs a real vLLM"
    )


def install() -> None:
    if "vllm._custom_ops" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    pkg = types.ModuleType("vllm")
    pkg.__path__ = []  # a package, so `vllm._custom_ops` resolves
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = _rotary_embedding
    pkg._custom_ops = ops
    sys.modules.setdefault("vllm", pkg)
    sys.modules["vllm._custom_ops"] = ops
