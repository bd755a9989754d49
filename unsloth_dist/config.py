"""Validated training configuration.

`TrainConfig` keeps the field names of `transformers.TrainingArguments` wherever the
meaning is the same, and adds the distributed `backend` (a discriminated union keyed by
`name`) and the `precision` policy. Every validation error is re-raised as a
`ConfigError` whose message names the field and says what would fix it.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

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
    # numbers given for string fields (`--set output_dir=2024`) become strings; inf/nan never
    # pass a size check
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
    """One process, one device."""

    name: Literal["single"] = "single"


class DDPConfig(_Strict):
    """torch DistributedDataParallel."""

    name: Literal["ddp"] = "ddp"
    find_unused_parameters: bool = False
    bucket_cap_mb: float = Field(25.0, gt=0)
    static_graph: bool = False
    gradient_as_bucket_view: bool = True


class FSDPConfig(_Strict):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer and the root."""

    name: Literal["fsdp"] = "fsdp"
    # full = FULL_SHARD, grad_op = SHARD_GRAD_OP (keep params unsharded between forward
    # and backward), hybrid = shard inside a node and replicate across nodes, none = replicate.
    sharding: Literal["full", "grad_op", "hybrid", "none"] = "full"
    # None: derived from `sharding` (True for full/hybrid, False for grad_op/none).
    reshard_after_forward: Optional[bool] = None
    cpu_offload: bool = False
    wrap: Literal["decoder_layer"] = "decoder_layer"

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
)


class ZeroConfig(_Strict):
    """DeepSpeed ZeRO stage 1, 2 or 3 (`name` picks the stage)."""

    name: Literal["zero1", "zero2", "zero3"] = "zero2"
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    allgather_bucket_size: int = Field(500_000_000, gt=0)
    stage3_prefetch_bucket_size: int = Field(50_000_000, gt=0)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_max_live_parameters: int = Field(1_000_000_000, gt=0)
    stage3_max_reuse_distance: int = Field(1_000_000_000, ge=0)

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
    """Pick the backend from the launcher environment and the world size at start-up."""

    name: Literal["auto"] = "auto"


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


class TrainConfig(_Strict):
    """Everything a training run needs; field names follow `transformers.TrainingArguments`."""

    output_dir: str = "outputs"
    backend: BackendConfig = Field(default_factory=AutoConfig)
    precision: Precision = "bf16-mixed"

    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # Optional: the global batch (per_device x accumulation x world size) asked for. When set,
    # it must equal that product at start-up; this catches a config written for another world size.
    global_batch_size: Optional[int] = Field(None, gt=0)

    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping

    num_train_epochs: Optional[float] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)  # wins over num_train_epochs, as in transformers
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)

    logging_steps: int = Field(1, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)
    save_steps: Optional[int] = Field(None, gt=0)
    save_total_limit: Optional[int] = Field(None, gt=0)
    # "latest" = the newest complete checkpoint in output_dir (a fresh start when there is none),
    # or the path of a checkpoint-* directory
    resume_from_checkpoint: Optional[str] = None
    # a step whose global loss is NaN/inf: stop (raise, naming the step) or skip (no update)
    nan_policy: Literal["stop", "skip"] = "stop"
    # save a checkpoint at the next step boundary on SIGTERM (preemption), then stop cleanly
    save_on_sigterm: bool = True
    seed: int = 42
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    dataloader_pin_memory: bool = True

    # the data pipeline (unsloth_dist.data): files, format, template, packing, masking
    data: Optional["DataConfig"] = None

    # process group: auto = nccl with CUDA, gloo without
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    dist_timeout_s: int = Field(1800, gt=0)
    disable_tqdm: bool = False
    # where rank 0 also sends the metrics it writes to output_dir/metrics.jsonl:
    # "tensorboard" (output_dir/runs), "wandb" (project from WANDB_PROJECT), or both
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    run_name: Optional[str] = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if value is None or value == "none" or value == "":
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
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


def _parse_value(text: str) -> Any:
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
    """Apply `key.sub=value` overrides (values parsed as YAML) to a plain config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set learning_rate=2e-4)")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        value = _parse_value(raw)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if part == "backend" and depth == 0:
                child = _backend_to_dict(child if child is not None else "auto")
                if isinstance(child, BaseModel):
                    child = _backend_to_dict(child)
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
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
