"""accelerate config files derived from a TrainConfig, and reading them back under `accelerate launch`.

Writing: `accelerate_cluster_config` builds accelerate's own `ClusterConfig` (the class that
`accelerate config` fills in) and `write_accelerate_config` saves it with `to_yaml_file`, so
the file is exactly what accelerate itself would write.

Reading: `accelerate launch` does not pass its config file to the script; it exports
environment variables instead (accelerate 1.15, measured, see tests/test_accelerate_launch.py):

    every distributed type   ACCELERATE_MIXED_PRECISION, ACCELERATE_DYNAMO_*, OMP_NUM_THREADS,
                             PYTHONPATH, + torchrun's RANK / WORLD_SIZE / LOCAL_* / MASTER_*
    MULTI_GPU (ddp)          nothing more (ACCELERATE_USE_CPU is only set by the one-process
                             "simple" launcher, i.e. distributed_type NO / MULTI_CPU)
    FSDP                     ACCELERATE_USE_FSDP=true, FSDP_VERSION, FSDP_SHARDING_STRATEGY
                             (always, default FULL_SHARD; FSDP2 ignores it),
                             FSDP_RESHARD_AFTER_FORWARD, FSDP_OFFLOAD_PARAMS,
                             FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE, FSDP_ACTIVATION_CHECKPOINTING, ...
    DEEPSPEED                ACCELERATE_USE_DEEPSPEED=true, ACCELERATE_DEEPSPEED_ZERO_STAGE,
                             ACCELERATE_GRADIENT_ACCUMULATION_STEPS, ACCELERATE_GRADIENT_CLIPPING,
                             ACCELERATE_DEEPSPEED_OFFLOAD_{OPTIMIZER,PARAM}_DEVICE,
                             ACCELERATE_DEEPSPEED_CONFIG_FILE (when deepspeed_config_file is used),
                             ACCELERATE_CONFIG_DS_FIELDS
                             (with deepspeed_config_file only the last two and the default
                             ACCELERATE_MIXED_PRECISION=no: stage, offload, accumulation, clipping
                             and fp16 / bf16 are read from that JSON)

`backend_from_accelerate_env` turns those into our backend config dict, and
`check_accelerate_launch` rejects a launch that disagrees with the TrainConfig or with the
generated file's process count. The file itself is found through `UNSLOTH_DIST_ACCELERATE_CONFIG`
(exported by `unsloth-dist launch`) or, on Linux, by reading `--config_file` from the command
line of the `accelerate launch` process that started this one (/proc/<ppid>/cmdline).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import ConfigError, FSDPConfig, TrainConfig, ZeroConfig, parse_backend
from ..distributed import LaunchError, launched_by_accelerate

CONFIG_PATH_VAR = "UNSLOTH_DIST_ACCELERATE_CONFIG"

# FSDPConfig.sharding <-> the FSDP1 strategy names accelerate uses (FSDP_SHARDING_STRATEGY)
_SHARDING_TO_STRATEGY = {"full": "FULL_SHARD", "grad_op": "SHARD_GRAD_OP", "hybrid": "HYBRID_SHARD", "none": "NO_SHARD"}
_STRATEGY_TO_SHARDING = {v: k for k, v in _SHARDING_TO_STRATEGY.items()} | {"HYBRID_SHARD_ZERO2": "hybrid"}
# our precision -> accelerate's mixed_precision
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}

ACCELERATE_BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3")


class AccelerateLaunchError(LaunchError):
    """The accelerate launch disagrees with the TrainConfig or the generated config file."""


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- writing


def accelerate_cluster_config(
    cfg: TrainConfig,
    backend: Any = None,
    *,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: Optional[str] = None,
    main_process_port: Optional[int] = None,
    cpu: bool = False,
):
    """accelerate's `ClusterConfig` for `backend` (default: cfg.backend) under `cfg`.

    `num_processes` is the total over all machines, as in accelerate."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    b = parse_backend(backend if backend is not None else cfg.backend)
    if b.name not in ACCELERATE_BACKENDS:
        raise ConfigError(
            f"backend {b.name!r} has no accelerate config; choose one of {', '.join(ACCELERATE_BACKENDS)} "
            "(one process needs no launcher config)"
        )
    if num_processes < 1 or num_machines < 1:
        raise ConfigError(f"num_processes ({num_processes}) and num_machines ({num_machines}) must be at least 1")
    if num_processes % num_machines:
        raise ConfigError(
            f"num_processes {num_processes} is not a multiple of num_machines {num_machines}; "
            "accelerate's num_processes counts processes on all machines together"
        )
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"machine_rank {machine_rank} is outside 0..{num_machines - 1}")
    if num_machines > 1 and not main_process_ip:
        raise ConfigError(
            f"{num_machines} machines need the main process address: give --main-process-ip "
            "(the address of machine 0, reachable from every machine)"
        )
    # the Trainer's own checks for this world size (global_batch_size, fp16 + fsdp ...)
    cfg = TrainConfig(**(cfg.model_dump(exclude_unset=True) | {"backend": b.model_dump(exclude_unset=True) | {"name": b.name}}))
    cfg.check_world_size(num_processes)

    fsdp_config: dict[str, Any] = {}
    deepspeed_config: dict[str, Any] = {}
    if isinstance(b, FSDPConfig):
        if cpu and b.cpu_offload:
            raise ConfigError("backend.cpu_offload: a --cpu run has no GPU to offload from; set backend.cpu_offload=false")
        if b.sharding == "hybrid" and num_machines == 1:
            raise ConfigError("backend.sharding: hybrid shards inside a node and replicates across nodes; "
                              "with one machine use sharding: full")
        distributed_type = DistributedType.FSDP
        fsdp_config = {
            "fsdp_version": 2,
            # accelerate reads FSDP1's strategy only for fsdp_version 1 but always exports it
            # (FSDP_SHARDING_STRATEGY); our Trainer reads it to tell hybrid / none apart
            "fsdp_sharding_strategy": _SHARDING_TO_STRATEGY[b.sharding],
            "fsdp_reshard_after_forward": b.resolved_reshard_after_forward,
            "fsdp_offload_params": b.cpu_offload,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules: decoder layers
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": cfg.gradient_checkpointing,
        }
    elif isinstance(b, ZeroConfig):
        if cpu and (b.offload_optimizer != "none" or b.offload_param != "none"):
            raise ConfigError("backend.offload_optimizer / offload_param: a --cpu run has nothing to offload from; set them to none")
        distributed_type = DistributedType.DEEPSPEED
        deepspeed_config = {
            "zero_stage": b.stage,
            "offload_optimizer_device": b.offload_optimizer,
            "offload_param_device": b.offload_param,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "gradient_clipping": cfg.max_grad_norm,
            "zero3_init_flag": False,
        }
        if b.stage == 3:
            deepspeed_config["zero3_save_16bit_model"] = True
        if num_machines > 1:
            # accelerate then starts every machine with torchrun (no pdsh / hostfile needed)
            deepspeed_config["deepspeed_multinode_launcher"] = "standard"
    else:
        distributed_type = DistributedType.MULTI_GPU

    return ClusterConfig(
        compute_environment=ComputeEnvironment.LOCAL_MACHINE,
        distributed_type=distributed_type,
        mixed_precision=_MIXED_PRECISION[cfg.precision],
        use_cpu=cpu,
        debug=False,
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        rdzv_backend="static",
        same_network=True,
        gpu_ids="all",
        fsdp_config=fsdp_config,
        deepspeed_config=deepspeed_config,
        downcast_bf16=False,
        enable_cpu_affinity=False,
    )


def write_accelerate_config(path: str | os.PathLike, cfg: TrainConfig, backend: Any = None, **kwargs: Any) -> Path:
    """Write the accelerate YAML for `cfg` (see `accelerate_cluster_config`) and return its path."""
    path = Path(path)
    cluster = accelerate_cluster_config(cfg, backend, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster.to_yaml_file(str(path))
    return path


# --------------------------------------------------------------------------- reading


def backend_from_accelerate_env(env: Optional[Mapping[str, str]] = None) -> Optional[dict[str, Any]]:
    """The backend config dict that the accelerate launch in `env` asks for, or None when the
    process was not started by `accelerate launch` with FSDP or DeepSpeed (plain multi-GPU
    launches are DDP, which `auto` already picks)."""
    env = os.environ if env is None else env
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return _zero_from_env(env)
    if _truthy(env.get("ACCELERATE_USE_FSDP")):
        return _fsdp_from_env(env)
    return None


def _deepspeed_config_file(env: Mapping[str, str]) -> tuple[Optional[str], dict[str, Any]]:
    """accelerate's deepspeed_config_file (ACCELERATE_DEEPSPEED_CONFIG_FILE) and its contents, or
    (None, {}) when the accelerate config has none (its deepspeed_config fields are then in the env)."""
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not ds_file:
        return None, {}
    try:
        ds = json.loads(Path(ds_file).read_text())
    except (OSError, ValueError) as exc:
        raise AccelerateLaunchError(f"accelerate's deepspeed_config_file {ds_file!r} cannot be read as JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise AccelerateLaunchError(
            f"accelerate's deepspeed_config_file {ds_file!r} holds a JSON {type(ds).__name__}, not an object; "
            "write a DeepSpeed config there (`unsloth-dist config deepspeed` writes one)"
        )
    return ds_file, ds


def _zero_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    stage_raw = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    _, ds = _deepspeed_config_file(env)
    zopt = ds.get("zero_optimization") or {}
    if stage_raw in (None, "") and "stage" in zopt:
        stage_raw = str(zopt["stage"])
    try:
        stage = int(stage_raw) if stage_raw not in (None, "") else None
    except ValueError:
        stage = None
    if stage not in (1, 2, 3):
        raise AccelerateLaunchError(
            f"accelerate launched DeepSpeed but the ZeRO stage is {stage_raw!r}; set deepspeed_config.zero_stage "
            "to 1, 2 or 3 in the accelerate config (unsloth-dist config accelerate writes it)"
        )
    out: dict[str, Any] = {"name": f"zero{stage}"}
    opt = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or (zopt.get("offload_optimizer") or {}).get("device")
    par = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or (zopt.get("offload_param") or {}).get("device")
    for key, value in (("offload_optimizer", opt), ("offload_param", par)):
        if value is None or str(value).lower() == "none":
            continue
        if str(value).lower() != "cpu":
            raise AccelerateLaunchError(
                f"accelerate asks for {key} device {value!r}; only 'cpu' (or 'none') is supported here"
            )
        if key == "offload_param" and stage != 3:
            continue  # accelerate ignores parameter offload below stage 3; so does DeepSpeed
        out[key] = "cpu"
    # the file's tuning knobs become the backend's fields (validated there); "auto" and our own
    # defaults (what `unsloth-dist config deepspeed` writes) leave the field unset
    for key, field, stage3_only in _DS_FILE_KNOBS:
        value = zopt.get(key)
        if value is None or value == "auto" or (stage3_only and stage != 3):
            continue
        if value != ZeroConfig.model_fields[field].default:
            out[field] = value
    for key in ("leaf_module", "stage3_module_granularity_threshold"):
        if zopt.get(key):
            raise AccelerateLaunchError(
                f"accelerate's deepspeed_config_file sets zero_optimization.{key}, which this framework does not "
                "pass on: it makes the decoder layers ZeRO-3 leaf modules itself (backend.stage3_leaf_layers, on "
                f"by default); remove {key} from the file"
            )
    return out


# (file key, ZeroConfig field, zero3 only)
_DS_FILE_KNOBS = (
    ("overlap_comm", "overlap_comm", False),
    ("contiguous_gradients", "contiguous_gradients", False),
    ("reduce_bucket_size", "reduce_bucket_size", False),
    ("allgather_bucket_size", "allgather_bucket_size", False),
    ("stage3_prefetch_bucket_size", "stage3_prefetch_bucket_size", True),
    ("stage3_param_persistence_threshold", "stage3_param_persistence_threshold", True),
    ("stage3_max_live_parameters", "stage3_max_live_parameters", True),
    ("stage3_max_reuse_distance", "stage3_max_reuse_distance", True),
    ("memory_efficient_linear", "stage3_memory_efficient_linear", True),
)


def _fsdp_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    version = env.get("FSDP_VERSION", "1")
    strategy = (env.get("FSDP_SHARDING_STRATEGY") or "FULL_SHARD").upper()
    reshard_raw = (env.get("FSDP_RESHARD_AFTER_FORWARD") or "true").strip()
    if reshard_raw.upper() in _STRATEGY_TO_SHARDING or reshard_raw.isdigit():
        # FSDP1 style: reshard_after_forward holds a sharding strategy name (or its 1-based index)
        names = list(_SHARDING_TO_STRATEGY.values()) + ["HYBRID_SHARD_ZERO2"]
        strategy = names[int(reshard_raw) - 1] if reshard_raw.isdigit() else reshard_raw.upper()
        reshard: Optional[bool] = None
    elif reshard_raw.lower() in ("true", "false", "1", "0", "yes", "no"):
        reshard = _truthy(reshard_raw)
    else:
        raise AccelerateLaunchError(f"FSDP_RESHARD_AFTER_FORWARD={reshard_raw!r} is neither a bool nor an FSDP strategy")
    if strategy.isdigit():
        strategy = list(_SHARDING_TO_STRATEGY.values())[int(strategy) - 1]
    if strategy not in _STRATEGY_TO_SHARDING:
        raise AccelerateLaunchError(
            f"FSDP_SHARDING_STRATEGY={strategy!r} is unknown; use one of {', '.join(_STRATEGY_TO_SHARDING)}"
        )
    sharding = _STRATEGY_TO_SHARDING[strategy]
    if version == "2" and sharding == "full" and reshard is False:
        # FSDP2 spells SHARD_GRAD_OP as reshard_after_forward: false
        sharding = "grad_op"
    out: dict[str, Any] = {"name": "fsdp", "sharding": sharding}
    if sharding in ("full", "hybrid") and reshard is False:
        out["reshard_after_forward"] = False
    if _truthy(env.get("FSDP_OFFLOAD_PARAMS")):
        out["cpu_offload"] = True
    return out


def accelerate_config_path(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The accelerate config file of the `accelerate launch` that started this process, if known."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_PATH_VAR):
        return Path(env[CONFIG_PATH_VAR])
    if environ is not None or not sys.platform.startswith("linux"):
        return None
    pid = os.getppid()
    for _ in range(4):  # torchrun's agent runs inside `accelerate launch`; deepspeed adds one level
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        args = [a.decode(errors="replace") for a in argv if a]
        if (any(a.endswith("accelerate") or a == "launch" for a in args[:4]) and "launch" in args) or any(
                a.endswith("accelerate-launch") or a == "accelerate.commands.launch" for a in args[:4]):
            for i, a in enumerate(args):
                for flag in ("--config_file", "--config-file"):
                    if a == flag and i + 1 < len(args):
                        return Path(cwd, args[i + 1])
                    if a.startswith(flag + "="):
                        return Path(cwd, a.split("=", 1)[1])
            return None
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            return None
        if pid <= 1:
            return None
    return None


def check_accelerate_launch(cfg: TrainConfig, environ: Optional[Mapping[str, str]] = None) -> Optional[dict[str, Any]]:
    """Under `accelerate launch`: the backend dict accelerate asks for (None for DDP / not
    accelerate), after checking the launch agrees with `cfg` and with the config file's
    process count (backend, accumulation, clipping and precision, from the env or accelerate's
    deepspeed_config_file). Raises AccelerateLaunchError naming the disagreement and the fix."""
    env = os.environ if environ is None else environ
    if not launched_by_accelerate(env):
        return None
    wanted = backend_from_accelerate_env(env)
    world = int(env.get("WORLD_SIZE") or 1)

    path = accelerate_config_path(environ)
    if path is not None and path.is_file():
        try:
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        except Exception:  # not ours to judge: accelerate itself read it
            data = {}
        n = data.get("num_processes")
        if isinstance(n, int) and n > 0 and n != world:
            raise AccelerateLaunchError(
                f"the accelerate config {str(path)!r} says num_processes: {n} but this launch started {world} "
                f"process(es) (WORLD_SIZE={world}); regenerate it with `unsloth-dist config accelerate "
                f"--num-processes {world} ...` or drop the --num_processes override"
            )
        m = data.get("num_machines")
        local = int(env.get("LOCAL_WORLD_SIZE") or world)
        if isinstance(m, int) and m > 0 and local and world // max(local, 1) != m:
            raise AccelerateLaunchError(
                f"the accelerate config {str(path)!r} says num_machines: {m} but this launch has "
                f"{world // max(local, 1)} node(s) of {local} process(es); regenerate the config for this cluster"
            )

    b = cfg.backend
    if wanted is not None and b.name != "auto":
        if b.name != wanted["name"]:
            raise AccelerateLaunchError(
                f"the TrainConfig asks for backend {b.name!r} but the accelerate config launches {wanted['name']!r}; "
                f"use backend: auto (the accelerate config decides) or regenerate it with "
                f"`unsloth-dist config accelerate --backend {b.name}`"
            )
        # FSDP2 spells SHARD_GRAD_OP as full sharding without resharding after forward: compare what runs
        effective = ("grad_op" if isinstance(b, FSDPConfig) and b.sharding == "full"
                     and not b.resolved_reshard_after_forward else getattr(b, "sharding", None))
        if isinstance(b, FSDPConfig) and effective != wanted.get("sharding", "full"):
            raise AccelerateLaunchError(
                f"backend.sharding is {b.sharding!r}"
                + (" with reshard_after_forward: false (FSDP2's grad_op)" if effective != b.sharding else "")
                + f" but the accelerate config asks for {wanted.get('sharding')!r} "
                "(FSDP_SHARDING_STRATEGY / FSDP_RESHARD_AFTER_FORWARD); regenerate the accelerate config"
            )
        # what the file turns on beyond the backend's name must not be dropped silently (under
        # backend: auto it is the backend; a named backend keeps its own fields)
        for key in ("offload_optimizer", "offload_param", "cpu_offload"):
            if key in wanted and hasattr(b, key) and getattr(b, key) != wanted[key]:
                raise AccelerateLaunchError(
                    f"the accelerate config asks for {key} {wanted[key]!r} but the TrainConfig has backend.{key} "
                    f"{getattr(b, key)!r}; set backend.{key}: {wanted[key]} (or backend: auto), or regenerate the "
                    "accelerate config from this recipe"
                )
    if _truthy(env.get("FSDP_ACTIVATION_CHECKPOINTING")) and not cfg.gradient_checkpointing:
        raise AccelerateLaunchError(
            "the accelerate config has fsdp_activation_checkpointing: true (FSDP_ACTIVATION_CHECKPOINTING) but the "
            "TrainConfig has gradient_checkpointing: false; set gradient_checkpointing: true, or regenerate the "
            "accelerate config from this recipe"
        )
    if wanted is None and b.name in ("fsdp", "zero1", "zero2", "zero3") and world > 1:
        raise AccelerateLaunchError(
            f"the TrainConfig asks for backend {b.name!r} but accelerate was started with a multi-GPU (DDP) "
            f"config; use `unsloth-dist config accelerate --backend {b.name}` or backend: ddp / auto"
        )
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        regenerate = "regenerate the accelerate config with --config for this recipe"
        _check_launch_number(cfg, "gradient_accumulation_steps", env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
                             "the accelerate config", "gradient_accumulation_steps",
                             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", regenerate)
        _check_launch_number(cfg, "max_grad_norm", env.get("ACCELERATE_GRADIENT_CLIPPING"),
                             "the accelerate config", "gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", regenerate)
        # with deepspeed_config_file, accelerate exports none of the two above: they are in the file
        ds_path, ds = _deepspeed_config_file(env)
        if ds_path is not None:
            for key, field in (("gradient_accumulation_steps", "gradient_accumulation_steps"),
                               ("gradient_clipping", "max_grad_norm"),
                               ("train_micro_batch_size_per_gpu", "per_device_train_batch_size")):
                _check_launch_number(cfg, field, ds.get(key), _ds_source(ds_path), key, None,
                                     f'set {key} to {getattr(cfg, field)} (or "auto") in that file, or set '
                                     f"{field}: {ds.get(key)} in the TrainConfig")
            total = _launch_number(ds.get("train_batch_size"), f"train_batch_size in {_ds_source(ds_path)}")
            if total is not None and total != cfg.global_batch(world):
                raise AccelerateLaunchError(
                    f"{_ds_source(ds_path)} has train_batch_size {ds.get('train_batch_size')} but the TrainConfig's "
                    f"global batch at {world} processes is {cfg.global_batch(world)} (per_device_train_batch_size x "
                    'gradient_accumulation_steps x processes); set it to that (or "auto") in that file')
    else:
        ds_path, ds = None, {}
    _check_launch_precision(cfg, env, ds_path, ds)
    return wanted


def _launch_number(raw: Any, where: str) -> Optional[float]:
    """A number that accelerate's env or DeepSpeed file holds; None where it is unset or left to
    the Trainer ("auto", which accelerate fills from the training arguments)."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "auto", "none")):
        return None
    if not isinstance(raw, bool):
        try:
            return float(raw)
        except (TypeError, ValueError):
            pass
    raise AccelerateLaunchError(f'{where} is {raw!r}, not a number; write a number or "auto"')


def _ds_source(ds_path: str) -> str:
    return f"the DeepSpeed config file {ds_path!r} (accelerate's deepspeed_config_file)"


def _check_launch_number(
    cfg: TrainConfig, field: str, raw: Any, source: str, key: str, var: Optional[str], fix: str
) -> None:
    """Raise when `source`'s `key` (exported as `var`) is a number other than the TrainConfig's `field`."""
    via = f" ({var})" if var else ""
    value = _launch_number(raw, f"{key} in {source}{via}")
    want = getattr(cfg, field)
    if value is not None and abs(value - want) > 1e-12:
        raise AccelerateLaunchError(f"{source} has {key} {raw}{via} but the TrainConfig has {field} {want}; {fix}")


def _ds_precision_flag(dtype: str, precision: str) -> set[bool]:
    """The values a DeepSpeed config's `<dtype>.enabled` may take under TrainConfig `precision`:
    what `unsloth-dist config deepspeed` writes (bf16 only for precision bf16, since bf16-mixed
    autocasts over fp32 DeepSpeed weights; fp16 for fp16-mixed), and what accelerate writes for the
    mixed_precision we map `precision` to (`<dtype>.enabled = mixed_precision == dtype`)."""
    generated = precision == ("bf16" if dtype == "bf16" else "fp16-mixed")
    return {generated, _MIXED_PRECISION[precision] == dtype}


def _check_launch_precision(cfg: TrainConfig, env: Mapping[str, str], ds_path: Optional[str], ds: Mapping[str, Any]) -> None:
    """accelerate's mixed_precision (ACCELERATE_MIXED_PRECISION) and the DeepSpeed file's
    fp16 / bf16 switches must agree with cfg.precision (through `_MIXED_PRECISION`)."""
    precision = cfg.precision
    if ds_path is not None:
        for dtype in ("fp16", "bf16"):
            section = ds.get(dtype)
            if section is None:
                continue
            where = _ds_source(ds_path)
            raw = section.get("enabled") if isinstance(section, dict) else section
            text = str(raw).strip().lower() if isinstance(raw, (str, bool)) else None
            if raw is None or text == "auto":
                continue  # left to the Trainer
            if not isinstance(section, dict) or text not in ("true", "false"):
                raise AccelerateLaunchError(
                    f'{where} has {dtype}: {json.dumps(section)}; write {dtype}: {{"enabled": true | false | "auto"}}'
                )
            enabled = text == "true"
            allowed = _ds_precision_flag(dtype, precision)
            if enabled not in allowed:
                fits = [p for p in _MIXED_PRECISION if enabled in _ds_precision_flag(dtype, p)]
                raise AccelerateLaunchError(
                    f"{where} has {dtype}.enabled {json.dumps(enabled)} but the TrainConfig has precision "
                    f"{precision!r}; set {dtype}.enabled to {json.dumps(not enabled)} (or \"auto\") in that file, "
                    f"or set precision: {' / '.join(fits)} in the TrainConfig"
                )
    raw_mp = env.get("ACCELERATE_MIXED_PRECISION")
    mp = (raw_mp or "").strip().lower()
    if not mp or mp == "no":
        # "no" is what a bare `accelerate launch` (no config file) and a deepspeed_config_file launch
        # export by default: not a request; the TrainConfig's precision (and the file's switches,
        # checked above) decide. An explicit fp16 / bf16 must agree
        return
    var = f"ACCELERATE_MIXED_PRECISION={raw_mp}"
    if mp == "fp8":
        raise AccelerateLaunchError(
            f"accelerate's mixed_precision is fp8 ({var}) but unsloth_dist has no fp8 training; set mixed_precision: "
            f"{_MIXED_PRECISION[precision]} in the accelerate config (or --mixed_precision "
            f"{_MIXED_PRECISION[precision]}) for the TrainConfig's precision {precision!r}"
        )
    fits = [p for p, m in _MIXED_PRECISION.items() if m == mp]
    if not fits:
        raise AccelerateLaunchError(
            f"accelerate's mixed_precision {raw_mp!r} ({var}) is unknown; use no, fp16 or bf16"
        )
    if precision not in fits:
        default = " (also accelerate's default when neither its config nor --mixed_precision sets one)" if mp == "no" else ""
        raise AccelerateLaunchError(
            f"accelerate's mixed_precision is {mp!r} ({var}{default}) but the TrainConfig has precision "
            f"{precision!r}; set mixed_precision: {_MIXED_PRECISION[precision]} in the accelerate config (or launch "
            f"with --mixed_precision {_MIXED_PRECISION[precision]}), or set precision: {' / '.join(fits)} in the "
            f"TrainConfig; `unsloth-dist config accelerate --config RECIPE` writes a matching file"
        )
