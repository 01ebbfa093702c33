"""Draft trees as SGLang 0.5.23 builds and verifies them (pure functions, no model).

Building (`spec_utils.select_top_k_tokens`, `eagle_utils.organize_draft_results`): the draft's top
`topk` tokens after the context are level 0, each scored by its draft probability. Each later level
expands the `topk` best nodes of the level before (the beams) by their own top `topk` children,
scored by the product of draft probabilities along the path, and keeps every child as a candidate.
After `num_steps` levels the `num_draft_tokens - 1` best candidates form the tree under the root
(the newest verified token). `topk=1` is a chain of `num_steps` tokens.

Verifying: the target scores every node in one forward (each node sees its ancestors). Greedy: walk
from the root while a child carries the target's argmax. Sampling (`tree_speculative_sampling_target_only`
at its default thresholds): at each node draw one coin and walk the children in order, accepting the
first whose cumulative target probability passes it; if none does, sample the target's distribution
with the tried children removed. Drafts are deterministic (top-k), so each emitted token is distributed
exactly as the target's: the output is the target's own sampling, only faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eagle_ray.generation import check_sampling


@dataclass(frozen=True)
class SpecParams:
    """SGLang's `--speculative-eagle-topk`, `--speculative-num-steps`, `--speculative-num-draft-tokens`,
    and the request's sampling (`temperature` 0: greedy)."""

    topk: int = 1
    num_steps: int = 3
    num_draft_tokens: int = 4
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.topk < 1 or self.num_steps < 1 or self.num_draft_tokens < 2:
            raise ValueError(f"need topk >= 1, num_steps >= 1, num_draft_tokens >= 2: {self}")
        if self.topk == 1 and self.num_draft_tokens != self.num_steps + 1:
            raise ValueError(
                f"a chain (topk 1) of num_steps {self.num_steps} verifies num_draft_tokens = num_steps + 1 ="
                f" {self.num_steps + 1} tokens, got {self.num_draft_tokens} (SGLang's rule)"
            )
        most = self.topk + (self.num_steps - 1) * self.topk**2
        if self.num_draft_tokens - 1 > most:
            raise ValueError(
                f"num_draft_tokens {self.num_draft_tokens}: topk {self.topk} and num_steps {self.num_steps} draft"
                f" at most {most} candidates, so at most {most + 1} tokens"
            )
        check_sampling(self.temperature, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Candidates:
    """Every drafted candidate of a round: token, path score, parent (-1: the root), level."""

    tokens: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    levels: list[int] = field(default_factory=list)

    def add(self, token: int, score: float, parent: int, level: int) -> int:
        self.tokens.append(token)
        self.scores.append(score)
        self.parents.append(parent)
        self.levels.append(level)
        return len(self.tokens) - 1


def draft_level(
    c: Candidates, probs: torch.Tensor, token_of: torch.Tensor, topk: int, beams: list[int] | None, level: int
) -> tuple[list[int], list[int]]:
    """Add one level of candidates: the top `topk` tokens of each row of the draft's `probs [B, Vd]`.

    Row j was drafted from `beams[j]` (None at level 0: one row, the root's); a child's score is its
    beam's times its own probability; `token_of` maps draft ids to target ids. Returns the next beams
    (the best `topk` new candidates, best first) and the row each came from.
    """
    top = probs.float().topk(topk, dim=-1)
    new = []
    for j in range(probs.shape[0]):
        parent, base = (-1, 1.0) if beams is None else (beams[j], c.scores[beams[j]])
        for s, t in zip(top.values[j].tolist(), top.indices[j].tolist(), strict=True):
            new.append((c.add(int(token_of[t]), base * s, parent, level), j))
    best = sorted(new, key=lambda cj: (-c.scores[cj[0]], cj[0]))[:topk]
    return [cj[0] for cj in best], [cj[1] for cj in best]


@dataclass(frozen=True)
class Tree:
    """Node 0 is the root (the newest verified token); `parents[0]` is -1; parents precede children."""

    tokens: list[int]
    parents: list[int]

    @property
    def depths(self) -> list[int]:
        d = [0] * len(self.tokens)
        for i in range(1, len(d)):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self, node: int) -> list[int]:
        return [i for i in range(1, len(self.tokens)) if self.parents[i] == node]

    def visible(self) -> torch.Tensor:
        """`[n, n]` bool: node i sees node j when j is i or an ancestor of i."""
        n = len(self.tokens)
        m = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            m[i] |= m[self.parents[i]]
        return m


def select_tree(root: int, c: Candidates, num_draft_tokens: int) -> Tree:
    """The root and the `num_draft_tokens - 1` best candidates, in candidate order (SGLang sorts the picks).

    Ties go to the earlier candidate; a parent precedes its children and scores at least as high,
    so the picks hold every ancestor of every pick.
    """
    order = sorted(range(len(c.tokens)), key=lambda i: (-c.scores[i], i))[: num_draft_tokens - 1]
    picked = sorted(order)
    node_of = {cand: k + 1 for k, cand in enumerate(picked)}
    parents = [-1] + [0 if c.parents[i] < 0 else node_of[c.parents[i]] for i in picked]
    return Tree([root] + [c.tokens[i] for i in picked], parents)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The target's sampling distribution per row: softmax(logits / T), then top-p renormalised (as SGLang)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def verify_greedy(tree: Tree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Accepted nodes after the root (in order) and the bonus token, from the target's `logits [n, V]`."""
    best = logits.argmax(-1).tolist()
    path, node = [], 0
    while True:
        nxt = next((ch for ch in tree.children(node) if tree.tokens[ch] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)
        node = nxt


def verify_sampling(tree: Tree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """As `verify_greedy`, sampling: `probs [n, V]` the target's distributions at the nodes."""
    path, node = [], 0
    while True:
        p = probs[node]
        coin = float(torch.rand((), generator=generator))
        acc, tried, nxt = 0.0, [], None
        for ch in tree.children(node):
            acc += float(p[tree.tokens[ch]])
            if coin < acc:
                nxt = ch
                break
            tried.append(tree.tokens[ch])
        if nxt is None:
            residual = p.clone()
            residual[tried] = 0.0
            if float(residual.sum()) <= 0:  # the children held all the mass (rounding): sample among them
                residual = p
            return path, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        path.append(nxt)
        node = nxt
