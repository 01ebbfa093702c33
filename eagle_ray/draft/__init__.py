"""The EAGLE-3 draft side (no Ray here): vocabulary, network, TTT loss, export, speculative decoding."""

from eagle_ray.draft.decode import speculative_decode, target_decode
from eagle_ray.draft.export import load_draft, load_nemo_draft, save_draft, save_nemo, save_speculators
from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
from eagle_ray.draft.speculate import SpecDecodeResult, speculative_greedy, target_greedy
from eagle_ray.draft.tree import SpecParams
from eagle_ray.draft.ttt import TTTStats, teacher_targets, ttt_loss
from eagle_ray.draft.vocab import DraftVocab, build_draft_vocab, count_loss_tokens

__all__ = [
    "DraftVocab",
    "Eagle3Draft",
    "Eagle3DraftConfig",
    "SpecDecodeResult",
    "SpecParams",
    "TTTStats",
    "build_draft_vocab",
    "count_loss_tokens",
    "load_draft",
    "load_nemo_draft",
    "save_draft",
    "save_nemo",
    "save_speculators",
    "speculative_decode",
    "speculative_greedy",
    "target_decode",
    "target_greedy",
    "teacher_targets",
    "ttt_loss",
]
