"""LoRA's low-rank update added inside the GEMM that computes it.

peft's LoRA linear computes ``result = base(x) + lora_B(lora_A(x)) * scaling``: besides the two
small matmuls, the ``* scaling`` and the ``+`` are two full passes over the layer's output
(tokens x out_features) in the forward, and again in the backward (the gradient is scaled before
lora_B's backward reads it). Here the update is one ``addmm_`` into the base output,
``out += scaling * (x @ A^T) @ B^T``: cuBLAS applies ``alpha = scaling`` and ``beta = 1`` in the
GEMM's epilogue, so the output is read and written once and no tensor of the output's size is
created. The backward reads the output gradient once per small matmul and scales only the
tokens x r intermediate.

The same arithmetic as peft (up to rounding: the scaling is applied to the product, not to its
bf16-rounded output), tested against :func:`lora_delta_reference` and against peft's own forward.
"""
from __future__ import annotations

import torch


class _LoraDelta(torch.autograd.Function):
    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()  # tokens x r
        out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, xa, a, b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        g_xa = (g2 @ b).mul_(s)  # tokens x r: the only scaled tensor
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = (g_xa @ a).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = g_xa.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_b = torch.mm(g2.t(), xa).mul_(s)
        return grad, grad_x, grad_a, grad_b, None


def lora_delta(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * (x @ a.T) @ b.T``, written into `out` (which must not be needed by anything
    else: it is the fresh output of the base layer). `x` [..., in], `a` [r, in], `b` [out, r], all
    one dtype; `out` [..., out] contiguous in that dtype. Returns `out`."""
    return _LoraDelta.apply(out, x, a, b, float(scaling))


def lora_delta_reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """What peft computes: ``out + (x @ a.T @ b.T) * scaling`` (out of place)."""
    return out + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scaling
