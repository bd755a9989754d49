"""`FastLanguageModel`: load a causal LM (+ tokenizer) ready for `unsloth_dist.Trainer`.

    model, tokenizer = FastLanguageModel.from_pretrained("path/or/hub-id", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)

Loading resolves the device map first (:mod:`unsloth_dist.models.device_map`, which refuses an
impossible map before any weight is read), loads through transformers (bitsandbytes for 4/8-bit),
patches the kernels (:func:`unsloth_dist.models.patch_model`, report logged) and sets up
gradient checkpointing when asked. Under a distributed launch every rank loads a whole replica on
its own device.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .device_map import DeviceMapPlan, resolve_device_map
from .lora import add_lora, bnb_config, enable_gradient_checkpointing, protect_packed_weights
from .patching import patch_model

logger = logging.getLogger("unsloth_dist")

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_dtype(dtype: Any) -> torch.dtype:
    """None -> bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on the CPU."""
    if dtype is None or dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype={dtype}: use torch.bfloat16, torch.float16 or torch.float32")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}: use None (auto), 'bfloat16', 'float16' or 'float32'")


def resolve_model_path(model_name: Union[str, os.PathLike]) -> str:
    """A local directory, or a plausible hub id (``org/name``); anything else is a clear error."""
    name = str(model_name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json; give a directory written by save_pretrained")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} is a file; give the model directory (with config.json)")
    looks_local = name.startswith(("/", "./", "../", "~", ".\\")) or os.sep in name.strip("/").replace("/", "", 1) \
        or name.count("/") > 1
    if looks_local or not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"model path {name!r} does not exist (and is not a hub id like 'org/model'); check the path")
    return name


class FastLanguageModel:
    """Loading, LoRA and export entry points (static methods)."""

    @staticmethod
    def from_pretrained(
        model_name: Union[str, os.PathLike],
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        device_map: Any = "auto",
        attn_implementation: Optional[str] = None,
        kernels: bool = True,
        use_gradient_checkpointing: Union[bool, str] = False,
        trust_remote_code: bool = False,
        token: Optional[str] = None,
        max_memory: Optional[dict] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load `(model, tokenizer)` from a local directory or a hub id.

        dtype: None -> bf16 on a GPU with bf16, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: QLoRA base (bitsandbytes NF4, double quantisation, compute and storage
            dtype bf16 -- or fp16 with dtype=fp16 -- so FSDP / ZeRO-3 can shard the packed weights).
        device_map: "auto" (one replica per rank under torchrun; split over the GPUs in one process),
            "balanced", "sequential", "cpu", "cuda:K", or a dict; see `unsloth_dist.models.device_map`.
        kernels: patch the Triton kernels in (`patch_model`); False leaves the model as transformers built it.
        Remaining keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer")
        if "torch_dtype" in kwargs:  # the transformers 4.x name
            legacy = kwargs.pop("torch_dtype")
            dtype = legacy if dtype is None else dtype
        path = resolve_model_path(model_name)
        hub_kw = {"token": token, "revision": revision, "trust_remote_code": trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(path, **hub_kw)
        except OSError as exc:
            raise OSError(
                f"could not read the config of {path!r}: {exc}. For a hub id the hub must be reachable "
                "(and a token given for gated models); otherwise give a local directory") from None
        torch_dtype = resolve_dtype(dtype)
        quant_bits = 4 if load_in_4bit else 8 if load_in_8bit else None
        qconfig = kwargs.pop("quantization_config", None)
        if quant_bits and qconfig is None:
            qdtype = torch_dtype if torch_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            qconfig = bnb_config(load_in_4bit, load_in_8bit, qdtype)
        # the map is resolved (and checked) before a single weight is read
        plan: DeviceMapPlan = resolve_device_map(
            config, device_map, max_memory=max_memory, dtype=torch_dtype, quant_bits=quant_bits,
            trust_remote_code=trust_remote_code)
        logger.info("%s", plan)
        load_kw: dict[str, Any] = dict(config=config, dtype=torch_dtype, device_map=plan.device_map, **hub_kw)
        if qconfig is not None:
            load_kw["quantization_config"] = qconfig
        if attn_implementation is not None:
            load_kw["attn_implementation"] = attn_implementation
        load_kw.update(kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
        if quant_bits == 4:
            protect_packed_weights(model)
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and max_seq_length > max_pos:
            logger.warning("max_seq_length=%d exceeds the model's max_position_embeddings=%d (no RoPE scaling is "
                           "applied here)", max_seq_length, max_pos)
        model.max_seq_length = max_seq_length
        model._unsloth_kernels = bool(kernels)
        model.unsloth_device_plan = plan
        report = patch_model(model, kernels=kernels)
        logger.info("%s", report)
        enable_gradient_checkpointing(model, use_gradient_checkpointing)
        tokenizer = _load_tokenizer(path, max_seq_length, hub_kw)
        if tokenizer is not None and getattr(model, "generation_config", None) is not None:
            if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: Any = None,
        bias: str = "none",
        use_gradient_checkpointing: Union[bool, str] = False,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: Optional[list[str]] = None,
        init_lora_weights: Any = True,
        layers_to_transform: Optional[list[int]] = None,
        loftq_config: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        """peft LoRA on the linear projections (q, k, v, o, gate, up, down by default). A 4/8-bit
        model is prepared for k-bit training first (QLoRA). `random_state` seeds the adapter init
        without disturbing the global RNG. Kernel patching stays in place."""
        kwargs.pop("max_seq_length", None)  # accepted for compatibility; set at load time
        return add_lora(
            model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, use_rslora=use_rslora,
            modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
            layers_to_transform=layers_to_transform, loftq_config=loftq_config, **kwargs,
        )

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        model.eval()
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = True
        return model

    @staticmethod
    def for_training(model: nn.Module) -> nn.Module:
        model.train()
        return model

    @staticmethod
    def save_pretrained_merged(trainer_or_model: Any, out_dir: Union[str, os.PathLike], tokenizer: Any = None,
                               save_method: str = "merged_16bit", peft_model: Optional[nn.Module] = None) -> Optional[Path]:
        """``save_method``: "merged_16bit" (bf16), "merged_fp16", "merged_32bit" or "lora" (adapter only).
        Give an `unsloth_dist.Trainer` (collective: call on every rank) or an unwrapped model."""
        from . import export

        dtypes = {"merged_16bit": torch.bfloat16, "merged_fp16": torch.float16, "merged_32bit": torch.float32}
        if save_method == "lora":
            return export.save_lora_adapter(trainer_or_model, peft_model, out_dir, tokenizer=tokenizer)
        if save_method not in dtypes:
            raise ValueError(f"save_method={save_method!r}: use 'merged_16bit', 'merged_fp16', 'merged_32bit' or 'lora'")
        return export.save_merged(trainer_or_model, out_dir, dtype=dtypes[save_method], tokenizer=tokenizer,
                                  peft_model=peft_model)


def _load_tokenizer(path: str, max_seq_length: int, hub_kw: dict):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **hub_kw)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer could be loaded from %s (%s); returning tokenizer=None", path,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
    tok.model_max_length = max_seq_length
    tok.padding_side = "right"  # training pads on the right; generation helpers switch to left
    return tok
