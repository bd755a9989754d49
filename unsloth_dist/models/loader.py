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

import functools
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
        if (path / "unsloth_checkpoint.json").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is an unsloth_dist training checkpoint (weights and optimizer state as the backend "
                "wrote them), not a model directory: resume it with resume_from_checkpoint, or write a loadable "
                f"model from it: `unsloth-dist checkpoint consolidate {str(path)} -o OUT` (full fine-tuning), or after "
                "training model.save_pretrained(dir) / save_pretrained_merged(dir, tokenizer) (LoRA)")
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


_NOTICED: set = set()  # one-line notices already given in this process


def _notice_once(key: str, msg: str, *args: Any) -> None:
    """A warning on rank 0, once per process."""
    from .. import distributed as D

    if key in _NOTICED or D.launch_rank() != 0:
        return
    _NOTICED.add(key)
    logger.warning(msg, *args)


def _set_rope_scaling(config: Any, rope_scaling: dict) -> None:
    """unsloth's ``rope_scaling=`` onto the config: transformers 5 keeps it in ``rope_parameters``
    (merged, so that rope_theta stays), 4.x in ``rope_scaling``."""
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling={rope_scaling!r}: give a dict such as {{'rope_type': 'linear', 'factor': 2.0}}")
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    current = getattr(config, "rope_parameters", None)
    if isinstance(current, dict):
        config.rope_parameters = {**current, **scaling}
    else:
        config.rope_scaling = scaling


class FastLanguageModel:
    """Loading, LoRA and export entry points (static methods), with unsloth's signatures.

    Differences from unsloth's defaults (documented in docs/MULTI_GPU_TRAINING.md): ``load_in_4bit``
    defaults to False here (a one-line notice on rank 0 when it is not given) and
    ``use_gradient_checkpointing`` to False in both ``from_pretrained`` and ``get_peft_model``
    (unsloth: True and "unsloth"); pass them explicitly to get unsloth's behaviour."""

    @staticmethod
    def from_pretrained(
        model_name: Union[str, os.PathLike],
        max_seq_length: Optional[int] = 2048,
        dtype: Any = None,
        load_in_4bit: Optional[bool] = None,
        load_in_8bit: bool = False,
        device_map: Any = "auto",
        attn_implementation: Optional[str] = None,
        kernels: bool = True,
        use_gradient_checkpointing: Union[bool, str] = False,
        trust_remote_code: bool = False,
        token: Optional[str] = None,
        max_memory: Optional[dict] = None,
        revision: Optional[str] = None,
        full_finetuning: bool = False,
        rope_scaling: Optional[dict] = None,
        fix_tokenizer: bool = True,
        use_exact_model_name: bool = False,
        load_in_16bit: bool = False,
        fast_inference: bool = False,
        gpu_memory_utilization: Optional[float] = None,
        max_lora_rank: Optional[int] = None,
        float8_kv_cache: bool = False,
        disable_log_stats: bool = True,
        random_state: Optional[int] = None,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load `(model, tokenizer)` from a local directory or a hub id.

        max_seq_length: None -> the model's max_position_embeddings.
        dtype: None -> bf16 on a GPU with bf16, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: QLoRA base (bitsandbytes NF4, double quantisation, compute and storage
            dtype bf16 -- or fp16 with dtype=fp16 -- so FSDP / ZeRO-3 can shard the packed weights).
            Default False here (unsloth's is True): a notice says so on rank 0 when it is not given.
        load_in_8bit: not supported (a clear error): the exports and the sharded backends handle 4-bit NF4.
        full_finetuning: every weight trains: no quantization, and ``get_peft_model`` leaves the model as is.
        device_map: "auto" (one replica per rank under torchrun; split over the GPUs in one process),
            "balanced", "sequential", "cpu", "cuda:K", or a dict; see `unsloth_dist.models.device_map`.
        kernels: patch the Triton kernels in (`patch_model`); False leaves the model as transformers built it.
        rope_scaling: e.g. ``{"rope_type": "linear", "factor": 2.0}``, set on the config (None: the model's own).
        fast_inference / gpu_memory_utilization / max_lora_rank / float8_kv_cache / disable_log_stats: unsloth's
            vLLM options, accepted and ignored (a warning once when one asks for vLLM): generation here is
            transformers' ``generate()``. fix_tokenizer, use_exact_model_name, random_state: accepted, no effect.
        Remaining keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
        The tokenizer is remembered on the model (``for_inference`` / ``for_training`` switch its padding
        side), and the model gets ``model.save_pretrained_merged(dir, tokenizer, save_method=...)``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
        if load_in_8bit:
            raise ValueError(
                "load_in_8bit=True is not supported by unsloth_dist (its merged exports and the fsdp / zero3 "
                "backends handle 4-bit NF4 bases only); use load_in_4bit=True (QLoRA) or a 16-bit load")
        if full_finetuning or load_in_16bit:
            if load_in_4bit:
                logger.warning("%s: the model is loaded without quantization; load_in_4bit=True is ignored",
                               "full_finetuning=True" if full_finetuning else "load_in_16bit=True")
            load_in_4bit = False
        elif load_in_4bit is None:
            load_in_4bit = False
            _notice_once("load_in_4bit", "FastLanguageModel.from_pretrained: load_in_4bit not given: loading "
                         "unquantized weights (unsloth's default is load_in_4bit=True); pass load_in_4bit=True for "
                         "a QLoRA base, or load_in_4bit=False to silence this")
        if fast_inference or gpu_memory_utilization is not None or max_lora_rank is not None or float8_kv_cache:
            _notice_once("vllm", "FastLanguageModel.from_pretrained: fast_inference / gpu_memory_utilization / "
                         "max_lora_rank / float8_kv_cache are vLLM options and are ignored here: unsloth_dist "
                         "generates with transformers' generate()")
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool)
                                           or max_seq_length <= 0):
            raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer (or None: the model's "
                             "max_position_embeddings)")
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
        if rope_scaling is not None:
            _set_rope_scaling(config, rope_scaling)
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_seq_length is None:
            max_seq_length = int(max_pos) if isinstance(max_pos, int) and max_pos > 0 else 2048
        torch_dtype = resolve_dtype(dtype)
        quant_bits = 4 if load_in_4bit else None
        qconfig = kwargs.pop("quantization_config", None)
        if full_finetuning and qconfig is not None:
            raise ValueError("full_finetuning=True with a quantization_config: a quantized base cannot be fully "
                             "fine-tuned; drop one of them")
        if quant_bits and qconfig is None:
            qdtype = torch_dtype if torch_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            qconfig = bnb_config(True, False, qdtype)
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
        if max_pos is not None and max_seq_length > max_pos and rope_scaling is None:
            logger.warning("max_seq_length=%d exceeds the model's max_position_embeddings=%d (no RoPE scaling is "
                           "applied here; pass rope_scaling= to scale)", max_seq_length, max_pos)
        model.max_seq_length = max_seq_length
        model._unsloth_kernels = bool(kernels)
        model.unsloth_device_plan = plan
        if full_finetuning:
            model._unsloth_full_finetuning = True
            for p in model.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
        report = patch_model(model, kernels=kernels)
        logger.info("%s", report)
        enable_gradient_checkpointing(model, use_gradient_checkpointing)
        tokenizer = _load_tokenizer(path, max_seq_length, hub_kw)
        if tokenizer is not None and getattr(model, "generation_config", None) is not None:
            if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
        _attach(model, tokenizer)
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
        without disturbing the global RNG. Kernel patching stays in place. ``"embed_tokens"`` /
        ``"lm_head"`` in `target_modules` (unsloth's continued-pretraining list) are trained in full
        (peft's modules_to_save), as unsloth does. A model loaded with ``full_finetuning=True`` is
        returned unchanged (every weight trains)."""
        kwargs.pop("max_seq_length", None)  # accepted for compatibility; set at load time
        kwargs.pop("temporary_location", None)  # unsloth's scratch directory for its own merges: not used here
        for name in ("use_dora", "qat_scheme"):
            if name in kwargs and not kwargs[name]:
                kwargs.pop(name)  # unsloth arguments at their "off" value
        if getattr(model, "_unsloth_full_finetuning", False):
            _notice_once("full_ft_peft", "get_peft_model: the model was loaded with full_finetuning=True, so "
                         "get_peft_model has no effect (every weight trains)")
            return model
        tokenizer = getattr(model, "_unsloth_tokenizer", None)
        peft_model = add_lora(
            model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, use_rslora=use_rslora,
            modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
            layers_to_transform=layers_to_transform, loftq_config=loftq_config, **kwargs,
        )
        _attach(peft_model, tokenizer)
        return peft_model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Ready for ``model.generate``: eval mode (no dropout), gradient checkpointing off (remembered for
        ``for_training``), the KV cache on, and the tokenizer from ``from_pretrained`` padding on the left
        (batched generation of prompts of different lengths needs it)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"for_inference takes the model, not a {type(model).__name__}")
        was = model.__dict__.get("_unsloth_ckpt_modules")
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        if on or was is None:
            model.__dict__["_unsloth_ckpt_modules"] = on
        for m in on:
            m.gradient_checkpointing = False
        model.eval()
        _set_use_cache_and_padding(model, True, "left")
        return model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: Union[bool, str, None] = None) -> nn.Module:
        """Back to training after ``for_inference``: train mode, the tokenizer pads on the right again, and
        gradient checkpointing: None (default) -> as it was before ``for_inference``; True / "unsloth" ->
        on (set up if the model had none); False -> off."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"for_training takes the model, not a {type(model).__name__}")
        remembered = model.__dict__.pop("_unsloth_ckpt_modules", None) or []
        model.train()
        if use_gradient_checkpointing is None:
            for m in remembered:
                m.gradient_checkpointing = True
        elif use_gradient_checkpointing:
            if remembered:
                for m in remembered:
                    m.gradient_checkpointing = True
            elif not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
                enable_gradient_checkpointing(model, use_gradient_checkpointing)
        else:
            for m in model.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.gradient_checkpointing = False
        checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        _set_use_cache_and_padding(model, False if checkpointed else None, "right")
        return model

    @staticmethod
    def save_pretrained_merged(trainer_or_model: Any, out_dir: Union[str, os.PathLike], tokenizer: Any = None,
                               save_method: str = "merged_16bit", peft_model: Optional[nn.Module] = None,
                               max_shard_size: Union[int, str] = "5GB") -> Optional[Path]:
        """``save_method``: "merged_16bit" (bf16), "merged_fp16", "merged_32bit" or "lora" (adapter only).
        Give an `unsloth_dist.Trainer` / `UnslothTrainer` or a model. Collective (every rank calls it) after
        fsdp / zero3 training; otherwise rank 0 writes and may call it alone. The notebook form
        ``model.save_pretrained_merged(dir, tokenizer, save_method=...)`` calls this."""
        from . import export

        dtypes = {"merged_16bit": torch.bfloat16, "merged_fp16": torch.float16, "merged_32bit": torch.float32}
        if save_method == "lora":
            return export.save_lora_adapter(trainer_or_model, peft_model, out_dir, tokenizer=tokenizer)
        if save_method not in dtypes:
            extra = (" (4-bit merged exports and GGUF are not written by unsloth_dist: export merged_16bit and "
                     "quantize / convert it with your tool of choice)") if ("4bit" in str(save_method)
                                                                           or "gguf" in str(save_method)) else ""
            raise ValueError(f"save_method={save_method!r}: use 'merged_16bit', 'merged_fp16', 'merged_32bit' or "
                             f"'lora'{extra}")
        return export.save_merged(trainer_or_model, out_dir, dtype=dtypes[save_method], tokenizer=tokenizer,
                                  peft_model=peft_model, max_shard_size=max_shard_size)


def _model_save_pretrained_merged(model: nn.Module, save_directory: Union[str, os.PathLike], tokenizer: Any = None,
                                  save_method: str = "merged_16bit", push_to_hub: bool = False, token: Any = None,
                                  is_main_process: bool = True, max_shard_size: Union[int, str] = "5GB",
                                  safe_serialization: bool = True, **kwargs: Any) -> Optional[Path]:
    """``model.save_pretrained_merged(dir, tokenizer, save_method="merged_16bit")`` (unsloth's notebook
    line): through the trainer that last trained the model while it exists (collective after fsdp /
    zero3 training: call it on every rank; otherwise rank 0 writes, alone if need be), else from the
    model itself (rank 0 writes)."""
    from .export import trainer_of

    if push_to_hub:
        raise ValueError("save_pretrained_merged(push_to_hub=True): unsloth_dist does not upload to the hub; save "
                         "to a directory and upload it (huggingface_hub.upload_folder)")
    if not safe_serialization:
        raise ValueError("save_pretrained_merged(safe_serialization=False): the export is written as safetensors only")
    unknown = [k for k in kwargs if k not in ("save_peft_format", "tags", "temporary_location",
                                              "maximum_memory_usage", "variant", "state_dict", "save_function")]
    if unknown:
        raise TypeError(f"save_pretrained_merged() got unexpected keyword argument(s) {unknown}")
    if kwargs.get("state_dict") is not None:
        raise ValueError("save_pretrained_merged(state_dict=...) is not supported; the weights come from the model")
    trainer = trainer_of(model)
    return FastLanguageModel.save_pretrained_merged(trainer if trainer is not None else model, save_directory,
                                                    tokenizer, save_method=save_method, peft_model=model,
                                                    max_shard_size=max_shard_size)


def _model_push_to_hub_merged(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("push_to_hub_merged: unsloth_dist does not upload to the hub; use "
                              "model.save_pretrained_merged(dir, tokenizer, save_method=...) and upload the directory")


def _attach(model: nn.Module, tokenizer: Any) -> None:
    """What unsloth puts on the models it returns: the tokenizer (for the padding side) and
    ``save_pretrained_merged`` / ``push_to_hub_merged`` bound to this model."""
    if tokenizer is not None:
        model.__dict__["_unsloth_tokenizer"] = tokenizer
    model.__dict__["save_pretrained_merged"] = functools.partial(_model_save_pretrained_merged, model)
    model.__dict__["push_to_hub_merged"] = functools.partial(_model_push_to_hub_merged, model)


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


def _set_use_cache_and_padding(model: nn.Module, use_cache: Optional[bool], padding_side: str) -> None:
    """for_inference / for_training: the config's use_cache (None: left as it is) and the padding side
    of the tokenizer from_pretrained returned with the model."""
    cfg = getattr(model, "config", None)
    if use_cache is not None and cfg is not None and hasattr(cfg, "use_cache"):
        cfg.use_cache = use_cache
    tok = getattr(model, "_unsloth_tokenizer", None)
    if tok is not None:
        tok.padding_side = padding_side
