"""Gated MLP activations: ``act(gate) * up``, forward and backward.

* ``"silu"``: SwiGLU (Llama, Qwen2/3, Mistral): silu(a) = a * sigmoid(a)
* ``"gelu_tanh"``: GeGLU with the tanh approximation (Gemma 2's ``gelu_pytorch_tanh``)
* ``"gelu"``: GeGLU with the exact (erf) GELU

The op is elementwise and memory bound: one flat kernel over all elements, fp32 math, one
rounding to the input dtype. The backward writes the two input gradients into the buffers of
the saved ``gate`` and ``up`` activations (they are dead after this backward), so it allocates
nothing; it bumps their version counters first, so another autograd user of those tensors that
runs its backward later fails with PyTorch's "modified by an inplace operation" error instead of
reading gradients (patch with ``swiglu=False`` for such a model).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton.language as tl

from ._utils import LazyKernel, empty_like, poisoning, use_triton

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

# --------------------------------------------------------------------------- reference


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


# --------------------------------------------------------------------------- kernels


def _glu_fwd(A, B, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        g = a * tl.sigmoid(a)
    elif ACT == 1:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
        g = 0.5 * a * (1.0 + th)
    else:
        g = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    tl.store(H + offs, (g * b).to(H.dtype.element_ty), mask=mask)


def _glu_bwd(DH, A, B, DA, DB, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        s = tl.sigmoid(a)
        g = a * s
        dg = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        g = 0.5 * a * (1.0 + th)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        dg = 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        g = a * cdf
        dg = cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    tl.store(DA + offs, (dh * b * dg).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dh * g).to(DB.dtype.element_ty), mask=mask)


_fwd_kernel = LazyKernel(_glu_fwd, name="glu_fwd")
_bwd_kernel = LazyKernel(_glu_bwd, name="glu_bwd")

_BLOCK = 1024


def _grid(n: int):
    return (max(1, math.ceil(n / _BLOCK)),)


class GLUFunction(torch.autograd.Function):
    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, gate, up, activation):
        act = ACTIVATIONS[activation]
        gate_c, up_c = gate.contiguous(), up.contiguous()
        out = empty_like(gate_c, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = gate_c.numel()
        if n:
            _fwd_kernel[_grid(n)](gate_c, up_c, out, n, ACT=act, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(gate_c, up_c)
        ctx.act = act
        ctx.shape = gate.shape
        # only intermediate activations (not leaves, not copies made here) may be overwritten
        ctx.reuse = gate_c is gate and up_c is up and not gate.is_leaf and not up.is_leaf
        return out

    @staticmethod
    def backward(ctx, dh):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "a second backward through unsloth_dist's fused GLU (retain_graph=True): the first one wrote its "
                "gradients over the saved activations, so this one would be wrong. Backward once per forward, or "
                "patch the model without it (patch_model(model, swiglu=False))"
            )
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        if ctx.reuse and not poisoning() and gate.dtype == up.dtype and gate.data_ptr() != up.data_ptr():
            da, db = gate, up  # write the gradients over the activations, dead to this op from here
            ctx.consumed = True
            # the kernel's stores bypass autograd: bump the version counters so that another node
            # that saved these tensors (e.g. a forward hook's loss term on gate_proj's output) fails
            # loudly in its backward instead of reading gradients as activations
            torch.autograd.graph.increment_version((gate, up))
        else:
            da, db = empty_like(gate), empty_like(up)
        n = gate.numel()
        if n:
            _bwd_kernel[_grid(n)](dh, gate, up, da, db, n, ACT=ctx.act, BLOCK=_BLOCK, num_warps=4)
        return da, db, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up``. Triton on CUDA / under TRITON_INTERPRET=1, the reference otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if use_triton(gate) and gate.shape == up.shape and gate.device == up.device:
        return GLUFunction.apply(gate, up, activation)
    return glu_reference(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
