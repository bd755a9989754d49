"""Under `accelerate launch`, the DeepSpeed config file accelerate was given (deepspeed_config_file,
exported as ACCELERATE_DEEPSPEED_CONFIG_FILE) and accelerate's mixed_precision
(ACCELERATE_MIXED_PRECISION) must agree with the TrainConfig's gradient_accumulation_steps,
max_grad_norm and precision: a contradiction is an AccelerateLaunchError naming both sides,
raised before any process group exists; values the file leaves "auto" are the Trainer's."""
from __future__ import annotations

import json

import pytest
import torch

from unsloth_dist.config import load_config, parse_backend
from unsloth_dist.launch.accelerate_config import AccelerateLaunchError, check_accelerate_launch
from unsloth_dist.launch.deepspeed_config import deepspeed_config

BASE = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
MULTI_GPU = BASE | {"ACCELERATE_DYNAMO_BACKEND": "NO"}  # accelerate's plain multi-GPU launch sets both
# what accelerate 1.15 exports for a DeepSpeed config with deepspeed_config_file: no stage, no
# accumulation / clipping variables (they are in the file), and mixed_precision's default "no"
DS_FILE_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
               "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero3_init_flag"}
AUTO = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def cfg(**kw):
    # TrainConfig defaults: gradient_accumulation_steps 1, max_grad_norm 1.0, precision bf16-mixed
    return load_config({"max_steps": 1, "backend": "auto", **kw})


def ds_env(tmp_path, ds: dict, **env) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return BASE | DS_FILE_ENV | {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)} | env


# ---------------------------------------------------------------- the DeepSpeed config file


def test_audit_case_is_refused(tmp_path):
    """gas 8, clip 0.3, fp16 in the file against gas 1, clip 1.0, bf16-mixed: used to pass silently."""
    env = ds_env(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8,
                            "gradient_clipping": 0.3, "train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})
    with pytest.raises(AccelerateLaunchError, match="ds.json") as exc:
        check_accelerate_launch(cfg(), env)
    assert "gradient_accumulation_steps 8" in str(exc.value)


@pytest.mark.parametrize("change, kw, says", [
    ({"gradient_accumulation_steps": 8}, {},
     ["gradient_accumulation_steps 8", "TrainConfig has gradient_accumulation_steps 1", 'gradient_accumulation_steps to 1 (or "auto")']),
    ({"gradient_accumulation_steps": 2}, {"gradient_accumulation_steps": 4},
     ["gradient_accumulation_steps 2", "TrainConfig has gradient_accumulation_steps 4"]),
    ({"gradient_clipping": 0.3}, {}, ["gradient_clipping 0.3", "TrainConfig has max_grad_norm 1.0"]),
    ({"gradient_clipping": 1.0}, {"max_grad_norm": 0.0}, ["gradient_clipping 1.0", "max_grad_norm 0.0"]),
    ({"fp16": {"enabled": True}}, {}, ["fp16.enabled true", "precision 'bf16-mixed'", "fp16-mixed"]),
    ({"fp16": {"enabled": "true"}}, {"precision": "fp32"}, ["fp16.enabled true", "precision 'fp32'"]),
    ({"bf16": {"enabled": True}}, {"precision": "fp32"}, ["bf16.enabled true", "precision 'fp32'", "bf16 / bf16-mixed"]),
    ({"bf16": {"enabled": True}}, {"precision": "fp16-mixed"}, ["bf16.enabled true", "precision 'fp16-mixed'"]),
    ({"bf16": {"enabled": False}}, {"precision": "bf16"}, ["bf16.enabled false", "precision 'bf16'"]),
    ({"fp16": {"enabled": False}}, {"precision": "fp16-mixed"}, ["fp16.enabled false", "precision 'fp16-mixed'"]),
    ({"gradient_accumulation_steps": "eight"}, {}, ["gradient_accumulation_steps", "'eight'", "not a number"]),
    ({"gradient_clipping": True}, {}, ["gradient_clipping", "not a number"]),
    ({"bf16": {"enabled": "yes please"}}, {}, ["bf16", '"enabled": true | false | "auto"']),
], ids=["gas", "gas-4", "clip", "clip-off", "fp16-vs-bf16-mixed", "fp16-str-vs-fp32", "bf16-vs-fp32",
        "bf16-vs-fp16-mixed", "bf16-off-vs-bf16", "fp16-off-vs-fp16-mixed", "gas-garbage", "clip-bool", "bf16-garbage"])
def test_file_disagreeing_with_trainconfig_is_an_error(tmp_path, change, kw, says):
    env = ds_env(tmp_path, AUTO | change)
    with pytest.raises(AccelerateLaunchError) as exc:
        check_accelerate_launch(cfg(**kw), env)
    msg = str(exc.value)
    assert str(tmp_path / "ds.json") in msg and "deepspeed_config_file" in msg, msg
    for s in says:
        assert s in msg, msg


def test_auto_and_missing_values_are_left_to_the_trainer(tmp_path):
    for precision in ("fp32", "bf16", "bf16-mixed", "fp16-mixed"):
        c = cfg(precision=precision, gradient_accumulation_steps=3, max_grad_norm=0.5)
        assert check_accelerate_launch(c, ds_env(tmp_path, AUTO)) == {"name": "zero2"}
        assert check_accelerate_launch(c, ds_env(tmp_path, {"zero_optimization": {"stage": 3}})) == {"name": "zero3"}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed", "fp16-mixed"])
def test_generated_deepspeed_file_is_accepted(tmp_path, precision):
    """`unsloth-dist config deepspeed` for the same recipe (bf16-mixed writes bf16 and fp16 disabled:
    the Trainer autocasts over fp32 DeepSpeed weights) passes as accelerate's deepspeed_config_file."""
    c = cfg(precision=precision, gradient_accumulation_steps=4, max_grad_norm=0.25, per_device_train_batch_size=2)
    ds = deepspeed_config(c, parse_backend("zero3"), 2)
    assert check_accelerate_launch(c, ds_env(tmp_path, ds)) == {"name": "zero3"}


@pytest.mark.parametrize("precision, flags", [
    ("bf16-mixed", {"bf16": {"enabled": True}}),  # what accelerate itself writes for mixed_precision bf16
    ("bf16", {"bf16": {"enabled": True}, "fp16": {"enabled": False}}),
    ("fp16-mixed", {"fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}),
    ("fp32", {"fp16": {"enabled": "false"}, "bf16": {"enabled": False}}),
])
def test_matching_precision_flags_are_accepted(tmp_path, precision, flags):
    ds = {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0} | flags
    assert check_accelerate_launch(cfg(precision=precision), ds_env(tmp_path, ds)) == {"name": "zero1"}


def test_explicit_mixed_precision_is_checked_even_with_a_file(tmp_path):
    # the file's "no" is accelerate's default (its config has no mixed_precision with a file) and is
    # not checked, but `--mixed_precision bf16` on the command line is
    env = ds_env(tmp_path, AUTO | {"fp16": {"enabled": True}}, ACCELERATE_MIXED_PRECISION="bf16")
    with pytest.raises(AccelerateLaunchError, match=r"ACCELERATE_MIXED_PRECISION=bf16.*precision 'fp16-mixed'"):
        check_accelerate_launch(cfg(precision="fp16-mixed"), env)
    env = ds_env(tmp_path, AUTO, ACCELERATE_MIXED_PRECISION="bf16")
    assert check_accelerate_launch(cfg(precision="bf16"), env) == {"name": "zero2"}


# ---------------------------------------------------------------- ACCELERATE_MIXED_PRECISION


# "no" is a bare `accelerate launch`'s default (no config file): not a request, any precision goes
@pytest.mark.parametrize("mp, precision", [("no", "fp32"), ("no", "bf16-mixed"), ("no", "bf16"), ("bf16", "bf16"),
                                           ("bf16", "bf16-mixed"), ("fp16", "fp16-mixed"), ("BF16", "bf16-mixed")])
def test_matching_mixed_precision_is_accepted(mp, precision):
    assert check_accelerate_launch(cfg(precision=precision), MULTI_GPU | {"ACCELERATE_MIXED_PRECISION": mp}) is None


@pytest.mark.parametrize("mp, precision, says", [
    ("fp16", "fp32", ["ACCELERATE_MIXED_PRECISION=fp16", "precision 'fp32'", "mixed_precision: no", "fp16-mixed"]),
    ("fp16", "bf16-mixed", ["ACCELERATE_MIXED_PRECISION=fp16", "precision 'bf16-mixed'", "mixed_precision: bf16"]),
    ("bf16", "fp32", ["ACCELERATE_MIXED_PRECISION=bf16", "precision 'fp32'", "bf16 / bf16-mixed"]),
    ("bf16", "fp16-mixed", ["ACCELERATE_MIXED_PRECISION=bf16", "precision 'fp16-mixed'", "mixed_precision: fp16"]),
    ("fp8", "bf16-mixed", ["ACCELERATE_MIXED_PRECISION=fp8", "no fp8", "mixed_precision: bf16"]),
    ("int4", "fp32", ["ACCELERATE_MIXED_PRECISION=int4", "unknown"]),
])
def test_mixed_precision_disagreeing_with_trainconfig_is_an_error(mp, precision, says):
    with pytest.raises(AccelerateLaunchError) as exc:
        check_accelerate_launch(cfg(precision=precision), MULTI_GPU | {"ACCELERATE_MIXED_PRECISION": mp})
    for s in says:
        assert s in str(exc.value), str(exc.value)


def test_mixed_precision_is_checked_for_fsdp_and_deepspeed_envs_too():
    fsdp = BASE | {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "fp16"}
    with pytest.raises(AccelerateLaunchError, match="ACCELERATE_MIXED_PRECISION=fp16"):
        check_accelerate_launch(cfg(precision="bf16"), fsdp)
    ds = BASE | {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                 "ACCELERATE_MIXED_PRECISION": "bf16"}
    with pytest.raises(AccelerateLaunchError, match="precision 'fp32'"):
        check_accelerate_launch(cfg(precision="fp32"), ds)
    assert check_accelerate_launch(cfg(precision="bf16"), ds) == {"name": "zero2"}


def test_garbage_accumulation_env_is_a_clear_error():
    env = BASE | {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                  "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "four"}
    with pytest.raises(AccelerateLaunchError, match="ACCELERATE_GRADIENT_ACCUMULATION_STEPS.*'four'"):
        check_accelerate_launch(cfg(precision="fp32"), env)


# ---------------------------------------------------------------- through the Trainer


def test_trainer_refuses_before_the_process_group(tmp_path, monkeypatch):
    from unsloth_dist import Trainer

    env = ds_env(tmp_path, AUTO | {"gradient_clipping": 0.3}, RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT="1", TORCHELASTIC_RUN_ID="r")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(AccelerateLaunchError, match=r"gradient_clipping 0\.3.*max_grad_norm 1\.0"):
        Trainer(torch.nn.Linear(2, 2), [], args=cfg(output_dir=str(tmp_path / "out")))
    assert not torch.distributed.is_initialized()
