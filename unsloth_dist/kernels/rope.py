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

#: tokens per program (a power of two); None: automatic -- as many tokens as keep the widest
#: half-tile (tokens x padded heads x head_dim/2) at about ``_TILE`` elements
BLOCK_T: int | None = None
#: warps per program; None: automatic -- about 16 elements of the widest half-tile per thread
NUM_WARPS: int | None = None
_TILE = 4096
_MAX_BLOCK_T = 64


def _rope_kernel(Q, K, QO, KO, COS, SIN, T,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
                 sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, COS_BATCHED: tl.constexpr,
                 BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program: BLOCK_T consecutive tokens of one sequence, every q and k head
    pid = tl.program_id(0)
    n_tblocks = tl.cdiv(T, BLOCK_T)
    b = (pid // n_tblocks).to(tl.int64)
    t = ((pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    tmask = t < T
    d = tl.arange(0, BLOCK_D)

    # cos / sin: contiguous [B or 1, T, 2 * HALF], loaded once per token for all heads
    crow = t * (2 * HALF)
    if COS_BATCHED:
        crow += b * T * (2 * HALF)
    coff = crow[:, None] + d[None, :]  # [BLOCK_T, BLOCK_D]
    cmask = tmask[:, None]
    if BLOCK_D != HALF:
        cmask = cmask & (d < HALF)[None, :]
    c1 = tl.load(COS + coff, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + coff + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + coff, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + coff + HALF, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of [[c1, -s1], [s2, c2]] (acting on [x1, x2]) is [[c1, s2], [-s1, c2]]
        a12 = s2
        a21 = -s1
    else:
        a12 = -s1
        a21 = s2
    a11 = c1[:, None, :]  # [BLOCK_T, 1, BLOCK_D]: broadcast over heads
    a12 = a12[:, None, :]
    a21 = a21[:, None, :]
    a22 = c2[:, None, :]
    dd = d[None, None, :]
    tt = t[:, None, None]
    mt = tmask[:, None, None]

    # q heads
    hq = tl.arange(0, BLOCK_HQ)[None, :, None]
    mq = mt
    if BLOCK_HQ != HQ:
        mq = mq & (hq < HQ)
    if BLOCK_D != HALF:
        mq = mq & (dd < HALF)
    qin = Q + b * sq_b + tt * sq_t + hq * sq_h + dd
    q1 = tl.load(qin, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qin + HALF, mask=mq, other=0.0).to(tl.float32)
    qout = QO + b * sqo_b + tt * sqo_t + hq * sqo_h + dd
    tl.store(qout, (q1 * a11 + q2 * a12).to(QO.dtype.element_ty), mask=mq)
    tl.store(qout + HALF, (q1 * a21 + q2 * a22).to(QO.dtype.element_ty), mask=mq)

    # k heads
    hk = tl.arange(0, BLOCK_HK)[None, :, None]
    mk = mt
    if BLOCK_HK != HK:
        mk = mk & (hk < HK)
    if BLOCK_D != HALF:
        mk = mk & (dd < HALF)
    kin = K + b * sk_b + tt * sk_t + hk * sk_h + dd
    k1 = tl.load(kin, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kin + HALF, mask=mk, other=0.0).to(tl.float32)
    kout = KO + b * sko_b + tt * sko_t + hk * sko_h + dd
    tl.store(kout, (k1 * a11 + k2 * a12).to(KO.dtype.element_ty), mask=mk)
    tl.store(kout + HALF, (k1 * a21 + k2 * a22).to(KO.dtype.element_ty), mask=mk)


_kernel = LazyKernel(_rope_kernel, name="rope")
_CONFIGS: dict[tuple, tuple[int, int, int, int, int]] = {}


def _config(HQ: int, HK: int, D: int, T: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps), cached per shape class."""
    key = (HQ, HK, D, T if T < _MAX_BLOCK_T else _MAX_BLOCK_T, BLOCK_T, NUM_WARPS)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        bhq, bhk, bd = next_pow2(HQ), next_pow2(HK), next_pow2(D // 2)
        widest = max(bhq, bhk) * bd
        bt = BLOCK_T if BLOCK_T is not None else max(1, _TILE // widest)
        bt = max(1, min(next_pow2(bt), next_pow2(T), _MAX_BLOCK_T))
        warps = NUM_WARPS if NUM_WARPS is not None else min(16, max(4, next_pow2(bt * widest // 512)))
        cfg = _CONFIGS[key] = (bt, bhq, bhk, bd, warps)
    return cfg


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    """Rotate q, k into qo, ko (which may be q, k themselves: each program reads its tokens'
    heads completely before it writes them, so the kernel works in place). cos / sin must be
    contiguous."""
    B, HQ, T, D = q.shape
    if B * T == 0:
        return
    HK = k.shape[1]
    bt, bhq, bhk, bd, warps = _config(HQ, HK, D, T)
    sq, sk, sqo, sko = q.stride(), k.stride(), qo.stride(), ko.stride()
    _kernel.launch(
        (B * ((T + bt - 1) // bt),),
        q, k, qo, ko, cos, sin, T,
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2],
        sqo[0], sqo[1], sqo[2], sko[0], sko[1], sko[2],
        HQ=HQ, HK=HK, HALF=D // 2, COS_BATCHED=cos.shape[0] != 1,
        BACKWARD=backward, BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_D=bd, num_warps=warps,
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- in-place safety
# All checks are O(1) Python on sizes / strides / pointers (no tensors created, no syncs); what
# depends only on a layout or a class is computed once and cached.

_LAYOUTS: dict[tuple, tuple[bool, int]] = {}


def _layout(t: torch.Tensor) -> tuple[bool, int]:
    """(no internal overlap, span in elements) of `t`'s sizes / strides, cached per layout.

    No internal overlap: a sufficient condition for distinct indices of `t` to address distinct
    elements (false for expanded / stride-0 tensors, which an in-place write would corrupt).
    Span: 1 + the largest element offset (0 for an empty tensor)."""
    shape, stride = t.shape, t.stride()
    key = (shape, stride)
    info = _LAYOUTS.get(key)
    if info is None:
        dims = sorted((st, sz) for st, sz in zip(stride, shape) if sz > 1)
        ok, span = True, 1
        for st, sz in dims:
            if st < span:
                ok = False
                break
            span = st * sz
        extent = 0 if 0 in shape else 1 + sum((sz - 1) * st for st, sz in zip(stride, shape))
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        info = _LAYOUTS[key] = (ok, extent)
    return info


def _no_internal_overlap(t: torch.Tensor) -> bool:
    return _layout(t)[0]


def _byte_range(t: torch.Tensor, extent: int | None = None) -> tuple[int, int]:
    """[first byte, one past the last byte] `t` addresses (`extent`: its span, when known)."""
    if extent is None:
        extent = t.numel() if t.is_contiguous() else _layout(t)[1]
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def _overlap(r1: tuple[int, int], r2: tuple[int, int]) -> bool:
    return r1[0] < r2[1] and r2[0] < r1[1]


def _may_alias(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` may share memory: their byte ranges intersect (live tensors of
    different allocations never do; a superset of sharing one storage with intersecting
    ranges, so never a false "no")."""
    return _overlap(_byte_range(a), _byte_range(b))


_VIEW_NODE_PREFIXES = ("TransposeBackward", "ViewBackward", "UnsafeViewBackward", "PermuteBackward",
                       "AsStridedBackward", "SliceBackward", "SelectBackward", "SplitBackward",
                       "SplitWithSizesBackward", "UnbindBackward", "NarrowBackward", "AliasBackward",
                       "SqueezeBackward", "UnsqueezeBackward", "ReshapeAliasBackward")
# kinds of autograd nodes (a property of the node's class, cached per class)
_VIEW, _FORBIDS, _CUSTOM, _OTHER = range(4)
_NODE_KIND: dict[type, int] = {}


def _node_kind(cls: type) -> int:
    kind = _NODE_KIND.get(cls)
    if kind is None:
        if cls.__name__.rstrip("0123456789") in _VIEW_NODE_PREFIXES:
            kind = _VIEW
        elif cls.__name__ == "AccumulateGrad" or hasattr(cls, "_saved_result"):
            kind = _FORBIDS  # a leaf, or an op that saved its own output
        elif hasattr(cls, "saved_tensors"):
            kind = _CUSTOM  # a custom autograd.Function: look at what it saved
        else:
            kind = _OTHER
        _NODE_KIND[cls] = kind
    return kind


def _producer_forbids_in_place(t: torch.Tensor) -> bool:
    """Walking back from `t` through view ops to what produced its storage: True when that is a
    leaf that requires grad (`t` is a view of a parameter / a caller's leaf), or an op that saved
    its output for its own backward (exp, sigmoid, a custom Function saving its result or not
    declaring `saves_output = False`, ...):
    rotating `t` in place would corrupt it, so RoPE runs out of place. (Other
    consumers that saved the pre-rotation tensor cannot be seen from here; the version-counter
    bump of the in-place path makes their backward raise instead of silently using rotated
    values.)"""
    node = t.grad_fn
    for _ in range(16):
        if node is None:
            return False
        kind = _node_kind(type(node))
        if kind != _VIEW:
            break
        nxt = node.next_functions
        node = nxt[0][0] if nxt else None
    else:
        return True  # an unusually long view chain: do not guess
    if kind == _FORBIDS:
        return True
    if kind == _CUSTOM:
        # Our Functions declare whether they save their output. Another library's Function is
        # not inspected: reading its saved tensors unpacks them, and under activation
        # checkpointing unpacking recomputes the checkpointed layer there and then (its compute
        # again, and memory held until the backward), so RoPE runs out of place after it.
        declared = getattr(getattr(node, "_forward_cls", None), "saves_output", None)
        return True if declared is None else bool(declared)
    return False


def _dtype_kept(dtype: torch.dtype, other: torch.dtype) -> bool:
    """`dtype` is the promoted dtype of (dtype, other)."""
    return other is dtype or torch.promote_types(dtype, other) == dtype


def _can_rotate_in_place(q, k, cos, sin, inplace) -> bool:
    if inplace is False:
        return False
    if inplace is None and (q.grad_fn is None or k.grad_fn is None):
        return False  # auto: only intermediate activations of a graph
    if not (_dtype_kept(q.dtype, cos.dtype) and _dtype_kept(q.dtype, sin.dtype)):
        return False  # the output has another dtype than q (e.g. fp32 cos with bf16 q)
    if (q.requires_grad and q.is_leaf) or (k.requires_grad and k.is_leaf):
        return False  # a leaf that requires grad must not be modified
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return False
    (q_ok, q_extent), (k_ok, k_extent) = _layout(q), _layout(k)
    if not (q_ok and k_ok):
        return False
    rq, rk, rc, rs = _byte_range(q, q_extent), _byte_range(k, k_extent), _byte_range(cos), _byte_range(sin)
    if _overlap(rq, rk) or _overlap(rq, rc) or _overlap(rq, rs) or _overlap(rk, rc) or _overlap(rk, rs):
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
    if g.dtype != dtype or g.stride(-1) != 1 or not _layout(g)[0]:
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


_increment_version = torch.autograd.graph.increment_version


class RoPEFunction(torch.autograd.Function):
    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace=None):
        cos, sin = cos.contiguous(), sin.contiguous()  # the kernel indexes them as contiguous
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        if inplace:  # decided by apply_rope on the caller's tensors (inside here they are detached)
            _launch(q, k, q, k, cos, sin, False)  # (apply_rope checked: last dims contiguous)
            # the Triton store is invisible to autograd: bump the version counters so that a
            # tensor saved before the rotation (sharing this storage) fails loudly in backward
            if q.is_inference() or k.is_inference():
                for t in (q, k):
                    if not t.is_inference():
                        _increment_version(t)
            else:
                _increment_version((q, k))
            # returned as-is (not marked dirty): autograd hands out views of q / k with this
            # node as grad_fn -- no CopySlices on the projection output, no copies in backward
            return q, k
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
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
