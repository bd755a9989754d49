"""Checkpoints: exact resume for every backend, resume across world sizes and backends, saves
killed half-way, SIGTERM, a crashed rank, NaN policies, pruning.

Every run trains a tiny fp32 Llama for 8 steps with a global batch of 4 samples
(tests/workers/resume.py); "uninterrupted" is the same run without a stop.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, free_port, run_cmd, torchrun

from unsloth_dist import checkpoint

WORKER = "tests/workers/resume.py"
pytestmark = pytest.mark.slow


def launch(backend: str, out, *args: str, nproc: int = 2, check: bool = True, env: dict | None = None, timeout: int = 300):
    if backend == "single" or nproc == 1:
        cmd = [sys.executable, WORKER, backend, str(out), *args]
    else:
        cmd = torchrun(nproc, WORKER, backend, str(out), *args)
    if check:
        return run_cmd(cmd, timeout=timeout, env=env)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def result(out, mode: str) -> dict:
    return torch.load(os.path.join(out, f"result-{mode}.pt"), weights_only=False)


def assert_same_weights(a: dict, b: dict, atol: float, what: str) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, deepspeed_cpu_ops):
    """Uninterrupted 8-step runs (checkpoints at 4 and 8), made on first use."""
    cache: dict[str, object] = {}

    def get(backend: str):
        if backend not in cache:
            out = tmp_path_factory.mktemp(f"full-{backend}")
            launch(backend, out, "full", nproc=1 if backend == "single" else 2)
            cache[backend] = out
        return cache[backend]

    return get


@pytest.mark.parametrize("backend", ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_resume_reproduces_uninterrupted_run(backend, full_runs, tmp_path):
    full_dir = full_runs(backend)
    full = result(full_dir, "full")
    assert len(full["losses"]) == 8
    ckpt = full_dir / "checkpoint-4"
    meta = checkpoint.read_meta(ckpt)
    assert meta["step"] == 4 and meta["backend"] == backend and meta["losses"] == full["losses"][:4]
    assert (full_dir / "latest").read_text() == "checkpoint-8"
    launch(backend, tmp_path, "resume", str(ckpt), nproc=1 if backend == "single" else 2)
    resumed = result(tmp_path, "resume")
    assert resumed["start_step"] == 4 and len(resumed["losses"]) == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][4:]), rtol=1e-6, atol=0)
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, f"{backend} resumed")


@pytest.mark.parametrize(
    "source, target, nproc",
    [
        ("ddp", "single", 1), ("fsdp", "ddp", 2), ("fsdp", "fsdp", 1),  # DCP reshards natively
        ("zero2", "fsdp", 2), ("fsdp", "zero3", 2), ("zero3", "single", 1), ("zero2", "zero2", 1),  # consolidated
    ],
    ids=["ddp2-to-single1", "fsdp2-to-ddp2", "fsdp2-to-fsdp1", "zero2-to-fsdp2", "fsdp2-to-zero3",
         "zero3-to-single1", "zero2-2-to-zero2-1"],
)
def test_resume_on_other_world_size_or_backend(source, target, nproc, full_runs, tmp_path):
    """A checkpoint goes on under another world size or backend (gradient accumulation keeps the
    global batch): DCP reshards between single / ddp / fsdp; to or from DeepSpeed, and between
    DeepSpeed world sizes, it goes through the consolidated intermediate (DeepSpeed's universal
    checkpoint converter for ZeRO partitions). Weights and Adam state carry over, so the run goes
    on like the uninterrupted one."""
    reference = result(full_runs("single"), "full")
    launch(target, tmp_path, "resume", str(full_runs(source) / "checkpoint-4"), nproc=nproc)
    resumed = result(tmp_path, "resume")
    assert resumed["world_size"] == nproc and resumed["start_step"] == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][4:]), rtol=1e-5, atol=0)
    assert_same_weights(reference["state_dict"], resumed["state_dict"], 1e-5, f"{source}->{target}")
    assert not list(tmp_path.glob(".convert-*")), "the conversion scratch directory is removed"


def test_resume_with_another_global_batch_is_refused_before_start(full_runs, tmp_path):
    proc = launch("single", tmp_path, "resume", str(full_runs("zero2") / "checkpoint-4"), nproc=1, check=False,
                  env={"WORKER_ARGS": json.dumps({"gradient_accumulation_steps": 1})})
    assert proc.returncode != 0
    assert "resume_from_checkpoint" in proc.stderr and "global batch of 4" in proc.stderr
    assert "gradient_accumulation_steps" in proc.stderr


def test_consolidate_writes_the_weights_of_the_step(full_runs, tmp_path):
    """`unsloth-dist checkpoint consolidate` of the step-8 checkpoint of a ZeRO-3 run gives the
    run's final weights as a safetensors file with the model's config.json; `inspect` shows it."""
    from safetensors.torch import load_file

    src = full_runs("zero3")
    proc = run_cmd([sys.executable, "-m", "unsloth_dist", "checkpoint", "consolidate", str(src / "checkpoint-8"),
                    "-o", str(tmp_path / "export")])
    assert "step 8" in proc.stdout
    weights = load_file(tmp_path / "export" / "model.safetensors")
    full = result(src, "full")["state_dict"]
    assert set(weights) == set(full)
    for k, v in full.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llama"
    shown = run_cmd([sys.executable, "-m", "unsloth_dist", "checkpoint", "inspect", str(src)]).stdout
    assert "zero3" in shown and "checkpoint-8" in shown
    bad = subprocess.run([sys.executable, "-m", "unsloth_dist", "checkpoint", "inspect", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_exception_on_one_rank_ends_every_rank(tmp_path):
    """An exception on rank 1 ends the whole run quickly with a non-zero exit and the
    original error in the launcher's output; no rank waits for the collective timeout."""
    t0 = time.monotonic()
    proc = launch("fsdp", tmp_path, "raise", "2", "1", check=False, timeout=240,
                  env={"WORKER_ARGS": json.dumps({"dist_timeout_s": 600})})
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120, "a rank waited for the collective timeout"
    assert "boom on rank 1 after step 2" in proc.stdout + proc.stderr


def test_save_killed_half_way_is_never_latest(full_runs, tmp_path):
    """The process dies after the backend wrote its files for step 4 but before the checkpoint was
    finished: `latest` stays on step 2, the half-written directory is ignored, and resuming from
    latest ends with the uninterrupted run's weights."""
    proc = launch("single", tmp_path, "kill-in-save", "2", nproc=1, check=False)
    assert proc.returncode != 0
    assert (tmp_path / ".checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / "latest").read_text() == "checkpoint-2"
    assert checkpoint.resolve("latest", str(tmp_path)) == tmp_path / "checkpoint-2"
    # a directory without the completion marker is not a checkpoint, even if named like one
    (tmp_path / "checkpoint-6").mkdir()
    assert checkpoint.resolve("latest", str(tmp_path)) == tmp_path / "checkpoint-2"
    with pytest.raises(checkpoint.CheckpointError, match="not a complete"):
        checkpoint.resolve(str(tmp_path / "checkpoint-6"), str(tmp_path))
    (tmp_path / "checkpoint-6").rmdir()
    launch("single", tmp_path, "resume", "latest", nproc=1)
    resumed, reference = result(tmp_path, "resume"), result(full_runs("single"), "full")
    assert resumed["start_step"] == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][2:]), rtol=1e-6, atol=0)
    assert_same_weights(reference["state_dict"], resumed["state_dict"], 1e-6, "resumed after a killed save")
    assert not (tmp_path / ".checkpoint-4.tmp").exists(), "the next save of step 4 replaces the leftover"


def test_sigterm_saves_and_stops_then_resumes(full_runs, tmp_path):
    """SIGTERM to one rank (preemption): every rank stops at the next step boundary after a
    complete checkpoint; the run restarted from latest matches the uninterrupted one."""
    launch("ddp", tmp_path, "sigterm", "3", "1")
    stopped = result(tmp_path, "sigterm")
    assert stopped["stopped_by_signal"] and stopped["global_step"] == 3
    assert (tmp_path / "latest").read_text() == "checkpoint-3" and checkpoint.is_complete(tmp_path / "checkpoint-3")
    launch("ddp", tmp_path, "resume", "latest")
    resumed, full = result(tmp_path, "resume"), result(full_runs("ddp"), "full")
    assert resumed["start_step"] == 3
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-6, atol=0)
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, "resumed after SIGTERM")


def test_killed_rank_ends_the_run_and_latest_resumes(full_runs, tmp_path):
    """kill -9 of rank 1 after a random step in 5..7: torchrun ends the other rank, nothing
    hangs; the restart from latest (step 4) finishes with the uninterrupted weights."""
    import random

    step = random.randint(5, 7)
    print(f"killing rank 1 after step {step}")
    t0 = time.monotonic()
    proc = launch("ddp", tmp_path, "kill-rank", str(step), "1", check=False, timeout=240,
                  env={"WORKER_ARGS": json.dumps({"dist_timeout_s": 60})})
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 200
    assert (tmp_path / "latest").read_text() == "checkpoint-4"
    launch("ddp", tmp_path, "resume", "latest")
    resumed, full = result(tmp_path, "resume"), result(full_runs("ddp"), "full")
    assert resumed["start_step"] == 4
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, "resumed after a killed rank")


def test_nan_policy_stop_names_the_step(tmp_path):
    proc = launch("single", tmp_path, "nan", "3", "stop", nproc=1, check=False)
    assert proc.returncode != 0
    assert "FloatingPointError" in proc.stderr and "step 3" in proc.stderr and "nan_policy" in proc.stderr


def test_nan_policy_skip_leaves_weights_and_goes_on(tmp_path):
    launch("ddp", tmp_path, "nan", "3", "skip")
    r = result(tmp_path, "nan")
    assert len(r["losses"]) == 8 and r["losses"][2] != r["losses"][2]  # step 3 is NaN
    assert all(x == x for i, x in enumerate(r["losses"]) if i != 2)
    assert_same_weights(r["before"], r["after"], 0, "skipped step changed the weights")
    assert any(not torch.equal(r["after"][k], r["state_dict"][k]) for k in r["after"]), "training went on after the skip"
    assert json.loads([l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "skipped" in l][0])["step"] == 3


def test_save_total_limit_prunes_after_the_new_checkpoint(tmp_path):
    launch("single", tmp_path, "full", nproc=1, env={"WORKER_ARGS": json.dumps({"save_steps": 2, "save_total_limit": 2})})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert (tmp_path / "latest").read_text() == "checkpoint-8"
    assert not list(tmp_path.glob(".checkpoint-*"))
