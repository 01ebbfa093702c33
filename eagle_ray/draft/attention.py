"""TTT attention on packed tokens: no padding, no dense mask, memory linear in tokens.

At TTT step k the query at slot t attends to step 0's keys at slots <= t of its own document
(block 1, a varlen causal attention) and to its own slot's keys from steps 1..k (the diagonals,
one dot product each). Work per step: the causal block plus k·N, not (k+1)·S² as a dense mask.

Block 1 and the diagonals are merged by log-sum-exp, as NeMo AutoModel's flash path and SpecForge's
FlashAttention path merge them, in one autograd function whose backward is FlashAttention-2's
(`dS = P ∘ (dP − rowsum(dO ∘ O))`) run with the MERGED output and log-sum-exp: block 1's kernel then
yields its exact share of the gradient through the merge, and nothing quadratic is saved.

Backends (`attention=`), differing only in block 1's kernel:
- `sdpa` (CPU): PyTorch's fused flash-attention CPU kernels (forward returns the log-sum-exp, backward
  takes the merged one), one call per document, GQA native.
- `torch` (any device, the portable reference): block 1 by document and query chunk in plain matmuls,
  each chunk against only the keys it can see; GQA groups queries, never copies keys.
- `flex`: PyTorch's flex attention over every step's keys laid end to end under one block-sparse mask
  (SpecForge's default; no merge needed). Compiled on CUDA. PyTorch has no flex backward on the CPU:
  there it runs eager and forward-only (the tests compare it to the others without gradients).
`auto` picks `flex` on CUDA, `sdpa` on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "torch", "flex")  # = train.config.ATTENTION_BACKENDS (tested)
# scores of one query chunk: at most this many floats (heads x queries x keys), about 64 MB
_CHUNK_SCORES = 1 << 24


@dataclass
class PackedLayout:
    """Where each packed slot sits: its document's span, its position in it. Built once per batch."""

    cu_seqlens: torch.Tensor  # [B+1] on the compute device
    spans: list[tuple[int, int]]  # host copy of the documents' [start, end)
    doc: torch.Tensor  # [N] document of each slot
    pos: torch.Tensor  # [N] position within its document
    end: torch.Tensor  # [N] end (exclusive) of its document
    cache: dict[Any, Any] = field(default_factory=dict)  # per-batch objects a backend builds once (flex masks)

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor) -> PackedLayout:
        cu = cu_seqlens.long()
        host = cu.tolist()  # the one host sync: Python needs the spans to chunk block 1
        lens = cu[1:] - cu[:-1]
        n = host[-1]
        doc = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=n)
        pos = torch.arange(n, device=cu.device) - cu[:-1][doc]
        return PackedLayout(cu, list(zip(host[:-1], host[1:], strict=True)), doc, pos, cu[1:][doc])

    @property
    def num_tokens(self) -> int:
        return self.spans[-1][1] if self.spans else 0


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name == "sdpa" and device.type != "cpu":
        raise ValueError(f"attention backend 'sdpa' runs on the CPU only, not {device.type}; use 'flex' or 'torch'")
    return name


def ttt_attention(
    q: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], layout: PackedLayout, scale: float, backend: str
) -> torch.Tensor:
    """`q [N, Hq, d]` of the current step against `kv` (step 0's keys/values first, then steps 1..k,
    each `[N, Hkv, d]`); returns `[N, Hq, d]`."""
    if backend == "flex":
        if not _FLEX_FAILED:
            try:
                return _flex_attention(q, kv, layout, scale)
            except Exception as e:  # a compile failure on some GPU/driver: the run goes on, slower, and says so
                if not q.is_cuda:
                    raise
                _FLEX_FAILED.append(e)
                log.warning("flex attention failed (%s: %s); TTT attention falls back to 'torch'", type(e).__name__, e)
        backend = "torch"
    flat = [t for pair in kv for t in pair]
    return _MergedAttention.apply(layout, scale, _KERNELS[backend], q, *flat)


# ---------------------------------------------------------------------------------------------
# block 1's kernels: forward -> (out, lse); backward(merged out and lse) -> (dq, dk, dv)


def _groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[n, Hq, ...]` → `[Hkv, rep·n, ...]`: each KV head's query heads as one matmul operand."""
    n, hq = x.shape[:2]
    rep = hq // kv_heads
    return x.reshape(n, kv_heads, rep, *x.shape[2:]).movedim(0, 2).reshape(kv_heads, rep * n, *x.shape[2:])


def _ungroup(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_groups`."""
    kv_heads, rep = x.shape[0], x.shape[1] // n
    return x.reshape(kv_heads, rep, n, *x.shape[2:]).movedim(2, 0).reshape(n, kv_heads * rep, *x.shape[2:])


def _chunks(layout: PackedLayout, heads: int):
    """(doc start, chunk start, chunk end): query chunks sized so a chunk's scores stay bounded, and small
    enough that skipping the keys after a chunk skips most of the causal block's upper half."""
    for s0, e0 in layout.spans:
        size = min(512, max(16, _CHUNK_SCORES // max(heads * (e0 - s0), 1)))
        for c0 in range(s0, e0, size):
            yield s0, c0, min(c0 + size, e0)


def _scores(qg: torch.Tensor, k: torch.Tensor, s0: int, c0: int, c1: int) -> torch.Tensor:
    """Float32 scores `[Hkv, rep·n, L]` of a (pre-scaled) query chunk against its document's keys up to the
    chunk's end, causal: the chunk's own columns above the diagonal are -inf."""
    s = torch.matmul(qg, k[s0:c1].permute(1, 2, 0)).float()
    n, length = c1 - c0, c1 - s0
    above = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
    s.view(s.shape[0], -1, n, length)[..., length - n :].masked_fill_(above, float("-inf"))
    return s


def _torch_forward(q, k, v, layout: PackedLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-causal attention over step 0's keys: output `[N, Hq, d]` and log-sum-exp `[N, Hq]` (float32)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    hkv = k.shape[1]
    for s0, c0, c1 in _chunks(layout, q.shape[1]):
        s = _scores(_groups(q[c0:c1] * scale, hkv), k, s0, c0, c1)
        chunk_lse = torch.logsumexp(s, -1, keepdim=True)
        p = s.sub_(chunk_lse).exp_().to(v.dtype)
        out[c0:c1] = _ungroup(torch.matmul(p, v[s0:c1].transpose(0, 1)), c1 - c0)
        lse[c0:c1] = _ungroup(chunk_lse.squeeze(-1), c1 - c0)
    return out, lse


def _torch_backward(dout, q, k, v, out, lse, delta, layout: PackedLayout, scale: float):
    """Gradients of block 1 given the MERGED output's log-sum-exp and `delta = rowsum(dO ∘ O)`: the
    probabilities `exp(S − lse)` are then block 1's share of the merged softmax, so this is exact."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    hkv = k.shape[1]
    for s0, c0, c1 in _chunks(layout, q.shape[1]):
        n = c1 - c0
        qg, dog = _groups(q[c0:c1] * scale, hkv), _groups(dout[c0:c1], hkv)
        p = _scores(qg, k, s0, c0, c1).sub_(_groups(lse[c0:c1], hkv)[..., None]).exp_()
        ds = torch.matmul(dog, v[s0:c1].permute(1, 2, 0)).float()
        ds = ds.sub_(_groups(delta[c0:c1], hkv)[..., None]).mul_(p).to(q.dtype)
        dq[c0:c1] = _ungroup(torch.matmul(ds, k[s0:c1].transpose(0, 1)), n) * scale
        dk[s0:c1] += torch.matmul(ds.transpose(1, 2), qg).transpose(0, 1)
        dv[s0:c1] += torch.matmul(p.to(dout.dtype).transpose(1, 2), dog).transpose(0, 1)
    return dq, dk, dv


# sdpa: PyTorch's fused CPU flash-attention kernels, one call per document ([1, heads, L, d] views, no copies)
def _doc(x: torch.Tensor, s0: int, e0: int) -> torch.Tensor:
    return x[s0:e0].transpose(0, 1)[None]


def _sdpa_forward(q, k, v, layout: PackedLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for s0, e0 in layout.spans:
        o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _doc(q, s0, e0), _doc(k, s0, e0), _doc(v, s0, e0), 0.0, True, attn_mask=None, scale=scale
        )
        out[s0:e0], lse[s0:e0] = o[0].transpose(0, 1), m[0].transpose(0, 1)
    return out, lse


def _sdpa_backward(dout, q, k, v, out, lse, delta, layout: PackedLayout, scale: float):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for s0, e0 in layout.spans:
        g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _doc(dout, s0, e0),
            _doc(q, s0, e0),
            _doc(k, s0, e0),
            _doc(v, s0, e0),
            _doc(out, s0, e0),
            lse[s0:e0].transpose(0, 1)[None].contiguous(),
            0.0,
            True,
            attn_mask=None,
            scale=scale,
        )
        for full, part in zip((dq, dk, dv), g, strict=True):
            full[s0:e0] = part[0].transpose(0, 1)
    return dq, dk, dv


_KERNELS = {"torch": (_torch_forward, _torch_backward), "sdpa": (_sdpa_forward, _sdpa_backward)}


def _diag_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`[N, Hq]` float32: each slot's query against its own slot's key (GQA by broadcast, no copy)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    return (q.view(n, hkv, hq // hkv, d) * k[:, :, None]).sum(-1).float().view(n, hq) * scale


def _by_group(x: torch.Tensor, hkv: int) -> torch.Tensor:
    n, hq = x.shape[:2]
    return x.view(n, hkv, hq // hkv, *x.shape[2:])


class _MergedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: PackedLayout, scale: float, kernel, q: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        k0, v0, diag = kv[0], kv[1], list(zip(kv[2::2], kv[3::2], strict=True))
        out, lse = kernel[0](q, k0, v0, layout, scale)
        if diag:
            hkv = k0.shape[1]
            scores = [_diag_scores(q, k, scale) for k, _ in diag]
            merged = torch.logsumexp(torch.stack([lse, *scores]), dim=0)
            acc = out.float() * torch.exp(lse - merged)[..., None]
            for s, (_, v) in zip(scores, diag, strict=True):
                _by_group(acc, hkv).add_(_by_group(torch.exp(s - merged), hkv)[..., None] * v[:, :, None].float())
            out, lse = acc.to(q.dtype), merged
        ctx.layout, ctx.scale, ctx.kernel = layout, scale, kernel
        ctx.save_for_backward(q, out, lse, *kv)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, out, lse, *kv = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # [N, Hq]
        k0, v0 = kv[0], kv[1]
        dq, dk0, dv0 = ctx.kernel[1](dout, q, k0, v0, out, lse, delta, layout, scale)
        grads = [dk0, dv0]
        hkv = k0.shape[1]
        qg, dog = _by_group(q, hkv).float(), _by_group(dout, hkv).float()
        dqg = _by_group(dq, hkv)
        for k, v in zip(kv[2::2], kv[3::2], strict=True):
            p = torch.exp(_diag_scores(q, k, scale) - lse)
            dp = (dog * v[:, :, None].float()).sum(-1).flatten(1)
            ds = _by_group(p * (dp - delta) * scale, hkv)[..., None]  # [N, Hkv, rep, 1]
            dqg += (ds * k[:, :, None].float()).to(dq.dtype)
            grads += [(ds * qg).sum(2).to(k.dtype), (_by_group(p, hkv)[..., None] * dog).sum(2).to(v.dtype)]
        return (None, None, None, dq, *grads)


# ---------------------------------------------------------------------------------------------
# flex: every step's keys end to end, one block-sparse mask


def _flex_attention(q, kv, layout: PackedLayout, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, steps = q.shape[0], len(kv)
    key = ("flex", steps)
    if key not in layout.cache:
        doc = layout.doc

        def ttt_mask(b, h, qi, ki):
            kj = ki % n  # step ki // n's key of slot kj
            return torch.where(ki < n, (doc[qi] == doc[kj]) & (kj <= qi), kj == qi)

        layout.cache[key] = create_block_mask(ttt_mask, None, None, n, steps * n, device=q.device)
        if q.device.type == "cuda" and "flex_fn" not in layout.cache:
            layout.cache["flex_fn"] = _compiled_flex()
    fn = layout.cache.get("flex_fn", flex_attention)
    keys = torch.cat([k for k, _ in kv]).transpose(0, 1)[None]  # [1, Hkv, steps·N, d]
    values = torch.cat([v for _, v in kv]).transpose(0, 1)[None]
    out = fn(q.transpose(0, 1)[None], keys, values, block_mask=layout.cache[key], scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


_COMPILED: list = []
_FLEX_FAILED: list = []  # the first error, once flex failed in this process


def _compiled_flex():
    if not _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED[0]
