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
from eagle_ray.data import DataError, DataStats, iter_texts, load_tokenizer, make_batch_source, sharegpt_path
from eagle_ray.draft import (
    DraftVocab,
    Eagle3Draft,
    Eagle3DraftConfig,
    SpecDecodeResult,
    TTTStats,
    build_draft_vocab,
    count_loss_tokens,
    load_draft,
    save_draft,
    speculative_greedy,
    ttt_loss,
)
from eagle_ray.engines.sglang import verify_eagle3_export
from eagle_ray.offline import OfflineSupervision, dump_supervision
from eagle_ray.pool import PooledTargetModel, ShardQuarantinedError, ShardResult
from eagle_ray.target import (
    Eagle3TargetBatch,
    Eagle3TargetModel,
    HFEagle3TargetModel,
    SGLangEagle3TargetModel,
    load_target,
)
from eagle_ray.tiny import build_tiny_target, markov_sequences, pretrain_tiny_target
from eagle_ray.train import DraftTrainConfig, TrainResult, train_draft

__all__ = [
    "DataError",
    "DataStats",
    "DraftTrainConfig",
    "DraftVocab",
    "Eagle3Draft",
    "Eagle3DraftConfig",
    "Eagle3TargetBatch",
    "Eagle3TargetModel",
    "HFEagle3TargetModel",
    "InvalidBatchError",
    "ModelInfo",
    "OfflineSupervision",
    "PackedBatch",
    "PooledTargetModel",
    "SGLangEagle3TargetModel",
    "ShardQuarantinedError",
    "ShardResult",
    "SpecDecodeResult",
    "Supervision",
    "TTTStats",
    "TrainResult",
    "build_draft_vocab",
    "build_tiny_target",
    "count_loss_tokens",
    "default_aux_layer_ids",
    "dump_supervision",
    "iter_texts",
    "load_draft",
    "load_target",
    "load_tokenizer",
    "make_batch_source",
    "markov_sequences",
    "pack_padded",
    "pretrain_tiny_target",
    "resolve_aux_layer_ids",
    "save_draft",
    "sharegpt_path",
    "shift_left",
    "speculative_greedy",
    "train_draft",
    "ttt_loss",
    "validate_packed",
    "verify_eagle3_export",
]
