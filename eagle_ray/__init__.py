"""eagle_ray: serve an EAGLE-3 target model (SGLang or transformers) to draft trainers on Ray.

The public names are imported lazily (PEP 562), each from its submodule on first use, so the
Ray-free parts (contract, engines, draft, target) import on a machine without Ray or SGLang;
`from eagle_ray import X` and `eagle_ray.X` work as with eager imports.
"""

from __future__ import annotations

from eagle_ray._lazy import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "eagle_ray.contract": (
        "InvalidBatchError",
        "ModelInfo",
        "PackedBatch",
        "Supervision",
        "default_aux_layer_ids",
        "pack_padded",
        "resolve_aux_layer_ids",
        "shift_left",
        "validate_packed",
        "vllm_aux_layer_ids",
    ),
    "eagle_ray.data": ("DataError", "DataStats", "iter_texts", "load_tokenizer", "make_batch_source", "sharegpt_path"),
    "eagle_ray.draft": (
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
        "ttt_loss",
    ),
    "eagle_ray.engines.base": ("UnsupportedTargetError",),
    "eagle_ray.generation": ("GenerationParams",),
    "eagle_ray.engines.sglang": ("verify_eagle3_export", "verify_eagle3_exports"),
    "eagle_ray.offline": ("OfflineSupervision", "dump_supervision"),
    "eagle_ray.pool": ("ChaosMonkey", "PoolClient", "PooledTargetModel", "ShardResult", "connect_pool", "serve_pool"),
    "eagle_ray.target": (
        "Eagle3TargetBatch",
        "Eagle3TargetModel",
        "HFEagle3TargetModel",
        "SGLangEagle3TargetModel",
        "VocabMapping",
        "load_target",
        "target_distribution",
    ),
    "eagle_ray.tiny": (
        "TINY_ARCHS",
        "build_tiny_target",
        "distinct_ngram_ratio",
        "markov_batches",
        "markov_sequences",
        "pretrain_tiny_target",
        "tiny_config",
    ),
    "eagle_ray.train": ("DraftTrainConfig", "EpochCacheConfig", "OptimConfig", "TrainResult", "train_draft"),
    "eagle_ray.train.epoch_cache": ("CachedSupply", "EpochCache"),
    "eagle_ray.train.reader": ("CycledBatches", "DumpSupply", "PoolSupply", "RankReader"),
    "eagle_ray.train.sample_audit": ("audit_run", "expected_samples"),
    "eagle_ray.train.trackers": ("Tracker", "Trackers", "open_trackers"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
