"""`unsloth-dist env`: what is installed, what the machine has, and whether the launcher
environment can run. Each row has a status: ok, info, warn or blocker (with the fix)."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Mapping, Optional

OK, INFO, WARN, BLOCKER = "ok", "info", "warn", "blocker"


@dataclass
class Row:
    item: str
    value: str
    status: str = OK
    fix: str = ""


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_rows() -> list[Row]:
    import torch

    rows = [Row("python", platform.python_version()), Row("torch", torch.__version__)]
    for name, dist, required in (
        ("transformers", "transformers", True),
        ("peft", "peft", True),
        ("accelerate", "accelerate", True),
        ("deepspeed", "deepspeed", True),
        ("triton", "triton", False),
        ("bitsandbytes", "bitsandbytes", False),
    ):
        v = _version(dist)
        if v is not None:
            rows.append(Row(name, v))
        elif required:
            rows.append(Row(name, "not installed", BLOCKER, f"pip install {dist}"))
        else:
            rows.append(Row(name, "not installed", INFO, f"optional: pip install {dist}"))
    return rows


def device_rows() -> tuple[list[Row], int]:
    import torch

    if not torch.cuda.is_available():
        why = "CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}, no GPU visible"
        return [Row("CUDA", f"not available ({why})", INFO, "training runs on CPU with gloo (slow)")], 0
    n = torch.cuda.device_count()
    rows = [Row("CUDA", f"{torch.version.cuda} (driver sees {n} GPU(s))")]
    try:
        nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        rows.append(Row("NCCL", nccl))
    except Exception as exc:  # pragma: no cover - GPU only
        rows.append(Row("NCCL", f"unavailable ({exc})", WARN, "multi-GPU runs need NCCL; use a CUDA build of torch"))
    for i in range(n):  # pragma: no cover - GPU only
        p = torch.cuda.get_device_properties(i)
        rows.append(Row(f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}"))
    return rows, n


def launch_rows(environ: Mapping[str, str], gpu_count: int, cuda: bool) -> list[Row]:
    """Launcher variables and their consistency with each other and with the visible GPUs."""
    from ..distributed import LaunchError, read_launch_env

    rows: list[Row] = []
    shown = [k for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                         "ACCELERATE_DEEPSPEED_ZERO_STAGE", "UNSLOTH_FORCE_SINGLE_GPU") if k in environ]
    rows.append(Row("launcher vars", ", ".join(f"{k}={environ[k]}" for k in shown) or "none (one process)", INFO))
    try:
        env = read_launch_env(environ)
    except LaunchError as exc:
        rows.append(Row("launch environment", "inconsistent", BLOCKER, str(exc)))
        return rows
    rows.append(Row("launch", f"launcher={env.launcher} world_size={env.world_size} rank={env.rank} "
                              f"local_world_size={env.local_world_size}", OK))
    if cuda and env.distributed and env.local_world_size > gpu_count:
        rows.append(Row(
            "GPUs per node", f"{env.local_world_size} processes per node, {gpu_count} GPU(s) visible", BLOCKER,
            f"launch at most {gpu_count} process(es) per node (--nproc {gpu_count}) or make more GPUs visible "
            f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
        ))
    elif cuda and not env.distributed and gpu_count > 1:
        rows.append(Row("GPUs", f"{gpu_count} visible, 1 process", INFO,
                        f"use all of them: unsloth-dist launch CONFIG --nproc {gpu_count}"))
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() == "" and cuda is False and env.distributed:
        rows.append(Row("CUDA_VISIBLE_DEVICES", "empty: no GPU visible", WARN, "unset it to use the GPUs"))
    if env.launcher == "accelerate":
        from .accelerate_config import AccelerateLaunchError, backend_from_accelerate_env

        try:
            rows.append(Row("accelerate backend", str(backend_from_accelerate_env(environ) or {"name": "ddp/auto"}), OK))
        except AccelerateLaunchError as exc:
            rows.append(Row("accelerate backend", "unreadable", BLOCKER, str(exc)))
    return rows


def check_environment(environ: Optional[Mapping[str, str]] = None, gpu_count: Optional[int] = None) -> list[Row]:
    """All rows. `gpu_count` overrides the detected count (tests; planning for another machine)."""
    import torch

    environ = os.environ if environ is None else environ
    rows = package_rows()
    dev, n = device_rows()
    rows += dev
    cuda = torch.cuda.is_available() if gpu_count is None else gpu_count > 0
    rows += launch_rows(environ, n if gpu_count is None else gpu_count, cuda)
    return rows
