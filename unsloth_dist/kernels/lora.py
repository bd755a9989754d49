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

:func:`lora_linear` is the whole LoRA linear over a frozen ``nn.Linear`` base, split so that
everything its backward needs from the activations is saved *before* the base GEMM runs:
``xa = x @ A^T`` saves ``(x, A)``; the base GEMM with the update added saves nothing through
autograd (the frozen weight and ``B`` are parameters, kept by reference; ``xa`` is tokens x r).
Under non-reentrant activation checkpointing with early stop (torch's default, and what the
Trainer enables), the recompute of a layer stops at its last saved tensor: the layer's last LoRA
linear (``down_proj`` in Llama-style MLPs, whose output only feeds the residual add) then skips its
base GEMM in the recompute, about a quarter of the layer's matmul work. Over a base layer that is
not a plain frozen ``nn.Linear`` (QLoRA's bitsandbytes 4-bit layer) the same order is kept by
calling :func:`lora_xa` before the base layer and :func:`lora_add` after it.
"""
from __future__ import annotations

import torch


class _LoraA(torch.autograd.Function):
    """xa = x @ A^T (tokens x r), saving (x, A): the activations LoRA's backward needs."""

    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor):
        ctx.save_for_backward(x, a)
        return x.reshape(-1, x.shape[-1]) @ a.t()

    @staticmethod
    def backward(ctx, g_xa: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x = (g_xa @ a).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_a = g_xa.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_a


def _update_grads(ctx, g2: torch.Tensor):
    """Gradients of ``scaling * xa @ B^T`` w.r.t. xa and B from the output gradient [tokens, out]
    (`ctx.b`, `ctx.xa`, `ctx.scaling` kept by the forward); inputs 1 and 2 of both Functions below."""
    grad_xa = (g2 @ ctx.b).mul_(ctx.scaling) if ctx.needs_input_grad[1] else None  # tokens x r: the only scaled tensor
    grad_b = torch.mm(g2.t(), ctx.xa).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
    return grad_xa, grad_b


class _AddLoraUpdate(torch.autograd.Function):
    """out += scaling * xa @ B^T, in place in the base layer's fresh output (cuBLAS epilogue);
    saves nothing through autograd (B: a parameter, by reference; xa: tokens x r, detached)."""

    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float):
        out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
        ctx.mark_dirty(out)
        ctx.b, ctx.xa, ctx.scaling = b, xa.detach(), scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, *_update_grads(ctx, grad.reshape(-1, grad.shape[-1])), None)


class _FrozenLinearLora(torch.autograd.Function):
    """x @ W^T (+ bias) + scaling * xa @ B^T for a frozen W and bias; saves nothing through
    autograd's saved-tensor machinery (W, B: parameters, by reference; xa: tokens x r, detached)."""

    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, x: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
                bias, scaling: float):
        out = torch.nn.functional.linear(x, w, bias)
        out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
        ctx.w, ctx.b, ctx.xa, ctx.scaling, ctx.x_shape = w, b, xa.detach(), scaling, x.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (g2 @ ctx.w).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return (grad_x, *_update_grads(ctx, g2), None, None, None)


def lora_linear(x: torch.Tensor, w: torch.Tensor, bias, a: torch.Tensor, b: torch.Tensor,
                scaling: float, x_lora=None) -> torch.Tensor:
    """``F.linear(x, w, bias) + scaling * (x_lora @ a.T) @ b.T`` for a frozen `w` / `bias` (no
    gradient for them), saving only what LoRA's backward needs, before the base GEMM (see the
    module docstring). `x_lora`: the adapter's input (LoRA dropout applied), default `x`. One dtype."""
    xa = _LoraA.apply(x if x_lora is None else x_lora, a)
    return _FrozenLinearLora.apply(x, xa, b, w, bias, float(scaling))


def lora_xa(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The adapter's first product ``x @ a.T`` as [tokens, r], saving ``(x, a)`` for the backward.
    Call it *before* the base layer (then :func:`lora_add`): with a base that saves no activation
    itself (bitsandbytes' 4-bit / 8-bit matmuls keep only their frozen weight), everything the
    LoRA linear's backward needs is then saved before the base runs, so a checkpointed layer's
    recompute stops before its last projection's base, as with :func:`lora_linear`."""
    return _LoraA.apply(x, a)


def lora_add(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * xa @ b.T`` written into `out` (the fresh output of the base layer, needed
    by nothing else; [..., out] contiguous, `xa`'s dtype); `xa` from :func:`lora_xa`. Returns `out`."""
    return _AddLoraUpdate.apply(out, xa, b, float(scaling))


def lora_delta(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * (x @ a.T) @ b.T``, written into `out` (which must not be needed by anything
    else: it is the fresh output of the base layer). `x` [..., in], `a` [r, in], `b` [out, r], all
    one dtype; `out` [..., out] contiguous in that dtype. Returns `out`. (``lora_add(out,
    lora_xa(x, a), b, scaling)``; a caller that can run ``lora_xa`` before the base layer should.)"""
    return lora_add(out, lora_xa(x, a), b, scaling)


def lora_delta_reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """What peft computes: ``out + (x @ a.T @ b.T) * scaling`` (out of place)."""
    return out + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scaling
