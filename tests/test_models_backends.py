"""LoRA on a model loaded by FastLanguageModel trains under every backend (single, and ddp, fsdp,
zero2, zero3 with 2 gloo ranks): the loss falls, only LoRA weights change, and both exports made
from the trained (sharded / partitioned) model reload with plain peft / transformers to the same
logits as the trained model, to fp32 tolerance.

The four 2-rank backends run one after another in one torchrun (one process group; every
Trainer builds its own backend) to keep the CPU time down; each backend is checked separately."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_cmd, torchrun

WORKER = "tests/workers/models_train.py"
MULTI = ["ddp", "fsdp", "zero2", "zero3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory, deepspeed_cpu_ops):
    out = tmp_path_factory.mktemp("runs")
    run_cmd([sys.executable, WORKER, model_dir, str(out), "single"])
    run_cmd(torchrun(2, WORKER, model_dir, str(out), *MULTI))
    return out


def _load(runs, backend):
    return torch.load(runs / f"{backend}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["single", *MULTI])
def test_lora_trains_and_only_adapters_move(runs, backend):
    got = _load(runs, backend)
    assert got["backend"] == backend and got["world_size"] == (1 if backend == "single" else 2)
    losses = got["losses"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert got["missing"] == [], "full_state_dict lost keys"
    assert got["moved"] and all("lora_" in k for k in got["moved"]), got["moved"]
    # every adapter (A and B of 7 projections x 2 layers) trained
    assert len(got["moved"]) == 28


@pytest.mark.slow
@pytest.mark.parametrize("backend", MULTI)
def test_backends_agree_with_one_process(runs, backend):
    ref, got = _load(runs, "single"), _load(runs, backend)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["single", *MULTI])
def test_adapter_export_round_trip(runs, model_dir, backend):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = _load(runs, backend)
    adapter = runs / f"{backend}-adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not list(runs.glob(f".{backend}-adapter.tmp-*")), "temporary export directory left behind"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=got["ids"]).logits
    torch.testing.assert_close(logits, got["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["single", *MULTI])
def test_merged_export_round_trip(runs, backend):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    got = _load(runs, backend)
    merged = runs / f"{backend}-merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in keys)
    assert (merged / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()  # plain transformers, no peft
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=got["ids"]).logits
    torch.testing.assert_close(logits, got["logits"], rtol=1e-4, atol=1e-5)
