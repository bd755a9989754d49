"""Every launch command in an example's header docstring is run by a test, exactly as written (with
DIR / FILE filled in and tiny settings appended).

Commands already exercised elsewhere are listed in ELSEWHERE with the test that runs them; a check
here makes sure that test runs that launcher, that script and those arguments. The rest run here:
the seed-API example in one process and under ZeRO-3, QLoRA-FSDP's clear refusal without CUDA, and
(marked gpu) QLoRA-FSDP and the split-model inference on the device. Last, the commands written in
the README and docs/MULTI_GPU_TRAINING.md: the README's set-up commands match .ci/run, every
`unsloth-dist ...` line names real commands and options, every examples/*.py named exists.
"""
from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cmd, torchrun

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from models_common import make_model_dir  # noqa: E402

EXAMPLES = ["train.py", "multi_gpu_training.py", "multi_gpu_inference.py", "qlora_fsdp.py"]
LAUNCHERS = ("python examples/", "torchrun ", "deepspeed ", "accelerate launch ")

# header command -> "test file::function or fixture" that runs it
ELSEWHERE = {
    "python examples/train.py": "tests/test_launchers.py::single_run",
    "torchrun --nproc_per_node 2 examples/train.py --backend fsdp": "tests/test_launchers.py::test_torchrun_fsdp",
    "deepspeed --num_gpus 2 examples/train.py --backend zero2":
        "tests/test_launchers.py::test_deepspeed_launcher_zero2",
    "accelerate launch --config_file FILE examples/train.py":
        "tests/test_accelerate_launch.py::test_accelerate_launch_generated_config",
    "torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --lora":
        "tests/test_seed_api.py::test_seed_snippet_under_torchrun",
    "python examples/multi_gpu_inference.py --model DIR": "tests/test_models_inference.py::single",
    "torchrun --nproc_per_node 2 examples/multi_gpu_inference.py --model DIR":
        "tests/test_models_inference.py::test_data_parallel_matches_one_process",
}
HERE = {
    "python examples/multi_gpu_training.py --model DIR": "test_multi_gpu_training_one_process",
    "torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --backend zero3 --lora":
        "test_multi_gpu_training_zero3_lora",
    "python examples/multi_gpu_inference.py --model DIR --device-map sequential --max-memory 0=20GiB,1=20GiB":
        "test_multi_gpu_inference_split_over_two_gpus",
    # on the device; without CUDA, test_qlora_fsdp_without_cuda_is_a_clear_error runs the same command
    "torchrun --nproc_per_node 2 examples/qlora_fsdp.py --model DIR": "test_qlora_fsdp",
}


def header_commands(script: str) -> list[str]:
    """The launch commands in an example's module docstring (trailing `# comments` dropped)."""
    doc = ast.get_docstring(ast.parse((ROOT / "examples" / script).read_text())) or ""
    out = []
    for line in doc.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(LAUNCHERS):
            out.append(" ".join(line.split()))
    return out


def command(header: str, **fill: str) -> list[str]:
    """A header command as an argv: placeholders filled, `python` -> this interpreter, torchrun through
    conftest.torchrun (same flags, plus a free port on 127.0.0.1)."""
    assert any(header in header_commands(s) for s in EXAMPLES), f"{header!r} is not in any example's header"
    words = [fill.get(w, w) for w in shlex.split(header)]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "torchrun":
        assert words[1] == "--nproc_per_node", header
        return torchrun(int(words[2]), *words[3:])
    raise AssertionError(f"no runner for {header!r}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("examples") / "model")


# ------------------------------------------------------------------ every header command has its test


def test_every_header_command_has_a_test():
    found = {c for s in EXAMPLES for c in header_commands(s)}
    assert found, "no header commands found"
    for script in EXAMPLES:
        assert header_commands(script), f"examples/{script} has no launch command in its header docstring"
    untested = found - set(ELSEWHERE) - set(HERE)
    assert not untested, f"header commands no test runs (add a test, then list it in ELSEWHERE or HERE): {untested}"
    stale = (set(ELSEWHERE) | set(HERE)) - found
    assert not stale, f"listed commands no longer in any header: {stale}"
    here = sys.modules[__name__]
    for cmd, name in HERE.items():
        assert callable(getattr(here, name, None)), f"{name} (for {cmd!r}) is not a test in this file"


@pytest.mark.parametrize("header", sorted(ELSEWHERE))
def test_the_test_elsewhere_runs_the_header_command(header):
    """The listed test runs that launcher with that process count, that script and those arguments."""
    path, name = ELSEWHERE[header].split("::")
    source = (ROOT / path).read_text()
    fn = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    assert fn is not None, f"{path} has no function {name}"
    body = ast.get_source_segment(source, fn)
    words = shlex.split(header)
    script = next(w for w in words if w.startswith("examples/"))
    assert f'"{script}"' in source, f"{path} does not run {script}"
    launcher, args = words[0], words[words.index(script) + 1:]
    if launcher == "python":  # a subprocess of this interpreter, or main() of the loaded example with the same argv
        expect = ["sys.executable"] if path != "tests/test_models_inference.py" else ["_example().main("]
    elif launcher == "torchrun":
        expect = [f"torchrun({words[2]},"]
    elif launcher == "deepspeed":
        expect = [f'"--num_gpus", "{words[2]}"']
    else:
        expect = ["accelerate_exe()", '"--config_file"']
    for snippet in expect:
        assert snippet in body, f"{ELSEWHERE[header]} does not launch like {header!r} (no {snippet})"
    for arg in args:
        if arg in ("DIR", "FILE"):
            continue
        assert f'"{arg}"' in body, f"{ELSEWHERE[header]} does not pass {arg} ({header!r})"


# ------------------------------------------------------------------ examples/multi_gpu_training.py


def test_multi_gpu_training_one_process(model_dir, tmp_path):
    out = tmp_path / "out"
    run_cmd(command("python examples/multi_gpu_training.py --model DIR", DIR=model_dir) + ["--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert (s["world_size"], s["backend"], s["global_step"], len(s["losses"])) == (1, "single", 5, 5)
    assert s["losses"][-1] < s["losses"][0], s["losses"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_multi_gpu_training_zero3_lora(model_dir, tmp_path, deepspeed_cpu_ops):
    out = tmp_path / "out"
    header = "torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --backend zero3 --lora"
    run_cmd(command(header, DIR=model_dir) + ["--out", str(out), "--max-steps", "3"])
    s = json.loads((out / "summary.json").read_text())
    assert (s["world_size"], s["backend"], s["global_step"]) == (2, "zero3", 3)
    assert all(x == x for x in s["losses"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------ examples/multi_gpu_inference.py


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_multi_gpu_inference_split_over_two_gpus(model_dir, tmp_path):
    out = tmp_path / "gen.json"
    header = ("python examples/multi_gpu_inference.py --model DIR --device-map sequential "
              "--max-memory 0=20GiB,1=20GiB")
    run_cmd(command(header, DIR=model_dir) + ["--json", str(out), "--no-sample", "--max-new-tokens", "4"])
    res = json.loads(out.read_text())
    assert res["world_size"] == 1 and len(res["greedy"]) == 5
    assert set(map(str, res["device_map"].values())) <= {"0", "1"}


# ------------------------------------------------------------------ examples/qlora_fsdp.py

QLORA = "torchrun --nproc_per_node 2 examples/qlora_fsdp.py --model DIR"
NO_CUDA = "examples/qlora_fsdp.py needs CUDA GPUs and none is visible here"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_fsdp_without_cuda_is_a_clear_error(model_dir):
    env = {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "examples/qlora_fsdp.py", "--model", model_dir], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert one.returncode == 2, one.stderr
    assert NO_CUDA in one.stderr and "multi_gpu_training.py" in one.stderr
    assert "Traceback" not in one.stderr
    # as the header launches it: every rank says why; the only traceback is torchrun's own ChildFailedError
    proc = subprocess.run(command(QLORA, DIR=model_dir), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert NO_CUDA in text
    assert 'qlora_fsdp.py", line' not in text, text[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_fsdp(tmp_path_factory, tmp_path):
    """The header command on the device (as many ranks as GPUs, at most 2): QLoRA trains under fsdp, the
    loss falls, every rank reports its peak memory, the adapter is written."""
    pytest.importorskip("bitsandbytes")
    model = make_model_dir(tmp_path_factory.mktemp("qlora") / "model", hidden=256, layers=4, vocab=128)
    n = min(2, torch.cuda.device_count())
    argv = command(QLORA, DIR=model)
    argv[argv.index("--nproc_per_node") + 1] = str(n)
    out = tmp_path / "out"
    run_cmd(argv + ["--out", str(out), "--max-steps", "20", "--seq-len", "128", "--lr", "2e-3"])
    s = json.loads((out / "summary.json").read_text())
    assert (s["backend"], s["world_size"], s["steps"]) == ("fsdp", n, 20)
    losses = s["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert len(s["peak_mem_gib_per_rank"]) == n and all(p > 0 for p in s["peak_mem_gib_per_rank"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    print(f"\nqlora_fsdp on {n} x {s['gpu']}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"peak GiB {s['peak_mem_gib_per_rank']}")


# ------------------------------------------------------------------ commands in the README and the guide

DOCS = ["README.md", "docs/MULTI_GPU_TRAINING.md"]
INSTALL = 'pip install "setuptools>=70" wheel torch==2.13.0 && DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[dev]"'


def _code_blocks(text: str) -> list[str]:
    return text.split("```")[1::2]


def test_readme_setup_commands_and_ci_agree():
    blocks = [b.split("\n", 1)[1].strip() for b in _code_blocks((ROOT / "README.md").read_text()) if b.startswith("bash")]
    assert blocks[0] == f"{INSTALL} && python examples/quickstart.py", blocks[0]
    assert blocks[1] == "python -m pytest -q", blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == f"{INSTALL} && {blocks[1]}", f".ci/run runs {ci!r}, not the README's install + test command"


def _unsloth_dist_calls() -> list[list[str]]:
    calls = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for line in text.splitlines():
            for part in line.split("unsloth-dist ")[1:]:
                words = shlex.split(part.split("#", 1)[0].split("`", 1)[0].replace("\\", " "), posix=True)
                if words and not words[0].startswith(("-", ".")) and words[0].isidentifier():
                    calls.append(words)
    return calls


def test_unsloth_dist_commands_in_docs_exist():
    """Every `unsloth-dist SUB [SUB2] --option` written in the README and the guide is a real command
    with those options."""
    import typer

    from unsloth_dist.cli import app

    root = typer.main.get_command(app)
    calls = _unsloth_dist_calls()
    assert len(calls) > 10, calls
    seen = set()
    for words in calls:
        cmd, path = root, []
        for w in words:
            if hasattr(cmd, "commands") and not w.startswith("-"):  # a group (typer's own click copy)
                alternatives = w.split("|")  # prose like `checkpoint inspect|consolidate`
                for alt in alternatives:
                    assert alt in cmd.commands, f"`unsloth-dist {' '.join(path + [alt])}` is not a command (in {words})"
                    seen.add(" ".join(path + [alt]))
                cmd, path = cmd.commands[alternatives[0]], path + [alternatives[0]]
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in words:
            if w == "--":
                break  # arguments after -- go to `train`
            if w.startswith("-") and w not in ("-", "--"):
                assert w.split("=", 1)[0] in opts, f"`unsloth-dist {' '.join(path)}` has no option {w} ({words})"
        seen.add(" ".join(path))
    assert {"train", "launch", "config accelerate", "config deepspeed", "plan", "env", "plot",
            "checkpoint consolidate"} <= seen, seen


def test_example_scripts_named_in_docs_exist():
    import re

    for doc in DOCS:
        for name in set(re.findall(r"examples/([\w]+\.py)", (ROOT / doc).read_text())):
            assert (ROOT / "examples" / name).is_file(), f"{doc} names examples/{name}, which does not exist"
