"""Rotary position embedding on q and k, forward and backward.

Takes q ``[batch, q_heads, seq, head_dim]`` and k ``[batch, kv_heads, seq, head_dim]`` (the layout
HF attention modules pass, usually non-contiguous views of ``[batch, seq, heads, head_dim]``)
and ``cos``/``sin`` ``[batch or 1, seq, head_dim]`` as HF's rotary-embedding module returns them.
Because cos/sin are per token and computed by HF, every rope-scaling variant (linear, dynamic,
llama3, yarn, longrope; including yarn's attention scaling folded into cos/sin) and every
``position_ids`` layout (left padding, packed sequences restarting at 0) works unchanged.

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

GQA: q and k may have different head counts. One program handles one (batch, token): it loads
that token's cos/sin row once and rotates every q and k head.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._utils import LazyKernel, empty_like, next_pow2, use_triton

# --------------------------------------------------------------------------- reference


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `apply_rotary_pos_emb`."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# --------------------------------------------------------------------------- kernel


def _rope_kernel(Q, K, QO, KO, COS, SIN, T,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
                 sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                 sc_b, sc_t,
                 HQ, HK, HALF,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cbase = b * sc_b + t * sc_t
    c1 = tl.load(COS + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of [[c1, -s1], [s2, c2]] (acting on [x1, x2]) is [[c1, s2], [-s1, c2]]
        a11 = c1
        a12 = s2
        a21 = -s1
        a22 = c2
    else:
        a11 = c1
        a12 = -s1
        a21 = s2
        a22 = c2

    # q heads
    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq[:, None] < HQ) & dmask[None, :]
    qin = Q + b * sq_b + t * sq_t + hq[:, None] * sq_h + d[None, :]
    q1 = tl.load(qin, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qin + HALF, mask=mq, other=0.0).to(tl.float32)
    qout = QO + b * sqo_b + t * sqo_t + hq[:, None] * sqo_h + d[None, :]
    tl.store(qout, (q1 * a11[None, :] + q2 * a12[None, :]).to(QO.dtype.element_ty), mask=mq)
    tl.store(qout + HALF, (q1 * a21[None, :] + q2 * a22[None, :]).to(QO.dtype.element_ty), mask=mq)

    # k heads
    hk = tl.arange(0, BLOCK_HK)
    mk = (hk[:, None] < HK) & dmask[None, :]
    kin = K + b * sk_b + t * sk_t + hk[:, None] * sk_h + d[None, :]
    k1 = tl.load(kin, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kin + HALF, mask=mk, other=0.0).to(tl.float32)
    kout = KO + b * sko_b + t * sko_t + hk[:, None] * sko_h + d[None, :]
    tl.store(kout, (k1 * a11[None, :] + k2 * a12[None, :]).to(KO.dtype.element_ty), mask=mk)
    tl.store(kout + HALF, (k1 * a21[None, :] + k2 * a22[None, :]).to(KO.dtype.element_ty), mask=mk)


_kernel = LazyKernel(_rope_kernel, name="rope")


def _launch(q, k, cos, sin, backward: bool, q_dtype: torch.dtype, k_dtype: torch.dtype):
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    qo = empty_like(q, dtype=q_dtype)
    ko = empty_like(k, dtype=k_dtype)
    if B * T == 0:
        return qo, ko
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    BLOCK_D = next_pow2(D // 2)
    BLOCK_HQ, BLOCK_HK = next_pow2(HQ), next_pow2(HK)
    tile = max(BLOCK_HQ, BLOCK_HK) * BLOCK_D
    _kernel[(B * T,)](
        q, k, qo, ko, cos, sin, T,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        sc_b, cos.stride(1),
        HQ, HK, D // 2,
        BACKWARD=backward, BLOCK_HQ=BLOCK_HQ, BLOCK_HK=BLOCK_HK, BLOCK_D=BLOCK_D,
        num_warps=4 if tile <= 4096 else 8,
    )
    return qo, ko


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        # output dtype as HF's `q * cos + ...`: the promoted dtype of q and cos
        return _launch(q, k, cos, sin, False, torch.promote_types(q.dtype, cos.dtype),
                       torch.promote_types(k.dtype, cos.dtype))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        gq, gk = _launch(dq, dk, cos, sin, True, *ctx.dtypes)
        return gq, gk, None, None


def _fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, T, D = q.shape
    return (
        D % 2 == 0 and k.shape[0] == B and k.shape[2] == T and k.shape[3] == D
        and cos.shape[1] == T and cos.shape[2] == D and cos.shape[0] in (1, B)
        and not (cos.requires_grad or sin.requires_grad)  # the kernel gives no cos/sin gradient
        and q.dtype == k.dtype and q.device == k.device == cos.device
    )


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's `apply_rotary_pos_emb`: Triton on CUDA / under TRITON_INTERPRET=1 (when
    the shapes are the standard ones), the PyTorch reference otherwise."""
    if use_triton(q) and _fits(q, k, cos, sin, unsqueeze_dim):
        return RoPEFunction.apply(q, k, cos, sin)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)
