"""Generation requests: what a replica is asked to continue, and how (the contract for `generate`).

A request is a prompt (token ids) and `GenerationParams`. Request j of a batch samples with seed
`params.seeds[j]`, or `params.seed + j` without `seeds`, so a request's answer depends on the request alone:
a shard re-run on another replica (failover) gives the same tokens on the same hardware.
The answer holds the new tokens only, up to and including a stop id when one is emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

from eagle_ray.contract import InvalidBatchError, ModelInfo, PackedBatch


def check_sampling(temperature: float, top_p: float) -> None:
    """The sampling settings every request shares (generation here, speculative decoding in `draft/tree.py`)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    seeds: tuple[int, ...] | None = None  # one per request of the batch, overriding `seed`

    def seed_of(self, j: int) -> int:
        return self.seeds[j] if self.seeds is not None else self.seed + j

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_p)

    def check_fits(self, batch: PackedBatch, info: ModelInfo) -> None:
        """`InvalidBatchError` naming the first prompt whose answer would run past the target's context."""
        if self.seeds is not None and len(self.seeds) != batch.num_sequences:
            raise ValueError(f"{len(self.seeds)} seeds for {batch.num_sequences} prompts")
        for i, n in enumerate(batch.seqlens):
            if n + self.max_new_tokens > info.max_context:
                raise InvalidBatchError(
                    "sequence_too_long",
                    f"prompt of {n} tokens + max_new_tokens {self.max_new_tokens} exceeds the target's context "
                    f"{info.max_context}",
                    sequence=i,
                )
