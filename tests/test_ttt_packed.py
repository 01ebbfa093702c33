"""The packed TTT trainer equals the padded one it replaced (`eagle_ray.testing.padded_ttt`), on ragged fp32
batches: the loss, every metric and every parameter's gradient within 1e-5, on every attention backend the CPU
runs (flex without gradients: PyTorch has no flex backward on the CPU). Plain unit tests: no Ray, no target."""

from __future__ import annotations

import pytest
import torch

from eagle_ray.contract import Supervision
from eagle_ray.draft.attention import PackedLayout, resolve_backend, ttt_attention
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.ttt import Teacher, _SoftCrossEntropy, ttt_loss, walk_rounds
from eagle_ray.testing.padded_ttt import padded_ttt_loss, walk_rounds_loop

H, V, D = 64, 300, 120
TOL = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls on 2 shared cores


def make_draft(kv_heads: int = 2, seed: int = 3) -> tuple[Eagle3Draft, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    config = Eagle3DraftConfig(
        hidden_size=H,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=V,
        draft_vocab_size=D,
        aux_layer_ids=[1, 2, 3],
    )
    emb, head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    ids = torch.randperm(V, generator=g)[:D].sort().values
    return Eagle3Draft.from_target(config, emb, head, ids, seed=seed), head


def make_sup(lens: list[int], seed: int = 0, keep: float = 0.7) -> Supervision:
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    return Supervision(
        input_ids=torch.randint(0, V, (n,), generator=g),
        loss_mask=(torch.rand(n, generator=g) < keep).long(),
        cu_seqlens=torch.tensor([0, *lens]).cumsum(0),
        aux_hidden_states=torch.randn(n, 3 * H, generator=g),
        last_hidden_states=torch.randn(n, H, generator=g),
    )


def train_once(fn, sup: Supervision, kv_heads: int = 2, **options):
    draft, head = make_draft(kv_heads)
    loss, stats = fn(draft, sup, head, steps=7, **options)
    loss.backward()
    return loss.detach(), stats, {n: p.grad for n, p in draft.named_parameters() if p.grad is not None}


LAYOUTS = {
    "ragged": [37, 5, 1, 64, 12],
    "one long": [150],
    "short docs": [2, 1, 3, 1, 7, 2],  # shorter than the 7 steps: chains run off their documents
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "options",
    [{"attention": "sdpa"}, {"attention": "torch"}, {"checkpoint": True}, {"ce_chunk": 7}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_packed_equals_the_padded_reference(layout, options):
    sup = make_sup(LAYOUTS[layout])
    ref_loss, ref_stats, ref_grads = train_once(padded_ttt_loss, sup)
    loss, stats, grads = train_once(ttt_loss, sup, **options)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for ours, theirs in zip(stats.as_tensor(), ref_stats.as_tensor(), strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), **TOL)
    assert stats.summary()["tokens"] == int(sup.shifted().loss_mask.sum())
    assert grads.keys() == ref_grads.keys() and "fc.weight" in grads and "lm_head.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)


def test_multi_head_attention_and_long_chains():
    """MHA (no grouping), and a draft that is mostly right: each document's aux states are one row and its teacher
    one token, the draft's own guess, and the layer's residual branches are damped, so chains run long (walked
    rounds well above 1) while every parameter still gets a gradient."""
    lens = [40, 33, 9]
    sup = make_sup(lens, seed=4, keep=0.9)
    draft, head = make_draft(kv_heads=4)
    with torch.no_grad():
        for s0, e0 in zip(sup.cu_seqlens[:-1].tolist(), sup.cu_seqlens[1:].tolist(), strict=True):
            sup.aux_hidden_states[s0:e0] = sup.aux_hidden_states[s0]
            guess = draft.draft_ids[draft.logits(draft.fc(sup.aux_hidden_states[s0])).argmax()]
            sup.last_hidden_states[s0:e0] = 10 * head[guess]

    def damped(fn, sup):
        d, h = make_draft(kv_heads=4)
        with torch.no_grad():
            d.midlayer.self_attn.o_proj.weight.mul_(0.05)
            d.midlayer.mlp.down_proj.weight.mul_(0.05)
        loss, stats = fn(d, sup, h, steps=7)
        loss.backward()
        return loss.detach(), stats, {n: p.grad for n, p in d.named_parameters() if p.grad is not None}

    ref_loss, ref_stats, ref_grads = damped(padded_ttt_loss, sup)
    loss, stats, grads = damped(ttt_loss, sup)
    summary = stats.summary()
    assert summary["acc"][0] > 0.9 and summary["acceptance_rounds"] > 2.5, summary  # measured: 0.97, rounds 4+
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for ours, theirs in zip(stats.as_tensor(), ref_stats.as_tensor(), strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), **TOL)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)


def test_flex_forward_equals_the_reference():
    sup = make_sup(LAYOUTS["ragged"])
    draft, head = make_draft()
    with torch.no_grad():
        ref_loss, ref_stats = padded_ttt_loss(draft, sup, head, steps=7)
        loss, stats = ttt_loss(draft, sup, head, steps=7, attention="flex")
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for ours, theirs in zip(stats.as_tensor(), ref_stats.as_tensor(), strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), **TOL)


def dense_ttt_attention(q, kv, layout: PackedLayout, scale: float) -> torch.Tensor:
    """The definition: a dense mask over every step's keys (document-causal on step 0, own slot after)."""
    n = q.shape[0]
    same_doc = layout.doc[:, None] == layout.doc[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril() & same_doc
    mask = torch.cat([causal] + [torch.eye(n, dtype=torch.bool)] * (len(kv) - 1), dim=1)
    keys, values = torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
@pytest.mark.parametrize("steps", [1, 4])
def test_attention_and_its_gradients_equal_the_dense_definition(backend, steps):
    g = torch.Generator().manual_seed(steps)
    layout = PackedLayout.from_cu_seqlens(torch.tensor([0, 30, 31, 75, 90]))
    n, hq, hkv, d = 90, 6, 2, 8

    q = torch.randn(n, hq, d, generator=g, requires_grad=True)
    kv = [tuple(torch.randn(n, hkv, d, generator=g, requires_grad=True) for _ in "kv") for _ in range(steps)]
    dout = torch.randn(n, hq, d, generator=g)
    ours = ttt_attention(q, kv, layout, 0.3, backend)
    ours.backward(dout)
    mine = [q.grad] + [t.grad for pair in kv for t in pair]
    for t in [q] + [t for pair in kv for t in pair]:
        t.grad = None
    ref = dense_ttt_attention(q, kv, layout, 0.3)
    ref.backward(dout)
    torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(mine, [q.grad] + [t.grad for pair in kv for t in pair], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_torch_kernel_chunks_long_documents(monkeypatch):
    """A document longer than one query chunk: chunks see only the keys up to their end, and still agree."""
    import eagle_ray.draft.attention as attention

    monkeypatch.setattr(attention, "_CHUNK_SCORES", 4 * 100 * 16)  # 4 heads x 100 keys: chunks of 16 queries
    sup = make_sup([100, 20])
    ref_loss, ref_stats, ref_grads = train_once(padded_ttt_loss, sup)
    loss, stats, grads = train_once(ttt_loss, sup, attention="torch")
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)


def test_walk_rounds_equals_the_loop_walk():
    g = torch.Generator().manual_seed(5)
    for trial in range(30):
        lens = torch.randint(1, 40, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        width = max(lens)
        first = torch.zeros(len(lens), width, dtype=torch.bool)
        lead = torch.zeros(len(lens), width, dtype=torch.long)
        for r, n in enumerate(lens):
            first[r, :n] = torch.rand(n, generator=g) < (0.3 + 0.2 * (trial % 4))
            lead[r, :n] = torch.randint(0, 8, (n,), generator=g) * first[r, :n]
        valid = torch.arange(width)[None] < torch.tensor(lens)[:, None]
        layout = PackedLayout.from_cu_seqlens(torch.tensor([0, *lens]).cumsum(0))
        assert walk_rounds(first[valid], lead[valid], layout) == walk_rounds_loop(first, lead), (lens, trial)


def test_chunked_cross_entropy_equals_the_plain_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(30, 16, generator=g, requires_grad=True)
    probs = torch.softmax(torch.randn(60, 30, generator=g), -1)
    ok = torch.rand(60, generator=g) < 0.8
    teacher = Teacher(probs, ok, torch.arange(60), probs.argmax(-1))
    rows = torch.randperm(60, generator=g)[:50]  # x's teacher rows
    loss, ce, hit = _SoftCrossEntropy.apply(x, w, teacher, rows, 0.37, 8)
    probs, ok = probs[rows], ok[rows]
    (loss * 2).backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    logp = torch.log_softmax(x @ w.T, -1)
    plain = -(probs * logp).sum(-1) * ok
    (plain.sum() * 0.37 * 2).backward()
    torch.testing.assert_close(ce, plain.detach(), **TOL)
    torch.testing.assert_close(loss, plain.sum().detach() * 0.37, **TOL)
    assert torch.equal(hit, (logp.argmax(-1) == probs.argmax(-1)) & ok)
    torch.testing.assert_close(gx, x.grad, **TOL)
    torch.testing.assert_close(gw, w.grad, **TOL)


def test_backend_names_are_checked():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("sdpa", torch.device("cuda"))
    draft, head = make_draft()
    with pytest.raises(ValueError, match="unknown"):
        ttt_loss(draft, make_sup([5]), head, attention="dense")


def test_the_config_offers_the_backends_the_trainer_has():
    from eagle_ray.draft.attention import BACKENDS
    from eagle_ray.train.config import ATTENTION_BACKENDS, DraftTrainConfig

    assert ATTENTION_BACKENDS == BACKENDS
    with pytest.raises(ValueError, match="attention: must be one of auto, sdpa, torch, flex, got 'dense'"):
        DraftTrainConfig(attention="dense")
