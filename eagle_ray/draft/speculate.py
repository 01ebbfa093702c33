"""Measured acceptance: real greedy speculative decoding of a draft against a target.

Each round the draft proposes a chain of k tokens from the target's aux states (its step 0 over
the context, then k-1 steps on the last slot, as `ttt.py` trains it); the target verifies the
chain in one forward; the longest agreeing prefix plus the target's own next token is kept.
The output therefore equals target-only greedy decoding token for token (checked here against
a target-only run), and the acceptance length is tokens produced per verify forward, the number
SGLang reports as accept length.

The target is anything with `forward_packed(PackedBatch)` and `get_lm_head_weight()` (an
engine-backed target or a pool): greedy tokens come from its last hidden states and lm_head, so
no full-vocabulary logits are shipped. It recomputes the whole sequence each round (no KV
cache): an evaluator, not a server. All prompts share each round's target forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eagle_ray.contract import PackedBatch
from eagle_ray.draft.model import Eagle3Draft, KVCache


@torch.no_grad()
def propose(draft: Eagle3Draft, aux: torch.Tensor, next_ids: torch.Tensor, k: int) -> list[int]:
    """Draft a chain of `k` target token ids after a context.

    `aux [n, 3H]`: the target's aux states of context tokens 0..n-1; `next_ids [n]`: tokens 1..n
    (the last one is the target's newest token, which has no aux state yet).
    """
    dev = draft.fc.weight.device
    n = next_ids.numel()
    kv = KVCache(mask=torch.ones(n, n, dtype=torch.bool, device=dev).tril())
    aux = aux.to(dev, draft.fc.weight.dtype)
    hidden = draft.infer(next_ids.to(dev), aux, torch.arange(n, device=dev), kv, True)[-1:]
    d2t = draft.d2t
    out: list[int] = []
    for j in range(k):
        tok = draft.logits(hidden)[-1].argmax()
        out.append(int(tok + d2t[tok]))
        if j + 1 < k:  # step j+1 of slot n-1: every context slot and the chain so far
            kv.mask = torch.ones(1, len(kv) + 1, dtype=torch.bool, device=dev)
            position = torch.tensor([n + j], device=dev)
            hidden = draft.infer(torch.tensor([out[-1]], device=dev), hidden, position, kv, False)
    return out


def _forward(target: Any, seqs: list[list[int]]) -> Any:
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    return target.forward_packed(PackedBatch.from_sequences(ids, [torch.ones_like(t) for t in ids]))


def _greedy(sup: Any, rows: torch.Tensor | slice, lm_head: torch.Tensor) -> torch.Tensor:
    """The target's greedy next tokens at `rows`, from its last hidden states (no full logits shipped)."""
    h = sup.last_hidden_states[rows]
    return (h.to(lm_head.dtype) @ lm_head.T).argmax(-1)


def target_greedy(target: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Target-only greedy decoding, one token per forward (the reference)."""
    outs: list[list[int]] = [[] for _ in prompts]
    lm_head = target.get_lm_head_weight()
    for _ in range(max_new_tokens):
        sup = _forward(target, [p + o for p, o in zip(prompts, outs, strict=True)])
        for i, tok in enumerate(_greedy(sup, sup.cu_seqlens[1:] - 1, lm_head).tolist()):
            outs[i].append(tok)
    return outs


@dataclass
class SpecDecodeResult:
    outputs: list[list[int]]
    reference: list[list[int]] | None
    verify_forwards: int  # per prompt, summed
    produced: int  # tokens produced by those forwards
    accepted_draft_tokens: int
    proposed_draft_tokens: int

    @property
    def acceptance_length(self) -> float:
        return self.produced / max(self.verify_forwards, 1)

    @property
    def matches_reference(self) -> bool:
        return self.reference is not None and self.outputs == self.reference

    def summary(self) -> dict[str, Any]:
        return {
            "acceptance_length": self.acceptance_length,
            "draft_accept_rate": self.accepted_draft_tokens / max(self.proposed_draft_tokens, 1),
            "verify_forwards": self.verify_forwards,
            "tokens": self.produced,
            "matches_target_greedy": self.matches_reference,
        }


def speculative_greedy(
    target: Any,
    draft: Eagle3Draft,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    num_draft_tokens: int = 4,
    check: bool = True,
) -> SpecDecodeResult:
    """Greedy speculative decoding of every prompt; with `check`, also the target-only reference."""
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_draft_tokens and max_new_tokens must be >= 1")
    if any(len(p) < 1 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    draft.eval()
    lm_head = target.get_lm_head_weight()
    sup = _forward(target, prompts)
    ends = sup.cu_seqlens[1:].tolist()
    outs = [[t] for t in _greedy(sup, sup.cu_seqlens[1:] - 1, lm_head).tolist()]
    aux = [sup.aux_hidden_states[s:e] for s, e in zip(sup.cu_seqlens[:-1].tolist(), ends, strict=True)]
    forwards = produced = accepted = proposed = 0
    while True:
        active = [i for i, o in enumerate(outs) if len(o) < max_new_tokens]
        if not active:
            break
        chains = []
        for i in active:
            ctx = prompts[i] + outs[i]
            chains.append(propose(draft, aux[i], torch.tensor(ctx[1:]), num_draft_tokens))
        sup = _forward(target, [prompts[i] + outs[i] + c for i, c in zip(active, chains, strict=True)])
        starts = sup.cu_seqlens[:-1].tolist()
        for i, chain, s in zip(active, chains, starts, strict=True):
            n0 = len(prompts[i]) + len(outs[i])
            greedy = _greedy(sup, slice(s + n0 - 1, s + n0 + len(chain)), lm_head).tolist()
            a = 0
            while a < len(chain) and chain[a] == greedy[a]:
                a += 1
            new = (chain[:a] + [greedy[a]])[: max_new_tokens - len(outs[i])]
            outs[i] += new
            forwards, produced = forwards + 1, produced + len(new)
            accepted, proposed = accepted + a, proposed + len(chain)
            # aux of every token but the newest, from this (causal) verify forward
            aux[i] = sup.aux_hidden_states[s : s + n0 + len(new) - 1]
    reference = target_greedy(target, prompts, max_new_tokens) if check else None
    return SpecDecodeResult(outs, reference, forwards, produced, accepted, proposed)
