"""Bad data: a missing field names the row and the field; empty, undecodable, malformed and
too-long rows are skipped and counted (and logged); a file with no usable row is an error."""
from __future__ import annotations

import json
import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from data_common import word_tokenizer  # noqa: E402

from unsloth_dist.data import DataConfig, DataError, build_datasets  # noqa: E402


def _cfg(tmp_path, path, **kw):
    kw.setdefault("max_seq_length", 16)
    return DataConfig(paths=[str(path)], cache_dir=str(tmp_path / "cache"), **kw)


def good(i=0):
    return json.dumps({"instruction": "what is two plus three", "output": "five" + " five" * (i % 3)}).encode()


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    lines = [
        good(0),                                                     # 1 ok
        b"",                                                         # 2 empty line
        b"{}",                                                       # 3 empty object
        json.dumps({"instruction": "  ", "output": ""}).encode(),    # 4 only blank values
        b'{"instruction": "hello", "output": "hi',                   # 5 invalid JSON
        b'{"instruction": "hello \xff\xfe", "output": "hi there"}',  # 6 not UTF-8
        json.dumps({"instruction": "hello \ud800", "output": "hi"}).encode(),  # 7 lone surrogate escape
        json.dumps({"instruction": "tell me a joke " * 5, "output": "no"}).encode(),  # 8 too long (drop)
        b"[1, 2]",                                                   # 9 not an object
        json.dumps({"instruction": "hello", "output": "   "}).encode(),  # 10 blank answer: empty
        good(1),                                                     # 11 ok
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.INFO, logger="unsloth_dist.data"):
        train, _, rep = build_datasets(_cfg(tmp_path, p), word_tokenizer(), seed=0)
    src = rep.sources[0]
    assert len(train) == 2 and src.kept == 2 and src.rows == 11
    assert src.skipped == {"empty": 4, "invalid_json": 1, "undecodable": 2, "too_long": 1, "not_an_object": 1}
    assert src.examples[0] == "line 2: empty" and src.examples[3].startswith("line 5: invalid_json")
    log = caplog.text
    assert "11 rows, 2 kept" in log and "skipped: empty 4, invalid_json 1" in log
    assert any(r.levelno == logging.WARNING and "1 too_long" in r.getMessage() for r in caplog.records)


def test_missing_field_names_the_row_and_the_field(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b"\n".join([good(), good(), json.dumps({"instruction": "hello"}).encode(), good()]) + b"\n")
    with pytest.raises(DataError, match=r"m\.jsonl line 3: field 'output' is missing \(format instruction\)"):
        build_datasets(_cfg(tmp_path, p), word_tokenizer())
    train, _, rep = build_datasets(_cfg(tmp_path, p, missing_field="skip"), word_tokenizer())
    assert len(train) == 3 and rep.sources[0].skipped == {"missing_field": 1}
    assert rep.sources[0].examples == ["line 3: missing_field (field 'output' is missing)"]
    # chat turns: the turn index and key
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'messages\[1\].role' is missing"):
        build_datasets(_cfg(tmp_path, c), word_tokenizer())
    # CSV: the data row (header not counted)
    v = tmp_path / "v.csv"
    v.write_text("instruction,input\nhello,there\nwhat,is\n")
    with pytest.raises(DataError, match=r"v\.csv row 1: field 'output' is missing"):
        build_datasets(_cfg(tmp_path, v, format="instruction"), word_tokenizer())


def test_csv_undecodable_row_is_skipped(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text\nhello there\nbad \xff bytes\nhow are you\n")
    train, _, rep = build_datasets(_cfg(tmp_path, p), word_tokenizer())
    assert len(train) == 2 and rep.sources[0].skipped == {"undecodable": 1}
    assert rep.sources[0].examples == ["row 2: undecodable"]


@pytest.mark.parametrize("content,match", [
    (b"", "no usable rows"),
    (b"\n\n{}\n", "no usable rows"),
    (json.dumps({"instruction": "tell me a joke " * 9, "output": "no"}).encode(),
     r"no usable rows \(1 read; skipped: too_long 1\).*Raise data.max_seq_length"),
    (b"not json\n", "no usable rows"),
])
def test_a_file_without_usable_rows_is_an_error(tmp_path, content, match):
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(good() + b"\n")
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    cfg = DataConfig(paths=[str(ok), str(p)], cache_dir=str(tmp_path / "cache"), max_seq_length=16)
    with pytest.raises(DataError, match=match) as info:
        build_datasets(cfg, word_tokenizer())
    assert str(p) in str(info.value)
    assert not [d for d in (tmp_path / "cache").glob("*") if d.is_dir() and not d.name.startswith(".")] \
        if (tmp_path / "cache").exists() else True


def test_a_row_the_chat_template_refuses_is_named(tmp_path):
    """A template's raise_exception (a system message under a template that only alternates user /
    assistant) names the file and row and follows data.missing_field, instead of a bare jinja error."""
    from data_common import word_tokenizer

    from unsloth_dist.data import DataConfig, build_datasets
    from unsloth_dist.data.sources import DataError

    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
              "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    ok = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": ok}) + "\n" + json.dumps({"messages": [{"role": "system", "content": "be"}] + ok}) + "\n")
    tok = word_tokenizer(chat_template=strict)
    cfg = dict(paths=[str(path)], cache_dir=str(tmp_path / "cache"), max_seq_length=64)
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'messages' is refused by the chat template: Conversation roles"):
        build_datasets(DataConfig(**cfg), tok, seed=0)
    train, _, rep = build_datasets(DataConfig(**cfg, missing_field="skip"), tok, seed=0)
    assert len(train) == 1
