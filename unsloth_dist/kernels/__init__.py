"""Triton kernels, one op per file, each with a torch.autograd.Function and a plain PyTorch
reference. Every public op dispatches: the Triton kernel on CUDA tensors (or on CPU tensors
under ``TRITON_INTERPRET=1``, Triton's interpreter), the reference elsewhere."""
from ._utils import LAUNCHES, interpret_mode, poison_outputs, use_triton
from .cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .lora import lora_add, lora_delta, lora_delta_reference, lora_linear, lora_xa
from .quant import dequantize_4bit, dequantize_4bit_reference, qlora_linear
from .rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference
from .rope import RoPEFunction, apply_rope, rope_reference
from .swiglu import GLUFunction, geglu, glu, glu_reference, swiglu

__all__ = [
    "LAUNCHES", "interpret_mode", "poison_outputs", "use_triton",
    "FusedLinearCrossEntropyFunction", "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "lora_add", "lora_delta", "lora_delta_reference", "lora_linear", "lora_xa",
    "dequantize_4bit", "dequantize_4bit_reference", "qlora_linear",
    "RMSNormFunction", "rms_norm", "rms_norm_reference",
    "RoPEFunction", "apply_rope", "rope_reference",
    "GLUFunction", "geglu", "glu", "glu_reference", "swiglu",
]
