"""Rotary position embedding on q and k, forward and backward.

Takes q ``[batch, q_heads, seq, head_dim]`` and k ``[batch, kv_heads, seq, head_dim]`` (the layout
HF attention modules pass, usually non-contiguous views of ``[batch, seq, heads, head_dim]``)
and ``cos``/``sin`` ``[batch or 1, seq, head_dim]`` as HF's rotary-embedding module returns them.
Because cos/sin are per token and computed by HF, every rope-scaling variant (linear, dynamic,
llama3, yarn, longrope; including yarn's attention scaling folded into cos/sin) and every
``position_ids`` layout (left padding, packed sequences restarting at 0) works unchanged.

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

GQA: q and k may have different head counts. One launch rotates both: one program handles one
(batch, token), loads that token's cos/sin row once and rotates every q and k head.

In place (see :func:`apply_rope`): the forward rotates q and k in their own storage, whatever
their strides (HF's transposed views are used as they are, never copied), and returns them --
no activation memory. The backward applies the inverse rotation (the transpose) in place on the
incoming gradients when nothing else refers to them, which is the case for the gradients that
attention's backward produces. Every fallback is out of place, with the same kernel.
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


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    """Rotate q, k into qo, ko (which may be q, k themselves: each program reads its token's
    heads completely before it writes them, so the kernel works in place)."""
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    if B * T == 0:
        return
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


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- in-place safety


def _no_internal_overlap(t: torch.Tensor) -> bool:
    """Sufficient condition for distinct indices of `t` to address distinct elements (false for
    expanded / stride-0 tensors, which an in-place write would corrupt)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return False
        span = st * sz
    return True


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + (1 + sum((sz - 1) * st for st, sz in zip(t.stride(), t.shape))) * t.element_size()


def _may_alias(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


_VIEW_NODE_PREFIXES = ("TransposeBackward", "ViewBackward", "UnsafeViewBackward", "PermuteBackward",
                       "AsStridedBackward", "SliceBackward", "SelectBackward", "SplitBackward",
                       "SplitWithSizesBackward", "UnbindBackward", "NarrowBackward", "AliasBackward",
                       "SqueezeBackward", "UnsqueezeBackward", "ReshapeAliasBackward")
_IS_VIEW_NODE: dict[type, bool] = {}


def _producer_forbids_in_place(t: torch.Tensor) -> bool:
    """Walking back from `t` through view ops to what produced its storage: True when that is a
    leaf that requires grad (`t` is a view of a parameter / a caller's leaf), or an op that saved
    its output for its own backward (exp, sigmoid, a custom Function saving its result, ...):
    rotating `t` in place would corrupt it, so RoPE runs out of place. (Other
    consumers that saved the pre-rotation tensor cannot be seen from here; the version-counter
    bump of the in-place path makes their backward raise instead of silently using rotated
    values.)"""
    node = t.grad_fn
    for _ in range(16):
        if node is None:
            return False
        cls = type(node)
        is_view = _IS_VIEW_NODE.get(cls)
        if is_view is None:
            is_view = _IS_VIEW_NODE[cls] = cls.__name__.rstrip("0123456789") in _VIEW_NODE_PREFIXES
        if not is_view:
            break
        nxt = node.next_functions
        node = nxt[0][0] if nxt else None
    else:
        return True  # an unusually long view chain: do not guess
    if node is None:
        return False
    if type(node).__name__ == "AccumulateGrad" or hasattr(node, "_saved_result"):
        return True
    if hasattr(node, "saved_tensors"):  # a custom autograd.Function
        try:
            saved = node.saved_tensors
        except RuntimeError:
            return True
        ptr = t.untyped_storage().data_ptr()
        return any(s is not None and s.untyped_storage().data_ptr() == ptr for s in saved)
    return False


def _can_rotate_in_place(q, k, cos, sin, inplace) -> bool:
    if inplace is False:
        return False
    if inplace is None and (q.grad_fn is None or k.grad_fn is None):
        return False  # auto: only intermediate activations of a graph
    if torch.promote_types(q.dtype, cos.dtype) != q.dtype or torch.promote_types(q.dtype, sin.dtype) != q.dtype:
        return False  # the output has another dtype than q (e.g. fp32 cos with bf16 q)
    for t in (q, k):
        if (t.requires_grad and t.is_leaf) or t.stride(-1) != 1 or not _no_internal_overlap(t):
            return False  # a leaf that requires grad must not be modified
    if _may_alias(q, k) or _may_alias(q, cos) or _may_alias(q, sin) or _may_alias(k, cos) or _may_alias(k, sin):
        return False
    return not (_producer_forbids_in_place(q) or _producer_forbids_in_place(k))


def _storage_use_count(t: torch.Tensor) -> int:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except Exception:  # pragma: no cover - private API gone: never reuse
        return 1 << 30


def _owned_gradient(g: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when the incoming gradient `g` can be overwritten with the input gradient: nothing
    but this backward refers to its memory (PyTorch's own criterion for stealing a gradient
    buffer, use_count == 1 -- the gradient attention's backward hands over), and it is a dense,
    non-overlapping tensor of the input's dtype. A gradient the caller passed to
    ``backward()`` / ``autograd.grad`` is held by the caller too and is never modified."""
    if g.dtype != dtype or g.stride(-1) != 1 or not _no_internal_overlap(g):
        return False
    try:
        if g._use_count() != 1:
            return False
        base = g._base
        if base is None:
            return _storage_use_count(g) == 2  # g's TensorImpl + the temporary storage wrapper
        # a view of a buffer only it refers to: the view's reference to its base + `base` here
        ok = base._use_count() == 2 and _storage_use_count(g) == 3
        del base
        return ok
    except Exception:  # pragma: no cover - private API gone: never reuse
        return False


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace=None):
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        if inplace:  # decided by apply_rope on the caller's tensors (inside here they are detached)
            _launch(q, k, q, k, cos, sin, False)
            # the Triton store is invisible to autograd: bump the version counters so that a
            # tensor saved before the rotation (sharing this storage) fails loudly in backward
            for t in (q, k):
                if not t.is_inference():
                    torch.autograd.graph.increment_version(t)
            # returned as-is (not marked dirty): autograd hands out views of q / k with this
            # node as grad_fn -- no CopySlices on the projection output, no copies in backward
            return q, k
        # output dtype as HF's `q * cos + ...`: the promoted dtype of q and cos
        qo = empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
        ko = empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
        _launch(q, k, qo, ko, cos, sin, False)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        # the inverse rotation in place on the incoming gradients when they are ours to
        # overwrite (the usual case inside a model), into new buffers otherwise
        gq = dq if _owned_gradient(dq, q_dtype) else empty_like(dq, dtype=q_dtype)
        gk = dk if _owned_gradient(dk, k_dtype) else empty_like(dk, dtype=k_dtype)
        if gk is dk and gq is dq and _may_alias(dq, dk):
            gk = empty_like(dk, dtype=k_dtype)
        _launch(dq, dk, gq, gk, cos, sin, True)
        return gq, gk, None, None, None


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
               unsqueeze_dim: int = 1, inplace: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's `apply_rotary_pos_emb`: Triton on CUDA / under TRITON_INTERPRET=1 (when
    the shapes are the standard ones), the PyTorch reference otherwise.

    ``inplace``: the Triton path may rotate q and k in their own storage (no new activation
    memory; the results are views of q / k, whose old values are gone) --

    * ``None`` (default): in place when q and k are intermediate tensors of an autograd graph
      (they have a ``grad_fn``, like the projections HF's attention passes), out of place for
      leaf tensors (e.g. a caller's own tensors, or anything under ``no_grad``);
    * ``True``: in place also for tensors without a ``grad_fn`` (the patched HF attention passes
      this: it rebinds q and k to the results, so their old values are never read again);
    * ``False``: never.

    Even when asked, it runs out of place when in place is unsafe or impossible: a leaf that
    requires grad (or a view of one), an output dtype other than q's (fp32 cos with bf16 q), q and k (or cos/sin)
    sharing memory, expanded / overlapping strides, or an op producing q / k that saved its own
    output for backward. A tensor some *other* op saved before the rotation makes that op's
    backward raise (the version counter is bumped), as for any PyTorch in-place op. After an
    in-place call q and k are consumed: use the results (take gradients w.r.t. what produced
    q / k, e.g. the projection outputs, not w.r.t. the q / k views themselves)."""
    if use_triton(q) and _fits(q, k, cos, sin, unsqueeze_dim):
        return RoPEFunction.apply(q, k, cos, sin, _can_rotate_in_place(q, k, cos, sin, inplace))
    return rope_reference(q, k, cos, sin, unsqueeze_dim)
