"""examples/train.py under the real launchers, on CPU: torchrun + FSDP2 and the DeepSpeed
launcher + ZeRO-2, plus one process. Same config and global batch, so the same losses."""
from __future__ import annotations

import re
import shutil
import sys

import pytest

from conftest import ROOT, free_port, run_cmd, torchrun

SCRIPT = "examples/train.py"
LINE = re.compile(
    r"backend=(\w+) world_size=(\d+) steps=(\d+) loss ([\d.]+) -> ([\d.]+)\s+eval ([\d.]+) -> ([\d.]+)"
)
COMMON = ["--set", "max_steps=12", "--seq-len", "64", "--layers", "2", "--hidden", "64"]


def summary(proc) -> dict:
    m = LINE.search(proc.stdout)
    assert m, f"no summary line in output:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    b, w, s, l0, l1, e0, e1 = m.groups()
    return {"backend": b, "world": int(w), "steps": int(s), "loss0": float(l0), "loss1": float(l1),
            "eval0": float(e0), "eval1": float(e1)}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # same global batch as 2 ranks x 4 x accumulation 2: 8 x accumulation 2
    proc = run_cmd([sys.executable, SCRIPT, "--backend", "single", *COMMON, "--set", f"output_dir={out}",
                    "--set", "per_device_train_batch_size=8"])
    return summary(proc)


def check(res: dict, backend: str, single: dict) -> None:
    assert res["backend"] == backend and res["world"] == 2 and res["steps"] == 12
    assert res["loss1"] < res["loss0"] - 0.5, res  # it learned
    assert res["eval1"] < res["eval0"], res
    assert res["loss1"] == pytest.approx(single["loss1"], rel=1e-3), (res, single)


@pytest.mark.slow
def test_torchrun_fsdp(tmp_path, single_run):
    proc = run_cmd(torchrun(2, SCRIPT, "--backend", "fsdp", *COMMON, "--set", f"output_dir={tmp_path}"))
    check(summary(proc), "fsdp", single_run)
    assert (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_deepspeed_launcher_zero2(tmp_path, single_run, deepspeed_cpu_ops):
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.fail("the `deepspeed` launcher is not on PATH; pip install deepspeed")
    proc = run_cmd([launcher, "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
                    "--backend", "zero2", *COMMON, "--set", f"output_dir={tmp_path}"])
    check(summary(proc), "zero2", single_run)


@pytest.mark.slow
def test_auto_backend_under_deepspeed_launcher_is_zero(tmp_path, deepspeed_cpu_ops):
    launcher = shutil.which("deepspeed")
    proc = run_cmd([launcher, "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT, *COMMON,
                    "--set", "max_steps=2", "--set", f"output_dir={tmp_path}"])
    assert summary(proc)["backend"] == "zero2"


def test_bad_config_is_a_clear_error_before_any_process_group(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, SCRIPT, "--set", "backend.offload_param=cpu", "--backend", "zero2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "backend.offload_param" in proc.stderr and "zero3" in proc.stderr
    assert "Traceback" not in proc.stderr
