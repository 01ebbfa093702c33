"""The first TTT trainer, kept as the reference the packed one is tested against (and the baseline
`benchmarks/ttt_bench.py` measures it against): every batch padded to its longest sequence, the draft
layer run on `[B, S_max]`, and each step's attention a dense boolean mask over (k+1)·S keys.

It drives the draft's own modules (projections, norms, MLP, heads) so the two trainers share every
parameter and differ only in layout and attention. Semantics are `eagle_ray.draft.ttt`'s, slot for slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eagle_ray.contract import Supervision
from eagle_ray.draft.model import Eagle3Draft, rope
from eagle_ray.draft.ttt import DEFAULT_STEP_DECAY, DEFAULT_TTT_STEPS, TTTStats, teacher_targets


def padded_layout(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(row, column) of each packed slot in a `[B, S]` layout, and B, S (S = longest sequence)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    b, s = lens.numel(), int(lens.max())
    rows = torch.repeat_interleave(torch.arange(b, device=lens.device), lens)
    cols = torch.arange(int(cu_seqlens[-1]), device=lens.device) - cu_seqlens[:-1].repeat_interleave(lens)
    return rows, cols, b, s


def _shift(x: torch.Tensor, fill: int) -> torch.Tensor:
    """One slot left within each row of `[B, S]`; padding holds `fill` already, so rows never mix."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def _step(draft: Eagle3Draft, ids, hidden, positions, base_mask, kv: list) -> torch.Tensor:
    """One draft step on `[B, S]`: step 0's keys under `base_mask`, later steps' keys on the diagonal."""
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    if not kv:
        hidden = draft.fc(hidden)
    x = torch.cat([layer.input_layernorm(draft.embed_tokens(ids)), layer.hidden_norm(hidden)], dim=-1)
    b, s, _ = x.shape
    split = lambda t, n: t.view(b, s, n, attn.hd)  # noqa: E731
    q = rope(split(attn.q_proj(x), attn.heads), positions, attn.theta).transpose(1, 2)
    k = rope(split(attn.k_proj(x), attn.kv_heads), positions, attn.theta).transpose(1, 2)
    v = split(attn.v_proj(x), attn.kv_heads).transpose(1, 2)
    kv.append((k, v))
    eye = torch.eye(s, dtype=torch.bool, device=x.device).expand(b, s, s)
    keys, values = torch.cat([a for a, _ in kv], dim=2), torch.cat([c for _, c in kv], dim=2)
    mask = torch.cat([base_mask] + [eye] * (len(kv) - 1), dim=2)
    rep = attn.heads // attn.kv_heads
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
    h = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, s, attn.heads * attn.hd))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def padded_ttt_loss(
    draft: Eagle3Draft,
    sup: Supervision,
    lm_head_weight: torch.Tensor,
    steps: int = DEFAULT_TTT_STEPS,
    decay: float = DEFAULT_STEP_DECAY,
) -> tuple[torch.Tensor, TTTStats]:
    """The TTT loss of one packed (unshifted) supervision record, computed padded, and its sums."""
    if steps < 1:
        raise ValueError(f"ttt steps must be >= 1, got {steps}")
    device = draft.fc.weight.device
    s = sup.shifted()
    cu = s.cu_seqlens.to(device)
    teacher = teacher_targets(
        s.last_hidden_states.to(device), s.loss_mask.to(device), lm_head_weight.to(device), draft.draft_ids
    )
    rows, cols, b, width = padded_layout(cu)

    def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
        out = x.new_full((b, width, *x.shape[1:]), fill)
        out[rows, cols] = x
        return out

    ids = pad(s.input_ids.to(device), 0)
    idx = pad(teacher.index, -1)
    hidden = pad(s.aux_hidden_states.to(device, draft.fc.weight.dtype), 0)
    valid = pad(torch.ones_like(rows, dtype=torch.bool), False)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    base_mask, kv = causal[None] & valid[:, None, :], []
    positions = torch.arange(width, device=device).expand(b, width)
    first = idx >= 0
    run = first.clone()  # slots whose chain is still all-correct
    lead = torch.zeros(first.shape, dtype=torch.long, device=device)  # per slot: its leading correct steps
    chain = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    loss_sum, correct, count = (torch.zeros(steps, device=device) for _ in range(3))
    for k in range(steps):
        hidden = _step(draft, ids, hidden, positions + k, base_mask, kv)
        sel = idx >= 0
        r = idx[sel]
        logp = F.log_softmax(draft.logits(hidden[sel]).float(), dim=-1)
        p, ok = teacher.probs[r], teacher.in_draft[r]
        ce = -(p * logp).sum(-1) * ok
        n = max(int(sel.sum()), 1)
        total = total + decay**k * ce.sum() / n
        hit = torch.zeros_like(sel)
        hit[sel] = (logp.argmax(-1) == p.argmax(-1)) & ok
        run &= hit
        lead += run
        chain += run[first].sum()
        loss_sum[k], correct[k], count[k] = ce.detach().sum(), hit.sum(), sel.sum()
        ids, idx = _shift(ids, 0), _shift(idx, -1)
    weight = sum(decay**k for k in range(steps))
    rounds_sum, rounds = walk_rounds_loop(first.cpu(), lead.cpu())
    stats = TTTStats(loss_sum.cpu(), correct.cpu(), count.cpu(), chain.detach().cpu(), rounds_sum, rounds)
    return total / weight, stats


def walk_rounds_loop(first: torch.Tensor, lead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, rounds) of greedy verify rounds walked over each row of `[B, S]` loss slots `first`, where
    slot t's round accepts `lead[t]` drafted tokens and the bonus: the next round starts at t + lead[t] + 1."""
    tokens = rounds = 0
    for row_first, row_lead in zip(first.tolist(), lead.tolist(), strict=True):
        t = 0
        while t < len(row_first):
            if not row_first[t]:
                t += 1
                continue
            tokens, rounds = tokens + row_lead[t] + 1, rounds + 1
            t += row_lead[t] + 1
    return torch.tensor(float(tokens)), torch.tensor(float(rounds))
