"""Chat templates: a conversation -> (input_ids, loss_mask), loss on exactly what the assistant says.

The loss mask is 1 on each assistant turn's content tokens and on the token that ends that turn
(`<|im_end|>` / `<|eot_id|>`: the draft must learn to stop), 0 on system and user turns and on
all scaffolding (BOS, role headers, the newline after `<|im_end|>`).

Built-in templates encode piece by piece: special ids come from the tokenizer by name (a clear
error when it lacks one) and every text piece is encoded on its own, so message text can never
turn into a special token and assistant content is tokenized as the target generates it (after a
prompt that ends with the role header).

- "chatml" (alias "qwen"): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn (Qwen 2.5 / 3).
- "llama3": `<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`
  per turn, content stripped as Meta's template does (no Llama 3.1 date/system preamble).
- "hf": the transformers tokenizer's own `chat_template`, by rendering prefixes: the assistant
  turn k spans from the end of `render(turns[:k], add_generation_prompt=True)` to the end of
  `render(turns[:k+1])` minus trailing whitespace. Each span and each gap is tokenized separately
  (special spellings parsed). A template whose prefixes are not prefixes of the full rendering
  (e.g. one that rewrites earlier turns) is rejected for that record ("bad_text").
  `return_assistant_tokens_mask` is not used: it needs `{% generation %}` markers few templates have.

"auto" picks by the tokenizer's special tokens: Llama-3's -> "llama3", `<|im_start|>`/`<|im_end|>`
-> "chatml", else a transformers chat template -> "hf" ("tokenizer" is another name for "hf").
`system_prompt` is inserted as the first turn when a conversation has no system turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eagle_ray.data.records import Message
from eagle_ray.data.tokenizers import HFTokenizer, Tokenizer

Encoded = tuple[list[int], list[int]]  # input_ids, loss_mask
Encode = Callable[[Sequence[Message]], Encoded]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    special_tokens: tuple[str, ...]  # the tokenizer must have these
    build: Callable[[Tokenizer, dict[str, int]], Encode]
    system_prompt: str | None = None

    def bind(self, tok: Tokenizer) -> Encode:
        """Resolve the special ids once; the result encodes conversations."""
        missing = [t for t in self.special_tokens if t not in tok.special_tokens]
        if missing:
            hint = ' (a Qwen BPE can map them: load_tokenizer("qwen", extra_special_tokens=...))'
            raise ValueError(
                f"chat template {self.name!r} needs special tokens {missing} that tokenizer {tok.name!r} lacks"
                + (hint if not isinstance(tok, HFTokenizer) else "")
            )
        encode = self.build(tok, {t: tok.special_tokens[t] for t in self.special_tokens})
        if self.system_prompt is None:
            return encode
        system = ("system", self.system_prompt)
        return lambda messages: encode(messages if messages[0][0] == "system" else [system, *messages])


class _Builder:
    """Appends pieces with their mask value; memoizes the few scaffolding strings."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.memo = tok, {}
        self.ids: list[int] = []
        self.mask: list[int] = []

    def new(self) -> _Builder:
        b = _Builder(self.tok)
        b.memo = self.memo
        return b

    def add(self, ids: list[int], loss: bool) -> None:
        self.ids += ids
        self.mask += [int(loss)] * len(ids)

    def text(self, s: str, loss: bool = False) -> None:
        self.add(self.tok.encode(s), loss)

    def fixed(self, s: str) -> None:
        if s not in self.memo:
            self.memo[s] = self.tok.encode(s)
        self.add(self.memo[s], False)


def _chatml(tok: Tokenizer, sp: dict[str, int]) -> Encode:
    start, end, proto = sp["<|im_start|>"], sp["<|im_end|>"], _Builder(tok)

    def encode(messages: Sequence[Message]) -> Encoded:
        b = proto.new()
        for role, content in messages:
            a = role == "assistant"
            b.add([start], False)
            b.fixed(f"{role}\n")
            b.text(content, a)
            b.add([end], a)
            b.fixed("\n")
        return b.ids, b.mask

    return encode


def _llama3(tok: Tokenizer, sp: dict[str, int]) -> Encode:
    proto = _Builder(tok)
    bos, head, head_end, eot = (sp[t] for t in LLAMA3_SPECIAL_TOKENS)

    def encode(messages: Sequence[Message]) -> Encoded:
        b = proto.new()
        b.add([bos], False)
        for role, content in messages:
            a = role == "assistant"
            b.add([head], False)
            b.fixed(role)
            b.add([head_end], False)
            b.fixed("\n\n")
            b.text(content.strip(), a)
            b.add([eot], a)
        return b.ids, b.mask

    return encode


def _hf(tok: Tokenizer, sp: dict[str, int]) -> Encode:
    if not isinstance(tok, HFTokenizer) or not getattr(tok.hf, "chat_template", None):
        raise ValueError(f"chat template 'hf' needs a transformers tokenizer with a chat_template, got {tok.name!r}")

    def render(messages: Sequence[Message], prompt: bool = False) -> str:
        chat = [{"role": r, "content": c} for r, c in messages]
        return tok.hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)

    def encode(messages: Sequence[Message]) -> Encoded:
        full = render(messages)
        cuts, spans = [0], []
        for k, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            before, through = render(messages[:k], prompt=True), render(messages[: k + 1])
            if not (full.startswith(before) and full.startswith(through)):
                raise ValueError(f"the chat template renders turn {k} differently once later turns follow")
            spans.append(len(cuts))
            cuts += [len(before), len(through.rstrip())]
        cuts.append(len(full))
        b = _Builder(tok)
        for i in range(len(cuts) - 1):
            b.add(tok.encode_rendered(full[cuts[i] : cuts[i + 1]]), i in spans)
        return b.ids, b.mask

    return encode


LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_TEMPLATES = {
    "chatml": (("<|im_start|>", "<|im_end|>"), _chatml),
    "llama3": (LLAMA3_SPECIAL_TOKENS, _llama3),
    "hf": ((), _hf),
}
_ALIASES = {"qwen": "chatml", "llama-3": "llama3", "tokenizer": "hf"}


def get_template(name: str, system_prompt: str | None = None, tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """Chat template "chatml" / "qwen", "llama3", "hf" / "tokenizer" (its own), or "auto" (needs `tokenizer`)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "auto":
        if tokenizer is None:
            raise ValueError("chat template 'auto' is picked from a tokenizer: pass tokenizer=")
        key = auto_template(tokenizer)
    if key not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {sorted([*_TEMPLATES, *_ALIASES])}")
    specials, build = _TEMPLATES[key]
    return ChatTemplate(key, specials, build, system_prompt)


def auto_template(tok: Tokenizer) -> str:
    """The built-in template a tokenizer's special tokens call for, else its own chat template."""
    if all(t in tok.special_tokens for t in LLAMA3_SPECIAL_TOKENS):
        return "llama3"
    if all(t in tok.special_tokens for t in _TEMPLATES["chatml"][0]):
        return "chatml"
    if isinstance(tok, HFTokenizer) and getattr(tok.hf, "chat_template", None):
        return "hf"
    raise ValueError(f"no chat template fits tokenizer {tok.name!r}: it has neither ChatML nor Llama-3 special tokens")
