"""eagle_ray: serve an EAGLE-3 target model (SGLang or transformers) to draft trainers on Ray."""

from eagle_ray.contract import (
    InvalidBatchError,
    ModelInfo,
    PackedBatch,
    Supervision,
    default_aux_layer_ids,
    pack_padded,
    resolve_aux_layer_ids,
    shift_left,
    validate_packed,
)
from eagle_ray.draft import DraftVocab, build_draft_vocab, count_loss_tokens
from eagle_ray.pool import PooledTargetModel, ShardQuarantinedError, ShardResult
from eagle_ray.target import (
    Eagle3TargetBatch,
    Eagle3TargetModel,
    HFEagle3TargetModel,
    SGLangEagle3TargetModel,
    load_target,
)
from eagle_ray.tiny import build_tiny_target

__all__ = [
    "DraftVocab",
    "Eagle3TargetBatch",
    "Eagle3TargetModel",
    "HFEagle3TargetModel",
    "InvalidBatchError",
    "ModelInfo",
    "PackedBatch",
    "PooledTargetModel",
    "SGLangEagle3TargetModel",
    "ShardQuarantinedError",
    "ShardResult",
    "Supervision",
    "build_draft_vocab",
    "build_tiny_target",
    "count_loss_tokens",
    "default_aux_layer_ids",
    "load_target",
    "pack_padded",
    "resolve_aux_layer_ids",
    "shift_left",
    "validate_packed",
]
