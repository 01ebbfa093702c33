"""A synthetic target: a BENCHMARK STAND-IN, never a model and never a test of an engine.

`SyntheticTarget` speaks the supervision contract (`ModelInfo`, correctly shaped unshifted
`Supervision`, embedding and lm_head weights) and charges for compute by SLEEPING
`num_tokens / tokens_per_s` per forward. The pool, the object store, the feed and the
trainers then run for real while the model costs nothing, so a cluster simulator can put
dozens of "replicas" on a 2-core machine. Load it as engine "synthetic":
`PooledTargetModel("synthetic", engine="synthetic", engine_kwargs={"tokens_per_s": 20_000})`.

The values are not a model's: slot t's last hidden state is its token id in every channel and
the aux states repeat it three times (cheap to write, and a reader can tell which token a row
belongs to; exact in float32, and in bfloat16 for ids below 256).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, resolve_aux_layer_ids
from eagle_ray.target import Eagle3TargetModel


class SyntheticEngine:
    """A `TargetEngine` that sleeps for the compute a real target would spend (benchmark stand-in)."""

    broken = False  # never out of step: the replica never retires it for that

    def __init__(
        self,
        tokens_per_s: float = 20_000.0,
        hidden: int = 64,
        vocab_size: int = 32_000,
        num_layers: int = 32,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        max_context: int = 1 << 20,
        kv_capacity_tokens: int = 1 << 20,
        seed: int = 0,
    ):
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0 (math.inf: no sleep), got {tokens_per_s}")
        self.tokens_per_s = float(tokens_per_s)
        self.seed = seed
        self.info = ModelInfo(
            hidden_size=hidden,
            vocab_size=vocab_size,
            num_layers=num_layers,
            aux_layer_ids=tuple(resolve_aux_layer_ids(aux_layer_ids, num_layers)),
            # bf16 by default: the bytes per token a real target ships
            dtype=dtype or torch.bfloat16,
            max_context=max_context,
            kv_capacity_tokens=kv_capacity_tokens,
        )
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.forwards = 0
        self.busy_s = 0.0  # time inside forward, sleep included: tokens / busy_s is the rate delivered

    def compute_seconds(self, num_tokens: int) -> float:
        """What a forward of `num_tokens` costs here: the sleep plus the (small) cost of writing the output."""
        return 0.0 if math.isinf(self.tokens_per_s) else num_tokens / self.tokens_per_s

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        t0 = time.perf_counter()
        ids = batch.input_ids
        n, h = ids.numel(), self.info.hidden_size
        last = ids.to(self.info.dtype)[:, None].expand(n, h).contiguous()
        aux = last.repeat(1, 3)
        logits = None
        if return_logits:
            logits = torch.zeros(n, self.info.vocab_size, dtype=torch.float32)
            logits[torch.arange(n), ids] = 1.0
        # unshifted, as every engine returns it: `Supervision.shifted()` is the contract's one shift
        sup = Supervision(ids, batch.loss_mask, batch.cu_seqlens, aux, last, logits)
        # the output's own cost counts against the budget, so the rate is the configured one, not less
        left = self.compute_seconds(n) - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        self.forwards += 1
        self.busy_s += time.perf_counter() - t0
        return sup

    def _weights_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            g = torch.Generator().manual_seed(self.seed)
            shape = (self.info.vocab_size, self.info.hidden_size)
            self._weights = tuple((torch.randn(shape, generator=g) * 0.02).to(self.info.dtype) for _ in range(2))  # type: ignore[assignment]
        return self._weights  # type: ignore[return-value]

    def input_embeddings(self) -> torch.Tensor:
        return self._weights_once()[0]

    def lm_head_weight(self) -> torch.Tensor:
        return self._weights_once()[1]

    def close(self) -> None:
        self._weights = None


class SyntheticTarget(Eagle3TargetModel):
    """Benchmark stand-in for an EAGLE-3 target (engine "synthetic"): contract-shaped supervision at a
    configured `tokens_per_s`, paid for by sleeping. Not a model; nothing it returns is a prediction."""

    @classmethod
    def from_pretrained(cls, model_path: str = "synthetic", **kwargs: Any) -> SyntheticTarget:
        """`model_path` is a label only; `kwargs`: `SyntheticEngine`'s, and what the pool passes every engine
        (trust_remote_code, ...), ignored."""
        known = inspect.signature(SyntheticEngine).parameters
        return cls(SyntheticEngine(**{k: v for k, v in kwargs.items() if k in known}))
