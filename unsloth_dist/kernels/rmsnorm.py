"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), forward and backward.

Two casting conventions, both from Hugging Face transformers:

* ``gemma=False`` (Llama, Qwen2, Qwen3, Mistral ``*RMSNorm``): normalise in fp32, cast the
  normalised value back to the input dtype, then multiply by ``weight`` in the promoted dtype
  of (input, weight) -- the output has that promoted dtype.
* ``gemma=True`` (Gemma 2 ``Gemma2RMSNorm``): multiply by ``(offset + weight)`` in fp32, then cast
  to the input dtype. ``offset`` is 1.0 for Gemma's ``(1 + weight)``.

The Triton backward computes the input gradient per row and the weight gradient as fp32
partial sums, one per program (each program walks a contiguous range of rows), which are then
summed -- no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._utils import LazyKernel, cdiv, empty, next_pow2, num_sms, use_triton, warps_for

# --------------------------------------------------------------------------- reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
                       gemma: bool = False) -> torch.Tensor:
    """Plain PyTorch RMSNorm with HF's exact casting (see the module docstring)."""
    if gemma:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out * (offset + weight.float())).type_as(x)
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight + offset if offset != 0.0 else weight
    return w * xf.to(input_dtype)


# --------------------------------------------------------------------------- kernels


def _rms_fwd(X, Y, W, RSTD, stride_x, stride_y, N, eps, offset,
             GEMMA: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    n = xf * rstd
    if GEMMA:
        y = n * w
    else:
        # HF Llama: (x * rstd).to(input dtype), then * weight in the output dtype
        y = n.to(x.dtype).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _rms_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, offset, rows_per_program,
             GEMMA: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        n = xf * rstd
        if GEMMA:
            dw += dy * n
        else:
            dw += dy * n.to(x.dtype).to(tl.float32)
        dn = dy * w
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / N))
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


_fwd_kernel = LazyKernel(_rms_fwd, name="rmsnorm_fwd")
_bwd_kernel = LazyKernel(_rms_bwd, name="rmsnorm_bwd")


def _out_dtype(x: torch.Tensor, w: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(x.dtype, w.dtype)


class RMSNormFunction(torch.autograd.Function):
    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        shape = x.shape
        N = shape[-1]
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        w = weight.contiguous()
        y = empty((M, N), _out_dtype(x, weight, gemma), x.device)
        rstd = empty((M,), torch.float32, x.device)
        BLOCK_N = next_pow2(N)
        if M > 0:
            _fwd_kernel[(M,)](x2, y, w, rstd, x2.stride(0), y.stride(0), N, float(eps), float(offset),
                              GEMMA=bool(gemma), BLOCK_N=BLOCK_N, num_warps=warps_for(BLOCK_N))
        ctx.save_for_backward(x2, w, rstd)
        ctx.offset, ctx.gemma, ctx.shape, ctx.w_dtype = float(offset), bool(gemma), shape, weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(-1, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = empty((M, N), x2.dtype, x2.device)
        programs = max(1, min(M, num_sms(x2.device) * (4 if x2.is_cuda else 1)))
        rows_per_program = cdiv(M, programs) if M else 1
        programs = cdiv(M, rows_per_program) if M else 1
        dw_partial = empty((programs, N), torch.float32, x2.device)
        BLOCK_N = next_pow2(N)
        if M > 0:
            _bwd_kernel[(programs,)](dy2, x2, w, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                     M, N, ctx.offset, rows_per_program,
                                     GEMMA=ctx.gemma, BLOCK_N=BLOCK_N, num_warps=warps_for(BLOCK_N))
            dw = dw_partial.sum(0).to(ctx.w_dtype)
        else:
            dw = torch.zeros(N, dtype=ctx.w_dtype, device=x2.device)
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of `x` (any leading shape). Triton on CUDA / under
    TRITON_INTERPRET=1, the PyTorch reference otherwise."""
    if use_triton(x) and x.shape[-1] <= 65536:
        return RMSNormFunction.apply(x, weight, eps, offset, gemma)
    return rms_norm_reference(x, weight, eps, offset, gemma)
