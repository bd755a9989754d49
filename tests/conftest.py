import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _prepare_triton_interpreter() -> None:
    """TRITON_INTERPRET must be set when triton is first imported (transformers' modeling code
    imports it through torch): only that import sees it, so the kernel tests can switch the
    interpreter on per test; the tests themselves run without it."""
    import torch

    if "triton" in sys.modules or torch.cuda.is_available():
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (its library is now the interpreter's)
    except Exception:
        pass
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_prepare_triton_interpreter()

# torch.distributed / DeepSpeed must not see a launcher environment left in the shell
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "UNSLOTH_FORCE_SINGLE_GPU",
             "UNSLOTH_DIST_ACCELERATE_CONFIG", "ACCELERATE_MIXED_PRECISION"):
    os.environ.pop(_var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(cmd: list[str], timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; on failure show its output (check=False: return
    it with its exit status; a timeout still fails the test)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    # own session: on timeout the whole launcher tree is killed (subprocess.run kills only the
    # launcher, then waits forever on pipes its ranks still hold)
    p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"command timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}\n---- stderr ----\n{err[-6000:]}")
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if proc.returncode != 0 and check:
        tail = (proc.stdout[-6000:] + "\n---- stderr ----\n" + proc.stderr[-8000:])
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """Build DeepSpeed's CPU shared-memory comm op once, in one process, before any two ranks
    would race to JIT-compile it."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        try:
            builder.load(verbose=False)
        except Exception as exc:  # the op is optional for DeepSpeed on CPU
            print(f"DeepSpeed shm comm op not built: {exc}")
    return True
