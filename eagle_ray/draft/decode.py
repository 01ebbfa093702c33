"""Speculative decoding as a server runs it: KV-cached target and draft, chain or tree drafts, greedy or sampled.

Per request and round (SGLang 0.5.23's EAGLE-3 worker, one request at a time):
1. the draft extends its KV cache over the newly verified tokens (each slot: the target's aux state of a
   token and the id of the token after it), which gives the level-0 candidates after the root, the newest
   verified token the target has not run yet;
2. `num_steps - 1` tree steps, each running the beams of the level before against the cache (a beam sees the
   context and its own ancestors), build the candidates; `tree.select_tree` keeps `num_draft_tokens - 1`;
3. the target runs the root and the tree in one forward against its KV cache (each node sees its ancestors),
   `tree.verify_greedy` or `tree.verify_sampling` picks the accepted path and the bonus token, and both caches
   keep only the accepted path.

The acceptance length is SGLang's: tokens emitted per verify forward, the bonus included (the first token
comes from the prefill). Under greedy verification the output equals `target_decode`'s token for token;
under sampling it has the target's distribution.

The target is an `HFEngine` (transformers: the weights SGLang serves, the same aux hooks); SGLang's own tree
kernels need CUDA (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eagle_ray.draft.model import Eagle3Draft, KVCache
from eagle_ray.draft.speculate import SpecDecodeResult
from eagle_ray.draft.tree import (
    Candidates,
    SpecParams,
    Tree,
    draft_level,
    select_tree,
    target_probs,
    verify_greedy,
    verify_sampling,
)


def _causal(past: int, new: int) -> torch.Tensor:
    return torch.cat([torch.ones(new, past, dtype=torch.bool), torch.ones(new, new, dtype=torch.bool).tril()], 1)


def _pick(logits: torch.Tensor, params: SpecParams, gen: torch.Generator) -> int:
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(target_probs(logits[None], params.temperature, params.top_p)[0], 1, generator=gen))


def _keep(cache: Any, past: int, nodes: list[int]) -> None:
    """Keep the target cache's first `past` tokens and the verified tree `nodes` (in order), drop the rest."""
    idx = torch.tensor(list(range(past)) + [past + n for n in nodes])
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, idx], layer.values[:, :, idx]
        if hasattr(layer, "cumulative_length"):  # sliding layers count what they have seen
            layer.cumulative_length = idx.numel()


@dataclass
class _Counts:
    forwards: int = 0
    produced: int = 0
    accepted: int = 0
    proposed: int = 0


def _draft_tree(draft: Eagle3Draft, kv: KVCache, last: torch.Tensor, root: int, n: int, p: SpecParams) -> Tree:
    """Step 2 of the round: candidates from the draft's hidden `last` at the root's slot, then the tree."""
    token_of, ctx, cands = draft.draft_ids, len(kv), Candidates()
    beams, _ = draft_level(cands, torch.softmax(draft.logits(last[None]).float(), -1), token_of, p.topk, None, 0)
    hidden, ancestors = last[None].expand(len(beams), -1), [[] for _ in beams]  # per beam: its ancestors' slots
    for level in range(1, p.num_steps):
        tree_slots = len(kv) - ctx
        mask = torch.zeros(len(beams), ctx + tree_slots + len(beams), dtype=torch.bool)
        mask[:, :ctx] = True
        for j, anc in enumerate(ancestors):
            mask[j, [ctx + a for a in anc] + [ctx + tree_slots + j]] = True
        kv.mask = mask
        ids = torch.tensor([cands.tokens[b] for b in beams])
        h = draft.infer(ids, hidden, torch.full((len(beams),), n + level - 1), kv, False)
        beams, rows = draft_level(cands, torch.softmax(draft.logits(h).float(), -1), token_of, p.topk, beams, level)
        hidden, ancestors = h[rows], [ancestors[r] + [tree_slots + r] for r in rows]
    kv.crop(ctx)  # tree slots are this round's only; the accepted tokens come back with the target's aux
    return select_tree(root, cands, p.num_draft_tokens)


@torch.no_grad()
def _decode_one(engine: Any, draft: Eagle3Draft, prompt: list[int], max_new: int, p: SpecParams, gen, stop, counts):
    cache = engine.new_cache()
    aux, logits = engine.extend(torch.tensor(prompt), torch.arange(len(prompt)), _causal(0, len(prompt)), cache)
    out = [_pick(logits[-1], p, gen)]
    kv, dtype = KVCache(), draft.fc.weight.dtype
    new_aux, new_ids, n = aux, prompt[1:] + out, len(prompt)  # n: the root's position; slots 0..n-1 follow it
    while len(out) < max_new and out[-1] not in stop:
        s0 = len(kv)
        kv.mask = _causal(s0, len(new_ids))
        h = draft.infer(torch.tensor(new_ids), new_aux.to(dtype), torch.arange(s0, s0 + len(new_ids)), kv, True)
        tree = _draft_tree(draft, kv, h[-1], out[-1], n, p)
        past = n  # the target has run tokens 0..n-1
        visible = torch.cat([torch.ones(len(tree.tokens), past, dtype=torch.bool), tree.visible()], 1)
        positions = n + torch.tensor(tree.depths)
        aux, logits = engine.extend(torch.tensor(tree.tokens), positions, visible, cache)
        if p.greedy:
            path, bonus = verify_greedy(tree, logits)
        else:
            path, bonus = verify_sampling(tree, target_probs(logits, p.temperature, p.top_p), gen)
        _keep(cache, past, [0] + path)
        new = [tree.tokens[i] for i in path] + [bonus]
        cut = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        emitted = new[: min(cut, max_new - len(out))]
        out += emitted
        counts.forwards, counts.produced = counts.forwards + 1, counts.produced + len(emitted)
        counts.accepted, counts.proposed = counts.accepted + len(path), counts.proposed + len(tree.tokens) - 1
        new_aux, new_ids, n = aux[[0] + path], new, n + len(new)
    return out


def _check(prompts: list[list[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(q) < 1 for q in prompts):
        raise ValueError("need at least one prompt, and every prompt needs at least one token")


def speculative_decode(
    engine: Any,
    draft: Eagle3Draft,
    prompts: list[list[int]],
    params: SpecParams | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    check: bool = True,
) -> SpecDecodeResult:
    """Decode each prompt with `draft` proposing and `engine` (an `HFEngine`) verifying.

    Request i samples with its own generator (seed + i). With `check`, the reference is `target_decode` with
    the same parameters: equal to the output under greedy, the same distribution under sampling.
    """
    p = params or SpecParams()
    _check(prompts, max_new_tokens)
    draft.eval()
    counts, stop = _Counts(), set(stop_ids)
    outs = [
        _decode_one(engine, draft, q, max_new_tokens, p, torch.Generator().manual_seed(seed + i), stop, counts)
        for i, q in enumerate(prompts)
    ]
    ref = target_decode(engine, prompts, max_new_tokens, p.temperature, p.top_p, seed, stop_ids) if check else None
    return SpecDecodeResult(outs, ref, counts.forwards, counts.produced, counts.accepted, counts.proposed)


@torch.no_grad()
def target_decode(
    engine: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Target-only decoding with a KV cache, one token per forward: greedy (temperature 0) or sampled."""
    _check(prompts, max_new_tokens)
    p = SpecParams(temperature=temperature, top_p=top_p)
    outs = []
    for i, q in enumerate(prompts):
        gen, cache = torch.Generator().manual_seed(seed + i), engine.new_cache()
        _, logits = engine.extend(torch.tensor(q), torch.arange(len(q)), _causal(0, len(q)), cache)
        out = [_pick(logits[-1], p, gen)]
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            n = len(q) + len(out) - 1
            _, logits = engine.extend(torch.tensor(out[-1:]), torch.tensor([n]), _causal(n, 1), cache)
            out.append(_pick(logits[-1], p, gen))
        outs.append(out)
    return outs
