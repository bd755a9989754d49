"""AdamW on fp32 master weights for bf16 models, in one pass per parameter.

The single / ddp backends train bf16 weights and let the optimizer update fp32 master copies
(`precision: bf16`). Done with torch ops that is four passes over every parameter: cast the bf16
gradient to an fp32 copy, scale it by the clipping coefficient, run AdamW on the master, copy the
master back into the bf16 weight (~52 bytes of memory traffic per parameter, plus an fp32 gradient
buffer as large as the master). This kernel reads the bf16 gradient, applies the clipping
coefficient (a device scalar, so nothing waits for the host), updates the master and both moments
and writes the bf16 weight: ~30 bytes per parameter, no fp32 gradient.

Semantics are torch.optim.AdamW's (decoupled weight decay, bias correction, `eps` added after the
square root; the tests compare against torch.optim.AdamW itself, which is the reference); the optimizer object and its state (`step`, `exp_avg`, `exp_avg_sq` per master
parameter) stay torch's, so checkpoints, schedulers and `state_dict()` are unchanged. `step` is
kept as a CPU tensor, as torch's non-fused AdamW keeps it, so the bias corrections are host
numbers and the update launches without a device sync.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton.language as tl

from ._utils import LazyKernel, cdiv, use_triton

# --------------------------------------------------------------------------- kernel


def _master_adamw(P, G, M, EA, EAS, COEF, n, decay, one_m_beta1, beta2, one_m_beta2, step_size, inv_bc2_sqrt, eps,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    coef = tl.load(COEF)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * coef
    m = tl.load(M + offs, mask=mask, other=0.0)
    ea = tl.load(EA + offs, mask=mask, other=0.0)
    eas = tl.load(EAS + offs, mask=mask, other=0.0)
    m = m * decay
    ea = ea + one_m_beta1 * (g - ea)
    eas = eas * beta2 + one_m_beta2 * (g * g)
    denom = tl.sqrt(eas) * inv_bc2_sqrt + eps
    m = m - step_size * (ea / denom)
    tl.store(M + offs, m, mask=mask)
    tl.store(EA + offs, ea, mask=mask)
    tl.store(EAS + offs, eas, mask=mask)
    tl.store(P + offs, m.to(P.dtype.element_ty), mask=mask)


_kernel = LazyKernel(_master_adamw, name="master_adamw")
_BLOCK = 2048


def supports(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor]) -> Optional[str]:
    """None when `master_adamw_step` can run this optimizer on these parameters, else the reason."""
    if type(optimizer) is not torch.optim.AdamW:
        return f"the optimizer is {type(optimizer).__name__}, not torch.optim.AdamW"
    for g in optimizer.param_groups:
        for key in ("amsgrad", "maximize", "differentiable", "capturable"):
            if g.get(key):
                return f"AdamW option {key}=True"
        if torch.is_tensor(g["lr"]):
            return "a tensor learning rate"
    if not params:
        return "no trainable parameters"
    if not use_triton(params[0]):
        return "Triton does not run on this device"
    for p, m in zip(params, masters):
        if p.device != m.device or not p.is_contiguous() or not m.is_contiguous() or m.dtype != torch.float32:
            return "a parameter and its fp32 master are not contiguous tensors on one device"
    return None


def grad_norm_and_coef(grads: Sequence[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Total 2-norm of `grads` (fp32, accumulated in fp32 whatever their dtype) and the clipping
    coefficient `min(1, max_norm / (norm + 1e-6))`, both device scalars, as clip_grad_norm_ does."""
    if not grads:
        z = torch.zeros((), dtype=torch.float32)
        return z, torch.ones((), dtype=torch.float32)
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isinf(max_norm):
        return total, torch.ones_like(total)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def master_adamw_step(optimizer: torch.optim.AdamW, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
                      coef: torch.Tensor) -> None:
    """Update every master whose model parameter has a gradient (`param.grad * coef`), with the
    hyper-parameters of the master's param group, and write the result into the bf16 parameter.
    Parameters without a gradient are skipped, as torch's AdamW skips them."""
    group_of = {id(m): g for g in optimizer.param_groups for m in g["params"]}
    optimizer._opt_called = True  # what torch's step wrapper records (LR schedulers check it)
    coef = coef.to(dtype=torch.float32)
    for p, m in zip(params, masters):
        grad = p.grad
        if grad is None:
            continue
        grad = grad.contiguous()
        group = group_of[id(m)]
        state = optimizer.state[m]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        elif state["step"].device.type != "cpu":  # e.g. loaded into a fused AdamW: one read, then host-side
            state["step"] = state["step"].detach().to("cpu", torch.float32)
        state["step"] += 1
        step = float(state["step"])
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        c = coef if coef.device == m.device else coef.to(m.device, non_blocking=True)
        n = m.numel()
        if n == 0:
            continue
        _kernel.launch((cdiv(n, _BLOCK),), p, grad, m, state["exp_avg"], state["exp_avg_sq"], c, n,
                       1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, lr / (1.0 - beta1**step),
                       1.0 / math.sqrt(1.0 - beta2**step), eps, BLOCK=_BLOCK, num_warps=8)
