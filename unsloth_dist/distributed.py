"""Launcher environment, process group, rank helpers and the checks that run before them.

Everything here that can reject input does so before `torch.distributed` is touched.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from .config import (
    AutoConfig,
    ConfigError,
    DDPConfig,
    FSDPConfig,
    SingleConfig,
    TrainConfig,
    ZeroConfig,
)


class LaunchError(RuntimeError):
    """The launcher environment is inconsistent or cannot run what was asked."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | deepspeed | accelerate | env
    accelerate_mode: Optional[str] = None  # fsdp | deepspeed | None
    accelerate_zero_stage: Optional[int] = None
    force_single: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _int_var(env: Mapping[str, str], name: str, default: Optional[int] = None) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher command") from None


def _truthy(value: Optional[str]) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    """Whether `accelerate launch` started this process. Its DeepSpeed / FSDP launches set
    ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP; its plain multi-GPU and single-process
    launches set ACCELERATE_MIXED_PRECISION together with ACCELERATE_DYNAMO_BACKEND. The mixed
    precision variable alone (a user's shell export) does not make a torchrun launch accelerate's."""
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")) or _truthy(env.get("ACCELERATE_USE_FSDP")):
        return True
    return "ACCELERATE_MIXED_PRECISION" in env and "ACCELERATE_DYNAMO_BACKEND" in env


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read rank / world size and which launcher started us, checking they agree."""
    env = os.environ if environ is None else environ
    force_single = _truthy(env.get("UNSLOTH_FORCE_SINGLE_GPU"))
    world = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    local_rank = _int_var(env, "LOCAL_RANK", 0)
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", None) or _int_var(env, "LOCAL_SIZE", None)

    if launched_by_accelerate(env):
        launcher = "accelerate"
    elif "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        launcher = "torchrun"
    elif "WORLD_SIZE" in env:
        launcher = "env"
    else:
        launcher = "none"

    mode, stage = None, None
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        mode = "deepspeed"
        stage = _int_var(env, "ACCELERATE_DEEPSPEED_ZERO_STAGE", None)
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            pass  # the stage is in that JSON (unsloth_dist.launch.accelerate_config reads it)
        elif stage not in (1, 2, 3):
            raise LaunchError(
                "accelerate set ACCELERATE_USE_DEEPSPEED=true but ACCELERATE_DEEPSPEED_ZERO_STAGE is "
                f"{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE')!r}; set zero_stage 1, 2 or 3 in the "
                "accelerate config (deepspeed_config.zero_stage)"
            )
    elif _truthy(env.get("ACCELERATE_USE_FSDP")):
        mode = "fsdp"

    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1}); the launcher environment is inconsistent")
    if local_world is None:
        local_world = world if world > 1 else 1
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} (LOCAL_WORLD_SIZE={local_world})")
    if world > 1 and not force_single:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise LaunchError(
                f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the script with torchrun, "
                "deepspeed or accelerate launch (they set it), or export it yourself"
            )
    if force_single:
        return LaunchEnv(launcher=launcher, force_single=True)
    return LaunchEnv(rank, world, local_rank, local_world, launcher, mode, stage, False)


def resolve_backend(backend: Any, env: LaunchEnv):
    """Turn `auto` into a concrete backend config and check the choice fits the launch."""
    if isinstance(backend, AutoConfig):
        if env.launcher == "accelerate":
            from .config import parse_backend
            from .launch.accelerate_config import backend_from_accelerate_env

            wanted = backend_from_accelerate_env()
            if wanted is not None:
                return parse_backend(wanted)
        if env.accelerate_mode == "deepspeed":
            return ZeroConfig(name=f"zero{env.accelerate_zero_stage}")
        if env.accelerate_mode == "fsdp":
            return FSDPConfig()
        if env.world_size == 1:
            return SingleConfig()
        if env.launcher == "deepspeed":
            return ZeroConfig(name="zero2")
        return DDPConfig()
    if env.world_size > 1 and isinstance(backend, SingleConfig):
        raise LaunchError(
            f"backend 'single' was asked for but the launcher started {env.world_size} processes "
            "(WORLD_SIZE); pick ddp, fsdp or zero1/2/3, or launch one process (or set UNSLOTH_FORCE_SINGLE_GPU=1)"
        )
    return backend


def device_for(env: LaunchEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def check_runtime(cfg: TrainConfig, backend, env: LaunchEnv) -> None:
    """Checks that depend on the machine and launch; they run before any process group."""
    cuda = torch.cuda.is_available()
    cfg.check_world_size(env.world_size)
    if cfg.precision == "fp16-mixed" and isinstance(backend, FSDPConfig) and cfg.backend.name == "auto":
        # (an explicit backend: fsdp is refused by the config itself; auto resolved it from the launch)
        raise ConfigError(
            "precision: fp16-mixed is not supported with backend fsdp, which backend: auto chose for this launch "
            "(FSDP2 has no sharded fp16 loss scaler); use precision: bf16-mixed / bf16, or launch a zero backend"
        )
    if cfg.dist_backend == "nccl" and not cuda:
        raise ConfigError("dist_backend: 'nccl' needs CUDA GPUs and none is visible; use dist_backend: gloo (or auto)")
    if not cuda:
        if cfg.precision == "fp16-mixed":
            raise ConfigError(
                "precision: fp16-mixed needs a CUDA GPU (fp16 loss scaling is not supported on CPU); "
                "use precision: bf16-mixed or fp32 on CPU"
            )
        from unsloth_dist.kernels._utils import interpret_mode

        if cfg.fused_master_adamw is True and not interpret_mode():
            raise ConfigError(
                "fused_master_adamw: true runs a Triton kernel and this run has no GPU (on CPU only Triton's "
                "interpreter, TRITON_INTERPRET=1, can run it, for tests); leave fused_master_adamw unset (off on CPU)"
            )
        if isinstance(backend, FSDPConfig) and backend.cpu_offload:
            raise ConfigError("backend.cpu_offload: there is no GPU to offload from on this CPU-only run; set cpu_offload: false")
        if isinstance(backend, ZeroConfig) and (backend.offload_optimizer != "none" or backend.offload_param != "none"):
            raise ConfigError(
                "backend.offload_optimizer / backend.offload_param: offloading to CPU needs a GPU to offload "
                "from and DeepSpeed's CPU Adam op; set them to none on a CPU-only run"
            )
    elif env.distributed and env.local_world_size > torch.cuda.device_count():
        raise LaunchError(
            f"{env.local_world_size} processes per node but only {torch.cuda.device_count()} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch at most one process per GPU"
        )
    if isinstance(backend, FSDPConfig) and backend.sharding == "hybrid" and env.world_size % env.local_world_size:
        raise ConfigError(
            f"backend.sharding: hybrid shards within a node of {env.local_world_size} ranks but the world size "
            f"{env.world_size} is not a multiple of it; use sharding: full"
        )
    if isinstance(backend, ZeroConfig):
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
            raise ConfigError(f"backend {backend.name!r} needs DeepSpeed, which failed to import ({exc}); pip install deepspeed") from None


def init_process_group(cfg: TrainConfig, backend, env: LaunchEnv, device: torch.device) -> None:
    """Create the default process group (if the launch is distributed and none exists)."""
    if dist.is_available() and dist.is_initialized():
        return
    if not env.distributed:
        if not isinstance(backend, (DDPConfig, FSDPConfig, ZeroConfig)):
            return
        # DDP, FSDP2 and DeepSpeed need a process group even in one process (`Trainer(backend=
        # "fsdp")` in a notebook, or a one-GPU run under torchrun): a one-rank group
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
            if env.force_single:  # UNSLOTH_FORCE_SINGLE_GPU: the launcher's values would join its group
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)
        if env.force_single:
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # (torchrun's store is for its own group)
    dist_backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if isinstance(backend, ZeroConfig):
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist_backend, timeout=timeout, verbose=False)
    else:
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(dist_backend, timeout=timeout, **kwargs)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def launch_rank() -> int:
    """This process's rank: the process group's, else the launcher's (before any group exists; 0
    when the launcher environment is missing or inconsistent -- the Trainer reports that)."""
    if is_dist():
        return dist.get_rank()
    try:
        return read_launch_env().rank
    except Exception:
        return 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if is_dist() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


_CPU_GROUP: list = []  # [(default group object, its gloo twin)]


def cpu_group():
    """A process group that reduces CPU tensors: the default group when it is gloo, otherwise a gloo
    group over the same ranks, created once (collectively: every rank calls this at the same point).

    The trainer sums its per-step counters (target tokens, tokens, a stop flag) over it, so reading
    them never waits for the GPU stream (an NCCL reduction of a CUDA tensor would, through `.tolist()`).
    None when there is no process group or it has one rank (nothing to reduce)."""
    if not is_dist() or dist.get_world_size() == 1:
        return None
    default = dist.group.WORLD
    if dist.get_backend(default) == "gloo":
        return default
    if not _CPU_GROUP or _CPU_GROUP[0][0] is not default:  # a new default group: a new twin
        _CPU_GROUP[:] = [(default, dist.new_group(backend="gloo"))]
    return _CPU_GROUP[0][1]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """End the process group at the end of a script, on every rank together: wait for the slowest
    rank (e.g. rank 0 still writing files), then destroy the groups. Call it once the Trainer and the
    models it wrapped are gone: a group destroyed while DDP's reducer still holds it, or left to the
    interpreter's exit (torch 2.13 + gloo), can hang or abort the rank ("terminate called without an
    active exception")."""
    import gc

    if not is_dist():
        return
    gc.collect()  # a DDP reducer in a reference cycle still holds the group
    try:
        dist.barrier()
    finally:
        _CPU_GROUP.clear()
        dist.destroy_process_group()
