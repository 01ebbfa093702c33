"""The EAGLE-3 draft side (no Ray here): vocabulary mapping so far; the draft network, TTT loss and export follow."""

from eagle_ray.draft.vocab import DraftVocab, build_draft_vocab, count_loss_tokens

__all__ = ["DraftVocab", "build_draft_vocab", "count_loss_tokens"]
