"""Chat data -> PackedBatches for the target pool: streaming readers, tokenizers, chat templates,
loss masks, packing, seekable deterministic order. Ray only once it is up: blocks are then prepared in
Ray tasks (`parallel.py`, imported then), else in this process."""

from eagle_ray.data.build import make_batch_source
from eagle_ray.data.encode import Sample
from eagle_ray.data.jsonstream import Position, RawRecord, read_records
from eagle_ray.data.records import Conversation, parse_record
from eagle_ray.data.sharegpt import iter_conversations, iter_texts, sharegpt_path
from eagle_ray.data.source import ChatBatchSource
from eagle_ray.data.stats import REPAIRS, SKIP_REASONS, DataError, DataStats
from eagle_ray.data.templates import LLAMA3_SPECIAL_TOKENS, ChatTemplate, get_template
from eagle_ray.data.tokenizers import HFTokenizer, QwenBPETokenizer, Tokenizer, load_tokenizer

__all__ = [
    "LLAMA3_SPECIAL_TOKENS",
    "REPAIRS",
    "SKIP_REASONS",
    "ChatBatchSource",
    "ChatTemplate",
    "Conversation",
    "DataError",
    "DataStats",
    "HFTokenizer",
    "Position",
    "QwenBPETokenizer",
    "RawRecord",
    "Sample",
    "Tokenizer",
    "get_template",
    "iter_conversations",
    "iter_texts",
    "load_tokenizer",
    "make_batch_source",
    "parse_record",
    "read_records",
    "sharegpt_path",
]
