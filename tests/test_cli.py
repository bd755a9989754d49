"""The `unsloth-dist` command: --help everywhere, one-line errors with exit 2, generated configs
in sync with the checked-in ones, `config deepspeed` = what the Trainer uses, `env`, `train`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, run_cmd

from unsloth_dist.cli import app
from unsloth_dist.config import load_config
from unsloth_dist.launch.deepspeed_config import deepspeed_config
from unsloth_dist.launch.envcheck import BLOCKER, launch_rows
from unsloth_dist.launch.generated import GENERATED, command

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["train"], ["launch"], ["config"], ["config", "accelerate"],
                                 ["config", "deepspeed"], ["env"], ["plan"]])
def test_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_checked_in_configs_are_current(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "regen"
    r = runner.invoke(app, command(path, str(out)))
    assert r.exit_code == 0, r.output
    regen = "unsloth-dist " + " ".join(command(path))
    assert (ROOT / path).is_file(), f"{path} is missing; regenerate it with: {regen}"
    assert out.read_text() == (ROOT / path).read_text(), (
        f"{path} differs from what the generator writes now; regenerate it with: {regen} "
        "(or all of them: python -m unsloth_dist.launch.generated)")


def test_config_deepspeed_is_what_the_trainer_uses(tmp_path):
    out = tmp_path / "ds.json"
    r = runner.invoke(app, ["config", "deepspeed", "--stage", "3", "--config", str(ROOT / "configs/tiny_llama.yaml"),
                            "--world-size", "2", "--offload-optimizer", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    cfg = load_config(ROOT / "configs/tiny_llama.yaml", backend={"name": "zero3", "offload_optimizer": "cpu"})
    assert json.loads(out.read_text()) == deepspeed_config(cfg, cfg.backend, 2)
    assert json.loads(out.read_text())["train_batch_size"] == 4 * 2 * 2


def test_config_accelerate_fsdp_follows_the_recipe(tmp_path):
    import yaml

    out = tmp_path / "a.yaml"
    r = runner.invoke(app, ["config", "accelerate", "--backend", "fsdp", "--num-processes", "4", "--config",
                            str(ROOT / "configs/tiny_llama.yaml"), "--set", "backend.sharding=grad_op", "--cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    assert data["distributed_type"] == "FSDP" and data["num_processes"] == 4 and data["use_cpu"] is True
    f = data["fsdp_config"]
    assert f["fsdp_version"] == 2 and f["fsdp_sharding_strategy"] == "SHARD_GRAD_OP"
    assert f["fsdp_reshard_after_forward"] is False and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # accelerate's own loader accepts it
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(out)).num_processes == 4


@pytest.mark.parametrize("args, message", [
    (["config", "accelerate", "--backend", "zero2", "--num-processes", "4", "--num-machines", "2", "-o", "x.yaml"],
     "--main-process-ip"),
    (["config", "accelerate", "--backend", "zero2", "--num-processes", "3", "--num-machines", "2",
      "--main-process-ip", "a", "-o", "x.yaml"], "not a multiple"),
    (["config", "accelerate", "--backend", "fsdp", "--num-processes", "2", "--config", "missing.yaml", "-o", "x.yaml"],
     "does not exist"),
    (["config", "deepspeed", "--stage", "2", "--set", "backend.offload_param=cpu", "-o", "x.json"], "zero3"),
    (["train", "missing.yaml"], "does not exist"),
    (["train", "configs/tiny_llama.yaml", "--backend", "zero4"], "backend 'zero4' is unknown"),
    (["train", "configs/tiny_llama.yaml", "--text", "nope.txt"], "--text file 'nope.txt' does not exist"),
    (["train", "configs/tiny_llama.yaml", "--model", "some/dir", "--layers", "2"], "--layers shape the built-in model"),
    (["plan", "--model", "llama-9", "--gpus", "2"], "neither a preset"),
])
def test_user_errors_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (ROOT / "x.yaml").exists() and not (ROOT / "x.json").exists()


def test_env_ok_and_blockers(monkeypatch):
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    assert "torch" in r.output and "deepspeed" in r.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 1 and "RANK=5 is outside" in r.output
    monkeypatch.setenv("RANK", "0")  # WORLD_SIZE=2 without MASTER_ADDR / MASTER_PORT
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 1 and "MASTER_ADDR" in r.output


def test_env_more_processes_than_gpus():
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "a",
           "MASTER_PORT": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    rows = launch_rows(env, gpu_count=2, cuda=True)
    bad = [r for r in rows if r.status == BLOCKER]
    assert bad and "4 processes per node, 2 GPU(s) visible" in bad[0].value and "--nproc 2" in bad[0].fix
    assert not [r for r in launch_rows(env | {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}, 2, True) if r.status == BLOCKER]


def test_train_a_recipe_in_process_entry_points(tmp_path):
    # the installed script and `python -m unsloth_dist` are the same command
    proc = run_cmd([sys.executable, "-m", "unsloth_dist", "train", "configs/full_ddp.yaml", "--backend", "single",
                    "--set", "max_steps=3", "--set", "disable_tqdm=true", "--set", "precision=fp32",
                    "--set", f"output_dir={tmp_path}", "--seq-len", "32", "--layers", "2", "--hidden", "64"])
    assert "backend=single world_size=1 steps=3" in proc.stdout
    assert (tmp_path / "metrics.jsonl").is_file()


def test_console_script_exists():
    import shutil

    exe = shutil.which("unsloth-dist")
    assert exe, "the unsloth-dist script is missing: pip install -e ."
    proc = subprocess.run([exe, "train", "missing.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: config file 'missing.yaml' does not exist")


def test_train_a_recipe_with_a_data_section_trains_on_it(tmp_path):
    """`unsloth-dist train` with a config whose data: section names files trains on those files
    (tokenized with --model's tokenizer), and without --model says it needs one."""
    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from data_common import SHIPPED, bpe_tokenizer

    from tiny import tiny_llama

    tok = bpe_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(seed=0, vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\nmax_steps: 2\nprecision: fp32\ndisable_tqdm: true\n"
                   f"per_device_train_batch_size: 4\ndata:\n  paths: [{SHIPPED / 'instructions.jsonl'}]\n"
                   f"  max_seq_length: 64\n  cache_dir: {tmp_path / 'cache'}\n")
    proc = subprocess.run([sys.executable, "-m", "unsloth_dist", "train", str(cfg), "--backend", "single"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "data: section" in proc.stderr and "--model" in proc.stderr, proc.stderr
    proc = run_cmd([sys.executable, "-m", "unsloth_dist", "train", str(cfg), "--backend", "single",
                    "--model", str(model_dir)])
    assert "backend=single world_size=1 steps=2" in proc.stdout
    # the files were tokenized: the cache holds them (the byte-level default corpus would not be cached)
    assert any((tmp_path / "cache").iterdir())


def test_cli_audit_one_line_errors_and_flags(tmp_path):
    """From a CLI audit: each of these was a traceback, a silently ignored flag or a wrong exit status."""
    tiny = str(ROOT / "configs/tiny_llama.yaml")
    # an output_dir whose 'latest' names a checkpoint that is gone
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("checkpoint-99\n")
    r = runner.invoke(app, ["checkpoint", "inspect", str(run)])
    assert r.exit_code == 2 and "no complete checkpoint" in r.output, r.output
    # -o naming a directory / a file where a directory is wanted: one line, before any work
    r = runner.invoke(app, ["config", "deepspeed", "--stage", "3", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output, r.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = runner.invoke(app, ["checkpoint", "consolidate", str(run), "-o", str(afile)])
    assert r.exit_code == 2, r.output
    # --offload-optimizer none wins over a recipe that offloads
    out = tmp_path / "ds.json"
    r = runner.invoke(app, ["config", "deepspeed", "--stage", "3", "-c", tiny, "--set", "backend.offload_optimizer=cpu",
                            "--offload-optimizer", "none", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "none"
    # plan --json exits 1 when nothing fits, as the table form does
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "1", "--gpu-memory", "1", "--json"])
    assert r.exit_code == 1, r.output
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "1", "--gpu-memory", "1"])
    assert r.exit_code == 1 and r.output.count("nothing fits") == 1, r.output
    # backend single on 2 processes: refused before anything starts
    r = runner.invoke(app, ["launch", tiny, "--nproc", "2", "--backend", "single", "--dry-run"])
    assert r.exit_code == 2 and "backend 'single' with 2 processes" in r.output, r.output
