"""The DeepSpeed JSON config derived from a TrainConfig.

The ZeRO backends pass exactly this dict to `deepspeed.initialize`, and the CLI writes it to
disk, so what is generated and what runs cannot disagree. Two settings need the model and are not
in the file: `backend.stage3_leaf_layers` (the zero3 backend marks the decoder layers as ZeRO-3 leaf
modules on the model itself, with DeepSpeed's `set_z3_leaf_modules`, before `deepspeed.initialize`),
and an unset `backend.reduce_bucket_size` larger than the model's trainable elements, which the
backend lowers to that count (e.g. under LoRA; DeepSpeed allocates its buckets at full size).
"""
from __future__ import annotations

from typing import Any

from ..config import TrainConfig, ZeroConfig


def deepspeed_config(cfg: TrainConfig, zero: ZeroConfig, world_size: int) -> dict[str, Any]:
    """A DeepSpeed config for `zero` under `cfg` on `world_size` ranks."""
    zopt: dict[str, Any] = {
        "stage": zero.stage,
        # stages 1-2 on one rank: nothing to overlap, and DeepSpeed's overlapping path waits for the
        # whole device before each bucket's reduction and at the end of backward. Kept for zero3 (no
        # clear change measured at one rank, its step times spread too widely) and with the optimizer
        # offloaded (there it also overlaps the gradients' copy to the CPU with backward)
        "overlap_comm": zero.overlap_comm
        and (world_size > 1 or zero.stage == 3 or zero.offload_optimizer == "cpu"),
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if zero.stage < 3:
        zopt["allgather_bucket_size"] = zero.allgather_bucket_size
        zopt["reduce_scatter"] = True
    else:
        zopt.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_max_live_parameters=zero.stage3_max_live_parameters,
            stage3_max_reuse_distance=zero.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=True,
            memory_efficient_linear=zero.stage3_memory_efficient_linear,
        )
    if zero.offload_optimizer == "cpu":
        zopt["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_param == "cpu":
        zopt["offload_param"] = {"device": "cpu", "pin_memory": True}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.global_batch(world_size),
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zopt,
        # DeepSpeed's bf16 inf/NaN scan of every gradient before each step (several kernels per
        # parameter tensor and a host wait, ~8% of a one-rank zero2 step at the 1B shape) would skip
        # the step; under nan_policy stop (the only policy the Trainer takes with ZeRO) the Trainer
        # checks the loss before and the grad norm after each step and stops on either
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": cfg.nan_policy == "skip"},
        "fp16": {
            "enabled": cfg.precision == "fp16-mixed",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        # bf16 weights and compute, fp32 master weights / optimizer state; reductions in
        # backend.reduce_dtype (fp32 by default). With one rank nothing is summed: the bf16 gradients
        # go through as they are (a cast to fp32 and back would be pure cost; the values are the same)
        ds["communication_data_type"] = zero.reduce_dtype if world_size > 1 else "bf16"
    if zero.offload_optimizer == "cpu":
        # DeepSpeed's CPU Adam runs the offloaded step; it reads the hyper-parameters from here.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_epsilon,
                "weight_decay": cfg.weight_decay,
            },
        }
    return ds
