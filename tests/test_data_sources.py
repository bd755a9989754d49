"""Every source type and format loads, the same rows give the same tokens whatever the file
type, big files stream, and the `data:` config rejects bad input up front."""
from __future__ import annotations

import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from data_common import SHIPPED, word_tokenizer  # noqa: E402

from unsloth_dist.config import ConfigError  # noqa: E402
from unsloth_dist.data import DataConfig, build_datasets  # noqa: E402
from unsloth_dist.data import sources as S  # noqa: E402

ROWS = [
    {"instruction": "what is two plus three", "input": "", "output": "five"},
    {"instruction": "tell me a joke", "input": "", "output": "no"},
    {"instruction": "hello", "input": "how are you", "output": "I am fine thanks"},
    {"instruction": "why is the sky blue", "input": "", "output": "because of light scattering"},
]


def _tokens(ds):
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def _build(tmp_path, paths, **kw):
    cfg = DataConfig(paths=paths, cache_dir=str(tmp_path / "cache"), max_seq_length=128, **kw)
    return build_datasets(cfg, word_tokenizer(), seed=0)


def _write_all(tmp_path, rows):
    """The same rows as every file type; returns {kind: path}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = {}
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["jsonl"] = p
    p = tmp_path / "array.json"
    p.write_text(json.dumps(rows, indent=2))
    out["json-array"] = p
    p = tmp_path / "lines.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["json-lines"] = p
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": rows}))
    out["json-wrapped"] = p
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out["csv"] = p
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=1)  # one row group per row: streamed
    out["parquet"] = p
    import datasets

    p = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(p))
    out["saved"] = p
    p = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(p))
    out["saved-dict"] = p
    return out


def test_every_source_type_gives_the_same_samples(tmp_path):
    files = _write_all(tmp_path / "files", ROWS)
    ref, _, rep = _build(tmp_path, [str(files["jsonl"])])
    assert len(ref) == len(ROWS) and rep.sources[0].format == "instruction"
    want = _tokens(ref)
    for kind, path in files.items():
        ds, _, rep = _build(tmp_path, [str(path)])
        assert _tokens(ds) == want, kind
        assert rep.sources[0].kept == len(ROWS), kind
    # a datasets.Dataset object, and a list of dicts
    import datasets

    for obj in (datasets.Dataset.from_list(ROWS), ROWS):
        cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_seq_length=128)
        ds, _, _ = build_datasets(cfg, word_tokenizer(), source=obj)
        assert _tokens(ds) == want


def test_folder_reads_every_file_in_order(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    (folder / "sub" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[2:]))
    (folder / "notes.txt").write_text("ignored")
    ds, _, rep = _build(tmp_path, [str(folder)])
    assert [s.name for s in rep.sources] == [str(folder / "a.jsonl"), str(folder / "sub" / "b.jsonl")]
    assert len(ds) == len(ROWS)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(S.DataError, match="holds no data files"):
        _build(tmp_path, [str(empty)])


@pytest.mark.parametrize("fmt,row", [
    ("text", {"text": "hello how are you"}),
    ("instruction", {"instruction": "hello", "output": "hi there"}),
    ("chat", {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}),
])
def test_each_format_detected_and_named(tmp_path, fmt, row):
    p = tmp_path / f"{fmt}.jsonl"
    p.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    auto, _, rep = _build(tmp_path, [str(p)])
    assert rep.sources[0].format == fmt
    named, _, _ = _build(tmp_path, [str(p)], format=fmt)
    assert _tokens(auto) == _tokens(named)
    tok = word_tokenizer()
    trained = [t for t, l in zip(tok.convert_ids_to_tokens(auto[0]["input_ids"].tolist()), auto[0]["labels"].tolist())
               if l != -100]
    if fmt == "text":
        assert trained == ["hello", "how", "are", "you", "<|im_end|>"]  # every token, EOS appended
    else:
        assert trained == ["hi", "there", "<|im_end|>"]


def test_field_mapping(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"prompt": "hello", "response": "hi there"}) + "\n")
    with pytest.raises(S.DataError, match="cannot tell the data format"):
        _build(tmp_path, [str(p)])
    ds, _, rep = _build(tmp_path, [str(p)], fields={"instruction": "prompt", "output": "response"})
    assert rep.sources[0].format == "instruction" and len(ds) == 1


def test_json_array_streams_across_chunks(tmp_path, monkeypatch):
    """The JSON array reader decodes element by element; with a tiny read size every element
    straddles reads (and a multi-byte character is split between reads)."""
    rows = [{"text": f"row {i} caf\u00e9 \u2603"} for i in range(50)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    real_open = open

    class Small:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            return self.f.read(7)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(S, "open", lambda path, mode="r", *a, **k: Small(real_open(path, mode, *a, **k)), raising=False)
    got = [r for _, r in S.iter_rows(S.Source(name=str(p), kind="json", path=str(p)))]
    assert got == rows


def test_parquet_reads_by_row_group(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"r{i}"} for i in range(3000)]
    p = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=500)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        for b in real(self, *a, **k):
            calls.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = [r["text"] for _, r in S.iter_rows(S.Source(name=str(p), kind="parquet", path=str(p)))]
    assert got == [r["text"] for r in rows] and max(calls) <= 1024 and len(calls) > 1


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"paths: .*'/no/such/file.jsonl' does not exist"):
        DataConfig(paths="/no/such/file.jsonl")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n")
    assert DataConfig(paths=str(p)).paths == [str(p)]  # one path or a list
    with pytest.raises(ConfigError, match="template: 'nope' is neither a built-in template"):
        DataConfig(paths=[str(p)], template="nope")
    with pytest.raises(ConfigError, match="template: the Jinja template does not parse"):
        DataConfig(paths=[str(p)], template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="eval_split: a fractional eval_split must be between 0 and 1"):
        DataConfig(paths=[str(p)], eval_split=1.5)
    with pytest.raises(ConfigError, match="eval_split: '/missing/eval.jsonl' does not exist"):
        DataConfig(paths=[str(p)], eval_split="/missing/eval.jsonl")
    with pytest.raises(ConfigError, match="truncation"):
        DataConfig(paths=[str(p)], truncation="middle")
    with pytest.raises(ConfigError, match="unknown field.*did you mean 'packing'"):
        DataConfig(paths=[str(p)], pakcing=True)
    with pytest.raises(ConfigError, match="fields: 'answer' is not a field"):
        DataConfig(paths=[str(p)], fields={"answer": "x"})
    with pytest.raises(ConfigError, match="max_seq_length"):
        DataConfig(paths=[str(p)], max_seq_length=1)
    cfg = DataConfig(paths=[str(p)], template="chatml", eval_split=0.1)
    assert cfg.eval_split == 0.1 and cfg.template == "chatml"


def test_eval_split_fraction_and_path(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 5))
    tr, ev, rep = _build(tmp_path, [str(p)], eval_split=0.25)
    assert (len(tr), len(ev)) == (15, 5) and rep.n_eval_samples == 5
    tr2, ev2, _ = _build(tmp_path, [str(p)], eval_split=0.25)
    assert _tokens(ev) == _tokens(ev2)  # same seed, same split
    e = tmp_path / "eval.jsonl"
    e.write_text(json.dumps(ROWS[0]) + "\n")
    tr, ev, rep = _build(tmp_path, [str(p)], eval_split=str(e))
    assert (len(tr), len(ev)) == (20, 1) and [s.name for s in rep.sources] == [str(p), str(e)]


def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", SHIPPED.parent / "make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_dataset_is_what_the_generator_writes():
    mod = _load_generator()
    files = mod.generate()
    for name, text in files.items():
        assert (SHIPPED / name).read_text() == text, f"examples/data/{name} is stale: run python examples/make_dataset.py"
    assert (SHIPPED / "LICENSE").is_file() and "Apache" in (SHIPPED / "LICENSE").read_text()
    assert sum(len(t.encode()) for t in files.values()) < 1_000_000


def test_single_chat_json_csv_json_cells_and_corrupt_parquet(tmp_path):
    """Edge cases of the readers: a .json file that is one chat ({"messages": [...]}) is one row, not
    a wrapper of its turns; a CSV column holding a chat as JSON is parsed under any name data.fields
    maps; a file that is not Parquet is named in the error."""
    from unsloth_dist.data.sources import DataError

    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"messages": chat}))
    train, _, rep = _build(tmp_path, [str(one)])
    assert rep.n_samples == 1 and len(train) == 1
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dialog"])
        w.writerow([json.dumps(chat)])
    train, _, rep = _build(tmp_path, [str(tmp_path / "m.csv")], format="chat", fields={"messages": "dialog"})
    assert rep.n_samples == 1 and len(train) == 1
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        _build(tmp_path, [str(bad)])
