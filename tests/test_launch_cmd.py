"""`unsloth-dist launch` under torchrun, the DeepSpeed launcher and accelerate (2 CPU processes
each, real runs), the commands it builds for several nodes, and its errors."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, free_port, run_cmd

from unsloth_dist.cli import app

TINY = ["--set", "max_steps=2", "--set", "disable_tqdm=true", "--set", "per_device_train_batch_size=2",
        "--set", "gradient_accumulation_steps=1", "--set", "gradient_checkpointing=false"]
MODEL = ["--", "--seq-len", "32", "--layers", "2", "--hidden", "64"]
SUMMARY = re.compile(r"backend=(\w+) world_size=(\d+) steps=(\d+)")
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.slow
@pytest.mark.parametrize("launcher, recipe, expect", [
    ("torchrun", "configs/full_fsdp.yaml", "fsdp"),
    ("deepspeed", "configs/full_zero2.yaml", "zero1"),  # --backend zero1 forwarded to every rank
    ("accelerate", "configs/full_zero3.yaml", "zero3"),
])
def test_launch_runs(tmp_path, launcher, recipe, expect, deepspeed_cpu_ops):
    backend = ["--backend", "zero1"] if launcher == "deepspeed" else []
    proc = run_cmd([sys.executable, "-m", "unsloth_dist", "launch", recipe, "--nproc", "2", "--launcher", launcher,
                    "--master-port", str(free_port()), "--out-dir", str(tmp_path), *backend, *TINY,
                    "--set", f"output_dir={tmp_path / 'out'}", "--set", "precision=fp32", *MODEL])
    m = SUMMARY.search(proc.stdout)
    assert m, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert m.groups() == (expect, "2", "2")
    if launcher == "accelerate":
        written = yaml.safe_load((tmp_path / "accelerate_zero3_2p.yaml").read_text())
        assert written["distributed_type"] == "DEEPSPEED" and written["num_processes"] == 2
        assert written["deepspeed_config"]["zero_stage"] == 3 and written["use_cpu"] is True


def test_dry_run_torchrun_several_nodes():
    r = cli("launch", "configs/full_fsdp.yaml", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--master-port", "29400", "--dry-run", "--", "--seq-len", "512")
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert "torch.distributed.run --nproc_per_node 8 --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29400 -m unsloth_dist train configs/full_fsdp.yaml --seq-len 512" in line


def test_dry_run_deepspeed_hostfile(tmp_path):
    r = cli("launch", "configs/full_zero3.yaml", "--nproc", "4", "--nnodes", "2", "--master-addr", "node0",
            "--launcher", "deepspeed", "--hosts", "node0,node1", "--out-dir", str(tmp_path), "--dry-run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hostfile").read_text() == "node0 slots=4\nnode1 slots=4\n"
    assert f"--num_gpus 4 --num_nodes 2 --hostfile {tmp_path / 'hostfile'} --master_addr node0" in r.output
    assert "--no_local_rank --module unsloth_dist train configs/full_zero3.yaml" in r.output
    # without --hosts DeepSpeed's runner cannot start several nodes (it reads them from a hostfile
    # even with --no_ssh): refused before anything starts, naming the ways that work
    r = cli("launch", "configs/full_zero3.yaml", "--nproc", "4", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "node0", "--launcher", "deepspeed", "--dry-run")
    assert r.exit_code != 0 and "needs --hosts" in r.output and "torchrun" in r.output, r.output


def test_dry_run_accelerate_several_machines(tmp_path):
    r = cli("launch", "configs/full_fsdp.yaml", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--master-port", "29400", "--launcher", "accelerate", "--gpu",
            "--out-dir", str(tmp_path), "--dry-run")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((tmp_path / "accelerate_fsdp_16p.yaml").read_text())
    assert cfg["num_processes"] == 16 and cfg["num_machines"] == 2 and cfg["machine_rank"] == 1
    assert cfg["main_process_ip"] == "10.0.0.1" and cfg["main_process_port"] == 29400
    assert cfg["fsdp_config"]["fsdp_version"] == 2 and cfg["use_cpu"] is False


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2", "--nnodes", "2"], "--nnodes 2 needs --master-addr"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a"], "--node-rank 2 is outside 0..1"),
    (["--nproc", "0"], "--nproc 0"),
    (["--nproc", "2", "--hosts", "a,b"], "only applies to --launcher deepspeed"),
    (["--nproc", "2", "--launcher", "deepspeed", "--hosts", "a,b"], "--hosts lists 2 host(s) but --nnodes is 1"),
    (["--nproc", "2", "--backend", "zero7"], "backend 'zero7' is unknown"),
    (["--nproc", "2", "--set", "global_batch_size=3"], "global_batch_size=3"),
])
def test_launch_errors(args, message):
    r = cli("launch", "configs/full_ddp.yaml", *args, "--dry-run")
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output


def test_launch_missing_config_and_bad_launcher():
    r = cli("launch", "configs/nope.yaml", "--nproc", "2", "--dry-run")
    assert r.exit_code == 2 and "configs/nope.yaml" in r.output and "does not exist" in r.output
    r = cli("launch", "configs/full_ddp.yaml", "--nproc", "2", "--launcher", "mpirun", "--dry-run")
    assert r.exit_code == 2  # click's choice error


def test_missing_master_address_from_the_real_command():
    proc = subprocess.run([sys.executable, "-m", "unsloth_dist", "launch", "configs/full_ddp.yaml", "--nproc", "2",
                           "--nnodes", "3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --nnodes 3 needs --master-addr"), proc.stderr
    assert "Traceback" not in proc.stderr
