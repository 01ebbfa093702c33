"""Turn one parsed JSON record into a normalized conversation or a pre-tokenized sequence.

Three shapes: ShareGPT (`{"conversations": [{"from", "value"}]}`), OpenAI chat
(`{"messages": [{"role", "content"}]}`, content a string or a list of text parts) and
pre-tokenized (`{"input_ids": [...], "loss_mask": [...]}`). `kind="auto"` picks by key;
"messages" is another name for "openai".
A record that does not fit raises `RecordError(reason, detail)`; reasons are `stats.SKIP_REASONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("auto", "sharegpt", "openai", "messages", "pretokenized")

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}

Message = tuple[str, str]  # (role, content), role in user / assistant / system


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"[{reason}] {detail}")


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]  # optional system first, then user/assistant alternating, assistant last
    repairs: tuple[str, ...] = ()  # stats.REPAIRS applied


@dataclass(frozen=True)
class Tokens:
    input_ids: list[int]
    loss_mask: list[int]


def parse_record(value: Any, kind: str = "auto") -> Conversation | Tokens:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(value, dict):
        raise RecordError("bad_record", f"expected a JSON object, got {type(value).__name__}")
    if kind == "auto":
        kind = next((k for key, k in _KEYS if key in value), None)
        if kind is None:
            raise RecordError("missing_field", f"none of {[key for key, _ in _KEYS]} in keys {sorted(value)[:8]}")
    if kind == "pretokenized":
        return _tokens(value)
    key, role_key, text_key = _FIELDS[kind]
    turns = value.get(key)
    if turns is None:
        raise RecordError("missing_field", f"no '{key}' field")
    if not isinstance(turns, list):
        raise RecordError("bad_record", f"'{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError("empty_conversation", f"'{key}' is empty")
    return normalize([_turn(t, i, role_key, text_key) for i, t in enumerate(turns)])


_KEYS = (("conversations", "sharegpt"), ("messages", "openai"), ("input_ids", "pretokenized"))
_FIELDS = {
    "sharegpt": ("conversations", "from", "value"),
    "openai": ("messages", "role", "content"),
    "messages": ("messages", "role", "content"),
}


def _turn(turn: Any, i: int, role_key: str, text_key: str) -> Message:
    if not isinstance(turn, dict):
        raise RecordError("bad_record", f"turn {i} is a {type(turn).__name__}, not an object")
    for k in (role_key, text_key):
        if turn.get(k) is None:
            raise RecordError("missing_field", f"turn {i} has no '{k}'")
    raw_role, text = turn[role_key], turn[text_key]
    role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise RecordError("unknown_role", f"turn {i} has role {raw_role!r}")
    if isinstance(text, list):  # OpenAI content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in text):
            raise RecordError("bad_record", f"turn {i}: content parts other than text are not supported")
        text = "".join(p["text"] for p in text)
    if not isinstance(text, str):
        raise RecordError("bad_record", f"turn {i}: '{text_key}' must be a string, got {type(text).__name__}")
    return role, text


def normalize(messages: list[Message]) -> Conversation:
    """Check the turn structure, dropping leading assistant and trailing user turns (counted repairs)."""
    system = [messages[0]] if messages and messages[0][0] == "system" else []
    rest = messages[len(system) :]
    if any(role == "system" for role, _ in rest):
        raise RecordError("non_alternating", f"a system turn at position {len(system) + _first(rest, 'system')}")
    repairs = []
    lead = _first(rest, "user")
    if lead:
        repairs.append("leading_assistant_dropped")
    rest = rest[lead:]
    tail = _first(rest[::-1], "assistant")
    if tail:
        repairs.append("trailing_user_dropped")
    rest = rest[: len(rest) - tail]
    if not rest:
        raise RecordError("no_assistant_turn", "no assistant turn follows a user turn")
    for i, (role, _) in enumerate(rest):
        if role != ("user", "assistant")[i % 2]:
            raise RecordError("non_alternating", f"two {role} turns in a row at turn {len(system) + lead + i}")
    return Conversation(tuple(system + rest), tuple(repairs))


def _first(messages: list[Message], role: str) -> int:
    """Index of the first turn with `role` (len(messages) when none)."""
    return next((i for i, (r, _) in enumerate(messages) if r == role), len(messages))


def _tokens(value: dict) -> Tokens:
    for k in ("input_ids", "loss_mask"):
        if value.get(k) is None:
            raise RecordError("missing_field", f"no '{k}' field")
        if not isinstance(value[k], list):
            raise RecordError("bad_record", f"'{k}' must be a list, got {type(value[k]).__name__}")
    ids, mask = value["input_ids"], value["loss_mask"]
    if len(ids) != len(mask):
        raise RecordError("length_mismatch", f"input_ids has {len(ids)} tokens but loss_mask has {len(mask)}")
    if not all(type(t) is int for t in ids):  # bools and floats are not token ids
        raise RecordError("bad_tokens", "input_ids must all be ints")
    if not all(m in (0, 1) and type(m) in (int, bool) for m in mask):
        raise RecordError("bad_tokens", "loss_mask values must be 0 or 1")
    return Tokens(ids, [int(m) for m in mask])
