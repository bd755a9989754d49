"""Device checks of issue 4 (marked gpu; skipped without 2 CUDA GPUs), plus their CPU smoke run.

* QLoRA (4-bit NF4, double quantisation, bf16 compute and storage) trains under ddp, fsdp and zero3
  with 2 GPUs: the loss falls; the peak memory of every GPU is recorded in
  $UNSLOTH_GPU_RESULTS/qlora-BACKEND.json (default: a pytest tmp dir).
* A model split over 2 GPUs by device_map="balanced" generates the same greedy tokens as on one GPU.

    UNSLOTH_GPU_RESULTS=benchmarks/results/models pytest -m gpu tests/test_gpu_models.py -s
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cmd, torchrun

WORKER = "tests/workers/models_gpu.py"
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs")


def _results_dir(tmp_path_factory) -> Path:
    d = os.environ.get("UNSLOTH_GPU_RESULTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        return Path(d)
    return tmp_path_factory.mktemp("gpu-results")


def _model_dir(root: Path, hidden: int, layers: int, vocab: int) -> str:
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir

    return make_model_dir(root / f"llama-h{hidden}-l{layers}-v{vocab}", hidden=hidden, layers=layers, vocab=vocab)


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    # ~150M parameters: hidden 1024, 12 layers, vocab 32000 (GQA 16/4 heads)
    return _model_dir(tmp_path_factory.mktemp("models"), hidden=1024, layers=12, vocab=32000)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero3"])
def test_qlora_trains_on_two_gpus(backend, medium_model, tmp_path_factory, deepspeed_cpu_ops):
    out = _results_dir(tmp_path_factory)
    run_cmd(torchrun(2, WORKER, "qlora", backend, medium_model, str(out)), env={"MG_STEPS": "20", "MG_SEQ": "512"})
    rec = json.loads((out / f"qlora-{backend}.json").read_text())
    losses = rec["losses"]
    assert rec["world_size"] == 2 and rec["backend"] == backend and len(losses) == 20
    assert all(map(lambda x: x == x, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert all(r["n_linear4bit"] == 12 * 7 for r in rec["per_rank"])
    assert {r["device"] for r in rec["per_rank"]} == {"cuda:0", "cuda:1"}
    print(f"\nqlora {backend}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; peak GiB per GPU "
          f"{[round(r['peak_mem_gib'], 3) for r in rec['per_rank']]}; {rec['seconds']:.1f}s")


@pytest.mark.gpu
@two_gpus
def test_split_model_generates_like_one_gpu(medium_model, tmp_path_factory):
    out = _results_dir(tmp_path_factory)
    one, split = out / "generate-one-gpu.json", out / "generate-split.json"
    run_cmd([sys.executable, WORKER, "generate", "cuda:0", medium_model, str(one)])
    run_cmd([sys.executable, WORKER, "generate", "balanced", medium_model, str(split)])
    a, b = json.loads(one.read_text()), json.loads(split.read_text())
    assert a["devices"] == ["cuda:0"]
    assert b["devices"] == ["cuda:0", "cuda:1"], b["plan"]
    assert a["tokens"] == b["tokens"]
    print(f"\nsplit plan:\n{b['plan']}\ngreedy tokens equal: {a['tokens'] == b['tokens']}")


@pytest.mark.slow
def test_qlora_backends_cpu_smoke(tmp_path, deepspeed_cpu_ops):
    """The same worker on CPU (gloo, tiny model, 4 steps): QLoRA under ddp, fsdp and zero3 with bnb's CPU
    backend. Skipped when bitsandbytes is missing."""
    pytest.importorskip("bitsandbytes")
    model = _model_dir(tmp_path, hidden=64, layers=2, vocab=128)
    run_cmd(torchrun(2, WORKER, "qlora", "ddp,fsdp,zero3", model, str(tmp_path)),
            env={"MG_STEPS": "4", "MG_SEQ": "16"})
    for backend in ("ddp", "fsdp", "zero3"):
        rec = json.loads((tmp_path / f"qlora-{backend}.json").read_text())
        assert rec["backend"] == backend and rec["world_size"] == 2
        assert rec["losses"][-1] < rec["losses"][0], (backend, rec["losses"])
        assert all(r["n_linear4bit"] == 14 for r in rec["per_rank"])
