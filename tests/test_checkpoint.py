"""Checkpoints: exact resume for every backend, resume across world sizes and backends, saves
killed half-way, SIGTERM, a crashed rank, NaN policies, pruning.

Every run trains a tiny fp32 Llama for 8 steps with a global batch of 4 samples
(tests/workers/resume.py); "uninterrupted" is the same run without a stop. The runs are batched
into four launches (see `runs`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd, torchrun

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


# ------------------------------------------------------------------ the runs, batched
#
# The runs are jobs of `tests/workers/resume.py --jobs`: the jobs of one world size run one after
# another in one launch (one process group, made by the launch's first job; every Trainer builds
# its own backend), so the tests pay the interpreter, import and process-group start-up once per
# launch instead of once per run. A launch may end with one job that ends its process (killed,
# or an exception): nothing runs after it. The resumes run in later launches than the runs they
# resume, so they see only what is on disk; what an interrupted run left is copied aside first
# (NAME-interrupted) for its test to look at. Each test checks the results of its own jobs; a job
# that failed (or did not run because an earlier job of its launch failed) fails the tests that use
# it, with the launch's output, which names the job ("JOB NAME FAILED").

ALL = ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"]
# (source, target, nproc) of test_resume_on_other_world_size_or_backend
CROSS = {
    "ddp2-to-single1": ("ddp", "single", 1), "fsdp2-to-ddp2": ("fsdp", "ddp", 2), "fsdp2-to-fsdp1": ("fsdp", "fsdp", 1),
    "zero2-to-fsdp2": ("zero2", "fsdp", 2), "fsdp2-to-zero3": ("fsdp", "zero3", 2), "zero3-to-single1": ("zero3", "single", 1),
    "zero2-2-to-zero2-1": ("zero2", "zero2", 1),
}


class Runs:
    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.dirs: dict[str, object] = {}
        self.launches: dict[str, dict] = {}  # launch name -> {"proc", "error", "ended"}
        self.owner: dict[str, str] = {}  # job name -> launch name
        self.job_dir: dict[str, object] = {}  # job name -> the directory it writes into

    def dir(self, name: str):
        # a pytest temp directory per name, as short as a test's own (`checkpoint inspect` prints
        # the path in the title of its table, which wraps at the table's width)
        if name not in self.dirs:
            self.dirs[name] = self.factory.mktemp(name)
        return self.dirs[name]

    def batch(self, launch_name: str, nproc: int, jobs: list[dict], timeout: int = 600) -> None:
        for job in jobs:  # a job writes into its own directory unless it says where
            job.setdefault("out", str(self.dir(job["name"])))
            self.owner[job["name"]] = launch_name
            self.job_dir[job["name"]] = Path(job["out"])
        spec = self.dir("jobs") / f"{launch_name}.json"
        spec.write_text(json.dumps(jobs))
        cmd = [sys.executable, WORKER, "--jobs", str(spec)] if nproc == 1 else torchrun(nproc, WORKER, "--jobs", str(spec))
        info: dict = {"proc": None, "error": None}
        try:
            info["proc"] = run_cmd(cmd, timeout=timeout, check=False)
        except pytest.fail.Exception as exc:  # timed out: the jobs that finished still count
            info["error"] = str(exc)
        info["ended"] = time.time()
        self.launches[launch_name] = info

    def output(self, job: str) -> str:
        info = self.launches[self.owner[job]]
        if info["error"]:
            return info["error"]
        proc = info["proc"]
        return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n---- stderr ----\n{proc.stderr[-8000:]}"

    def out(self, job: str):
        """The directory job `job` wrote into, failing the test with the launch's output if that
        job did not finish."""
        out = self.job_dir[job]
        if not (out / f"done-{job}").is_file():
            pytest.fail(f"job {job} did not finish (launch {self.owner[job]}):\n{self.output(job)}")
        return out

    def last(self, job: str):
        """The launch whose last job `job` ended its process: every other job of it finished,
        this one started and did not finish. Returns (proc, seconds from the job's start to the
        launcher's exit)."""
        launch_name = self.owner[job]
        info = self.launches[launch_name]
        if info["error"]:
            pytest.fail(f"launch {launch_name} (last job {job}): {info['error']}")
        for other, owner in self.owner.items():
            if owner == launch_name and other != job:
                self.out(other)
        out = self.job_dir[job]
        assert (out / f"start-{job}").is_file(), f"job {job} did not start:\n{self.output(job)}"
        assert not (out / f"done-{job}").is_file(), f"job {job} finished:\n{self.output(job)}"
        return info["proc"], info["ended"] - float((out / f"start-{job}").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, deepspeed_cpu_ops):
    """All the runs of this module but one (the refused resume): 4 launches."""
    import random

    r = Runs(tmp_path_factory)
    # uninterrupted 8-step runs (checkpoints at 4 and 8) of every backend; pruning; a run stopped by
    # SIGTERM to rank 1 after step 3; NaN skipped; last, kill -9 of rank 1 after a random step in
    # 5..7. The process group keeps the default 1800 s timeout: the kill is ended by torchrun, not
    # by a collective timing out.
    kill_step = random.randint(5, 7)
    print(f"killing rank 1 after step {kill_step}")
    r.batch("full-2", 2, [{"name": f"full-{b}", "backend": b, "mode": "full"} for b in ALL[1:]] + [
        {"name": "lora-zero3", "backend": "zero3", "mode": "full", "args": {"lora": True}},
        {"name": "sigterm", "backend": "ddp", "mode": "sigterm", "rest": ["3", "1"]},
        {"name": "nan-skip", "backend": "ddp", "mode": "nan", "rest": ["3", "skip"]},
        {"name": "kill-rank", "backend": "ddp", "mode": "kill-rank", "rest": [str(kill_step), "1"]},
    ], timeout=400)
    # last, SIGKILL in the middle of the save of step 4 (save_steps 2)
    r.batch("full-1", 1, [
        {"name": "full-single", "backend": "single", "mode": "full"},
        {"name": "prune", "backend": "single", "mode": "full", "args": {"save_steps": 2, "save_total_limit": 2}},
        {"name": "kill-in-save", "backend": "single", "mode": "kill-in-save", "rest": ["2"]},
    ])
    for name in ("sigterm", "kill-rank", "kill-in-save"):
        shutil.copytree(r.dir(name), r.dir(f"{name}-interrupted"), symlinks=True, dirs_exist_ok=True)
    ckpt4 = lambda src: str(r.dir(f"full-{src}") / "checkpoint-4")  # noqa: E731
    resume = lambda name, backend, src: {"name": name, "backend": backend, "mode": "resume", "rest": [src]}  # noqa: E731
    # a resume of an interrupted run goes on in that run's directory, from `latest`
    again = lambda name, backend: dict(resume(f"resume-{name}", backend, "latest"), out=str(r.dir(name)))  # noqa: E731
    # one process: the `single` backend first (the others leave a one-rank process group and its
    # environment behind); last, the NaN at step 3 with nan_policy stop
    cross1 = sorted((k for k, v in CROSS.items() if v[2] == 1), key=lambda k: CROSS[k][1] != "single")
    r.batch("resume-1", 1, [resume("resume-single", "single", ckpt4("single")), again("kill-in-save", "single")]
            + [resume(k, CROSS[k][1], ckpt4(CROSS[k][0])) for k in cross1]
            + [{"name": "nan-stop", "backend": "single", "mode": "nan", "rest": ["3", "stop"]}])
    # two ranks; last, an exception on rank 1 after step 2
    r.batch("resume-2", 2, [resume(f"resume-{b}", b, ckpt4(b)) for b in ALL[1:]]
            + [resume(k, CROSS[k][1], ckpt4(CROSS[k][0])) for k, v in CROSS.items() if v[2] == 2]
            + [again("sigterm", "ddp"), again("kill-rank", "ddp")]
            + [dict(resume("zero2-fp32-to-bf16", "zero2", ckpt4("zero2")), args={"precision": "bf16"})]
            + [{"name": "raise", "backend": "fsdp", "mode": "raise", "rest": ["2", "1"]}], timeout=400)
    return r


@pytest.mark.parametrize("backend", ALL)
def test_resume_reproduces_uninterrupted_run(backend, runs):
    full_dir = runs.out(f"full-{backend}")
    full = result(full_dir, "full")
    assert len(full["losses"]) == 8
    ckpt = full_dir / "checkpoint-4"
    meta = checkpoint.read_meta(ckpt)
    assert meta["step"] == 4 and meta["backend"] == backend and meta["losses"] == full["losses"][:4]
    assert (full_dir / "latest").read_text() == "checkpoint-8"
    resumed = result(runs.out(f"resume-{backend}"), "resume")
    assert resumed["world_size"] == (1 if backend == "single" else 2)
    assert resumed["start_step"] == 4 and len(resumed["losses"]) == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][4:]), rtol=1e-6, atol=0)
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, f"{backend} resumed")


@pytest.mark.parametrize("case", list(CROSS))
def test_resume_on_other_world_size_or_backend(case, runs):
    """A checkpoint goes on under another world size or backend (gradient accumulation keeps the
    global batch): DCP reshards between single / ddp / fsdp; to or from DeepSpeed, and between
    DeepSpeed world sizes, it goes through the consolidated intermediate (DeepSpeed's universal
    checkpoint converter for ZeRO partitions). Weights and Adam state carry over, so the run goes
    on like the uninterrupted one."""
    source, target, nproc = CROSS[case]
    reference = result(runs.out("full-single"), "full")
    out = runs.out(case)
    resumed = result(out, "resume")
    assert resumed["world_size"] == nproc and resumed["start_step"] == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][4:]), rtol=1e-5, atol=0)
    assert_same_weights(reference["state_dict"], resumed["state_dict"], 1e-5, f"{source}->{target}")
    assert not list(out.glob(".convert-*")), "the conversion scratch directory is removed"


def test_zero_resume_under_another_precision_goes_through_the_conversion(runs):
    """DeepSpeed names and lays out its files by its optimizer (fp32 / bf16): an fp32 ZeRO-2
    checkpoint resumed with precision bf16 is converted (before: a FileNotFoundError after the
    process group and the model were set up). bf16 compute: the losses within bf16 rounding."""
    reference = result(runs.out("full-zero2"), "full")
    out = runs.out("zero2-fp32-to-bf16")
    resumed = result(out, "resume")
    assert resumed["start_step"] == 4 and resumed["global_step"] == 8
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][4:]), rtol=2e-3, atol=0)
    assert not list(out.glob(".convert-*"))


def test_resume_with_another_global_batch_is_refused_before_start(runs, tmp_path):
    proc = launch("single", tmp_path, "resume", str(runs.out("full-zero2") / "checkpoint-4"), nproc=1, check=False,
                  env={"WORKER_ARGS": json.dumps({"gradient_accumulation_steps": 1})})
    assert proc.returncode != 0
    assert "resume_from_checkpoint" in proc.stderr and "global batch of 4" in proc.stderr
    assert "gradient_accumulation_steps" in proc.stderr


def test_consolidate_writes_the_weights_of_the_step(runs, tmp_path):
    """`unsloth-dist checkpoint consolidate` of the step-8 checkpoint of a ZeRO-3 run gives the
    run's final weights as a safetensors file with the model's config.json; `inspect` shows it."""
    from safetensors.torch import load_file

    src = runs.out("full-zero3")
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


def test_consolidate_of_zero3_lora_has_the_frozen_weights_and_the_cli_refuses_a_peft_folder(runs, tmp_path):
    """Under ZeRO-3 the frozen base lives in every rank's model-state fragments, not in DeepSpeed's
    optimizer state: the consolidated weights are all of the model's, bit for bit. The CLI does not
    write peft-named tensors as a Hugging Face folder (it would load as fresh weights): it says how
    to export the adapter or the merged model instead."""
    src = runs.out("lora-zero3")
    weights = checkpoint.consolidated_weights(src / "checkpoint-8")
    full = result(src, "full")["state_dict"]
    assert set(weights) == set(full) and any("base_layer" in k for k in full)
    for k, v in full.items():
        torch.testing.assert_close(weights[k], v.float(), rtol=0, atol=0, msg=k)
    proc = subprocess.run([sys.executable, "-m", "unsloth_dist", "checkpoint", "consolidate", str(src / "checkpoint-8"),
                           "-o", str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "LoRA run" in proc.stderr and "save_merged" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "export" / "model.safetensors").exists()


def test_exception_on_one_rank_ends_every_rank(runs):
    """An exception on rank 1 ends the whole run quickly with a non-zero exit and the
    original error in the launcher's output; no rank waits for the collective timeout (1800 s).
    (The last job of a launch: seconds from its start to the launcher's exit.)"""
    proc, seconds = runs.last("raise")
    assert proc.returncode != 0
    assert seconds < 120, "a rank waited for the collective timeout"
    assert "boom on rank 1 after step 2" in proc.stdout + proc.stderr
    assert "JOB raise FAILED" in proc.stdout


def test_save_killed_half_way_is_never_latest(runs):
    """The process dies after the backend wrote its files for step 4 but before the checkpoint was
    finished: `latest` stays on step 2, the half-written directory is ignored, and resuming from
    latest ends with the uninterrupted run's weights (the resume went on in kill-in-save/; what the
    killed run left is checked in its copy, kill-in-save-interrupted/)."""
    proc, _ = runs.last("kill-in-save")
    assert proc.returncode != 0
    left = runs.dir("kill-in-save-interrupted")
    assert (left / ".checkpoint-4.tmp").is_dir() and not (left / "checkpoint-4").exists()
    assert (left / "latest").read_text() == "checkpoint-2"
    assert checkpoint.resolve("latest", str(left)) == left / "checkpoint-2"
    # a directory without the completion marker is not a checkpoint, even if named like one
    (left / "checkpoint-6").mkdir()
    assert checkpoint.resolve("latest", str(left)) == left / "checkpoint-2"
    with pytest.raises(checkpoint.CheckpointError, match="not a complete"):
        checkpoint.resolve(str(left / "checkpoint-6"), str(left))
    (left / "checkpoint-6").rmdir()
    out = runs.out("resume-kill-in-save")
    resumed, reference = result(out, "resume"), result(runs.out("full-single"), "full")
    assert resumed["start_step"] == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][2:]), rtol=1e-6, atol=0)
    assert_same_weights(reference["state_dict"], resumed["state_dict"], 1e-6, "resumed after a killed save")
    assert not (out / ".checkpoint-4.tmp").exists(), "the next save of step 4 replaces the leftover"


def test_sigterm_saves_and_stops_then_resumes(runs):
    """SIGTERM to one rank (preemption): every rank stops at the next step boundary after a
    complete checkpoint (the job ends normally on both ranks); the run restarted from latest
    matches the uninterrupted one."""
    runs.out("sigterm")
    left = runs.dir("sigterm-interrupted")
    stopped = result(left, "sigterm")
    assert stopped["stopped_by_signal"] and stopped["global_step"] == 3
    assert (left / "latest").read_text() == "checkpoint-3" and checkpoint.is_complete(left / "checkpoint-3")
    resumed, full = result(runs.out("resume-sigterm"), "resume"), result(runs.out("full-ddp"), "full")
    assert resumed["start_step"] == 3
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-6, atol=0)
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, "resumed after SIGTERM")


def test_killed_rank_ends_the_run_and_latest_resumes(runs):
    """kill -9 of rank 1 after a random step in 5..7: torchrun ends the other rank, nothing
    hangs; the restart from latest (step 4) finishes with the uninterrupted weights."""
    proc, seconds = runs.last("kill-rank")
    assert proc.returncode != 0
    assert seconds < 200
    assert (runs.dir("kill-rank-interrupted") / "latest").read_text() == "checkpoint-4"
    resumed, full = result(runs.out("resume-kill-rank"), "resume"), result(runs.out("full-ddp"), "full")
    assert resumed["start_step"] == 4
    assert_same_weights(full["state_dict"], resumed["state_dict"], 1e-6, "resumed after a killed rank")


def test_nan_policy_stop_names_the_step(runs):
    proc, _ = runs.last("nan-stop")
    assert proc.returncode != 0
    assert "FloatingPointError" in proc.stderr and "step 3" in proc.stderr and "nan_policy" in proc.stderr
    assert "JOB nan-stop FAILED" in proc.stderr


def test_nan_policy_skip_leaves_weights_and_goes_on(runs):
    tmp_path = runs.out("nan-skip")
    r = result(tmp_path, "nan")
    assert len(r["losses"]) == 8 and r["losses"][2] != r["losses"][2]  # step 3 is NaN
    assert all(x == x for i, x in enumerate(r["losses"]) if i != 2)
    assert_same_weights(r["before"], r["after"], 0, "skipped step changed the weights")
    assert any(not torch.equal(r["after"][k], r["state_dict"][k]) for k in r["after"]), "training went on after the skip"
    assert json.loads([l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "skipped" in l][0])["step"] == 3


def test_save_total_limit_prunes_after_the_new_checkpoint(runs):
    tmp_path = runs.out("prune")  # a full single run with save_steps 2, save_total_limit 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert (tmp_path / "latest").read_text() == "checkpoint-8"
    assert not list(tmp_path.glob(".checkpoint-*"))
