"""Training-time test (TTT): the EAGLE-3 loss, unrolled over k draft steps, and its metrics.

Teacher: the target's next-token distribution rebuilt in the trainer from the shipped last
hidden states and the target lm_head (sent once), only at loss-masked slots. The full
vocabulary is touched once per slot, to find the target's argmax (the position mask: is the
target's choice inside the draft vocabulary?); only draft-vocabulary probabilities are kept.

The draft runs on the packed slots `[N]` (`cu_seqlens`), never padded, and its attention has no dense
mask (`draft/attention.py`); the padded trainer it replaced is the reference the tests hold it to
(`eagle_ray.testing.padded_ttt`). Memory is linear in tokens: the draft-vocabulary cross-entropy runs
over chunks of slots, and `checkpoint=True` recomputes each step's layer in the backward pass.

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
from typing import Any

import torch
import torch.nn.functional as F

from eagle_ray.contract import Supervision
from eagle_ray.draft.attention import PackedLayout, resolve_backend
from eagle_ray.draft.model import Eagle3Draft, TTTState

DEFAULT_TTT_STEPS = 7
DEFAULT_STEP_DECAY = 0.8


@dataclass
class Teacher:
    probs: torch.Tensor  # [M, D] float32: target distribution over the draft vocabulary
    in_draft: torch.Tensor  # [M] bool: the target's argmax lies in the draft vocabulary
    index: torch.Tensor  # [N] int64: row of `probs` for each slot, -1 where the loss mask is 0
    top: torch.Tensor  # [M] int64: each row's most likely draft token (argmax of `probs`)


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
    probs, in_draft, top = [], [], []
    with torch.no_grad():
        for part in rows.split(chunk_rows):
            logits = last_hidden[part].to(lm_head_weight.dtype) @ lm_head_weight.T
            in_draft.append(in_vocab[logits.argmax(-1)])
            probs.append(torch.softmax(logits[:, draft_ids].float(), dim=-1))
            top.append(probs[-1].argmax(-1))
    d = draft_ids.numel()
    return Teacher(
        probs=torch.cat(probs) if probs else last_hidden.new_zeros(0, d, dtype=torch.float32),
        in_draft=torch.cat(in_draft) if in_draft else torch.zeros(0, dtype=torch.bool, device=rows.device),
        index=index,
        top=torch.cat(top) if top else torch.zeros(0, dtype=torch.long, device=rows.device),
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
    def flat_size(ttt_steps: int) -> int:
        """The length of `flat()` for a `ttt_steps` unroll: three [K] vectors and three scalars."""
        return 3 * ttt_steps + 3

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


class _SoftCrossEntropy(torch.autograd.Function):
    """`sum_r weight · ok_r · CE(p_r, log_softmax(x_r @ W.T))` over rows x_r, whose teacher is `teacher`'s row
    `rows[r]`, a chunk of rows at a time, so the `[rows, draft_vocab]` logits (and the gathered teacher rows) never
    exist at once; the gradients are taken in the forward pass (as Liger's fused linear cross-entropy does),
    leaving `[rows, H]` and `[D, H]` to keep. Also returns each row's CE and whether its argmax is the teacher's
    (inside the draft vocabulary)."""

    @staticmethod
    def forward(ctx, x, w, teacher: Teacher, rows, weight: float, chunk: int):
        ce = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        hit = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        grad_x, grad_w = torch.empty_like(x), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for a in range(0, x.shape[0], chunk):
            r = rows[a : a + chunk]
            xc, p, okc = x[a : a + chunk], teacher.probs[r], teacher.in_draft[r]
            logp = F.log_softmax((xc @ w.T).float(), dim=-1)
            ce[a : a + chunk] = -(p * logp).sum(-1) * okc
            hit[a : a + chunk] = (logp.argmax(-1) == teacher.top[r]) & okc
            dlogits = ((logp.exp() * p.sum(-1, keepdim=True) - p) * (okc * weight)[:, None]).to(x.dtype)
            grad_x[a : a + chunk] = dlogits @ w.to(x.dtype)
            grad_w += (dlogits.T @ xc).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(ce, hit)
        return (ce * weight).sum(), ce, hit

    @staticmethod
    def backward(ctx, g, _ce, _hit):
        grad_x, grad_w = ctx.saved_tensors
        return g * grad_x, (g * grad_w).to(ctx.w_dtype), None, None, None, None


@dataclass
class _Step:
    """Step k's inputs, known before the loop starts (so the loop never waits on the host)."""

    ids: torch.Tensor  # [N] the token each slot reads at step k (0 past its document's end)
    rows: torch.Tensor  # [M_k] slots with a teacher at step k
    teacher: torch.Tensor  # [M_k] their rows of `Teacher.probs`


def _plan(ids: torch.Tensor, index: torch.Tensor, layout: PackedLayout, steps: int) -> list[_Step]:
    """Step k at slot t reads slot t+k's token and teacher, within t's document."""
    slot = torch.arange(ids.numel(), device=ids.device)
    plans = []
    for k in range(steps):
        src = slot + k
        inside = src < layout.end
        src = src.clamp(max=max(ids.numel() - 1, 0))
        idx = torch.where(inside, index[src], -1)
        rows = (idx >= 0).nonzero().squeeze(-1)
        plans.append(_Step(torch.where(inside, ids[src], 0), rows, idx[rows]))
    return plans


def ttt_loss(
    draft: Eagle3Draft,
    sup: Supervision,
    lm_head_weight: torch.Tensor,
    steps: int = DEFAULT_TTT_STEPS,
    decay: float = DEFAULT_STEP_DECAY,
    attention: str = "auto",
    checkpoint: bool = False,
    ce_chunk: int = 4096,
) -> tuple[torch.Tensor, TTTStats]:
    """The TTT loss of one packed (unshifted) supervision record (the decay-weighted mean over steps), and its sums.

    Runs on the packed slots: no padding, no dense mask (`draft/attention.py`). `attention`: a backend of
    `attention.BACKENDS`; `checkpoint`: recompute each step's draft layer in the backward pass (activation
    checkpointing) instead of keeping its activations; `ce_chunk`: rows per chunk of the draft-vocabulary
    cross-entropy.
    """
    if steps < 1:
        raise ValueError(f"ttt steps must be >= 1, got {steps}")
    device = draft.fc.weight.device
    s = sup.shifted()
    layout = PackedLayout.from_cu_seqlens(s.cu_seqlens.to(device))
    teacher = teacher_targets(
        s.last_hidden_states.to(device), s.loss_mask.to(device), lm_head_weight.to(device), draft.draft_ids
    )
    plans = _plan(s.input_ids.to(device), teacher.index, layout, steps)
    counts = [p.rows.numel() for p in plans]  # host ints: rows are sized already
    weight = sum(decay**k for k in range(steps))
    state = TTTState(layout, resolve_backend(attention, device))
    hidden = s.aux_hidden_states.to(device, draft.fc.weight.dtype)
    first = torch.zeros(layout.num_tokens, dtype=torch.bool, device=device)
    first[plans[0].rows] = True
    run = first.clone()  # slots whose chain is still all-correct
    lead = torch.zeros(first.shape, dtype=torch.long, device=device)  # per slot: its leading correct steps
    total = torch.zeros((), device=device)
    loss_sum, correct, chain = [], [], []
    for k, plan in enumerate(plans):
        hidden = _run_step(draft, plan.ids, hidden, layout.pos + k, state, checkpoint)
        x = draft.norm(hidden[plan.rows])
        step_loss, ce, hit_rows = _SoftCrossEntropy.apply(
            x, draft.lm_head.weight, teacher, plan.teacher, decay**k / max(counts[k], 1) / weight, ce_chunk
        )
        total = total + step_loss
        hit = torch.zeros_like(first)
        hit[plan.rows] = hit_rows
        run &= hit
        lead += run
        loss_sum.append(ce.sum())
        correct.append(hit_rows.sum())
        chain.append(run.sum())  # run only ever narrows `first`
    rounds_sum, rounds = walk_rounds(first, lead, layout)
    stats = TTTStats(
        torch.stack(loss_sum).detach().cpu(),
        torch.stack(correct).float().cpu(),
        torch.tensor(counts, dtype=torch.float32),
        torch.stack(chain).sum().float().cpu(),
        rounds_sum,
        rounds,
    )
    return total, stats


def _run_step(draft: Eagle3Draft, ids, hidden, positions, state: TTTState, checkpoint: bool) -> torch.Tensor:
    if not checkpoint or not torch.is_grad_enabled():
        return draft.step(ids, hidden, positions, state)

    def step(ids, hidden, positions, *kv):
        again = TTTState(state.layout, state.attention, list(zip(kv[::2], kv[1::2], strict=True)))
        return draft.step(ids, hidden, positions, again), *again.kv[-1]

    flat = [t for pair in state.kv for t in pair]
    out, k, v = torch.utils.checkpoint.checkpoint(step, ids, hidden, positions, *flat, use_reentrant=False)
    state.kv.append((k, v))
    return out


def walk_rounds(first: torch.Tensor, lead: torch.Tensor, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, rounds) of greedy verify rounds walked over each document's loss slots `first [N]`, where slot t's
    round accepts `lead[t]` drafted tokens and the bonus: the next round starts at the first loss slot from
    t + lead[t] + 1 on. The walk is a path in a forward-pointing graph: its nodes are marked by pointer doubling
    (log N vectorized rounds), not by a Python loop over slots."""
    n = first.numel()
    if n == 0:
        return torch.zeros(()), torch.zeros(())
    dev = first.device
    slot = torch.arange(n + 1, device=dev)
    # the first loss slot at or after each slot, in the same document; n (a sink) where there is none
    ahead = torch.where(first, slot[:n], n).flip(0).cummin(0).values.flip(0)
    ahead = torch.cat([ahead, ahead.new_full((1,), n)])
    end = torch.cat([layout.end, layout.end.new_full((1,), n)])
    nxt = ahead[(slot[:n] + lead + 1).clamp(max=n)]
    nxt = torch.cat([torch.where(nxt < end[:n], nxt, n), nxt.new_full((1,), n)])
    starts = ahead[layout.cu_seqlens[:-1]]
    jumps = [nxt]  # jumps[j][t]: the node 2^j steps on from t
    while (1 << len(jumps)) <= n:
        jumps.append(jumps[-1][jumps[-1]])
    # marks[t]: t begins a walked stretch of 2^j nodes; halve the stretches down to single nodes
    count = torch.zeros(n + 1, dtype=torch.long, device=dev)
    marks = count.index_add(0, starts, (starts < end[starts]).long()) > 0
    for jump in reversed(jumps):
        marks = marks | (count.index_add(0, jump, marks.long()) > 0)
    walked = marks[:n]
    return ((lead + 1) * walked).sum().float().cpu(), walked.sum().float().cpu()


class TTTObjective(torch.nn.Module):
    """`ttt_loss` as a module's forward, so DistributedDataParallel can wrap it (DDP syncs gradients
    of parameters used in `forward`; calling the draft's methods directly would bypass it)."""

    def __init__(
        self, draft: Eagle3Draft, steps: int = DEFAULT_TTT_STEPS, decay: float = DEFAULT_STEP_DECAY, **options: Any
    ):
        super().__init__()
        self.draft, self.steps, self.decay, self.options = draft, steps, decay, options

    def forward(self, sup: Supervision, lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, TTTStats]:
        return ttt_loss(self.draft, sup, lm_head_weight, self.steps, self.decay, **self.options)
