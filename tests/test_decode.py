"""Serving-style speculative decoding: trees as SGLang builds them, and sampling that keeps the target's law.

The tree tests run SGLang's own selection code (installed, on the CPU) against ours. The sampling tests
are statistical, with fixed seeds: a chi-square test against the exact distribution, and a control that
shows the same test rejects a wrong distribution. Greedy equality and measured acceptance on a trained
draft are in `test_draft_model.py` (they share its trained draft).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from eagle_ray.draft.decode import speculative_decode
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.tree import Candidates, SpecParams, Tree, draft_level, select_tree, target_probs, verify_sampling
from eagle_ray.engines.hf import HFEngine
from eagle_ray.hf_checkpoint import load_config
from eagle_ray.tiny import build_tiny_target


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of `counts` against `probs`, cells with expected count under 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def test_trees_are_the_ones_sglang_builds():
    from sglang.srt.speculative import eagle_utils, spec_utils

    import eagle_ray.engines._vllm_compat  # noqa: F401  (SGLang's CPU import seam)

    later = spec_utils._select_top_k_tokens_later.__wrapped__  # torch.compile'd upstream; the plain function here
    g = torch.Generator().manual_seed(0)
    for topk, steps, n_draft, vocab in [(3, 4, 10, 40), (2, 3, 6, 20), (4, 2, 12, 30), (1, 5, 6, 16)]:
        # the draft's distribution at each level as a function of the token it is drafted from
        table = [torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, -1) for _ in range(steps)]
        first = torch.softmax(torch.randn(1, vocab, generator=g) * 3, -1)
        # SGLang: EAGLEWorker.draft_forward's loop around select_top_k_tokens, then organize_draft_results
        topk_p, topk_index = first.topk(topk, dim=-1)
        scores, lists = None, ([], [], [])
        for i in range(steps):
            if i == 0:
                ids, _, scores, info = spec_utils._select_top_k_tokens_first(topk_p, topk_index, None, topk)
            else:
                ids, _, scores, info = later(i, topk_p, topk_index, None, scores, topk)
            for lst, x in zip(lists, info, strict=True):
                lst.append(x)
            if i + 1 < steps:
                topk_p, topk_index = table[i + 1][ids].topk(topk, dim=-1)
        parent_list, picked, tokens = eagle_utils.organize_draft_results(*lists, n_draft)
        # ours
        c = Candidates()
        beams, _ = draft_level(c, first, torch.arange(vocab), topk, None, 0)
        for level in range(1, steps):
            rows = table[level][torch.tensor([c.tokens[b] for b in beams])]
            beams, _ = draft_level(c, rows, torch.arange(vocab), topk, beams, level)
        tree = select_tree(99, c, n_draft)
        assert tree.tokens[1:] == tokens[0].tolist(), (topk, steps)
        # SGLang's parent of a picked candidate x is parent_list[x // topk] (-1: the root), as a candidate index
        node_of = {int(x): k + 1 for k, x in enumerate(picked[0])}
        sglang_parents = [
            0 if int(parent_list[0, x // topk]) < 0 else node_of[int(parent_list[0, x // topk])] for x in picked[0]
        ]
        assert tree.parents[1:] == sglang_parents, (topk, steps)
        assert len(c.tokens) == topk + (steps - 1) * topk * topk


def test_tree_sampling_emits_the_target_distribution():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, 12, generator=g) * 1.5, -1)
    tree = Tree(tokens=[0, 3, 7, 5], parents=[-1, 0, 0, 1])  # root -> {3, 7}; 3 -> {5}
    first, second = torch.zeros(12), torch.zeros(12)
    for _ in range(20000):
        path, bonus = verify_sampling(tree, probs, g)
        emitted = [tree.tokens[i] for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 3:
            second[emitted[1]] += 1
    assert _chi2_pvalue(first, probs[0]) > 1e-3  # the first token: the root's distribution
    assert _chi2_pvalue(second, probs[1]) > 1e-3  # after node 3 was accepted: node 3's
    assert _chi2_pvalue(first, probs[1]) < 1e-6  # the control: a wrong distribution is rejected


def test_target_probs_applies_temperature_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.allclose(target_probs(logits, 1.0), torch.softmax(logits, -1))
    assert torch.allclose(target_probs(logits, 0.5), torch.softmax(logits * 2, -1))
    p = target_probs(logits, 1.0, top_p=0.7)  # 0.64 + 0.24 reach 0.7: the top two, renormalised
    assert p[0, 2:].sum() == 0 and torch.allclose(p[0, :2], torch.softmax(logits[0, :2], -1))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A tiny random target over 8 tokens (wide init: peaked, varied distributions) and a random draft."""
    torch.manual_seed(0)
    path = build_tiny_target(tmp_path_factory.mktemp("v8") / "t", "qwen3", vocab_size=8, initializer_range=0.4)
    engine = HFEngine(str(path), dtype=torch.float32)
    config = Eagle3DraftConfig.from_target(load_config(path), 8, list(engine.info.aux_layer_ids))
    draft = Eagle3Draft.from_target(config, engine.input_embeddings(), engine.lm_head_weight(), torch.arange(8), seed=1)
    yield engine, draft
    engine.close()


def test_speculative_sampling_has_the_target_distribution(small_vocab):
    engine, draft = small_vocab
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompt, temperature, n = [1, 4, 2], 0.8, 600
        params = SpecParams(topk=2, num_steps=2, num_draft_tokens=4, temperature=temperature)
        r = speculative_decode(engine, draft, [prompt] * n, params, max_new_tokens=3, seed=10, check=False)
        # the exact law of tokens 2 and 3 (both come out of verification; token 1 from the prefill)
        model = engine.model
        with torch.no_grad():
            p1 = target_probs(model(torch.tensor([prompt])).logits[0, -1:], temperature)[0]
            two = torch.tensor([prompt + [a] for a in range(8)])
            p2 = target_probs(model(two).logits[:, -1], temperature)  # [t1, t2]
            three = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
            p3 = target_probs(model(three).logits[:, -1], temperature).view(8, 8, 8)  # [t1, t2, t3]
        exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # P(t2, t3)
        counts = torch.zeros(64)
        for out in r.outputs:
            counts[out[1] * 8 + out[2]] += 1
        accepted = r.accepted_draft_tokens / r.verify_forwards
        print(f"\nmean accepted draft tokens per verify {accepted:.2f}, p = {_chi2_pvalue(counts, exact):.3f}")
        assert 0.2 < accepted < 1.8  # both acceptance and rejection are exercised
        assert _chi2_pvalue(counts, exact) > 1e-3
        with torch.no_grad():  # the control: the law at another temperature is rejected by the same test
            hot = target_probs(model(three).logits[:, -1], 2.0).view(8, 8, 8)
            p1h = target_probs(model(torch.tensor([prompt])).logits[0, -1:], 2.0)[0]
            p2h = target_probs(model(two).logits[:, -1], 2.0)
        control = _chi2_pvalue(counts, (p1h[:, None, None] * p2h[:, :, None] * hot).sum(0).flatten())
        print(f"control (T=2.0): p = {control:.2e}")  # 600 samples: 1.6e-146 (1500 took 2.5x as long)
        assert control < 1e-6
    finally:
        torch.set_num_threads(threads)
