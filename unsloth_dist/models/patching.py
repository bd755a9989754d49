"""Patch the kernels of `unsloth_dist.kernels` into Hugging Face causal LMs, per instance.

``patch_model(model)`` works on a transformers 5.x ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM`` or ``Gemma2ForCausalLM`` (optionally wrapped by
peft) and returns a :class:`PatchReport`.

How each op is patched, and why:

* **RMSNorm** (every ``*RMSNorm`` module, incl. Qwen3's per-head ``q_norm``/``k_norm`` and
  Gemma 2's four norms per layer): the module instance gets its own ``forward`` that calls
  :func:`~unsloth_dist.kernels.rms_norm` on ``self.weight``; Gemma 2 uses ``(1 + weight)`` with
  Gemma's fp32 multiply.
* **SwiGLU / GeGLU** (every ``*MLP`` with ``gate_proj``/``up_proj``/``down_proj``): the
  instance's ``forward`` becomes ``down_proj(glu(gate_proj(x), up_proj(x)))``. It *calls* the
  projection modules, so peft LoRA layers wrapping them (applied before or after patching) work.
* **RoPE**: HF attention modules call the module-level function ``apply_rotary_pos_emb`` of
  their modeling module (``modeling_llama.apply_rotary_pos_emb`` ...), looked up in the module
  globals at call time. Re-implementing every attention forward to avoid that lookup would
  copy HF code per architecture and drift from it, so instead:
    - the *module attribute* is replaced, once per modeling module, by a dispatcher that calls
      our kernel only while a *patched attention instance* is running on this thread, and the
      original function otherwise (other models, unpatched instances in the same process, and
      other callers behave exactly as before). This global part is explicit (listed in
      ``PatchReport.global_patches``), reference counted, and reversed by :func:`unpatch_model`.
    - each attention instance gets a ``forward`` wrapper that marks "patched attention active"
      (thread-local, so autograd's recomputation under gradient checkpointing -- which re-enters
      the same forward -- sees it too) around HF's own forward.
* **Fused linear cross-entropy**: ``lm_head`` stays the same ``nn.Linear`` object (so
  ``state_dict`` keys, tied embeddings and ``get_output_embeddings()`` are untouched), but its
  instance ``forward`` accepts an extra ``unsloth_ce=`` argument: with it, it returns the fused
  CE of its input against the targets, computed on ``self.weight``. The causal LM's instance
  ``forward`` calls ``self.lm_head(hidden, unsloth_ce=...)`` -- through ``nn.Module.__call__``,
  so every hook on ``lm_head`` runs. That is what makes it correct under every backend:
    - DeepSpeed ZeRO-3 gathers ``lm_head.weight`` in ``lm_head``'s forward pre-hook and routes
      its gradient to the partition through its usual hooks, exactly as for a plain ``lm_head``
      call (``GatheredParameters`` would give the kernel the full tensor but its gradient would
      not reach the partition). Tied embeddings are the same Parameter, gathered the same way.
    - FSDP2: a tied ``lm_head`` belongs to the root's ``fully_shard`` group, whose parameters are
      unsharded for the whole root forward; an untied one is a group of its own, unsharded by its
      own forward pre-hook. Either way the kernel sees plain unsharded tensors. A frozen untied head
      is not gathered again for backward when the fused CE (sum / mean) already computed the
      gradients (`_fsdp_head_backward_gather`).
    - DDP / single: nothing special.
  With the fused CE patched, ``model.unsloth_fused_loss = True`` is set on the object passed in
  (and on the causal LM), which tells ``unsloth_dist.Trainer`` to call
  ``model(..., labels=labels, loss_reduction="sum")`` and read ``out.loss`` (the fp32 token-loss
  sum of next-token CE, labels -100 ignored; ``out.logits`` is None).
  Without ``loss_reduction`` the patched forward behaves like HF's: no labels -> logits; labels
  in training mode -> the HF mean loss (or sum / ``num_items_in_batch``), computed fused, with
  ``logits=None``; labels in eval mode -> HF's own forward (logits and loss).
  The fused CE computes exactly one loss, transformers' ``ForCausalLMLoss`` (next-token CE, with its
  ``ignore_index`` / ``shift_labels`` / ``num_items_in_batch``). A model whose own loss is another one
  -- ``model.loss_function = fn`` (transformers' setter), a ``model.loss_type`` other than a
  ``ForCausalLM`` one, a subclass overriding ``loss_function`` -- is checked per call
  (`_custom_loss`; it may be set after patching): HF-style labelled calls then run HF's own forward,
  i.e. that loss on materialised logits (warned once per model); ``loss_reduction=`` calls, whose
  contract is the CE token loss, raise a ValueError naming the attribute, as does
  ``loss_reduction=`` together with ``num_items_in_batch`` (which it would otherwise ignore).

* **LoRA** (peft's LoRA ``Linear`` and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` wrappers): the
  instance ``forward`` adds ``scaling * lora_B(lora_A(x))`` into the base output in one GEMM
  instead of peft's scale-and-add passes over the output (LoRA dropout, when set, is applied to the
  adapter's input as peft does). Over a frozen ``nn.Linear`` base it computes the base GEMM itself
  (:func:`~unsloth_dist.kernels.lora_linear`), saving what the backward needs before that GEMM, so
  a checkpointed layer's recompute stops before its last projection (``down_proj``). Over a
  bitsandbytes ``Linear4bit`` base (QLoRA) it computes the adapter's ``x @ A^T`` first
  (:func:`~unsloth_dist.kernels.lora_xa`), then the 4-bit GEMM with the update in one node
  (:func:`~unsloth_dist.kernels.qlora_linear`: one Triton dequantize launch, bit-identical to
  bitsandbytes', instead of its Python layers), so the recompute skips ``down_proj``'s 4-bit base the
  same way; over other bases (8-bit, a hooked or subclassed 4-bit layer, and a 4-bit layer given at
  most 1536 tokens on CUDA -- decoding, where bitsandbytes' fused 4-bit GEMV beats dequantizing the
  weight) it calls the base layer after ``lora_xa`` and adds in place (:func:`~unsloth_dist.kernels.lora_add`).
  It runs peft's own forward whenever that path is not plain LoRA: adapters disabled or merged,
  several active adapters, mixed-batch ``adapter_names``, DoRA and other variants, LoRA bias,
  autocast or mixed dtypes, and DeepSpeed ZeRO-3 partitioned adapter weights outside a ZeRO-3 leaf
  module (those are gathered only by calling the adapter modules; inside a leaf decoder layer,
  `backend.stage3_leaf_layers`, the whole layer is gathered and the fused path runs).

``kernels=False`` patches nothing.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unsloth_dist.kernels import quant
from unsloth_dist.kernels import (apply_rope, fused_linear_cross_entropy, glu, lora_add, lora_linear, lora_xa, qlora_linear,
                                  rms_norm)
from unsloth_dist.kernels.cross_entropy import reads_weight_in_backward

logger = logging.getLogger("unsloth_dist")

IGNORE_INDEX = -100
OPS = ("rms_norm", "rope", "swiglu", "fused_cross_entropy", "lora")


@dataclass(frozen=True)
class ArchSpec:
    gemma_norm: bool = False  # (1 + w), multiply in fp32 then cast (Gemma) vs HF Llama casting
    act_attr: str = "hidden_act"  # config field naming the MLP activation
    softcap_attr: Optional[str] = None  # config field of the final-logit soft-cap


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
    "mistral": ArchSpec(),
    "gemma2": ArchSpec(gemma_norm=True, act_attr="hidden_activation", softcap_attr="final_logit_softcapping"),
}

# HF activation names -> unsloth_dist.kernels.glu activation
_ACTS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


@dataclass
class PatchReport:
    """What `patch_model` did. ``patched[op][module class] = [qualified module names]``."""

    model_class: str = ""
    model_type: str = ""
    enabled: bool = True
    patched: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    global_patches: list[str] = field(default_factory=list)
    fused_loss: bool = False
    details: dict[str, str] = field(default_factory=dict)  # op -> variant (activation, norm kind, softcap)

    def add(self, op: str, module: nn.Module, name: str) -> None:
        self.patched.setdefault(op, {}).setdefault(type(module).__name__, []).append(name or "<root>")

    @property
    def ops(self) -> list[str]:
        """The ops that were patched into at least one module."""
        return [op for op in OPS if self.patched.get(op)]

    def count(self, op: str) -> int:
        return sum(len(v) for v in self.patched.get(op, {}).values())

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __str__(self) -> str:
        head = f"unsloth_dist kernels -> {self.model_class or '?'} (model_type {self.model_type or '?'})"
        if not self.enabled:
            return head + ": kernels disabled (kernels=False), nothing patched"
        lines = [head + ":"]
        for op in OPS:
            if self.patched.get(op):
                what = ", ".join(f"{len(names)} x {cls}" for cls, names in self.patched[op].items())
                if op in self.details:
                    what += f" [{self.details[op]}]"
                lines.append(f"  {op:<20} {what}")
            elif op in self.skipped:
                lines.append(f"  {op:<20} not patched: {self.skipped[op]}")
        for g in self.global_patches:
            lines.append(f"  global: {g}")
        if self.fused_loss:
            lines.append("  model.unsloth_fused_loss = True (Trainer gets the token-loss sum from the model)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside peft / other wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model") and callable(m.get_base_model):  # peft PeftModel
            inner = m.get_base_model()
            if inner is m:
                break
            m = inner
        elif type(m).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") and hasattr(m, "module"):
            m = m.module
        else:
            break
    return m


def _set_forward(module: nn.Module, fn, op: str) -> None:
    module.forward = types.MethodType(fn, module)
    module._unsloth_patch = op


def _clear_forward(module: nn.Module) -> None:
    if "forward" in module.__dict__:
        del module.__dict__["forward"]
    module.__dict__.pop("_unsloth_patch", None)
    for attr in ("_unsloth_rms", "_unsloth_act", "_unsloth_ce"):
        module.__dict__.pop(attr, None)


def _is_patched(module: nn.Module) -> bool:
    return "_unsloth_patch" in module.__dict__


def _from_modeling_module(module: nn.Module, modeling: str) -> bool:
    return type(module).__module__ == modeling or any(c.__module__ == modeling for c in type(module).__mro__)


# --------------------------------------------------------------------------- RMSNorm


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps_attr, offset, gemma = self._unsloth_rms
    return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset, gemma)


def _rms_eps_attr(module: nn.Module) -> Optional[str]:
    for a in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, a, None), float):
            return a
    return None


# --------------------------------------------------------------------------- LoRA


def _lora_fast_adapter(self, x: torch.Tensor, kwargs: dict) -> Optional[str]:
    """The one active adapter when the plain-LoRA fast path applies to this call, else None."""
    if kwargs or self.disable_adapters or self.merged:
        return None
    active = [n for n in self.active_adapters if n in self.lora_A]  # peft skips the others too
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name, False):
        return None
    a, b = self.lora_A[name], self.lora_B[name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or a.bias is not None or b.bias is not None:
        return None
    wa, wb = a.weight, b.weight
    if _zero3_not_gathered(wa) or _zero3_not_gathered(wb):
        return None
    if wa.dtype != x.dtype or wb.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    if wa.device != x.device or wa.dim() != 2 or wb.dim() != 2:
        return None
    return name


def _zero3_not_gathered(w: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter that is gathered only by calling its own module; one inside a
    ZeRO-3 leaf module (`backend.stage3_leaf_layers`: the whole decoder layer is gathered when it
    starts, forward and backward) can be used directly."""
    return hasattr(w, "ds_id") and not hasattr(w, "ds_z3_leaf_module")


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _lora_fast_adapter(self, x, kwargs) if not args else None
    if name is not None and _frozen_plain_linear(self.base_layer, x):
        base = self.base_layer
        xd = self.lora_dropout[name](x)  # dropout is the only use of the RNG here: peft's masks
        return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           self.scaling[name], x_lora=xd)
    if name is not None and (q4 := _frozen_4bit_linear(self.base_layer, x)) is not None:
        # QLoRA over a bitsandbytes Linear4bit: (x, A) saved first as above, then one node for the 4-bit
        # GEMM + update (kernels.qlora_linear: one dequantize launch, none of bitsandbytes' Python layers)
        xd = self.lora_dropout[name](x)
        xa = lora_xa(xd, self.lora_A[name].weight)
        return qlora_linear(x, q4[0], q4[1], self.base_layer.bias, xa, self.lora_B[name].weight, self.scaling[name])
    if name is not None:
        # the adapter's x @ A^T first, so that (x, A) are saved before the base layer runs (bitsandbytes'
        # 4-/8-bit matmuls save no activation): a checkpointed layer's recompute then stops before its
        # down_proj's base, as with lora_linear. peft draws the dropout mask after the base layer; the
        # bases taken here draw no random numbers, so the masks are the same.
        xd = self.lora_dropout[name](x)
        xa = lora_xa(xd, self.lora_A[name].weight)
        out = self.base_layer(x)
        b = self.lora_B[name].weight
        if out.dtype == x.dtype and out.is_contiguous() and out._base is None:
            return lora_add(out, xa, b, self.scaling[name])
        # an unexpected base output: finish out of place on the computed result
        return out + (torch.nn.functional.linear(xa, b) * self.scaling[name]).view(out.shape)
    return type(self).forward(self, x, *args, **kwargs)


def _frozen_plain_linear(base: nn.Module, x: torch.Tensor) -> bool:
    """A torch nn.Linear whose weight (and bias) take no gradient, in x's dtype and device: the
    base `lora_linear` computes itself (saving nothing for it)."""
    if type(base) is not nn.Linear or "forward" in base.__dict__ or base._forward_hooks or base._forward_pre_hooks:
        return False
    w, bias = base.weight, base.bias
    return (not w.requires_grad and w.dtype == x.dtype and w.device == x.device
            and (bias is None or (not bias.requires_grad and bias.dtype == x.dtype)))


#: Inputs of at most this many tokens on CUDA (or without grad on CPU) keep bitsandbytes' forward, which
#: multiplies them with its fused 4-bit GEMM / GEMV kernels (decoding, small batches) instead of
#: dequantizing the whole weight; above it bitsandbytes itself dequantizes and calls F.linear on CUDA,
#: as `qlora_linear` does (its `_gemm_4bit_custom_max_m`, 1536, in 0.50).
QLORA_LINEAR_MIN_TOKENS = 1537


def _frozen_4bit_linear(base: nn.Module, x: torch.Tensor):
    """(packed weight, QuantState) of a bitsandbytes ``Linear4bit`` whose forward `qlora_linear` computes
    with the same dequantized weight (frozen, computing in x's dtype, dequantized in one rounding to it:
    quantized from a weight of that dtype or fp32; stored [out, in]; nothing hooked; gathered; a layout
    the kernel covers; more than 1536 tokens on CUDA or in CPU inference), else None; bitsandbytes'
    forward runs in every other case."""
    if type(base).__name__ != "Linear4bit" or not type(base).__module__.startswith("bitsandbytes"):
        return None
    if x.numel() < QLORA_LINEAR_MIN_TOKENS * x.shape[-1] and (x.is_cuda or not torch.is_grad_enabled()):
        return None  # (on CPU: inference, where bitsandbytes repacks the weight for its AVX-512 kernel)
    if "forward" in base.__dict__ or base._forward_hooks or base._forward_pre_hooks:
        return None
    w = base.weight
    qs = getattr(w, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None or w.requires_grad or _zero3_not_gathered(w) or w.device != x.device:
        return None
    if (qs.dtype not in (x.dtype, torch.float32) or getattr(qs, "packing_format_for_cpu", False)
            or getattr(base, "compute_dtype", None) not in (None, x.dtype)):
        return None
    # the kernel's layouts (NF4 / FP4, 2-D, even size, gathered, scales on the device), stored [out, in]
    if not quant.kernel_supports(w, qs) or qs.shape[1] != x.shape[-1]:
        return None
    bias = base.bias
    if bias is not None and (bias.requires_grad or bias.dtype != x.dtype):
        return None
    return w, qs


def _is_peft_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: nothing to patch
        return False
    return (isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A")
            and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")
            and type(module).__module__.startswith("peft.tuners.lora"))


# --------------------------------------------------------------------------- MLP


def _glu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self._unsloth_act))


# --------------------------------------------------------------------------- RoPE

_ROPE_STATE = threading.local()
_ROPE_LOCK = threading.Lock()
# modeling module name -> [original function, number of patched models using the dispatcher]
_ROPE_GLOBAL: dict[str, list] = {}


def _rope_active() -> bool:
    return getattr(_ROPE_STATE, "depth", 0) > 0


def _make_rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _rope_active():
            unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
            if len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"}:
                # HF rebinds q / k to the results: rotating them in place is safe (even without
                # a grad_fn, e.g. under no_grad); apply_rope still falls back when it is not
                return apply_rope(q, k, cos, sin, unsqueeze_dim, inplace=True)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._unsloth_original = original
    return apply_rotary_pos_emb


def _install_rope_dispatcher(modeling: str) -> Optional[str]:
    mod = sys.modules.get(modeling)
    fn = getattr(mod, "apply_rotary_pos_emb", None) if mod is not None else None
    if fn is None:
        return None
    with _ROPE_LOCK:
        entry = _ROPE_GLOBAL.get(modeling)
        if entry is None:
            original = getattr(fn, "_unsloth_original", fn)
            mod.apply_rotary_pos_emb = _make_rope_dispatcher(original)
            entry = _ROPE_GLOBAL[modeling] = [original, 0]
        entry[1] += 1
    return f"{modeling}.apply_rotary_pos_emb"


def _release_rope_dispatcher(modeling: str) -> None:
    with _ROPE_LOCK:
        entry = _ROPE_GLOBAL.get(modeling)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            mod = sys.modules.get(modeling)
            if mod is not None:
                mod.apply_rotary_pos_emb = entry[0]
            del _ROPE_GLOBAL[modeling]


def _attention_forward(self, *args, **kwargs):
    _ROPE_STATE.depth = getattr(_ROPE_STATE, "depth", 0) + 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE_STATE.depth -= 1


# --------------------------------------------------------------------------- fused cross-entropy


def _lm_head_forward(self, input: torch.Tensor, unsloth_ce: Optional[dict] = None):
    _fsdp_head_backward_gather(self, unsloth_ce, input)
    if unsloth_ce is None:
        return type(self).forward(self, input)
    # runs inside lm_head's own forward: ZeRO-3 has gathered self.weight, FSDP2 has unsharded it
    return fused_linear_cross_entropy(input, self.weight, bias=self.bias, **unsloth_ce)


def _fsdp_head_backward_gather(head: nn.Module, unsloth_ce: Optional[dict], hidden: torch.Tensor) -> None:
    """A head that is its own FSDP2 group (backends/fsdp.py marks the untied head it wraps) is
    gathered again by FSDP2's pre-backward hook. The fused CE's Triton path with a sum / mean
    reduction computed its gradients in the forward and reads no weight in backward: for a frozen head
    (LoRA / QLoRA) that second gather of a vocab x hidden matrix is skipped. A trained head (its
    gradient is accumulated into the gathered weight), the "none" reduction (its backward recomputes
    the logits), the PyTorch reference path (plain autograd saves the weight) or the plain forward
    keep it. Set at every head forward: the last one before a backward decides it (one head call per
    forward pass in a causal LM)."""
    if not head.__dict__.get("_unsloth_fsdp_own_group"):
        return
    frozen = not any(p.requires_grad for p in head.parameters())
    skip = frozen and unsloth_ce is not None and not reads_weight_in_backward(hidden, unsloth_ce.get("reduction", "mean"))
    head.set_unshard_in_backward(not skip)


def _unfused_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str, ignore_index: int,
                  shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)


@functools.lru_cache(maxsize=None)
def _hf_causal_lm_loss():
    """transformers' ``ForCausalLMLoss``: the one loss the fused CE computes (None: no transformers.loss)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception:  # pragma: no cover
        return None
    return ForCausalLMLoss


def _custom_loss(causal: nn.Module) -> Optional[str]:
    """Why `causal`'s own loss is not transformers' ``ForCausalLMLoss`` (the attribute that makes it
    so, for a message), or None when it is. Resolved through the model's ``loss_function`` exactly as
    its HF forward does -- the instance set by ``model.loss_function = fn``, else
    ``LOSS_MAPPING[model.loss_type]`` (an unknown type falls back to ForCausalLMLoss there), or a
    subclass's override -- so that whatever HF would call is what is compared. Anything but that very
    function (a wrapper or partial of it, ``loss_type="ForMaskedLM"`` which does not shift the labels,
    a library that swapped ``LOSS_MAPPING["ForCausalLM"]``) counts as custom: the fused path would
    compute a different loss. Looked up per call: it may be set after `patch_model`."""
    default = _hf_causal_lm_loss()
    if default is None:
        return None
    try:
        fn = causal.loss_function
    except AttributeError:  # not a transformers PreTrainedModel: nothing to honour
        return None
    if fn is default:
        return None
    name = getattr(fn, "__qualname__", None) or repr(fn)
    cls = type(causal).__name__
    if "_loss_function" in causal.__dict__:
        return f"{cls}.loss_function is {name} (set by model.loss_function = ...; undo: del model._loss_function)"
    loss_type = getattr(causal, "loss_type", None)
    if loss_type is not None and fn is getattr(sys.modules.get("transformers.loss.loss_utils"), "LOSS_MAPPING",
                                               {}).get(loss_type):
        return f"{cls}.loss_type is {loss_type!r} ({name}; undo: model.loss_type = 'ForCausalLM')"
    return f"{cls}.loss_function is {name}"


def _warn_unfused_once(causal: nn.Module, reason: str) -> None:
    warned = causal._unsloth_ce.setdefault("warned", set())
    if reason in warned:
        return
    warned.add(reason)
    logger.warning(
        "%s, not transformers' ForCausalLMLoss, which is the only loss the fused linear cross-entropy "
        "computes: labelled training calls of this model run its own (unfused) forward and loss, which "
        "materialise the [tokens, vocab] logits. Remove the custom loss to use the fused path, or patch "
        "with patch_model(model, fused_cross_entropy=False) to run unfused explicitly.", reason)


def _causal_lm_forward(self, *args, **kwargs):
    """Instance forward of a patched *ForCausalLM (see the module docstring for the contract)."""
    loss_reduction = kwargs.pop("loss_reduction", None)
    if loss_reduction not in (None, "sum", "mean", "none"):
        raise ValueError(f"loss_reduction must be 'sum', 'mean', 'none' or None, got {loss_reduction!r}")
    if args:
        names = self._unsloth_ce["arg_names"]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward got {len(args)} positional arguments")
        for n, a in zip(names, args):
            if n in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {n!r}")
            kwargs[n] = a
    cls_forward = type(self).forward
    labels = kwargs.get("labels")
    if loss_reduction is not None and labels is not None:
        # loss_reduction's contract is the next-token CE token loss (fused or from the logits below):
        # what would make that differ from what the caller expects is refused, never dropped
        if kwargs.get("num_items_in_batch") is not None:
            raise ValueError(
                f"{type(self).__name__}.forward got both loss_reduction={loss_reduction!r} and "
                "num_items_in_batch: loss_reduction returns the token-loss sum / mean / per-token losses and "
                "would ignore num_items_in_batch. Pass one of them: loss_reduction='sum' and divide by the "
                "token count yourself, or num_items_in_batch alone (transformers' sum / num_items_in_batch).")
        reason = _custom_loss(self)
        if reason is not None:
            raise ValueError(
                f"{reason}, not transformers' ForCausalLMLoss: loss_reduction={loss_reduction!r} returns the "
                "next-token cross-entropy (the loss unsloth_dist.Trainer trains), not that loss. Remove the "
                "custom loss to train the cross-entropy, or train your loss through calls with labels and "
                "without loss_reduction (e.g. transformers' Trainer), which run the model's own forward and "
                "loss.")
    head = getattr(self, "lm_head", None)
    head_ok = isinstance(head, nn.Linear) and head.__dict__.get("_unsloth_patch") == "fused_cross_entropy"
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    fuse = (
        labels is not None
        and head_ok
        and (loss_reduction is not None or (self.training and torch.is_grad_enabled()))
        and (logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0))
    )
    if fuse and loss_reduction is None and (reason := _custom_loss(self)) is not None:
        # an HF-style call of a model with its own loss: HF's forward computes that loss (materialising
        # the logits) rather than the fused CE computing a different one
        _warn_unfused_once(self, reason)
        fuse = False
    if not fuse:
        if labels is None or loss_reduction is None:
            return cls_forward(self, **kwargs)
        # loss_reduction asked but the fused path does not apply (e.g. lm_head got wrapped): HF forward
        # for the logits, then the requested reduction
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        kwargs.pop("num_items_in_batch", None)
        kwargs["labels"] = None
        out = cls_forward(self, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = _unfused_loss(logits, labels, loss_reduction, ignore_index, shift_labels)
        if hasattr(out, "loss"):
            out.loss = loss
            return out
        return (loss,) + tuple(out)

    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    base = getattr(self, self.base_model_prefix)
    outputs = base(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = loss_reduction or ("sum" if num_items is not None else "mean")
    ce = dict(target=shift_labels.reshape(-1).to(hidden.device), ignore_index=ignore_index,
              softcap=self._unsloth_ce["softcap"], reduction=reduction)
    loss = self.lm_head(hidden.reshape(-1, hidden.shape[-1]), unsloth_ce=ce)
    if loss_reduction is None and num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    out_cls = self._unsloth_ce["output_cls"]
    fields = {"loss": loss, "logits": None,
              "hidden_states": getattr(outputs, "hidden_states", None),
              "attentions": getattr(outputs, "attentions", None)}
    for cache_field in ("cache", "past_key_values"):
        if cache_field in getattr(out_cls, "__dataclass_fields__", {}):
            fields[cache_field] = getattr(outputs, cache_field, None)
    out = out_cls(**fields)
    if return_dict:
        return out
    # transformers' tuple puts the logits second: keep that slot (None: never computed) so that out[1]
    # is not the cache
    return (loss, None) + tuple(v for k, v in out.items() if k not in ("loss", "logits"))


def _output_class(causal_lm: nn.Module):
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- public API


def patch_model(model: nn.Module, kernels: bool = True, rms_norm: bool = True, rope: bool = True,
                swiglu: bool = True, fused_cross_entropy: bool = True, lora: bool = True) -> PatchReport:
    """Swap the kernel-backed implementations into `model`'s modules (this instance only; see the
    module docstring). Call it before wrapping the model for a backend (DDP / FSDP / DeepSpeed);
    before or after peft's `get_peft_model`. Idempotent. Returns a :class:`PatchReport`."""
    causal = _causal_lm(model)
    config = getattr(causal, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    report = PatchReport(model_class=type(causal).__name__, model_type=model_type, enabled=bool(kernels))
    if not kernels:
        return report
    # LoRA: peft's layers, whatever the architecture around them
    if lora:
        found = False
        for name, module in causal.named_modules():
            if _is_peft_lora_linear(module):
                found = True
                if not _is_patched(module):
                    _set_forward(module, _lora_forward, "lora")
                report.add("lora", module, name)
        if found:
            report.details["lora"] = "update added in the GEMM epilogue (addmm_); peft's forward for other cases"
    spec = ARCHS.get(model_type)
    if spec is None:
        for op in OPS[:-1]:
            report.skipped[op] = f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHS)})"
        causal._unsloth_report = report
        return report
    modeling = type(causal).__module__
    if not modeling.startswith("transformers."):
        # a subclass defined elsewhere: use the module of the transformers class it derives from
        for c in type(causal).__mro__:
            if c.__module__.startswith("transformers.models."):
                modeling = c.__module__
                break
    wanted = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu, "fused_cross_entropy": fused_cross_entropy,
              "lora": lora}
    for op, on in wanted.items():
        if not on:
            report.skipped[op] = "switched off"

    # the activation of the gated MLPs
    act_name = getattr(config, spec.act_attr, None)
    act = _ACTS.get(str(act_name)) if act_name is not None else None
    if swiglu and act is None:
        report.skipped["swiglu"] = f"activation {act_name!r} has no fused kernel"

    if rms_norm:
        report.details["rms_norm"] = "gemma: x * (1 + w) in fp32" if spec.gemma_norm else "llama: w * x.to(dtype)"
    if swiglu and act is not None:
        report.details["swiglu"] = {"silu": "SwiGLU", "gelu_tanh": "GeGLU, tanh gelu", "gelu": "GeGLU, exact gelu"}[act]
    attn_modules = []
    for name, module in causal.named_modules():
        cls = type(module).__name__
        if not _from_modeling_module(module, modeling):
            continue
        if rms_norm and cls.endswith("RMSNorm"):
            eps_attr = _rms_eps_attr(module)
            w = getattr(module, "weight", None)
            if eps_attr is None or not isinstance(w, nn.Parameter) or w.dim() != 1:
                continue
            if not _is_patched(module):
                module._unsloth_rms = (eps_attr, 1.0 if spec.gemma_norm else 0.0, spec.gemma_norm)
                _set_forward(module, _rms_norm_forward, "rms_norm")
            report.add("rms_norm", module, name)
        elif swiglu and act is not None and cls.endswith("MLP") and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")
        ):
            if not _is_patched(module):
                module._unsloth_act = act
                _set_forward(module, _glu_mlp_forward, "swiglu")
            report.add("swiglu", module, name)
        elif rope and cls.endswith("Attention") and hasattr(module, "q_proj"):
            attn_modules.append((name, module))

    if rope and attn_modules:
        new = [(n, m) for n, m in attn_modules if not _is_patched(m)]
        target = _install_rope_dispatcher(modeling) if new else f"{modeling}.apply_rotary_pos_emb"
        if target is None:
            report.skipped["rope"] = f"{modeling} has no module-level apply_rotary_pos_emb"
        else:
            for _, m in new:
                _set_forward(m, _attention_forward, "rope")
            if new:
                causal.__dict__.setdefault("_unsloth_rope_modules", []).append(modeling)
            for n, m in attn_modules:
                report.add("rope", m, n)
            report.global_patches.append(
                f"{target} -> dispatcher (our kernel only inside patched attention instances; "
                "reversed by unpatch_model)")
    elif rope:
        report.skipped.setdefault("rope", "no attention modules found")

    if fused_cross_entropy:
        head = getattr(causal, "lm_head", None)
        base = getattr(causal, getattr(causal, "base_model_prefix", "model"), None)
        if head is None or base is None:
            report.skipped["fused_cross_entropy"] = "not a *ForCausalLM with lm_head"
        elif not (isinstance(head, nn.Linear) and type(head).__module__.startswith("torch.nn")):
            report.skipped["fused_cross_entropy"] = (
                f"lm_head is a {type(head).__name__} (e.g. LoRA / modules_to_save on lm_head), not a plain nn.Linear")
        else:
            if head.__dict__.get("_unsloth_patch") != "fused_cross_entropy":
                _set_forward(head, _lm_head_forward, "fused_cross_entropy")
            if not _is_patched(causal):
                sig = inspect.signature(type(causal).forward)
                arg_names = [p.name for p in list(sig.parameters.values())[1:]
                             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                softcap = getattr(config, spec.softcap_attr, None) if spec.softcap_attr else None
                causal._unsloth_ce = {"arg_names": arg_names, "softcap": softcap, "output_cls": _output_class(causal)}
                _set_forward(causal, _causal_lm_forward, "fused_cross_entropy")
            softcap = causal._unsloth_ce["softcap"]
            report.details["fused_cross_entropy"] = "in lm_head's forward" + (f", softcap {softcap:g}" if softcap else "")
            custom = _custom_loss(causal)
            if custom is not None:  # (checked again per call: it may also be set or removed later)
                report.details["fused_cross_entropy"] += (
                    f"; not used while {custom}: labelled calls run HF's forward, loss_reduction= raises")
            report.add("fused_cross_entropy", head, "lm_head")
            report.add("fused_cross_entropy", causal, "")
            report.fused_loss = True
            for obj in {id(model): model, id(causal): causal}.values():
                obj.unsloth_fused_loss = True
    causal._unsloth_report = report
    return report


def unpatch_model(model: nn.Module) -> None:
    """Undo `patch_model`: restore every patched module's class forward, drop the fused-loss flag
    and release the global RoPE dispatchers this model held (restored when no model uses them)."""
    causal = _causal_lm(model)
    for module in causal.modules():
        if _is_patched(module):
            _clear_forward(module)
    for modeling in causal.__dict__.pop("_unsloth_rope_modules", []):
        _release_rope_dispatcher(modeling)
    for obj in (model, causal):
        if "unsloth_fused_loss" in obj.__dict__:
            del obj.__dict__["unsloth_fused_loss"]
    causal.__dict__.pop("_unsloth_report", None)
