"""Every backend trains like one process: per-step losses and final weights of 2 gloo ranks
match a single-process run with the same global batch (fp32 tiny Llama, ragged label masks,
gradient accumulation 1 and 2, full fine-tuning and peft LoRA)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cmd, torchrun
from tiny import ragged_dataset

WORKER = "tests/workers/equivalence.py"
VARIANTS = ["full-gas1", "full-gas2", "lora-gas1", "lora-gas2"]
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3-modules"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    # one process, global batch 4 in one micro-batch (gas 1) -- the plain reference
    run_cmd([sys.executable, WORKER, "single", str(out), "full-gas1", "lora-gas1"])
    return {kind: torch.load(out / f"single-{kind}-gas1.pt") for kind in ("full", "lora")}


def test_data_is_ragged_enough_to_matter():
    """The global-token normalisation is only tested if a mean of per-sample means differs
    from the global token mean on this data."""
    data = ragged_dataset(n=32, seed=5)
    counts = [sum(1 for x in s["labels"][1:] if x != -100) for s in data]
    assert len(set(counts)) > 5
    assert min(counts) < max(counts) / 3


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, deepspeed_cpu_ops):
    """Every backend on 2 gloo ranks, one after another in one torchrun (one process group; every
    Trainer builds its own backend): the start-up is paid once. Each backend is checked by its own
    test; a run that failed (and the ones after it, which did not run) fail theirs with the output."""
    return _launch(tmp_path_factory, "two-ranks", BACKENDS, VARIANTS)


def _launch(tmp_path_factory, name, backends, variants):
    out = tmp_path_factory.mktemp(name)
    return out, run_cmd(torchrun(2, WORKER, ",".join(backends), str(out), *variants), check=False)


def _result(out, proc, backend, variant):
    path = out / f"{backend}-{variant}.pt"
    if not path.is_file():
        pytest.fail(f"{backend} {variant} did not finish (launch exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n---- stderr ----\n{proc.stderr[-8000:]}")
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_single_process(backend, reference, two_ranks):
    out, proc = two_ranks
    for variant in VARIANTS:
        kind = variant.split("-")[0]
        ref = reference[kind]
        got = _result(out, proc, backend, variant)
        assert got["world_size"] == 2 and got["backend"] == backend.split("-")[0]
        assert len(got["losses"]) == len(ref["losses"]) == 8
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0,
            msg=lambda m: f"{backend} {variant} per-step losses differ from one process: {m}",
        )
        # grad norms before clipping: catch a constant factor on the gradients, which Adam and
        # clipping would otherwise hide from the weights
        torch.testing.assert_close(
            torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0,
            msg=lambda m: f"{backend} {variant} grad norms differ from one process: {m}",
        )
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
        sd, ref_sd = got["state_dict"], ref["state_dict"]
        assert list(sd) == list(ref_sd), f"{backend} {variant}: full_state_dict keys differ"
        for key, value in ref_sd.items():
            torch.testing.assert_close(
                sd[key].float(), value.float(), rtol=1e-4, atol=1e-6,
                msg=lambda m, key=key: f"{backend} {variant} weight {key}: {m}",
            )
    # the reference really trained: LoRA moved only adapter weights, full fine-tuning moved all
    for kind, ref in reference.items():
        moved = {k for k, v in ref["state_dict"].items() if not torch.equal(v, ref["initial"][k])}
        if kind == "lora":
            assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]
        else:
            assert len(moved) == len(ref["initial"])


@pytest.mark.slow
def test_two_rank_launch_exits_cleanly(two_ranks):
    """The shared launch itself ended well (teardown included), not only every run's results."""
    _, proc = two_ranks
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n---- stderr ----\n{proc.stderr[-8000:]}"


OFFLOAD_BACKENDS = ["ddp", "fsdp", "zero3"]
OFFLOAD_VARIANTS = ["full+offload-gas2", "lora+offload-gas2"]


@pytest.fixture(scope="module")
def two_ranks_offload(tmp_path_factory, deepspeed_cpu_ops):
    return _launch(tmp_path_factory, "two-ranks-offload", OFFLOAD_BACKENDS, OFFLOAD_VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("backend", OFFLOAD_BACKENDS)
def test_activation_offload_trains_like_one_process(backend, reference, two_ranks_offload):
    """gradient_checkpointing + activation_offload on 2 ranks: the layer inputs went through the host
    copies (the worker counts them) and the run is the plain single-process one (fp32, gas 2)."""
    out, proc = two_ranks_offload
    for variant in OFFLOAD_VARIANTS:
        got, ref = _result(out, proc, backend, variant), reference[variant.split("+")[0]]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0,
                                   msg=lambda m: f"{backend} {variant} losses differ from one process: {m}")
        torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0,
                                   msg=lambda m: f"{backend} {variant} grad norms differ from one process: {m}")
        for key, value in ref["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][key].float(), value.float(), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, key=key: f"{backend} {variant} weight {key}: {m}")
