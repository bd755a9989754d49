"""4-bit (NF4 / FP4) weight dequantization for QLoRA, and the QLoRA linear built on it.

bitsandbytes stores a 4-bit weight as packed bytes (two values per byte, the first in the high
nibble), one ``absmax`` scale per ``blocksize`` values, and a 16-entry code (the NF4 or FP4 levels).
With double quantization (``nested``, the QLoRA default) the absmax scales are themselves 8-bit
codes into a 256-entry table, scaled per block of ``state2.blocksize`` scales and shifted by
``offset``. Dequantizing one weight through bitsandbytes' Python API is two library calls (the
scales, then the weight), each going through torch's dispatcher and a ctypes call; in QLoRA
training that happens for every 4-bit linear in the forward, again in the checkpoint recompute
and again in the backward (~640 times per step on an 8B model), and the host time showed up in
the step (benchmarks/NOTES.md entry 30).

Here one Triton kernel computes both levels: per byte, the two code values times the block's
scale, where the scale is ``code2[absmax8] * absmax2 + offset`` (nested) or the stored fp32 absmax.
The arithmetic is bitsandbytes' (its fixed fp32 table of the quant type, fp32 products, the nested
scale computed as a product then a sum, one rounding to the output dtype), so the result is
bit-identical to ``bitsandbytes.functional.dequantize_4bit``, which is the reference (and the path
off CUDA). Weights it does not cover (:func:`kernel_supports`: an odd element count, scales on
another device or in another dtype) are left to bitsandbytes by the caller.

:func:`qlora_linear` is the 4-bit counterpart of :func:`unsloth_dist.kernels.lora_linear`: the
frozen 4-bit base GEMM with the LoRA update added in its epilogue, in one autograd node that saves
nothing through autograd (the packed weight and ``B`` are kept by reference, ``xa`` is tokens x r);
its backward dequantizes the weight again for the input gradient, as bitsandbytes' does.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._utils import LazyKernel, cdiv, empty, use_triton

# --------------------------------------------------------------------------- reference


def dequantize_4bit_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' own dequantization (the packed weight in any storage dtype)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state)


# --------------------------------------------------------------------------- kernel


def _dequant4_kernel(Q, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, n_bytes,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # byte index; values 2*offs and 2*offs + 1
    mask = offs < n_bytes
    byte = tl.load(Q + offs, mask=mask, other=0).to(tl.int32)
    blk = (offs * 2) // BLOCKSIZE  # both values of a byte share a block (blocksize is even)
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + a8, mask=mask, other=0.0) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    hi = tl.load(CODE + (byte >> 4), mask=mask, other=0.0) * scale
    lo = tl.load(CODE + (byte & 15), mask=mask, other=0.0) * scale
    # one contiguous store of [hi0, lo0, hi1, lo1, ...] (the earlier two strided stores ran ~5% slower than
    # bitsandbytes' dequantize in a training profile, RESULTS run 8; this version's kernel time is not measured yet)
    vals = tl.interleave(hi, lo).to(OUT.dtype.element_ty)
    out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + out_offs, vals, mask=out_offs < 2 * n_bytes)


_kernel = LazyKernel(_dequant4_kernel, name="dequant4")
_BLOCK = 1024


_CODES: dict = {}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 levels of `quant_type`, as bitsandbytes decodes them (a fixed table per type: its
    dequantization does not read the ``code`` a ``QuantState`` carries)."""
    key = (quant_type, device)
    code = _CODES.get(key)
    if code is None:
        import bitsandbytes.functional as bnbf

        code = _CODES[key] = bnbf.get_4bit_type(quant_type, device=device).to(torch.float32).contiguous()
    return code


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def kernel_supports(packed: torch.Tensor, qs) -> bool:
    """Whether the kernel dequantizes this weight as bitsandbytes does: NF4 / FP4, a 2-D state with an
    even element count (two whole values per byte) held by `packed`, an even blocksize, fp32 scales
    (and, nested, an fp32 256-entry table, fp32 second-level scales, offset) on `packed`'s device."""
    n = qs.shape[0] * qs.shape[1] if len(qs.shape) == 2 else 1
    if (qs.quant_type not in ("nf4", "fp4") or len(qs.shape) != 2 or n % 2 or qs.blocksize % 2
            or packed.numel() * packed.element_size() * 2 < n or not packed.is_contiguous()):
        return False
    dev = packed.device
    if qs.nested:
        s2 = qs.state2
        return (qs.absmax.dtype == torch.uint8 and qs.absmax.device == dev and s2.code.dtype == torch.float32
                and s2.code.numel() == 256 and s2.code.device == dev and s2.absmax.dtype == torch.float32
                and s2.absmax.device == dev and torch.is_tensor(qs.offset) and qs.offset.dtype == torch.float32
                and qs.offset.device == dev and s2.blocksize > 0)
    return qs.absmax.dtype == torch.float32 and qs.absmax.device == dev


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes 4-bit parameter (`packed`: its data, any storage
    dtype; `quant_state`: its ``QuantState``), in ``quant_state.dtype`` (or `dtype`). One Triton
    launch on CUDA / under TRITON_INTERPRET=1; bitsandbytes' dequantization elsewhere."""
    qs = quant_state
    dtype = dtype or qs.dtype
    if not use_triton(packed):
        w = dequantize_4bit_reference(packed, qs)
        return w if w.dtype == dtype else w.to(dtype)
    if not kernel_supports(packed, qs):
        raise ValueError(f"dequantize_4bit: a {tuple(packed.shape)} {packed.dtype} packed tensor with a "
                         f"{qs.quant_type} {tuple(qs.shape)} state (blocksize {qs.blocksize}) is not one this "
                         "kernel dequantizes; use dequantize_4bit_reference")
    q = _as_bytes(packed)
    n_bytes = qs.shape[0] * qs.shape[1] // 2
    out = empty(tuple(qs.shape), dtype, packed.device)
    code = _code(qs.quant_type, packed.device)
    if qs.nested:
        s2 = qs.state2
        _kernel.launch((cdiv(n_bytes, _BLOCK),), q, code, qs.absmax, s2.code, s2.absmax, qs.offset, out, n_bytes,
                       BLOCKSIZE=qs.blocksize, BLOCKSIZE2=s2.blocksize, NESTED=True, BLOCK=_BLOCK, num_warps=4,
                       enable_fp_fusion=False)  # bitsandbytes: product, then sum (no FMA)
    else:
        _kernel.launch((cdiv(n_bytes, _BLOCK),), q, code, qs.absmax, code, qs.absmax, qs.absmax, out, n_bytes,
                       BLOCKSIZE=qs.blocksize, BLOCKSIZE2=1, NESTED=False, BLOCK=_BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------- QLoRA linear


class _Frozen4bitLinearLora(torch.autograd.Function):
    """x @ W^T (+ bias) + scaling * xa @ B^T for a frozen 4-bit W (dequantized here, freed after
    the GEMM) and a frozen bias; saves nothing through autograd's saved-tensor machinery."""

    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, x, xa, b, packed, bias, scaling: float, quant_state):
        w = dequantize_4bit(packed, quant_state, x.dtype)
        out = torch.nn.functional.linear(x, w, bias)
        del w
        out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
        ctx.packed, ctx.qs, ctx.b, ctx.xa, ctx.scaling, ctx.x_shape = packed, quant_state, b, xa.detach(), scaling, x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        from .lora import _update_grads

        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(ctx.packed, ctx.qs, g2.dtype)
            grad_x = (g2 @ w).view(ctx.x_shape)
            del w
        return (grad_x, *_update_grads(ctx, g2), None, None, None, None)


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias, xa: torch.Tensor, b: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """``F.linear(x, dequantize(packed)) (+ bias) + scaling * xa @ b.T`` for a frozen 4-bit weight;
    `xa` from :func:`unsloth_dist.kernels.lora_xa`, computed before this call (so that a checkpointed
    layer's recompute stops before its last projection, as with ``lora_linear``)."""
    return _Frozen4bitLinearLora.apply(x, xa, b, packed, bias, float(scaling), quant_state)
