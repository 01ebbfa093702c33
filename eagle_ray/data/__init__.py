"""Chat data -> PackedBatches for the target pool: streaming readers, tokenizers, chat templates,
loss masks, packing, seekable deterministic order. Ray only once it is up: blocks are then prepared in
Ray tasks (`parallel.py`, imported then), else in this process.

Names are imported lazily (PEP 562), as in `eagle_ray/__init__.py`: a job's `--help` and the record types
(`records.py`) come without torch.
"""

from __future__ import annotations

from eagle_ray._lazy import lazy_exports

_MODULE_OF = {
    "make_batch_source": "eagle_ray.data.build",
    "Sample": "eagle_ray.data.encode",
    "Position": "eagle_ray.data.jsonstream",
    "RawRecord": "eagle_ray.data.jsonstream",
    "read_records": "eagle_ray.data.jsonstream",
    "Conversation": "eagle_ray.data.records",
    "parse_record": "eagle_ray.data.records",
    "iter_conversations": "eagle_ray.data.sharegpt",
    "iter_texts": "eagle_ray.data.sharegpt",
    "sharegpt_path": "eagle_ray.data.sharegpt",
    "ChatBatchSource": "eagle_ray.data.source",
    "REPAIRS": "eagle_ray.data.stats",
    "SKIP_REASONS": "eagle_ray.data.stats",
    "DataError": "eagle_ray.data.stats",
    "DataStats": "eagle_ray.data.stats",
    "LLAMA3_SPECIAL_TOKENS": "eagle_ray.data.templates",
    "ChatTemplate": "eagle_ray.data.templates",
    "get_template": "eagle_ray.data.templates",
    "HFTokenizer": "eagle_ray.data.tokenizers",
    "QwenBPETokenizer": "eagle_ray.data.tokenizers",
    "Tokenizer": "eagle_ray.data.tokenizers",
    "load_tokenizer": "eagle_ray.data.tokenizers",
}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
