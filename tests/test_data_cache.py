"""The token cache: reused on the second run, rebuilt when the data, the tokenizer or a
tokenization setting changes, written atomically; under two ranks only one tokenizes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from conftest import run_cmd, torchrun  # noqa: E402
from data_common import SHIPPED, bpe_tokenizer, word_tokenizer  # noqa: E402

from unsloth_dist.data import DataConfig, DataError, build_datasets  # noqa: E402
from unsloth_dist.data import pipeline as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"messages": [{"role": "user", "content": "hello how are you"},
                      {"role": "assistant", "content": f"I am fine thanks {'good ' * i}"}]} for i in range(6)]


@pytest.fixture
def counted(monkeypatch):
    """Counts how many times the sources are tokenized."""
    calls = []
    real = P.tokenize_sources

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "tokenize_sources", spy)
    return calls


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_cache_reused_then_rebuilt_when_the_file_changes(tmp_path, counted):
    data = _write(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    cfg = DataConfig(paths=[str(data)], cache_dir=str(cache), max_seq_length=64)
    tok = word_tokenizer()
    a, _, rep = build_datasets(cfg, tok)
    assert not rep.cache_hit and len(counted) == 1
    b, _, rep = build_datasets(cfg, tok)
    assert rep.cache_hit and len(counted) == 1  # second run: read, not tokenized
    assert [a[i]["input_ids"].tolist() for i in range(len(a))] == [b[i]["input_ids"].tolist() for i in range(len(b))]
    assert rep.sources[0].kept == len(ROWS)  # the report comes back from the cache too
    # packing and the eval split are applied after loading: same entry
    _, _, rep = build_datasets(cfg.model_copy(update={"packing": True, "eval_split": 0.3}), tok)
    assert rep.cache_hit and len(counted) == 1
    # the same content under another name is the same data
    copy = _write(tmp_path / "copy.jsonl", ROWS)
    _, _, rep = build_datasets(DataConfig(paths=[str(copy)], cache_dir=str(cache), max_seq_length=64), tok)
    assert rep.cache_hit and rep.sources[0].name == str(copy)
    # the file changes: rebuilt, into a new entry
    _write(data, ROWS[:-1])
    c, _, rep = build_datasets(cfg, tok)
    assert not rep.cache_hit and len(counted) == 2 and len(c) == len(ROWS) - 1
    assert len(_entries(cache)) == 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_tokenizer_and_settings_are_part_of_the_key(tmp_path, counted):
    data = _write(tmp_path / "d.jsonl", ROWS)
    base = DataConfig(paths=[str(data)], cache_dir=str(tmp_path / "cache"), max_seq_length=64)
    tok = word_tokenizer()
    build_datasets(base, tok)
    for change in ({"max_seq_length": 63}, {"train_on_completions_only": False}, {"truncation": "right"},
                   {"template": "chatml"}):
        _, _, rep = build_datasets(base.model_copy(update=change), tok)
        assert not rep.cache_hit, change
    n = len(counted)
    _, _, rep = build_datasets(base, word_tokenizer(extra_text="zebra"))  # another vocabulary
    assert not rep.cache_hit and len(counted) == n + 1
    other_template = word_tokenizer()
    other_template.chat_template = other_template.chat_template.replace("\n", "\n\n", 1)
    _, _, rep = build_datasets(base, other_template)
    assert not rep.cache_hit
    _, _, rep = build_datasets(base.model_copy(update={"use_cache": False}), tok)  # forced rebuild
    assert not rep.cache_hit
    _, _, rep = build_datasets(base, tok)
    assert rep.cache_hit


def test_failed_tokenization_leaves_nothing_behind(tmp_path):
    data = _write(tmp_path / "d.jsonl", ROWS + [{"messages": [{"role": "user"}]}])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"line 7: field 'messages\[0\].content' is missing"):
        build_datasets(DataConfig(paths=[str(data)], cache_dir=str(cache)), word_tokenizer())
    assert not list(cache.iterdir())


@pytest.mark.slow
def test_two_ranks_tokenize_once_and_train(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 tokenizes (no process group yet: the other rank polls for the
    cache; then again under the group: a broadcast), both get identical data, an error on rank 0
    reaches rank 1, and DDP training on the packed chat data lowers the loss."""
    tok_dir = tmp_path / "tok"
    bpe_tokenizer().save_pretrained(str(tok_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n{}\n" + json.dumps({"messages": []}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    run_cmd(torchrun(2, str(ROOT / "tests" / "workers" / "data_ranks.py"), str(tok_dir),
                            str(SHIPPED / "chat.jsonl"), str(bad), str(work)), timeout=600)
    r0, r1 = (json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["tokenizer"] == r1["tokenizer"]
    # the bad file: the same error on both ranks
    assert r0["bad"] and "no usable rows" in r0["bad"]
    assert r1["bad"] and "no usable rows" in r1["bad"]
    # exactly one rank tokenized, both got the same data
    for phase in ("file_mode", "group_mode"):
        assert (r0[phase]["tokenized"], r1[phase]["tokenized"]) == (True, False), phase
        assert r0[phase]["train"] == r1[phase]["train"], phase
    assert r0["file_mode"]["eval"] == r1["file_mode"]["eval"]
    assert r0["file_mode"]["train"] == r0["group_mode"]["train"]
    assert not r0["group_mode_again"]["tokenized"] and not r1["group_mode_again"]["tokenized"]
    # training: the same losses on both ranks, finite, falling
    losses = r0["losses"]
    assert losses == r1["losses"] and len(losses) == 6
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert losses[-1] < losses[0] - 0.1, losses


def test_use_cache_false_waits_for_this_launchs_entry(tmp_path, monkeypatch):
    """Plain torchrun launches share their launcher variables (run id "none", port 29500): with
    use_cache false a waiting rank must not take the entry an earlier launch left."""
    from unsloth_dist.data import cache as C

    for k, v in {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = DataConfig(paths=[str(_write(tmp_path / "d.jsonl", ROWS))], cache_dir=str(tmp_path / "c"), use_cache=False,
                     max_seq_length=64, cache_wait_timeout_s=0.3)
    tok = word_tokenizer()
    build_datasets(cfg, tok)  # the earlier launch's rank 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(C, "_PROCESS_START", C._PROCESS_START + 10 * C.SAME_LAUNCH_S)  # a later launch
    with pytest.raises(DataError, match="waited"):
        build_datasets(cfg, tok)
    monkeypatch.setattr(C, "_PROCESS_START", C._PROCESS_START - 10 * C.SAME_LAUNCH_S + 5)  # the same launch
    build_datasets(cfg, tok)
