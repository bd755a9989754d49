"""Config validation, launcher-environment parsing and the generated DeepSpeed config.

Everything here is in-process and CPU-only: no subprocesses, no process groups, and the
launcher environment is always a plain dict handed to `read_launch_env` (os.environ is
never touched).
"""
from __future__ import annotations

import pytest
import torch
import yaml

from unsloth_dist import distributed as D
from unsloth_dist.config import (
    AutoConfig,
    ConfigError,
    DDPConfig,
    FSDPConfig,
    SingleConfig,
    TrainConfig,
    ZeroConfig,
    load_config,
    parse_backend,
)
from unsloth_dist.distributed import LaunchEnv, LaunchError
from unsloth_dist.launch.deepspeed_config import deepspeed_config

BASE = {"max_steps": 10}


def _config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**data)
    return str(info.value)


def _write(tmp_path, text: str, name: str = "train.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# =========================================================================== 1. invalid configs


def test_base_config_is_valid():
    """Control for the table below: every invalid case is BASE plus one bad setting."""
    cfg = TrainConfig(**BASE)
    assert cfg.max_steps == 10
    assert isinstance(cfg.backend, AutoConfig)


INVALID = [
    # id, extra config, substrings the message must contain (field first, then the hint)
    pytest.param(
        {"learnig_rate": 1e-4},
        ["learnig_rate", "unknown field", "did you mean 'learning_rate'", "valid fields here",
         "per_device_train_batch_size", "gradient_accumulation_steps"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        {"backend": {"name": "zero2", "offlaod_optimizer": "cpu"}},
        ["backend.offlaod_optimizer", "unknown field", "did you mean 'offload_optimizer'",
         "valid fields here", "reduce_bucket_size"],
        id="unknown-zero-backend-key",
    ),
    pytest.param(
        {"backend": {"name": "fsdp", "cpu_ofload": True}},
        ["backend.cpu_ofload", "unknown field", "did you mean 'cpu_offload'", "sharding"],
        id="unknown-fsdp-backend-key",
    ),
    pytest.param(
        {"backend": "zero4"},
        ["backend", "'zero4' is unknown", "did you mean 'zero3'", "single, ddp, fsdp, zero1, zero2, zero3, auto"],
        id="unknown-backend-name",
    ),
    pytest.param(
        {"backend": {"sharding": "full"}},
        ["backend", "needs a `name`", "zero3"],
        id="backend-without-name",
    ),
    pytest.param(
        {"backend": {"name": "zero2", "offload_param": "cpu"}},
        ["backend.offload_param", "only applies to ZeRO stage 3", "'zero2'", "use backend: zero3"],
        id="offload_param-on-zero2",
    ),
    pytest.param(
        {"backend": {"name": "zero1", "offload_param": "cpu"}},
        ["backend.offload_param", "only applies to ZeRO stage 3", "'zero1'", "use backend: zero3"],
        id="offload_param-on-zero1",
    ),
    pytest.param(
        {"backend": {"name": "zero2", "stage3_prefetch_bucket_size": 1_000}},
        ["backend.stage3_prefetch_bucket_size", "only applies to ZeRO stage 3", "remove stage3_prefetch_bucket_size"],
        id="stage3-option-on-zero2",
    ),
    pytest.param(
        {"backend": {"name": "zero2", "stage3_leaf_layers": False}},
        ["backend.stage3_leaf_layers", "only applies to ZeRO stage 3", "remove stage3_leaf_layers"],
        id="stage3-leaf-layers-on-zero2",
    ),
    pytest.param(
        {"precision": "fp16-mixed", "backend": "fsdp"},
        ["precision", "fp16-mixed", "fsdp", "use precision: bf16 or bf16-mixed"],
        id="fp16-mixed-with-fsdp",
    ),
    pytest.param(
        {"per_device_train_batch_size": 0},
        ["per_device_train_batch_size", "greater than 0", "got 0"],
        id="zero-batch-size",
    ),
    pytest.param(
        {"gradient_accumulation_steps": 0},
        ["gradient_accumulation_steps", "greater than 0"],
        id="zero-accumulation",
    ),
    pytest.param({"learning_rate": 0}, ["learning_rate", "greater than 0"], id="zero-lr"),
    pytest.param({"learning_rate": -1e-4}, ["learning_rate", "greater than 0"], id="negative-lr"),
    pytest.param(
        {"backend": {"name": "zero2", "reduce_bucket_size": 0}},
        ["backend.reduce_bucket_size", "greater than 0"],
        id="zero-reduce-bucket",
    ),
    pytest.param({"adam_beta1": 1.0}, ["adam_beta1", "less than 1"], id="adam_beta1-is-1"),
    pytest.param({"adam_beta1": 1.5}, ["adam_beta1", "less than 1"], id="adam_beta1-above-1"),
    pytest.param(
        {"max_steps": None},
        ["max_steps", "num_train_epochs", "neither"],
        id="no-max_steps-nor-epochs",
    ),
    pytest.param(
        {"warmup_steps": 10, "warmup_ratio": 0.1},
        ["warmup_steps", "warmup_ratio", "keep one"],
        id="warmup-steps-and-ratio",
    ),
    pytest.param(
        {"save_total_limit": 2},
        ["save_total_limit", "save_steps", "set save_steps"],
        id="save_total_limit-without-save_steps",
    ),
    pytest.param(
        {"lr_scheduler_type": "cosine_warm"},
        ["lr_scheduler_type", "'cosine_warm' is unknown", "cosine_with_restarts"],
        id="unknown-scheduler",
    ),
    pytest.param(
        {"precision": "fp8"},
        ["precision", "'fp8'", "bf16-mixed"],
        id="unknown-precision",
    ),
    pytest.param(
        {"backend": {"name": "fsdp", "sharding": "zero"}},
        ["backend.sharding", "'zero'", "grad_op"],
        id="unknown-fsdp-sharding",
    ),
    pytest.param(
        {"backend": {"name": "fsdp", "sharding": "grad_op", "reshard_after_forward": True}},
        ["backend.reshard_after_forward", "backend.sharding='grad_op'", "use sharding: full"],
        id="reshard-with-grad_op",
    ),
    pytest.param(
        {"dist_backend": "mpi"},
        ["dist_backend", "'mpi'"],
        id="unknown-dist-backend",
    ),
]


@pytest.mark.parametrize("extra, expected", INVALID)
def test_invalid_config_rejected(extra, expected):
    data = {**BASE, **extra}
    data = {k: v for k, v in data.items() if v is not None}
    msg = _config_error(data)
    assert msg.startswith("invalid configuration:"), msg
    for part in expected:
        assert part in msg, f"{part!r} missing from:\n{msg}"


def test_invalid_config_rejected_through_yaml(tmp_path):
    """The same checks apply when the config comes from a file."""
    path = _write(tmp_path, "max_steps: 5\nbackend:\n  name: zero2\n  offload_param: cpu\n")
    with pytest.raises(ConfigError, match=r"backend\.offload_param only applies to ZeRO stage 3"):
        load_config(path)


def test_several_errors_reported_together():
    msg = _config_error({**BASE, "per_device_train_batch_size": 0, "adam_beta1": 2.0})
    assert "per_device_train_batch_size" in msg and "adam_beta1" in msg


def test_stage3_options_accepted_on_zero3():
    """Control for the stage-3-only rejections: the same keys are fine on zero3, and a
    stage-3 key left at its default (what to_yaml writes) is fine on zero2."""
    cfg = TrainConfig(**BASE, backend={"name": "zero3", "offload_param": "cpu", "stage3_prefetch_bucket_size": 1_000})
    assert cfg.backend.offload_param == "cpu"
    assert cfg.backend.stage3_prefetch_bucket_size == 1_000
    z2 = TrainConfig(**BASE, backend={"name": "zero2", "offload_param": "none",
                                      "stage3_prefetch_bucket_size": 50_000_000})
    assert z2.backend.stage == 2


def test_reshard_true_with_full_is_valid():
    cfg = TrainConfig(**BASE, backend={"name": "fsdp", "sharding": "full", "reshard_after_forward": True})
    assert cfg.backend.resolved_reshard_after_forward is True


@pytest.mark.parametrize("bad", ["ddp", "zero2", "fp32"])
def test_fp16_mixed_allowed_without_fsdp(bad):
    """fp16-mixed is only a *config* error with fsdp (the CPU check is at runtime)."""
    if bad == "fp32":
        cfg = TrainConfig(**BASE, precision="fp32", backend="fsdp")
        assert cfg.precision == "fp32"
    else:
        cfg = TrainConfig(**BASE, precision="fp16-mixed", backend=bad)
        assert cfg.precision == "fp16-mixed"


# ----------------------------------------------------------------- global batch size vs world


def test_global_batch_not_a_multiple():
    cfg = TrainConfig(**BASE, per_device_train_batch_size=4, global_batch_size=30)
    with pytest.raises(ConfigError) as info:
        cfg.check_world_size(2)
    msg = str(info.value)
    assert "global_batch_size=30" in msg
    assert "= 8" in msg
    assert "choose a global_batch_size that is a multiple of 8" in msg
    assert "gradient_accumulation_steps to" not in msg


def test_global_batch_suggests_accumulation():
    cfg = TrainConfig(**BASE, per_device_train_batch_size=4, global_batch_size=32)
    with pytest.raises(ConfigError) as info:
        cfg.check_world_size(2)
    msg = str(info.value)
    assert "global_batch_size=32" in msg
    assert "set gradient_accumulation_steps to 4" in msg
    # and it fits once the world is the one the config was written for
    cfg.check_world_size(8)


def test_global_batch_matching_passes():
    cfg = TrainConfig(**BASE, per_device_train_batch_size=4, gradient_accumulation_steps=4, global_batch_size=32)
    cfg.check_world_size(2)
    assert cfg.global_batch(2) == 32
    with pytest.raises(ConfigError, match="set gradient_accumulation_steps to 2"):
        cfg.check_world_size(4)


# ----------------------------------------------------------------- overrides and files


def test_override_without_equals(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, overrides=["learning_rate"])
    msg = str(info.value)
    assert "'learning_rate'" in msg and "key=value" in msg


def test_override_with_empty_key():
    with pytest.raises(ConfigError, match="empty key"):
        load_config(BASE, overrides=["=3"])


def test_override_unknown_dotted_key():
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "backend": "zero3"}, overrides=["backend.offlaod_optimizer=cpu"])
    msg = str(info.value)
    assert "backend.offlaod_optimizer" in msg
    assert "did you mean 'offload_optimizer'" in msg


def test_override_into_non_section():
    with pytest.raises(ConfigError, match=r"learning_rate is not a section"):
        load_config({**BASE, "learning_rate": 1e-4}, overrides=["learning_rate.x=1"])


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "does not exist" in msg


def test_yaml_file_is_a_list(tmp_path):
    path = _write(tmp_path, "- max_steps: 10\n- learning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "mapping" in msg and "list" in msg


def test_yaml_file_is_invalid_yaml(tmp_path):
    path = _write(tmp_path, "max_steps: [10\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_load_config_rejects_other_types():
    with pytest.raises(ConfigError, match="not int"):
        load_config(42)


# =========================================================================== 2. runtime checks

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rejections")
ENV1 = LaunchEnv()  # plain single process


@cpu_only
def test_runtime_accepts_cpu_friendly_config():
    """Control: the same checks pass for a config this machine can run."""
    cfg = TrainConfig(**BASE, dist_backend="gloo", precision="bf16-mixed", backend="ddp")
    D.check_runtime(cfg, cfg.backend, LaunchEnv(world_size=2, local_world_size=2, launcher="torchrun"))
    cfg = TrainConfig(**BASE, backend={"name": "fsdp", "cpu_offload": False})
    D.check_runtime(cfg, cfg.backend, ENV1)


@cpu_only
@pytest.mark.parametrize(
    "data, backend, field, hint",
    [
        pytest.param({"dist_backend": "nccl"}, None, "dist_backend", "use dist_backend: gloo", id="nccl"),
        pytest.param({"precision": "fp16-mixed", "backend": "zero2"}, None, "precision", "bf16-mixed or fp32",
                     id="fp16-mixed"),
        pytest.param({"backend": {"name": "fsdp", "cpu_offload": True}}, None, "backend.cpu_offload",
                     "cpu_offload: false", id="fsdp-cpu_offload"),
        pytest.param({"backend": {"name": "zero2", "offload_optimizer": "cpu"}}, None, "backend.offload_optimizer",
                     "set them to none", id="zero-offload_optimizer"),
        pytest.param({"backend": {"name": "zero3", "offload_param": "cpu"}}, None, "backend.offload_param",
                     "set them to none", id="zero3-offload_param"),
    ],
)
def test_runtime_rejects_on_cpu(data, backend, field, hint):
    cfg = TrainConfig(**BASE, **data)
    with pytest.raises(ConfigError) as info:
        D.check_runtime(cfg, backend or cfg.backend, ENV1)
    msg = str(info.value)
    assert field in msg and hint in msg, msg


def test_runtime_checks_world_size():
    cfg = TrainConfig(**BASE, per_device_train_batch_size=4, global_batch_size=32, backend="ddp")
    env = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="torchrun")
    with pytest.raises(ConfigError, match="set gradient_accumulation_steps to 4"):
        D.check_runtime(cfg, cfg.backend, env)


def test_runtime_rejects_hybrid_on_uneven_nodes():
    cfg = TrainConfig(**BASE, backend={"name": "fsdp", "sharding": "hybrid"})
    env = LaunchEnv(rank=0, world_size=3, local_rank=0, local_world_size=2, launcher="torchrun")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("the GPU-count check fires first")
    with pytest.raises(ConfigError, match=r"backend\.sharding: hybrid"):
        D.check_runtime(cfg, cfg.backend, env)


# =========================================================================== 3. launcher env

TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}
DEEPSPEED = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "LOCAL_SIZE": "2",
}


def test_plain_process():
    env = D.read_launch_env({"PATH": "/usr/bin", "HOME": "/root"})
    assert env.launcher == "none"
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert not env.distributed
    assert isinstance(D.resolve_backend(AutoConfig(), env), SingleConfig)


def test_torchrun_env():
    env = D.read_launch_env(dict(TORCHRUN))
    assert env.launcher == "torchrun"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert env.distributed
    assert env.accelerate_mode is None


def test_deepspeed_launcher_env():
    env = D.read_launch_env(dict(DEEPSPEED))
    assert env.launcher == "deepspeed"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.num_nodes == 2


def test_deepspeed_launcher_local_size_only():
    """The DeepSpeed launcher's LOCAL_SIZE stands in for LOCAL_WORLD_SIZE."""
    raw = {k: v for k, v in DEEPSPEED.items() if k != "LOCAL_WORLD_SIZE"}
    env = D.read_launch_env(raw)
    assert env.launcher == "deepspeed"
    assert env.local_world_size == 2


def test_env_launcher_without_torchelastic():
    raw = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    assert D.read_launch_env(raw).launcher == "env"


def test_a_stray_mixed_precision_export_does_not_make_torchrun_accelerate():
    # a shell that exported ACCELERATE_MIXED_PRECISION (accelerate's own launches also set
    # ACCELERATE_DYNAMO_BACKEND) stays a torchrun launch, and no accelerate check runs
    from unsloth_dist.launch.accelerate_config import check_accelerate_launch

    raw = dict(TORCHRUN, ACCELERATE_MIXED_PRECISION="fp16")
    assert D.read_launch_env(raw).launcher == "torchrun"
    assert check_accelerate_launch(TrainConfig(**BASE, precision="bf16"), raw) is None
    assert D.read_launch_env(dict(raw, ACCELERATE_DYNAMO_BACKEND="NO")).launcher == "accelerate"


def test_accelerate_deepspeed_stage3():
    raw = dict(TORCHRUN, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
               ACCELERATE_MIXED_PRECISION="bf16")
    env = D.read_launch_env(raw)
    assert env.launcher == "accelerate"
    assert env.accelerate_mode == "deepspeed"
    assert env.accelerate_zero_stage == 3
    backend = D.resolve_backend(AutoConfig(), env)
    assert isinstance(backend, ZeroConfig)
    assert backend.name == "zero3" and backend.stage == 3


def test_accelerate_fsdp():
    env = D.read_launch_env(dict(TORCHRUN, ACCELERATE_USE_FSDP="true"))
    assert env.launcher == "accelerate"
    assert env.accelerate_mode == "fsdp"
    assert isinstance(D.resolve_backend(AutoConfig(), env), FSDPConfig)


@pytest.mark.parametrize("stage", [None, "4", ""])
def test_accelerate_deepspeed_without_stage(stage):
    raw = dict(TORCHRUN, ACCELERATE_USE_DEEPSPEED="true")
    if stage is not None:
        raw["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = stage
    with pytest.raises(LaunchError, match="ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        D.read_launch_env(raw)


def test_rank_not_below_world_size():
    with pytest.raises(LaunchError) as info:
        D.read_launch_env(dict(TORCHRUN, RANK="2"))
    assert "RANK=2" in str(info.value)


def test_local_rank_out_of_range():
    with pytest.raises(LaunchError, match="LOCAL_RANK=2"):
        D.read_launch_env(dict(TORCHRUN, LOCAL_RANK="2"))


def test_world_size_without_master_addr():
    raw = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError) as info:
        D.read_launch_env(raw)
    msg = str(info.value)
    assert "MASTER_ADDR" in msg and "WORLD_SIZE=2" in msg


@pytest.mark.parametrize("value", ["two", "2.0"])
def test_non_integer_world_size(value):
    with pytest.raises(LaunchError) as info:
        D.read_launch_env(dict(TORCHRUN, WORLD_SIZE=value))
    assert f"WORLD_SIZE={value!r}" in str(info.value)


def test_world_size_zero():
    with pytest.raises(LaunchError, match="WORLD_SIZE=0"):
        D.read_launch_env({"WORLD_SIZE": "0"})


def test_force_single_gpu():
    env = D.read_launch_env(dict(TORCHRUN, UNSLOTH_FORCE_SINGLE_GPU="1"))
    assert env.force_single
    assert env.world_size == 1 and env.rank == 0 and not env.distributed
    assert isinstance(D.resolve_backend(AutoConfig(), env), SingleConfig)
    single = SingleConfig()
    assert D.resolve_backend(single, env) is single


def test_single_backend_under_world_two():
    env = D.read_launch_env(dict(TORCHRUN))
    with pytest.raises(LaunchError) as info:
        D.resolve_backend(SingleConfig(), env)
    msg = str(info.value)
    assert "'single'" in msg and "2 processes" in msg and "UNSLOTH_FORCE_SINGLE_GPU" in msg


def test_auto_under_torchrun_is_ddp():
    env = D.read_launch_env(dict(TORCHRUN))
    assert isinstance(D.resolve_backend(AutoConfig(), env), DDPConfig)


def test_auto_under_deepspeed_launcher_is_zero2():
    env = D.read_launch_env(dict(DEEPSPEED))
    backend = D.resolve_backend(AutoConfig(), env)
    assert isinstance(backend, ZeroConfig) and backend.name == "zero2"


def test_explicit_backend_passes_through():
    env = D.read_launch_env(dict(TORCHRUN))
    zero3 = ZeroConfig(name="zero3")
    assert D.resolve_backend(zero3, env) is zero3


# =========================================================================== 4. valid paths


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_bare_string_backend(name, stage):
    cfg = TrainConfig(**BASE, backend=name)
    assert isinstance(cfg.backend, ZeroConfig)
    assert cfg.backend.name == name and cfg.backend.stage == stage
    assert cfg.backend == ZeroConfig(name=name)
    assert cfg.backend.offload_optimizer == "none"
    assert cfg.backend.reduce_bucket_size == 500_000_000


@pytest.mark.parametrize("name, cls", [("single", SingleConfig), ("ddp", DDPConfig), ("fsdp", FSDPConfig),
                                       ("auto", AutoConfig)])
def test_bare_string_other_backends(name, cls):
    cfg = TrainConfig(**BASE, backend=name)
    assert type(cfg.backend) is cls
    assert type(parse_backend(name)) is cls


def test_yaml_with_overrides(tmp_path):
    path = _write(tmp_path, "max_steps: 20\nlearning_rate: 1.0e-5\nbackend: zero3\n")
    plain = load_config(path)
    assert plain.learning_rate == 1e-5 and plain.backend.offload_optimizer == "none"

    cfg = load_config(path, overrides=["learning_rate=2e-4", "backend.offload_optimizer=cpu"])
    assert isinstance(cfg.learning_rate, float)
    assert cfg.learning_rate == 2e-4
    assert isinstance(cfg.backend, ZeroConfig)
    assert cfg.backend.name == "zero3"
    assert cfg.backend.offload_optimizer == "cpu"
    assert cfg.max_steps == 20


def test_override_values_are_typed(tmp_path):
    path = _write(tmp_path, "max_steps: 20\n")
    cfg = load_config(path, overrides=["per_device_train_batch_size=4", "gradient_checkpointing=true",
                                       "backend=fsdp", "backend.sharding=grad_op"])
    assert cfg.per_device_train_batch_size == 4
    assert cfg.gradient_checkpointing is True
    assert isinstance(cfg.backend, FSDPConfig) and cfg.backend.sharding == "grad_op"


def test_keywords_win_over_file_and_overrides_win_over_keywords(tmp_path):
    path = _write(tmp_path, "max_steps: 20\nlearning_rate: 1.0e-5\nseed: 7\n")
    cfg = load_config(path, learning_rate=3e-4)
    assert cfg.learning_rate == 3e-4
    assert cfg.seed == 7  # untouched file fields survive
    cfg = load_config(path, overrides=["learning_rate=1e-3"], learning_rate=3e-4)
    assert cfg.learning_rate == 1e-3


def test_replace_backend_of_existing_config():
    cfg = TrainConfig(max_steps=30, learning_rate=1e-4, backend={"name": "zero3", "offload_param": "cpu"})
    new = load_config(cfg, backend="fsdp")
    assert isinstance(new.backend, FSDPConfig)
    assert new.backend.sharding == "full"
    assert new.max_steps == 30 and new.learning_rate == 1e-4
    # the original is untouched
    assert isinstance(cfg.backend, ZeroConfig) and cfg.backend.offload_param == "cpu"
    # and without a keyword the config comes back equal, backend included
    assert load_config(cfg) == cfg


def test_replacing_backend_revalidates():
    cfg = TrainConfig(**BASE, precision="fp16-mixed", backend="zero2")
    with pytest.raises(ConfigError, match="fp16-mixed"):
        load_config(cfg, backend="fsdp")


@pytest.mark.parametrize(
    "backend",
    [
        {"name": "zero3", "offload_param": "cpu", "offload_optimizer": "cpu", "stage3_prefetch_bucket_size": 1234},
        {"name": "zero2", "reduce_bucket_size": 1000},
        {"name": "fsdp", "sharding": "grad_op"},
        {"name": "ddp", "bucket_cap_mb": 50.0, "find_unused_parameters": True},
        "auto",
    ],
    ids=["zero3", "zero2", "fsdp", "ddp", "auto"],
)
def test_to_yaml_round_trip(tmp_path, backend):
    cfg = TrainConfig(
        output_dir="runs/x",
        backend=backend,
        precision="bf16",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        global_batch_size=12,
        learning_rate=2e-4,
        num_train_epochs=1.5,
        warmup_ratio=0.05,
        lr_scheduler_type="cosine",
        lr_scheduler_kwargs={"num_cycles": 0.5},
        save_steps=100,
        save_total_limit=2,
        dist_backend="gloo",
    )
    text = cfg.to_yaml()
    assert isinstance(yaml.safe_load(text), dict)
    path = _write(tmp_path, text)
    back = load_config(path)
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()
    assert type(back.backend) is type(cfg.backend)


def test_fsdp_resolved_reshard():
    assert FSDPConfig(sharding="grad_op").resolved_reshard_after_forward is False
    assert FSDPConfig(sharding="none").resolved_reshard_after_forward is False
    assert FSDPConfig(sharding="full").resolved_reshard_after_forward is True
    assert FSDPConfig(sharding="hybrid").resolved_reshard_after_forward is True
    assert FSDPConfig(sharding="hybrid", reshard_after_forward=False).resolved_reshard_after_forward is False


def test_backend_class_errors_are_config_errors():
    with pytest.raises(ConfigError, match=r"backend\.offload_param only applies"):
        ZeroConfig(name="zero2", offload_param="cpu")
    with pytest.raises(ConfigError, match=r"backend\.bogus: unknown field"):
        FSDPConfig(bogus=1)


# =========================================================================== 5. deepspeed config


def _ds(backend, world=2, **fields):
    data = {**BASE, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "max_grad_norm": 0.5,
            "backend": backend, **fields}
    cfg = TrainConfig(**data)
    return cfg, deepspeed_config(cfg, cfg.backend, world)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_ds_batch_sizes(world):
    _, ds = _ds("zero2", world)
    assert ds["train_batch_size"] == 4 * 3 * world
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_ds_stage_and_clipping(name, stage):
    _, ds = _ds(name)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    "precision, bf16, fp16",
    [("bf16", True, False), ("bf16-mixed", False, False), ("fp32", False, False), ("fp16-mixed", False, True)],
)
def test_ds_precision(precision, bf16, fp16):
    _, ds = _ds("zero2", precision=precision)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16
    assert ("communication_data_type" in ds) is bf16


def test_ds_offload_optimizer_adds_optimizer():
    cfg, ds = _ds({"name": "zero2", "offload_optimizer": "cpu"}, learning_rate=3e-4, weight_decay=0.1,
                  adam_beta2=0.95)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    opt = ds["optimizer"]
    assert opt["params"]["lr"] == 3e-4
    assert opt["params"]["betas"] == [0.9, 0.95]
    assert opt["params"]["weight_decay"] == 0.1
    assert "offload_param" not in ds["zero_optimization"]


def test_ds_no_offload_has_no_optimizer():
    _, ds = _ds("zero3")
    assert "optimizer" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "offload_param" not in ds["zero_optimization"]


def test_ds_offload_param_on_zero3():
    _, ds = _ds({"name": "zero3", "offload_param": "cpu"})
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_ds_stage3_keys_only_for_zero3(name):
    backend = {"name": name, "reduce_bucket_size": 1_000}
    if name == "zero3":
        backend["stage3_prefetch_bucket_size"] = 777
    _, ds = _ds(backend)
    zopt = ds["zero_optimization"]
    stage3_keys = {k for k in zopt if k.startswith("stage3_")}
    assert zopt["reduce_bucket_size"] == 1_000
    if name == "zero3":
        assert zopt["stage3_prefetch_bucket_size"] == 777
        assert {"stage3_param_persistence_threshold", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save"} <= stage3_keys
        assert "allgather_bucket_size" not in zopt
    else:
        assert stage3_keys == set()
        assert zopt["allgather_bucket_size"] == 500_000_000


@pytest.mark.parametrize("value", [True, False])
def test_ds_memory_efficient_linear_reaches_the_json(value):
    _, ds = _ds({"name": "zero3", "stage3_memory_efficient_linear": value})
    assert ds["zero_optimization"]["memory_efficient_linear"] is value
    # the leaf layers need the model: the zero3 backend sets them on the model, never in the file
    assert "leaf_module" not in ds["zero_optimization"]


# =========================================================================== regressions
# Defects found while writing these tests, now fixed: assignment errors, unknown backend names,
# numeric-looking strings in overrides, infinite values.


def test_assignment_errors_are_config_errors():
    cfg = TrainConfig(**BASE, backend="fsdp")
    try:
        cfg.precision = "fp16-mixed"
    except ConfigError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{type(exc).__name__} instead of ConfigError") from None
    assert cfg.precision == "bf16-mixed", "the rejected value was kept"


def test_parse_backend_unknown_is_config_error():
    try:
        parse_backend("zero4")
    except ConfigError:
        return
    except ValueError as exc:
        raise AssertionError(f"plain ValueError: {exc}") from None


def test_numeric_looking_string_override():
    assert load_config(BASE, overrides=["output_dir=2024"]).output_dir == "2024"


def test_infinite_values_rejected():
    for ov in ("learning_rate=inf", "num_train_epochs=.inf"):
        try:
            load_config({"max_steps": 1} if "learning_rate" in ov else {}, overrides=[ov])
        except ConfigError:
            continue
        raise AssertionError(f"{ov} was accepted")


# --------------------------------------------------- lr_scheduler_kwargs checked against the schedule
# A key the schedule function does not take used to pass validation and fail in Trainer.train()
# (get_scheduler's TypeError, after the process group and the model were set up).


def _sched(name: str, kwargs: dict | None = None) -> dict:
    return {**BASE, "lr_scheduler_type": name, **({"lr_scheduler_kwargs": kwargs} if kwargs is not None else {})}


def test_lr_scheduler_kwargs_typo_names_the_key_and_the_valid_ones():
    message = _config_error(_sched("cosine", {"num_cyclez": 2}))
    assert "lr_scheduler_kwargs.num_cyclez: not an argument of the cosine scheduler" in message
    assert "did you mean 'num_cycles'?" in message and "it takes: num_cycles" in message
    # through a YAML file / override as well (the path the CLI takes)
    with pytest.raises(ConfigError, match=r"lr_scheduler_kwargs\.num_cyclez"):
        load_config(BASE, overrides=["lr_scheduler_type=cosine_with_restarts", "lr_scheduler_kwargs.num_cyclez=2"])


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("cosine", {"num_training_steps": 5}, "lr_scheduler_kwargs.num_training_steps: the Trainer sets it"),
        ("linear", {"num_warmup_steps": 5}, "lr_scheduler_kwargs.num_warmup_steps: the Trainer sets it"),
        ("cosine", {"last_epoch": 3}, "lr_scheduler_kwargs.last_epoch: the Trainer owns"),
        ("linear", {"power": 2.0}, "not an argument of the linear scheduler; it takes none"),
        ("constant", {"num_cycles": 2}, "not an argument of the constant scheduler; it takes none"),
        ("constant_with_warmup", {"last_epoch": 0}, "lr_scheduler_kwargs.last_epoch"),
        ("warmup_stable_decay", None, "the warmup_stable_decay scheduler needs num_decay_steps"),
    ],
)
def test_lr_scheduler_kwargs_refused(name, kwargs, fragment):
    assert fragment in _config_error(_sched(name, kwargs))


ACCEPTED_SCHEDULES = [
    ("linear", None),
    ("cosine", {"num_cycles": 0.25}),
    ("cosine_with_restarts", {"num_cycles": 2}),
    ("polynomial", {"lr_end": 1e-6, "power": 2.0}),
    ("constant", None),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {"timescale": 10}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 3, "min_lr_ratio": 0.1}),
]


@pytest.mark.parametrize("name, kwargs", ACCEPTED_SCHEDULES, ids=[n for n, _ in ACCEPTED_SCHEDULES])
def test_lr_scheduler_kwargs_accepted_ones_build(name, kwargs):
    # what validation accepts is what get_scheduler, called as the Trainer calls it, builds
    from transformers import get_scheduler

    cfg = TrainConfig(**_sched(name, kwargs))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    get_scheduler(cfg.lr_scheduler_type, optimizer=opt, num_warmup_steps=1, num_training_steps=10,
                  scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None)


def test_lr_scheduler_kwargs_checked_on_assignment():
    cfg = TrainConfig(**_sched("cosine"))
    with pytest.raises(ConfigError, match=r"lr_scheduler_kwargs\.num_cyclez"):
        cfg.lr_scheduler_kwargs = {"num_cyclez": 2}
    assert cfg.lr_scheduler_kwargs == {}
    with pytest.raises(ConfigError, match=r"lr_scheduler_kwargs\.num_cycles: not an argument of the linear"):
        TrainConfig(**_sched("cosine", {"num_cycles": 2})).lr_scheduler_type = "linear"


# --------------------------------------------------- overrides keep the text of string fields
# `--set run_name=007` used to give '7' (YAML made it a number, coerce_numbers_to_str a string again).


@pytest.mark.parametrize(
    "override, path, expected",
    [
        ("run_name=007", ("run_name",), "007"),
        ("run_name=1.10", ("run_name",), "1.10"),
        ("output_dir=1e3", ("output_dir",), "1e3"),
        ("output_dir=2024", ("output_dir",), "2024"),
        ("resume_from_checkpoint=2024-01-01", ("resume_from_checkpoint",), "2024-01-01"),
        ("run_name=true", ("run_name",), "true"),
        ("run_name= 0x10 ", ("run_name",), "0x10"),
        ("run_name='007'", ("run_name",), "007"),  # a quoted YAML string is unquoted
        ("data.cache_dir=0.50", ("data", "cache_dir"), "0.50"),  # nested section
        ("data.split=010", ("data", "split"), "010"),
        ("data.fields.output=1e3", ("data", "fields", "output"), "1e3"),  # dict[str, str] values
    ],
)
def test_override_of_string_field_keeps_the_text(override, path, expected):
    value = load_config(BASE, overrides=[override])
    for part in path:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    assert value == expected


def test_override_of_other_fields_still_parsed(tmp_path):
    path = _write(tmp_path, "max_steps: 20\nresume_from_checkpoint: latest\nrun_name: x\n")
    cfg = load_config(path, overrides=[
        "seed=007", "learning_rate=1e-4", "num_train_epochs=1.10", "gradient_checkpointing=true",
        "report_to=[tensorboard]", "backend=ddp", "backend.bucket_cap_mb=1e1", "data.eval_split=0.1",
        "lr_scheduler_type=cosine_with_restarts", "lr_scheduler_kwargs.num_cycles=3",
        "resume_from_checkpoint=null", "run_name=~",  # YAML null unsets an Optional[str]
    ])
    assert cfg.seed == 7 and cfg.learning_rate == 1e-4 and cfg.num_train_epochs == 1.1
    assert cfg.gradient_checkpointing is True and cfg.report_to == ["tensorboard"]
    assert isinstance(cfg.backend, DDPConfig) and cfg.backend.bucket_cap_mb == 10.0
    assert cfg.data.eval_split == 0.1
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 3}
    assert cfg.resume_from_checkpoint is None and cfg.run_name is None


def test_resume_from_checkpoint_true_means_latest():
    # transformers' spelling in a YAML recipe: `resume_from_checkpoint: true`
    from unsloth_dist.config import load_config

    assert load_config({"max_steps": 1, "resume_from_checkpoint": True}).resume_from_checkpoint == "latest"
    assert load_config({"max_steps": 1, "resume_from_checkpoint": False}).resume_from_checkpoint is None


def test_world_size_without_rank_is_a_launch_error():
    import unsloth_dist.distributed as D

    raw = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(D.LaunchError, match="WORLD_SIZE=2 but RANK is not set"):
        D.read_launch_env(raw)


def test_fp16_mixed_refused_when_auto_resolves_to_fsdp():
    # backend: auto under an accelerate FSDP launch becomes fsdp after the config was validated
    cfg = TrainConfig(**BASE, precision="fp16-mixed")
    env = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="accelerate", accelerate_mode="fsdp")
    backend = D.resolve_backend(cfg.backend, env)
    assert backend.name == "fsdp"
    with pytest.raises(ConfigError, match="fp16-mixed is not supported with backend fsdp, which backend: auto chose"):
        D.check_runtime(cfg, backend, env)


def test_force_single_with_a_ddp_backend_makes_its_own_one_rank_group(tmp_path):
    """UNSLOTH_FORCE_SINGLE_GPU=1 under a launcher's WORLD_SIZE=2 with backend ddp: the one-rank group
    the backend needs is this process's own (before, it joined the launcher's group and waited for a
    second rank until dist_timeout_s)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from tiny import tiny_llama, ragged_dataset\n"
        "from unsloth_dist import Trainer, distributed as D\n"
        f"t = Trainer(tiny_llama(seed=0), ragged_dataset(n=8), backend='ddp', args=dict(output_dir={str(tmp_path)!r}, "
        "max_steps=1, per_device_train_batch_size=2, precision='fp32', disable_tqdm=True, dist_timeout_s=20))\n"
        "r = t.train(); print('world', t.world_size, 'steps', r.global_step); D.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(UNSLOTH_FORCE_SINGLE_GPU="1", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="1", TORCHELASTIC_USE_AGENT_STORE="True")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "world 1 steps 1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
