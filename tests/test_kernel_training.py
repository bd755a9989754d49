"""A kernel-patched tiny Llama trains exactly like the unpatched one under every backend: same
per-step losses and grad norms (fp32, rtol 1e-4), same eval loss, same final weights, and a
full_state_dict keyed like the unpatched model -- single process, and 2 gloo ranks under ddp, fsdp
(FSDP2) and zero3 (incl. tied embeddings under fsdp and zero3, where lm_head.weight is the
embedding and the fused cross-entropy must run on the gathered / unsharded parameter).

The kernels dispatch to their PyTorch references here (CPU, no TRITON_INTERPRET) for speed; the
patched model still takes the fused-loss path of the Trainer (`loss_reduction="sum"` inside
lm_head's forward). One single-process run goes through the Triton kernels in the interpreter.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_cmd, torchrun

WORKER = "tests/workers/kernel_training.py"
NO_INTERP = {"TRITON_INTERPRET": "0"}

RUNS = {
    "single": ["plain-untied", "patched-untied", "plain-untied-lora", "patched-untied-lora"],
    "ddp": ["plain-untied", "patched-untied", "plain-untied-lora", "patched-untied-lora"],
    "fsdp": ["plain-untied", "patched-untied", "plain-tied", "patched-tied", "plain-untied-lora", "patched-untied-lora"],
    "zero3": ["plain-untied", "patched-untied", "plain-tied", "patched-tied", "plain-untied-lora", "patched-untied-lora"],
}


def _load(out, backend, variant):
    return torch.load(out / f"{backend}-{variant}.pt", weights_only=False)


def _assert_same_training(got, ref, what):
    assert len(got["losses"]) == len(ref["losses"]) > 0
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0,
                               msg=lambda m: f"{what}: per-step losses differ: {m}")
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0,
                               msg=lambda m: f"{what}: grad norms differ: {m}")
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4), what
    sd, ref_sd = got["state_dict"], ref["state_dict"]
    assert list(sd) == list(ref_sd) == got["keys_before"], f"{what}: full_state_dict keys changed by patching"
    for k, v in ref_sd.items():
        torch.testing.assert_close(sd[k].float(), v.float(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{what}: weight {k}: {m}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kt-single")
    run_cmd([sys.executable, WORKER, "single", str(out), *RUNS["single"]], env=NO_INTERP)
    return out


def test_single_process(single_run):
    for kind in ("untied", "untied-lora"):
        got, ref = _load(single_run, "single", f"patched-{kind}"), _load(single_run, "single", f"plain-{kind}")
        assert got["world_size"] == 1 and "fused_cross_entropy" in got["report"]
        assert not any(got["triton_launches"].values())  # reference dispatch here
        assert ref["fused_lora_calls"] == 0 and (got["fused_lora_calls"] > 0) == kind.endswith("lora")
        _assert_same_training(got, ref, f"single {kind}")


TWO_RANKS = ["ddp", "fsdp", "zero3"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, deepspeed_cpu_ops):
    """The 2-rank runs of every backend one after another in one torchrun (one process group;
    every Trainer builds its own backend), so the start-up is paid once; each backend is checked
    by its own test, and a run that did not finish fails it with the launch's output."""
    out = tmp_path_factory.mktemp("kt-two-ranks")
    runs = [f"{b}:{v}" for b in TWO_RANKS for v in RUNS[b]]
    proc = run_cmd(torchrun(2, WORKER, "--runs", str(out), *runs), env=NO_INTERP, check=False)
    return out, proc


@pytest.mark.slow
@pytest.mark.parametrize("backend", TWO_RANKS)
def test_two_ranks(backend, single_run, two_ranks):
    tmp_path, proc = two_ranks
    for variant in RUNS[backend]:
        if not (tmp_path / f"{backend}-{variant}.pt").is_file():
            pytest.fail(f"{backend} {variant} did not finish (launch exit {proc.returncode}):\n"
                        f"{proc.stdout[-4000:]}\n---- stderr ----\n{proc.stderr[-8000:]}")
    for variant in RUNS[backend]:
        if not variant.startswith("patched"):
            continue
        kind = variant[len("patched-"):]
        got = _load(tmp_path, backend, variant)
        assert got["world_size"] == 2 and got["backend"] == backend
        _assert_same_training(got, _load(tmp_path, backend, f"plain-{kind}"), f"{backend} {kind}")
        if kind.endswith("lora"):  # the fused LoRA update ran (under zero3 on the adapters its leaf layers gathered)
            assert got["fused_lora_calls"] > 0, got["fused_lora_calls"]
        if kind == "untied":  # and like one process
            torch.testing.assert_close(torch.tensor(got["losses"]),
                                       torch.tensor(_load(single_run, "single", "plain-untied")["losses"]),
                                       rtol=1e-4, atol=0, msg=lambda m: f"{backend}: differs from one process: {m}")


@pytest.mark.slow
def test_two_rank_launch_exits_cleanly(two_ranks):
    """The shared launch itself ended well (teardown included), not only every run's results."""
    _, proc = two_ranks
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n---- stderr ----\n{proc.stderr[-8000:]}"


@pytest.mark.slow
def test_single_process_through_triton_interpreter(single_run, tmp_path):
    """The same training with the Triton kernels (interpreted on CPU): TRITON_INTERPRET=1 is set
    in the worker's environment from the start."""
    run_cmd([sys.executable, WORKER, "single", str(tmp_path), "patched-untied"],
            env={"TRITON_INTERPRET": "1", "KT_STEPS": "4"})
    got = _load(tmp_path, "single", "patched-untied")
    ran = {k for k, v in got["triton_launches"].items() if v > 0}
    assert {"rmsnorm_fwd", "rmsnorm_bwd", "rope", "glu_fwd", "glu_bwd", "cross_entropy"} <= ran, ran
    _assert_same_training(got, _load(single_run, "single", "plain-untied"), "single, Triton interpreter")
