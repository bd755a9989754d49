"""examples/multi_gpu_inference.py on CPU: one process (device map resolves to the CPU here), and
data-parallel generation under torchrun (prompts sharded by rank, gathered to rank 0 in order),
which must give the same greedy tokens as one process."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT, run_cmd, torchrun

sys.path.insert(0, "tests/workers")
from models_common import make_model_dir  # noqa: E402

PROMPTS = ["the cat sat on the", "a big red", "the dog ran to", "a small blue house and", "then it was"]


def _example():
    spec = importlib.util.spec_from_file_location("multi_gpu_inference", ROOT / "examples" / "multi_gpu_inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("inf")
    model = make_model_dir(d / "model")
    out = d / "one.json"
    assert _example().main(["--model", model, "--json", str(out), "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    return model, json.loads(out.read_text())


def test_one_process_greedy_and_sampled(single):
    _, res = single
    assert res["world_size"] == 1 and res["device_map"] == {"": "cpu"} and res["prompts"] == PROMPTS
    assert len(res["greedy"]) == len(res["sampled"]) == 5
    assert all(1 <= len(r["tokens"]) <= 8 for r in res["greedy"])
    assert res["greedy"] != res["sampled"]


@pytest.mark.slow
def test_data_parallel_matches_one_process(single, tmp_path):
    model, res = single
    out = tmp_path / "dp.json"
    run_cmd(torchrun(2, "examples/multi_gpu_inference.py", "--model", model, "--json", str(out), "--no-sample",
                     "--max-new-tokens", "8", "--batch-size", "2"))
    dp = json.loads(out.read_text())
    assert dp["world_size"] == 2 and dp["prompts"] == PROMPTS
    assert [r["tokens"] for r in dp["greedy"]] == [r["tokens"] for r in res["greedy"]]


def test_sampling_seed_follows_the_global_prompt_index(single):
    """Under torchrun each rank generates its own prompts; the sampling seed of a batch is the seed plus
    the global index of its first prompt, not the rank-local offset (which gave every rank's first batch
    the same random stream). Same prompt, two global positions: two different draws; same position: the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = single
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = lambda idx: _example().generate(model, tok, ["the cat sat on the"], 24, True, 2.0, 1.0, 0, 1, indices=[idx])  # noqa: E731
    assert gen(0)[0]["tokens"] == gen(0)[0]["tokens"]
    assert gen(0)[0]["tokens"] != gen(1)[0]["tokens"]


def test_parse_max_memory():
    assert _example().parse_max_memory("0=20GiB,1=10GiB,cpu=64GiB") == {0: "20GiB", 1: "10GiB", "cpu": "64GiB"}
