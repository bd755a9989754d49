"""Validated training configuration.

`TrainConfig` keeps the field names of `transformers.TrainingArguments` wherever the
meaning is the same, and adds the distributed `backend` (a discriminated union keyed by
`name`) and the `precision` policy. Every validation error is re-raised as a
`ConfigError` whose message names the field and says what would fix it.
"""
from __future__ import annotations

import difflib
import inspect
import os
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "SingleConfig",
    "DDPConfig",
    "FSDPConfig",
    "ZeroConfig",
    "AutoConfig",
    "BackendConfig",
    "BACKEND_NAMES",
    "load_config",
    "apply_overrides",
    "parse_backend",
]


class ConfigError(ValueError):
    """A configuration problem, with the field and the fix in the message."""


class _Strict(BaseModel):
    # numbers given for string fields (`output_dir: 2024` in a file, a keyword) become strings
    # (`--set` overrides keep their text for string fields: apply_overrides); inf/nan never pass a
    # size check
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, coerce_numbers_to_str=True, allow_inf_nan=False
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self))) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # validate on a copy first: pydantic's validate_assignment stores the value before the
        # model validators run, so a rejected value would otherwise stay in place
        if name in type(self).model_fields:
            try:
                BaseModel.__setattr__(self.model_copy(), name, value)
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, type(self))) from None
        super().__setattr__(name, value)


# --------------------------------------------------------------------------- backends


class SingleConfig(_Strict):
    """One process, one device: no process group, no wrapping. For one GPU, the CPU, or debugging.
    Refused when the launcher started several processes (unless UNSLOTH_FORCE_SINGLE_GPU=1)."""

    name: Literal["single"] = Field("single", description="Selects this backend.")


class DDPConfig(_Strict):
    """torch DistributedDataParallel: every rank holds the whole model, gradients and optimizer
    state; gradients are all-reduced in buckets during backward. The fastest choice when all of it
    fits on one GPU."""

    name: Literal["ddp"] = Field("ddp", description="Selects this backend.")
    find_unused_parameters: bool = Field(
        False,
        description="Let DDP find parameters that got no gradient in a step (an extra graph walk every "
        "step). Turn on only when DDP reports parameters that did not receive a gradient (e.g. "
        "branches not used in every forward).",
    )
    bucket_cap_mb: float = Field(
        25.0,
        gt=0,
        description="Size in MiB of the gradient buckets DDP all-reduces while backward still runs. "
        "Larger buckets mean fewer, bigger all-reduces (can help on slow interconnects) and less overlap.",
    )
    static_graph: bool = Field(
        False,
        description="Tell DDP that the set of used parameters is the same in every step, which lets it "
        "skip per-step bookkeeping (and work with reentrant gradient checkpointing). Only for models "
        "whose forward does not change between steps.",
    )
    gradient_as_bucket_view: bool = Field(
        True,
        description="Gradients are views into DDP's communication buckets instead of separate tensors, "
        "saving one gradient-sized copy of memory. Turn off only if code holds on to `.grad` tensors "
        "across steps.",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype gradients are all-reduced in under `precision: bf16` (the weights and gradients are bf16 there). `fp32`: each bf16 bucket is widened to fp32 for the reduction (exact sums, twice the traffic, and a cast per bucket); `bf16`: the buckets are reduced as they are (half the traffic, rounding in the sum). With one rank nothing is reduced and neither costs anything.",
    )


class FSDPConfig(_Strict):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer and the root: each rank
    keeps a 1/N shard of the parameters, gradients and optimizer state, and gathers one layer at a
    time. For models whose weights and Adam state do not fit on one GPU, or to give the memory to the
    batch. Trained parameters are fp32 shards (the optimizer's masters) that `precision: bf16` casts
    to bf16 per layer for compute; under `precision: bf16` frozen weights (a LoRA base, and the fp32
    embeddings / head / norms peft leaves in a QLoRA model) are kept in bf16: the same bf16 values
    the compute used, at half the memory."""

    name: Literal["fsdp"] = Field("fsdp", description="Selects this backend.")
    # full = FULL_SHARD, grad_op = SHARD_GRAD_OP (keep params unsharded between forward
    # and backward), hybrid = shard inside a node and replicate across nodes, none = replicate.
    sharding: Literal["full", "grad_op", "hybrid", "none"] = Field(
        "full",
        description="How parameters, gradients and optimizer state are spread: `full` (FULL_SHARD: each "
        "rank keeps 1/N, a layer is gathered for its forward and again for its backward; least memory), "
        "`grad_op` (SHARD_GRAD_OP: parameters stay gathered between forward and backward; more memory, "
        "one all-gather less per layer), `hybrid` (shard within a node, replicate across nodes: "
        "intra-node traffic only for the gathers; the world size must be a multiple of the ranks per "
        "node), `none` (replicate everywhere, DDP-like).",
    )
    # None: derived from `sharding` (True for full/hybrid, False for grad_op/none).
    reshard_after_forward: Optional[bool] = Field(
        None,
        description="Free each decoder layer's gathered parameters after its forward (re-gathered for "
        "backward; the last layer, whose backward follows at once, keeps them). Unset: derived from "
        "`sharding` (true for full/hybrid, false for grad_op/none); true together with grad_op/none is rejected.",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer state in (pinned) CPU memory "
        "and run the optimizer step on the CPU (FSDP2 CPUOffloadPolicy). Saves most GPU memory at a "
        "large speed cost; needs a GPU (refused on CPU-only runs).",
    )
    wrap: Literal["decoder_layer"] = Field(
        "decoder_layer",
        description="What becomes its own FSDP unit: every decoder layer (found through the model's "
        "`_no_split_modules`, or its largest ModuleList of blocks), an untied input embedding and an untied "
        "output head (each when the layers are resharded after forward), plus the root for the rest (final "
        "norm, tied embeddings and head). The only policy so far.",
    )
    forward_prefetch: int = Field(
        0,
        ge=0,
        le=8,
        description="How many following decoder layers each layer's forward starts gathering "
        "(FSDP2 `set_modules_to_forward_prefetch`). 0: FSDP2's default, a layer's all-gather is issued when "
        "its forward begins, which overlaps only as far as the host runs ahead of the GPU; 1-2 issue it "
        "earlier, hiding the gather when the host is the bottleneck, at the memory of that many more "
        "gathered layers.",
    )
    backward_prefetch: int = Field(
        1,
        ge=1,
        le=8,
        description="How many preceding decoder layers each layer's backward starts gathering "
        "(FSDP2 `set_modules_to_backward_prefetch`). 1: FSDP2's default (the next layer of the backward); "
        "more gathers earlier at the memory of that many more gathered layers.",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the gradient reduce-scatter under `precision: bf16` (FSDP2 `MixedPrecisionPolicy.reduce_dtype`). `fp32`: gradients are reduced and kept in fp32 (exact sums); `bf16`: half the traffic and no cast, with rounding in the sum.",
    )

    @model_validator(mode="after")
    def _reshard(self) -> "FSDPConfig":
        if self.reshard_after_forward is True and self.sharding in ("grad_op", "none"):
            raise ValueError(
                f"backend.reshard_after_forward=true contradicts backend.sharding={self.sharding!r} "
                "(that strategy keeps parameters unsharded after forward); use sharding: full, "
                "or leave reshard_after_forward unset"
            )
        return self

    @property
    def resolved_reshard_after_forward(self) -> bool:
        if self.reshard_after_forward is not None:
            return self.reshard_after_forward
        return self.sharding in ("full", "hybrid")


_STAGE3_ONLY = (
    "offload_param",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_leaf_layers",
    "stage3_memory_efficient_linear",
)


class ZeroConfig(_Strict):
    """DeepSpeed ZeRO stage 1, 2 or 3 (`name` picks the stage). DeepSpeed owns gradient
    accumulation boundaries, clipping and fp16 loss scaling; the JSON config it gets is generated
    from the TrainConfig (`unsloth-dist config deepspeed` writes the same file)."""

    name: Literal["zero1", "zero2", "zero3"] = Field(
        "zero2",
        description="The ZeRO stage: `zero1` partitions the optimizer state, `zero2` also the gradients, "
        "`zero3` also the parameters (gathered one decoder layer at a time in forward and backward, "
        "see `stage3_leaf_layers`).",
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none",
        description="`cpu`: keep the optimizer state (fp32 master weights and Adam moments) in pinned CPU "
        "memory and step with DeepSpeed's CPU Adam. Frees the largest share of GPU memory for a slower "
        "step; needs a GPU (refused on CPU-only runs).",
    )
    offload_param: Literal["none", "cpu"] = Field(
        "none",
        description="`cpu`: keep the partitioned parameters in CPU memory and bring them to the GPU when a "
        "module runs (ZeRO-Infinity style). zero3 only; the slowest and smallest setting.",
    )
    overlap_comm: bool = Field(
        True,
        description="Overlap gradient reduction with backward computation. Faster; at stages 1-2 it "
        "doubles the reduction buffers (2 x reduce_bucket_size elements). Stages 1-2 on one rank run "
        "without it unless the optimizer is offloaded (nothing is reduced, and the overlapping path waits "
        "for the GPU at every bucket).",
    )
    contiguous_gradients: bool = Field(
        True,
        description="Copy gradients into one contiguous buffer as they are produced, avoiding memory "
        "fragmentation during backward.",
    )
    reduce_bucket_size: int = Field(
        500_000_000,
        gt=0,
        description="Elements reduced at a time when gradients are reduced / reduce-scattered. Lower it "
        "to save memory (each bucket is a buffer of this many elements), raise it for fewer, larger "
        "collectives. Left unset, it is lowered at setup to the model's trainable elements when those "
        "are fewer (LoRA: the adapters' size), since DeepSpeed allocates the buffer at full size.",
    )
    allgather_bucket_size: int = Field(
        500_000_000,
        gt=0,
        description="Elements all-gathered at a time when the updated parameter partitions are "
        "gathered after the step (stages 1-2; zero3 ignores it). Lower it to save memory.",
    )
    stage3_prefetch_bucket_size: int = Field(
        50_000_000,
        gt=0,
        description="zero3 only: elements of parameters fetched ahead of the module that needs them. "
        "Larger overlaps more communication with compute and uses more memory.",
    )
    stage3_param_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="zero3 only: parameters with fewer elements than this are not partitioned (kept "
        "whole on every rank), saving many tiny gathers (norms, biases).",
    )
    stage3_max_live_parameters: int = Field(
        1_000_000_000,
        gt=0,
        description="zero3 only: upper bound on the number of gathered parameter elements held on a GPU "
        "at once. Lower it to save memory at some speed cost.",
    )
    stage3_max_reuse_distance: int = Field(
        1_000_000_000,
        ge=0,
        description="zero3 only: a gathered parameter is kept (not released) if it will be used again "
        "within this many parameter elements; lower it to save memory.",
    )
    stage3_leaf_layers: bool = Field(
        True,
        description="zero3 only: make every decoder layer a ZeRO-3 leaf module (DeepSpeed's "
        "`set_z3_leaf_modules` on the model's decoder layer classes at setup; not in the generated JSON): "
        "a layer's parameters are gathered "
        "together when it starts, and DeepSpeed hooks the layers instead of each of their Linear / LoRA "
        "submodules, which cuts the host time spent in those hooks per step (measured on one H200: about 2x "
        "the tokens/s for full fine-tuning at the 1B shape and LoRA / QLoRA at the 8B shape, same peak memory), "
        "and the fused LoRA kernels can use the gathered adapters. A whole layer's parameters are live at "
        "once (`stage3_max_live_parameters` does not split a layer); `false`: DeepSpeed's default "
        "module-by-module gathering.",
    )
    stage3_memory_efficient_linear: bool = Field(
        True,
        description="zero3 only: DeepSpeed's `memory_efficient_linear` (it replaces "
        "torch.nn.functional.linear with an autograd function that does not keep the gathered weight "
        "for backward). `false`: plain linear (C++ autograd, less host time per call).",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of DeepSpeed's gradient reduction under `precision: bf16` (`communication_data_type`). `fp32`: exact sums, twice the traffic and a cast of every gradient bucket; `bf16` (DeepSpeed's own default for bf16): half the traffic, rounding in the sum. With one rank nothing is summed and the gradients are passed on in bf16 either way (the same values, no casts).",
    )

    @property
    def stage(self) -> int:
        return int(self.name[-1])

    @model_validator(mode="after")
    def _stage3_only(self) -> "ZeroConfig":
        if self.name != "zero3":
            for key in _STAGE3_ONLY:
                if key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(
                        f"backend.{key} only applies to ZeRO stage 3 but backend is {self.name!r}; "
                        f"use backend: zero3 or remove {key}"
                    )
        return self


class AutoConfig(_Strict):
    """Pick the backend from the launcher environment and the world size at start-up: the
    accelerate config's FSDP / DeepSpeed settings under `accelerate launch`, `single` for one
    process, `zero2` under the DeepSpeed launcher, `ddp` otherwise (torchrun with several ranks)."""

    name: Literal["auto"] = Field("auto", description="Selects this backend.")


BackendConfig = Annotated[
    Union[SingleConfig, DDPConfig, FSDPConfig, ZeroConfig, AutoConfig],
    Field(discriminator="name"),
]
_BACKEND_CLASSES = {
    "single": SingleConfig,
    "ddp": DDPConfig,
    "fsdp": FSDPConfig,
    "zero1": ZeroConfig,
    "zero2": ZeroConfig,
    "zero3": ZeroConfig,
    "auto": AutoConfig,
}
BACKEND_NAMES = tuple(_BACKEND_CLASSES)


def _backend_to_dict(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True) | {"name": value.name}
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict):
        name = value.get("name")
        if name is None:
            raise ValueError(f"backend needs a `name`, one of {', '.join(BACKEND_NAMES)}")
        if name not in _BACKEND_CLASSES:
            close = difflib.get_close_matches(str(name), BACKEND_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"backend {name!r} is unknown{hint}; choose one of {', '.join(BACKEND_NAMES)}"
            )
    return value


def parse_backend(value: Any) -> "SingleConfig | DDPConfig | FSDPConfig | ZeroConfig | AutoConfig":
    """A backend config from a name, a dict, or a backend config."""
    try:
        value = _backend_to_dict(value)
    except ValueError as exc:
        raise ConfigError(f"{_HEADER}\n  backend: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{_HEADER}\n  backend: give a name, a mapping or a backend config, not {type(value).__name__}")
    return _BACKEND_CLASSES[value["name"]](**value)


# --------------------------------------------------------------------------- train config

Precision = Literal["bf16", "bf16-mixed", "fp16-mixed", "fp32"]
_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# transformers' get_scheduler calls these with the optimizer (and warm-up) only: it drops
# scheduler_specific_kwargs, so any key given for them would be silently ignored
_SCHEDULERS_WITHOUT_KWARGS = ("constant", "constant_with_warmup")
# schedules with an argument that has no default (get_wsd_schedule's num_decay_steps): checked even
# when lr_scheduler_kwargs is empty (otherwise the check, and its import of transformers, is skipped)
_SCHEDULERS_WITH_REQUIRED_KWARGS = ("warmup_stable_decay",)
# arguments of the schedule functions that the Trainer sets: what to do instead
_SCHEDULER_ARGS_OF_TRAINER = {
    "optimizer": "the Trainer passes its own optimizer; remove it",
    "num_warmup_steps": "the Trainer sets it from warmup_steps / warmup_ratio; set one of those instead",
    "num_training_steps": "the Trainer sets it from max_steps / num_train_epochs; set one of those instead",
    # a fresh optimizer refuses last_epoch >= 0 (KeyError 'initial_lr'); resume restores the position
    "last_epoch": "the Trainer owns the schedule's position (resume_from_checkpoint restores it); remove it",
}


def _scheduler_kwargs_problems(name: str, kwargs: dict[str, Any]) -> list[str]:
    """What is wrong with `lr_scheduler_kwargs` for the scheduler `name`, one line per problem, judged
    from the signature of the function transformers' get_scheduler builds it with (nothing is built)."""
    try:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        params = inspect.signature(func).parameters
    except (ImportError, KeyError, ValueError, TypeError):
        return []  # no transformers, or a schedule it lacks: the Trainer reports that
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    if name in _SCHEDULERS_WITHOUT_KWARGS:
        takes: list[str] = []
    else:
        takes = [
            n for n, p in params.items()
            if n not in _SCHEDULER_ARGS_OF_TRAINER and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    listed = f"it takes: {', '.join(takes)}" if takes else "it takes none; remove lr_scheduler_kwargs"
    problems = []
    for key in kwargs:
        if key in takes:
            continue
        field = f"lr_scheduler_kwargs.{key}"
        if key in _SCHEDULER_ARGS_OF_TRAINER and key in params:
            problems.append(f"{field}: {_SCHEDULER_ARGS_OF_TRAINER[key]}")
            continue
        close = difflib.get_close_matches(key, takes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{field}: not an argument of the {name} scheduler{hint}; {listed}")
    missing = [n for n in takes if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        example = ", ".join(f"{n}: ..." for n in missing)
        problems.append(
            f"lr_scheduler_kwargs: the {name} scheduler needs {', '.join(missing)}; "
            f"add it (lr_scheduler_kwargs: {{{example}}})"
        )
    return problems


class TrainConfig(_Strict):
    """Everything a training run needs; field names follow `transformers.TrainingArguments`."""

    output_dir: str = Field(
        "outputs",
        description="Directory for everything the run writes: `metrics.jsonl`, `checkpoint-N/` "
        "directories and the `latest` marker, `runs/` for TensorBoard. Relative paths are relative to the "
        "working directory of the launched processes.",
    )
    backend: BackendConfig = Field(
        default_factory=AutoConfig,
        description="How the work is spread over processes: a bare name (`single`, `ddp`, `fsdp`, "
        "`zero1`, `zero2`, `zero3`, `auto`) takes that backend's defaults, a mapping with `name:` sets "
        "its options (see the backend sections below). `auto` decides from the launcher at start-up.",
    )
    precision: Precision = Field(
        "bf16-mixed",
        description="Numeric policy. `bf16`: bf16 parameters and compute, fp32 master weights, "
        "reductions and optimizer state. `bf16-mixed`: fp32 parameters, bf16 autocast. `fp16-mixed`: "
        "fp16 autocast with dynamic loss scaling (GPU only; not with fsdp). `fp32`: no reduced "
        "precision (use it on the CPU or to debug numerics).",
    )

    per_device_train_batch_size: int = Field(
        8,
        gt=0,
        description="Samples per micro-batch on each rank. Lower it when a step runs out of memory and "
        "raise gradient_accumulation_steps to keep the global batch.",
    )
    per_device_eval_batch_size: int = Field(
        8, gt=0, description="Samples per evaluation forward on each rank (no gradients are kept)."
    )
    gradient_accumulation_steps: int = Field(
        1,
        gt=0,
        description="Micro-batches accumulated per optimizer step. The global batch is "
        "per_device_train_batch_size x gradient_accumulation_steps x world size; adjust this to keep it "
        "when the number of GPUs changes.",
    )
    # Optional: the global batch (per_device x accumulation x world size) asked for. When set,
    # it must equal that product at start-up; this catches a config written for another world size.
    global_batch_size: Optional[int] = Field(
        None,
        gt=0,
        description="Samples per optimizer step over all ranks. When set, the start-up check requires "
        "per_device_train_batch_size x gradient_accumulation_steps x world size to equal it and says "
        "which accumulation would: this catches a config written for another number of GPUs. Unset: no "
        "check.",
    )

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW (reached after warm-up).")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW decoupled weight decay, applied to matrices only (biases and norm weights are "
        "never decayed).",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1: decay rate of the first-moment (mean) estimate.")
    adam_beta2: float = Field(
        0.999, ge=0, lt=1, description="AdamW beta2: decay rate of the second-moment (squared-gradient) estimate."
    )
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon, added to the denominator for stability.")
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="Clip the global gradient norm (over all ranks and shards) to this value before each "
        "step; 0 disables clipping. The logged grad_norm is the norm before clipping.",
    )  # 0 disables clipping

    num_train_epochs: Optional[float] = Field(
        None,
        gt=0,
        description="Passes over the training data (fractions allowed); used only when max_steps is not "
        "set. One of the two is required. The steps are ceil(epochs x samples / global batch): the passes "
        "run on into one another, so where the data is not a multiple of the global batch the batch that "
        "ends a pass is completed from the next pass (no sample is left out).",
    )
    max_steps: Optional[int] = Field(
        None,
        gt=0,
        description="Optimizer steps to run; wins over num_train_epochs, as in transformers. One of the "
        "two is required.",
    )  # wins over num_train_epochs, as in transformers
    warmup_steps: int = Field(
        0, ge=0, description="Steps of linear learning-rate warm-up from 0. Exclusive with warmup_ratio."
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Warm-up as a fraction of the total steps (rounded up). Exclusive with warmup_steps.",
    )
    lr_scheduler_type: str = Field(
        "linear",
        description="Learning-rate schedule after warm-up, built by transformers' `get_scheduler` "
        "(names as in TrainingArguments).",
    )
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments of the schedule, e.g. `{num_cycles: 2}` for "
        "cosine_with_restarts or `{min_lr_rate: 0.1}` for cosine_with_min_lr. Checked against the arguments "
        "of the transformers function that builds the schedule (an unknown key, or a missing required one "
        "such as warmup_stable_decay's `num_decay_steps`, is an error); the Trainer sets `num_warmup_steps`, "
        "`num_training_steps` and `last_epoch` itself, and `constant` / `constant_with_warmup` take none.",
    )

    logging_steps: int = Field(
        1,
        gt=0,
        description="Every this many optimizer steps rank 0 appends the loss (the mean over the steps since the "
        "last record, as transformers logs it), the learning rate the step used, grad norm, tokens/s and peak "
        "memory to output_dir/metrics.jsonl (and to report_to). The last step is always logged.",
    )
    eval_steps: Optional[int] = Field(
        None,
        gt=0,
        description="Evaluate the global eval loss every this many steps when an eval dataset is given "
        "(or data.eval_split is set). Unset: no evaluation during training (trainer.evaluate() still works).",
    )
    save_steps: Optional[int] = Field(
        None,
        gt=0,
        description="Write a checkpoint every this many optimizer steps (all ranks take part). Unset: no "
        "periodic checkpoints (a SIGTERM save still happens with save_on_sigterm).",
    )
    save_total_limit: Optional[int] = Field(
        None,
        gt=0,
        description="Keep at most this many of this run's checkpoints in output_dir (a resumed run is the "
        "same run), deleting the oldest only after a new one is complete; checkpoints of an earlier run in "
        "the same output_dir that this one does not resume are never deleted. Needs save_steps. Unset: keep all.",
    )
    # "latest" = the newest complete checkpoint in output_dir (a fresh start when there is none),
    # or the path of a checkpoint-* directory
    resume_from_checkpoint: Optional[str] = Field(
        None,
        description="`latest`: continue from the newest complete checkpoint in output_dir (a fresh start "
        "when there is none); or the path of a `checkpoint-N` directory, from any backend or world size. "
        "The global batch must be the one the checkpoint was trained with, and so must what fixes the data order: "
        "shuffle, the seed when shuffling, and the number of training samples. Another max_steps / "
        "num_train_epochs than the checkpoint's run is accepted: the learning rate continues from the saved "
        "step on the schedule for the new total (warm-up and decay computed for it, as transformers' Trainer "
        "rebuilds its scheduler), so the curve changes shape at that step (a warning gives the rates); the "
        "data order carries on unchanged.",
    )
    # a step whose global loss is NaN/inf: stop (raise, naming the step) or skip (no update)
    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="What a step whose global loss or gradient norm is NaN or inf does (the gradient norm "
        "is not checked under fp16-mixed, whose loss scaler skips such steps itself): `stop` raises, naming "
        "the step; `skip` makes no update for that step (logged as skipped) and goes on. The zero backends "
        "take `stop` only, and see the gradient norm after DeepSpeed's step: the run stops there, saved "
        "checkpoints untouched.",
    )
    # save a checkpoint at the next step boundary on SIGTERM (preemption), then stop cleanly
    save_on_sigterm: bool = Field(
        True,
        description="On SIGTERM (preemption) every rank finishes the current step, a checkpoint is saved, "
        "and training returns cleanly; resume with resume_from_checkpoint: latest. The rest of the step and "
        "the save must fit in the time the launcher or scheduler waits before SIGKILL (torchrun's agent: 30 s "
        "after it forwards the SIGTERM; Slurm: KillWait, often 30 s); past it the ranks are killed and the "
        "last periodic checkpoint (save_steps) is what resumes.",
    )
    seed: int = Field(
        42,
        description="Seeds torch and the order of the data: the sequence of global batches depends only on "
        "seed and global batch size, never on the world size or backend. Every backend starts each rank from "
        "rank 0's weights; from there rank r's torch RNG is seeded with seed + r, so the ranks draw different "
        "dropout masks, as the micro-batches of one process do.",
    )
    shuffle: bool = Field(
        True,
        description="Shuffle the training samples: each epoch is a permutation drawn from seed + epoch. false: "
        "every epoch reads the samples in the dataset's own order (a curriculum, or to feed exactly the "
        "batches another loop reads in order). Either way the epochs follow one another as one stream cut "
        "into global batches (see num_train_epochs).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward instead of storing them: much "
        "less activation memory for about one extra forward of compute. Turn on for long sequences or "
        "when out of memory.",
    )
    gradient_checkpointing_layers: Optional[int] = Field(
        None,
        ge=0,
        description="With `gradient_checkpointing: true`: how many decoder layers are checkpointed, counted "
        "from the first; the others keep their activations (no recompute for them: faster, at the activation "
        "memory of each such layer). Unset: every layer. More than the model has is an error.",
    )
    activation_offload: Optional[bool] = Field(
        None,
        description="With `gradient_checkpointing: true`: keep the input of each checkpointed decoder layer "
        "(the one activation checkpointing holds per layer, tokens x hidden) in pinned CPU memory instead of "
        "on the GPU: copied out on a side stream during the forward, back ahead of the layer's recompute in "
        "backward. Frees layers x tokens x hidden x 2 bytes of GPU memory (4 under fp32 / bf16-mixed; 2 GiB "
        "for an 8B model at 8192 tokens per micro-batch in bf16) for PCIe traffic that overlaps the compute; "
        "losses and gradients are bit-identical. Costs pinned host memory per rank: one buffer per layer, "
        "the longest micro-batch's layer input rounded up to a power of two (shorter ones reuse them; "
        "`unsloth-dist plan --activation-offload` prints it). Unset: as the "
        "model was set up (`use_gradient_checkpointing=\"unsloth\"` in get_peft_model / from_pretrained "
        "switches it on); true: on; false: off, also for such a model. On a machine without CUDA the copies "
        "stay in CPU memory and save nothing.",
    )
    fused_master_adamw: Optional[bool] = Field(
        None,
        description="single / ddp under `precision: bf16`: run gradient clipping, AdamW on the fp32 master "
        "weights and the copy back into the bf16 weights as one Triton kernel per parameter that reads the "
        "bf16 gradient directly (about 30 instead of 52 bytes of memory traffic per parameter, and no fp32 "
        "gradient copy; 1.09x tokens/s at the 1B shape on one H200). Same arithmetic as torch.optim.AdamW; "
        "the optimizer state and checkpoints are unchanged. Unset: on wherever it can run (a CUDA GPU, "
        "backend single / ddp, precision bf16, a plain torch.optim.AdamW), off elsewhere. true: required "
        "(an error where it cannot run). false: torch's AdamW on fp32 copies of the gradients.",
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="Worker processes per rank that collate batches (0: in the training process)."
    )
    dataloader_pin_memory: bool = Field(
        True, description="Collate into pinned host memory for faster copies to the GPU (ignored without CUDA)."
    )

    # the data pipeline (unsloth_dist.data): files, format, template, packing, masking
    data: Optional["DataConfig"] = Field(
        None,
        description="The data pipeline (see the data section below): files, format, chat template, "
        "masking, packing. Used when the Trainer gets no train_dataset (and a tokenizer).",
    )

    # process group: auto = nccl with CUDA, gloo without
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="torch.distributed communication library: `auto` is nccl with CUDA GPUs, gloo "
        "without; nccl needs GPUs.",
    )
    dist_timeout_s: int = Field(
        1800,
        gt=0,
        description="Seconds a collective may wait before the process group gives up (the process-group "
        "timeout). It is what ends ranks left waiting by a rank that died without a launcher watching; "
        "lower it to fail faster, raise it if a slow but healthy phase (a large save) hits it.",
    )
    disable_tqdm: bool = Field(False, description="Hide rank 0's progress bar (metrics are still logged).")
    # where rank 0 also sends the metrics it writes to output_dir/metrics.jsonl:
    # "tensorboard" (output_dir/runs), "wandb" (project from WANDB_PROJECT), or both
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Where rank 0 also sends the metrics it writes to output_dir/metrics.jsonl: "
        "`tensorboard` (event files in output_dir/runs/<run_name>), `wandb` (project from $WANDB_PROJECT), "
        "or both; the package must be installed (`pip install tensorboard` / `wandb`). Accepts a list or a "
        "comma-separated string; `none` or empty: metrics.jsonl only.",
    )
    run_name: Optional[str] = Field(
        None,
        description="Name of the run for report_to: the wandb run name and the TensorBoard run directory "
        "output_dir/runs/<run_name>. Unset: wandb's default name and a timestamp directory.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if value is None or value == "none" or value == "":
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
        return value

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _resume_bool(cls, value: Any) -> Any:
        # transformers' spelling: `resume_from_checkpoint: true` is the newest checkpoint
        if value is True:
            return "latest"
        if value is False:
            return None
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _expand_backend(cls, value: Any) -> Any:
        return _backend_to_dict(value)

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value not in _SCHEDULERS:
            raise ValueError(f"{value!r} is unknown; choose one of {', '.join(_SCHEDULERS)}")
        return value

    @model_validator(mode="after")
    def _scheduler_kwargs(self) -> "TrainConfig":
        # checked here rather than when the Trainer builds the schedule (a TypeError after the
        # process group and the model are set up, naming no config field)
        if not self.lr_scheduler_kwargs and self.lr_scheduler_type not in _SCHEDULERS_WITH_REQUIRED_KWARGS:
            return self
        problems = _scheduler_kwargs_problems(self.lr_scheduler_type, self.lr_scheduler_kwargs)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainConfig":
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError(
                "neither max_steps nor num_train_epochs is set: set max_steps (optimizer steps) "
                "or num_train_epochs (passes over the data)"
            )
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                "warmup_steps and warmup_ratio are both set; keep one (warmup_steps wins in "
                "transformers, which hides mistakes here)"
            )
        if self.save_total_limit is not None and self.save_steps is None:
            raise ValueError("save_total_limit is set but save_steps is not: set save_steps, or drop save_total_limit")
        if self.gradient_checkpointing_layers is not None and not self.gradient_checkpointing:
            raise ValueError(
                "gradient_checkpointing_layers is set but gradient_checkpointing is false: set "
                "gradient_checkpointing: true, or leave gradient_checkpointing_layers unset"
            )
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError(
                "activation_offload: true but gradient_checkpointing is false: it offloads what checkpointing "
                "keeps of each layer; set gradient_checkpointing: true, or leave activation_offload unset"
            )
        if self.fused_master_adamw is True and (self.backend.name not in ("single", "ddp", "auto") or self.precision != "bf16"):
            raise ValueError(
                f"fused_master_adamw: true needs backend single or ddp with precision bf16 (got backend "
                f"{self.backend.name!r}, precision {self.precision!r}): it updates the fp32 master copies those "
                "backends keep for bf16 weights; fsdp and zero update their own fp32 shards. Leave it unset or set it to false"
            )
        if self.precision == "fp16-mixed" and self.backend.name == "fsdp":
            raise ValueError(
                "precision fp16-mixed is not supported with backend fsdp (FSDP2 has no sharded fp16 "
                "loss scaler here); use precision: bf16 or bf16-mixed, or a zero backend for fp16"
            )
        return self

    # -------------------------------------------------------------- derived values

    def global_batch(self, world_size: int) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    def check_world_size(self, world_size: int) -> None:
        """Checks that need the world size (called before any process group exists)."""
        if self.global_batch_size is not None and self.global_batch(world_size) != self.global_batch_size:
            per = self.per_device_train_batch_size * world_size
            if self.global_batch_size % per:
                fix = (
                    f"choose a global_batch_size that is a multiple of {per} "
                    f"(per_device_train_batch_size {self.per_device_train_batch_size} x world size {world_size})"
                )
            else:
                fix = f"set gradient_accumulation_steps to {self.global_batch_size // per}"
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} but per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} x world size {world_size} = "
                f"{self.global_batch(world_size)}: {fix}"
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- errors


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that owns the field at `loc` (for listing valid keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, str) and part in _BACKEND_CLASSES and current is None:
            current = _BACKEND_CLASSES[part]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if part == "backend" and current is TrainConfig:
            current = None  # the next loc element is the discriminator tag
            continue
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return current if part == loc[-1] else None
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return current if isinstance(current, type) else None


_HEADER = "invalid configuration:"


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    prefix = "backend." if model in _BACKEND_CLASSES.values() else ""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # drop the discriminator tag from the displayed path: backend.zero2.x -> backend.x
        shown = [str(p) for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "backend" and p in _BACKEND_CLASSES)]
        field = prefix + ".".join(shown) if shown else (prefix.rstrip(".") or "config")
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1]) if len(loc) > 1 else model
            valid = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{field}: unknown field{hint}; valid fields here: {', '.join(valid)}")
        elif err["type"] in ("value_error", "assertion_error"):
            msg = str(err["msg"]).removeprefix("Value error, ")
            if msg.startswith(_HEADER):  # a nested model's own ConfigError, already formatted
                lines.extend(line.strip() for line in msg[len(_HEADER):].splitlines() if line.strip())
            else:
                lines.append(f"{field}: {msg}" if shown else msg)
        elif err["type"] == "literal_error":
            lines.append(f"{field}: {err['msg']} (got {err['input']!r})")
        else:
            lines.append(f"{field}: {err['msg']} (got {err['input']!r})")
    return _HEADER + "\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- loading


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _strip_optional(annotation: Any) -> Any:
    """`X` for `Optional[X]` / `X | None` / `Annotated[X, ...]`; anything else unchanged."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip_optional(members[0])
    return annotation


def _allows_none(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _member_annotation(annotation: Any, key: str) -> Any:
    """The annotation of `key` inside a field annotated `annotation` (a model's field, or the value
    type of a `dict[str, X]`); None where it is not known."""
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(key)
        return field.annotation if field is not None else None
    if get_origin(annotation) is dict and len(get_args(annotation)) == 2:
        return get_args(annotation)[1]
    return None


def _parse_value(text: str, annotation: Any = None) -> Any:
    """An override's value. For a field typed `str` / `Optional[str]` the text itself (stripped;
    a quoted YAML string is unquoted; a YAML null unsets an Optional[str]), so that `007`, `1e3` or
    `1.10` stay what was typed; for every other field (or an unknown one) the text parsed as YAML."""
    if _strip_optional(annotation) is str:
        text = text.strip()
        if text in _YAML_NULLS and _allows_none(annotation):
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = None
            if isinstance(value, str):
                return value
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `key.sub=value` overrides to a plain config dict. Values are parsed as YAML, except
    for fields typed `str` / `Optional[str]` (found from the models along the dotted path), which
    keep the text as given (`--set run_name=007` is '007', not 7)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set learning_rate=2e-4)")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        annotation: Any = TrainConfig  # of the section `node` is, followed along the path
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            annotation = _member_annotation(annotation, part)
            if part == "backend" and depth == 0:
                child = _backend_to_dict(child if child is not None else "auto")
                if isinstance(child, BaseModel):
                    child = _backend_to_dict(child)
                # the backend section's fields are those of the class its name selects
                annotation = _BACKEND_CLASSES.get(child.get("name")) if isinstance(child, dict) else None
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = _parse_value(raw, _member_annotation(annotation, parts[-1]))
    return data


def load_config(source: Any = None, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> TrainConfig:
    """A TrainConfig from a YAML path, a dict, a TrainConfig or None, plus dotted overrides
    and keyword fields (keywords win over the file, overrides win over both)."""
    if source is None:
        data: dict = {}
    elif isinstance(source, TrainConfig):
        data = source.model_dump(exclude_unset=True)
        if "backend" in data:
            data["backend"] = _backend_to_dict(source.backend)
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (give a YAML file path)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields, not {type(data).__name__}")
    else:
        raise ConfigError(f"args must be a TrainConfig, a dict or a YAML path, not {type(source).__name__}")
    data.update(kwargs)
    if overrides:
        data = apply_overrides(data, overrides)
    return TrainConfig(**data)


from .data.config import DataConfig  # noqa: E402  (it subclasses _Strict, defined above)

TrainConfig.model_rebuild()
