"""Training-time test (TTT): the EAGLE-3 loss, unrolled over k draft steps, and its metrics.

Teacher: the target's next-token distribution rebuilt in the trainer from the shipped last
hidden states and the target lm_head (sent once), only at loss-masked slots. The full
vocabulary is touched once per slot, to find the target's argmax (the position mask: is the
target's choice inside the draft vocabulary?); only draft-vocabulary probabilities are kept.

Step k at slot t (shifted view, see contract.shift_left): input token x[t+1+k], position t+k,
hidden = step k-1's output at t (step 0: fc(aux[t])), teacher = target's distribution at
t+1+k. Loss: soft cross-entropy over the draft vocabulary where the target's argmax is in it,
averaged over loss-masked slots, then the 0.8^k-weighted mean over the k steps (NeMo AutoModel's
normalisation: about ln(draft vocabulary) at initialisation whatever the step count, so a loss
compares across runs and peers, and the learning rate does not depend on `steps`; SpecForge reports
the unnormalised sum, which is this times sum_k 0.8^k).

Acceptance estimates (greedy, chain of `steps` drafted tokens):
- `acceptance_product` = 1 + sum_k prod_{j<=k} acc_j: the issue's formula; treats steps as
  independent, so it overestimates when errors cluster.
- `acceptance_chain` = 1 + mean over slots of the number of leading steps the draft gets right
  at that slot: the accepted length a verifier would see if the data were the target's own
  greedy text (teacher forcing feeds dataset tokens, not the draft's). Better founded; the
  evaluator in `speculate.py` measures the real thing.
- `acceptance_rounds`: the verify rounds a greedy decoder would run over the text, walked: a round at
  the first loss slot accepts its leading correct steps plus the bonus token, the next round starts
  after them. Rounds start where the last one failed, at harder slots than the average one, so this
  is below `acceptance_chain`; on the target's own greedy text it is what a server measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eagle_ray.contract import Supervision
from eagle_ray.draft.model import Eagle3Draft, StepCache

DEFAULT_TTT_STEPS = 7
DEFAULT_STEP_DECAY = 0.8


@dataclass
class Teacher:
    probs: torch.Tensor  # [M, D] float32: target distribution over the draft vocabulary
    in_draft: torch.Tensor  # [M] bool: the target's argmax lies in the draft vocabulary
    index: torch.Tensor  # [N] int64: row of `probs` for each slot, -1 where the loss mask is 0


def teacher_targets(
    last_hidden: torch.Tensor,
    loss_mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    draft_ids: torch.Tensor,
    chunk_rows: int = 1024,
) -> Teacher:
    """Teacher distributions at loss-masked slots; full-vocabulary logits live one chunk at a time."""
    rows = loss_mask.bool().nonzero().squeeze(-1)
    index = torch.full_like(loss_mask, -1, dtype=torch.long)
    index[rows] = torch.arange(rows.numel(), device=rows.device)
    in_vocab = torch.zeros(lm_head_weight.shape[0], dtype=torch.bool, device=draft_ids.device)
    in_vocab[draft_ids] = True
    probs, in_draft = [], []
    with torch.no_grad():
        for part in rows.split(chunk_rows):
            logits = last_hidden[part].to(lm_head_weight.dtype) @ lm_head_weight.T
            in_draft.append(in_vocab[logits.argmax(-1)])
            probs.append(torch.softmax(logits[:, draft_ids].float(), dim=-1))
    d = draft_ids.numel()
    return Teacher(
        probs=torch.cat(probs) if probs else last_hidden.new_zeros(0, d, dtype=torch.float32),
        in_draft=torch.cat(in_draft) if in_draft else torch.zeros(0, dtype=torch.bool, device=rows.device),
        index=index,
    )


@dataclass
class TTTStats:
    """Sums over slots (add them across batches and workers, then `summary()`)."""

    loss_sum: torch.Tensor  # [K] soft CE summed over loss-masked slots
    correct: torch.Tensor  # [K] slots where the draft's argmax equals the target's
    count: torch.Tensor  # [K] loss-masked slots at step k
    chain_sum: torch.Tensor  # [] sum over step-0 slots of leading correct steps
    rounds_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # [] tokens of the walked rounds
    rounds: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # [] walked rounds

    def __add__(self, other: TTTStats) -> TTTStats:
        return TTTStats(*[a + b for a, b in zip(self.as_tensor(), other.as_tensor(), strict=True)])

    def as_tensor(self) -> list[torch.Tensor]:
        return [self.loss_sum, self.correct, self.count, self.chain_sum, self.rounds_sum, self.rounds]

    def flat(self) -> torch.Tensor:
        """One float64 vector (for an all-reduce)."""
        return torch.cat([t.double().reshape(-1) for t in self.as_tensor()])

    @staticmethod
    def from_flat(v: torch.Tensor) -> TTTStats:
        k = (v.numel() - 3) // 3
        return TTTStats(v[:k], v[k : 2 * k], v[2 * k : 3 * k], v[3 * k], v[3 * k + 1], v[3 * k + 2])

    def summary(self) -> dict[str, float | list[float]]:
        count = self.count.double().clamp(min=1)
        acc = (self.correct.double() / count).tolist()
        product, run = 1.0, 1.0
        for a in acc:
            run *= a
            product += run
        return {
            "loss": (self.loss_sum.double() / count).tolist(),
            "acc": acc,
            "tokens": int(self.count[0]),
            "acceptance_product": product,
            "acceptance_chain": 1.0 + float(self.chain_sum) / float(count[0]),
            "acceptance_rounds": float(self.rounds_sum) / max(float(self.rounds), 1.0),
        }


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


def ttt_loss(
    draft: Eagle3Draft,
    sup: Supervision,
    lm_head_weight: torch.Tensor,
    steps: int = DEFAULT_TTT_STEPS,
    decay: float = DEFAULT_STEP_DECAY,
) -> tuple[torch.Tensor, TTTStats]:
    """The TTT loss of one packed (unshifted) supervision record (the decay-weighted mean over steps), and its sums."""
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
    cache = StepCache(base_mask=causal[None] & valid[:, None, :])
    positions = torch.arange(width, device=device).expand(b, width)
    first = idx >= 0
    run = first.clone()  # slots whose chain is still all-correct
    lead = torch.zeros(first.shape, dtype=torch.long, device=device)  # per slot: its leading correct steps
    chain = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    loss_sum, correct, count = (torch.zeros(steps, device=device) for _ in range(3))
    for k in range(steps):
        hidden = draft.step(ids, hidden, positions + k, cache)
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
    rounds_sum, rounds = walk_rounds(first.cpu(), lead.cpu())
    stats = TTTStats(loss_sum.cpu(), correct.cpu(), count.cpu(), chain.detach().cpu(), rounds_sum, rounds)
    return total / weight, stats


def walk_rounds(first: torch.Tensor, lead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class TTTObjective(torch.nn.Module):
    """`ttt_loss` as a module's forward, so DistributedDataParallel can wrap it (DDP syncs gradients
    of parameters used in `forward`; calling the draft's methods directly would bypass it)."""

    def __init__(self, draft: Eagle3Draft, steps: int = DEFAULT_TTT_STEPS, decay: float = DEFAULT_STEP_DECAY):
        super().__init__()
        self.draft, self.steps, self.decay = draft, steps, decay

    def forward(self, sup: Supervision, lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, TTTStats]:
        return ttt_loss(self.draft, sup, lm_head_weight, self.steps, self.decay)
