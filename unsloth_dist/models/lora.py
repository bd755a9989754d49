"""LoRA / QLoRA through peft, and the LoRA arithmetic the exports need.

* :func:`add_lora` -- ``FastLanguageModel.get_peft_model``: peft ``LoraConfig`` on every linear
  projection of the decoder (q, k, v, o, gate, up, down by default), seeded, with optional
  gradient checkpointing; a 4-bit / 8-bit model is first prepared with peft's
  ``prepare_model_for_kbit_training``. Kernel patching survives: ``patch_model`` works per instance
  and calls the projection modules, so peft's LoRA layers (wrapping them) run inside the patched
  MLPs; it is re-applied after wrapping so the report and the fused-loss flag stay current.
* :func:`bnb_config` -- the bitsandbytes NF4 config (double quantisation, compute dtype bf16) with
  ``bnb_4bit_quant_storage`` set to the compute dtype: the packed 4-bit weights are then a
  floating-point tensor like every other parameter, which FSDP / ZeRO-3 can shard and gather.
* :func:`protect_packed_weights` -- keeps those packed weights in their storage dtype when a
  backend calls ``model.to(dtype=...)`` (a dtype cast would reinterpret the packed bytes).
* :func:`merge_lora_state_dict` -- ``W + scaling * B @ A`` over a consolidated state dict keyed
  like the peft model's ``state_dict()`` (what ``Trainer.full_state_dict()`` returns), giving
  the base model's keys; 4-bit base weights are dequantised first.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger("unsloth_dist")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# named in target_modules, these are trained in full (modules_to_save) rather than given a LoRA
_FULL_TRAIN_TARGETS = ("embed_tokens", "lm_head")


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def is_quantized(model: nn.Module) -> Optional[int]:
    """4 or 8 if the (possibly peft-wrapped) model holds bitsandbytes layers, else None."""
    for m in model.modules():
        name = type(m).__name__
        if name in ("Linear4bit",) and type(m).__module__.startswith("bitsandbytes"):
            return 4
        if name in ("Linear8bitLt",) and type(m).__module__.startswith("bitsandbytes"):
            return 8
    return None


# --------------------------------------------------------------------------- QLoRA


def bnb_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype, **overrides: Any):
    """The BitsAndBytesConfig for 4-bit NF4 (double quantisation) or 8-bit loading."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"load_in_4bit / load_in_8bit need bitsandbytes, which failed to import ({exc}); "
            "pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **overrides)
    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # packed weights stored as `compute_dtype` elements: FSDP / ZeRO-3 shard them like the rest
        bnb_4bit_quant_storage=compute_dtype,
    )
    kwargs.update(overrides)
    return BitsAndBytesConfig(**kwargs)


def _packed_apply(self, fn, recurse: bool = True):
    keep = self.weight.dtype
    out = nn.Module._apply(self, fn, recurse)
    w = self.weight
    if w is not None and w.dtype != keep:
        # the cast went through a wider float type (bf16 -> fp32 -> bf16 is exact): restore the bytes
        w.data = w.data.to(keep)
    return out


def protect_packed_weights(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer keep its packed weight's dtype through
    ``module.to(dtype=...)`` / ``.float()`` (devices still move). Per instance; returns the count."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
            m._apply = _packed_apply.__get__(m, type(m))
            n += 1
    return n


# --------------------------------------------------------------------------- LoRA


def _linear_names(model: nn.Module) -> set[str]:
    names = set()
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(leaf)
    return names


def enable_gradient_checkpointing(model: nn.Module, mode: Union[bool, str]) -> None:
    """True: non-reentrant activation checkpointing of every decoder layer. "unsloth": the same with
    each layer's input kept in CPU memory until its recompute (activation offload,
    :mod:`unsloth_dist.models.offload`), as Unsloth's own "unsloth" mode does."""
    if not mode:
        return
    if mode not in (True, "unsloth"):
        raise ValueError(f"use_gradient_checkpointing={mode!r}: use False, True or 'unsloth'")
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "unsloth":
        from .offload import enable_activation_offload

        if not enable_activation_offload(model):
            raise ValueError(f"use_gradient_checkpointing='unsloth': {type(model).__name__} has no transformers "
                             "decoder layers to offload the inputs of; use True")
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        cfg.use_cache = False


def add_lora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Optional[Union[Iterable[str], str]] = None,
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
    """Wrap `model` with peft LoRA adapters (see `FastLanguageModel.get_peft_model`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_peft_model(model):
        raise ValueError("the model already has peft adapters; call get_peft_model on the base model once")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r}: use 'none', 'all' or 'lora_only'")
    present = _linear_names(model)
    if target_modules is None:
        targets: Union[list[str], str] = [t for t in DEFAULT_TARGETS if t in present]
        if not targets:
            raise ValueError(
                f"none of the default LoRA targets {list(DEFAULT_TARGETS)} is a linear layer of "
                f"{type(model).__name__}; pass target_modules= (its linear layers: {sorted(present)[:12]})")
    elif isinstance(target_modules, str):
        targets = target_modules  # "all-linear" or a regex, as peft takes it
    else:
        targets = list(target_modules)
        # unsloth's continued-pretraining list names the embeddings and the head: they are trained in
        # full (peft's modules_to_save), not given a LoRA, as unsloth does
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        full = [t for t in targets if t in _FULL_TRAIN_TARGETS and t in leaves]
        if full:
            targets = [t for t in targets if t not in full]
            modules_to_save = list(modules_to_save or []) + [t for t in full if t not in (modules_to_save or [])]
            from .. import distributed as D

            if D.launch_rank() == 0:
                logger.warning("get_peft_model: %s in target_modules are trained in full (modules_to_save), not "
                               "with LoRA, as unsloth does", full)
            if not targets:
                raise ValueError(f"target_modules {list(target_modules)}: no linear layer is left for LoRA once "
                                 f"{full} are trained in full; add the projections (e.g. q_proj, v_proj)")
        missing = [t for t in targets if t not in present]
        if missing:
            raise ValueError(
                f"target_modules {missing} match no linear layer of {type(model).__name__}; "
                f"its linear layers are {sorted(present)}")
    bits = is_quantized(model)
    if bits:
        # norms / embeddings to fp32, input grads for checkpointing; the packed weights stay as they are
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(use_gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False})
        protect_packed_weights(model)
    cfg = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
        use_rslora=use_rslora, modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
        layers_to_transform=layers_to_transform, loftq_config=loftq_config, task_type="CAUSAL_LM", **kwargs,
    )
    kernels = getattr(model, "_unsloth_kernels", None)
    max_len = getattr(model, "max_seq_length", None)
    state = torch.random.get_rng_state()
    torch.manual_seed(random_state)
    try:
        peft_model = get_peft_model(model, cfg)
    finally:
        torch.random.set_rng_state(state)
    enable_gradient_checkpointing(peft_model, use_gradient_checkpointing)
    if kernels:
        from .patching import patch_model

        report = patch_model(peft_model, kernels=True)  # idempotent; refreshes the fused-loss flag
        logger.info("%s", report)
    if max_len is not None:
        peft_model.max_seq_length = max_len
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d alpha=%s on %s: %d trainable parameters of %d (%.3f%%)", r, lora_alpha, targets,
                n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return peft_model


# --------------------------------------------------------------------------- merging


_PEFT_PREFIX = "base_model.model."
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                   ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")


def lora_layers(peft_model: nn.Module, adapter: str = "default") -> dict[str, dict]:
    """Per LoRA-wrapped module (name in the peft model's state-dict key space): its scaling,
    fan_in_fan_out and the live base layer (for 4-bit quant states)."""
    out: dict[str, dict] = {}
    for name, m in peft_model.named_modules():
        if adapter in (getattr(m, "lora_embedding_A", None) or {}):
            raise NotImplementedError(
                f"{name}: merging a LoRA on an embedding layer is not supported by this export (its update would be "
                "dropped); export the adapter (save_lora_adapter / trainer.save_model) or leave embed_tokens out of "
                "target_modules"
            )
        if hasattr(m, "lora_A") and hasattr(m, "scaling") and adapter in getattr(m, "lora_A", {}):
            if getattr(m, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(f"{name}: merging DoRA adapters is not supported by this export")
            out[name] = {
                "scaling": float(m.scaling[adapter]),
                "fan_in_fan_out": bool(getattr(m, "fan_in_fan_out", False)),
                "base": m.get_base_layer(),
            }
    return out


def _dequantize(packed: torch.Tensor, base: nn.Module, name: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None:
        raise ValueError(f"{name}: 4-bit weight without a quant state; cannot dequantize it for the merged export")
    dev = qs.absmax.device
    w = bnbf.dequantize_4bit(packed.to(dev), qs)
    return w.to("cpu", torch.float32)


def merge_lora_state_dict(
    state_dict: dict[str, torch.Tensor], peft_model: nn.Module, adapter: str = "default",
    dtype: Optional[torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    """The merged base-model state dict (base keys, no LoRA tensors) from a consolidated state dict
    keyed like ``peft_model.state_dict()``: ``W <- W + scaling * B @ A`` in fp32, then cast to
    `dtype` (default: keep each tensor's dtype; 4-bit weights become fp32 before the cast)."""
    layers = lora_layers(peft_model, adapter)
    prefixed = any(k.startswith(_PEFT_PREFIX) for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    quant_prefixes = set()
    for name, m in peft_model.named_modules():
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
            quant_prefixes.add(name)
    for key, t in state_dict.items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        if ".original_module." in key:
            continue  # modules_to_save keeps a copy of the untrained module
        if any(key.endswith(".weight" + s) for s in _QUANT_SUFFIXES):
            continue
        module_key = key.rsplit(".", 1)[0]
        module_key = module_key.replace(".base_layer", "")
        base_key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        if ".modules_to_save." in key:
            continue  # an adapter other than `adapter`
        w = t
        owner = key.rsplit(".", 1)[0]
        if owner in quant_prefixes and key.endswith(".weight"):
            w = _dequantize(t, dict(peft_model.named_modules())[owner], owner)
        if key.endswith(".weight") and module_key in layers and ".base_layer." in key:
            info = layers[module_key]
            a = state_dict[f"{module_key}.lora_A.{adapter}.weight"].float()
            b = state_dict[f"{module_key}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * info["scaling"]
            if info["fan_in_fan_out"]:
                delta = delta.T
            w = w.float() + delta.to(w.device)
            if dtype is None:
                w = w.to(t.dtype if t.is_floating_point() and owner not in quant_prefixes else torch.float32)
        if prefixed:
            if not base_key.startswith(_PEFT_PREFIX):
                continue
            base_key = base_key[len(_PEFT_PREFIX):]
        out[base_key] = w.to(dtype) if (dtype is not None and w.is_floating_point()) else w
    for key, t in state_dict.items():  # modules_to_save: the trained copy wins
        if f".modules_to_save.{adapter}." in key:
            base_key = key.replace(f".modules_to_save.{adapter}.", ".")
            if prefixed:
                base_key = base_key[len(_PEFT_PREFIX):]
            out[base_key] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return out


def strip_peft_key(key: str, adapter: str = "default") -> str:
    key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    return re.sub(r"\.(base_layer|modules_to_save\.%s)\." % re.escape(adapter), ".", key)
