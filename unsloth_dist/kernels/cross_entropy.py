"""Fused linear cross-entropy: ``hidden [N, H] @ weight[V, H]^T (+ bias) -> per-token CE``.

The ``[N, V]`` logits are never materialised for all tokens at once. The tokens are processed
in chunks of ``C`` rows; for each chunk

1. ``logits = h_chunk @ W^T (+ b)``                      (torch matmul, input dtype)
2. a Triton kernel computes, per row and in fp32, the (soft-capped) log-sum-exp with an
   online max/sum over the vocabulary, the token loss ``lse - z[target] + z_loss * lse^2``
   and -- when gradients are needed -- overwrites the logits buffer in place with
   ``d loss / d logits``
3. ``grad_h[chunk] = d_logits @ W`` and ``grad_W += d_logits^T @ h_chunk`` (and ``grad_b``).

So for ``reduction="sum"`` / ``"mean"`` both gradients are produced during the forward pass
(only they are kept, not the logits); the backward just scales them by the incoming gradient.
For ``reduction="none"`` the incoming gradient differs per token, so the forward only computes
the losses and the backward recomputes the logits chunk by chunk.

The chunk size is picked so that one chunk of logits is about as large as the hidden states
(``C ~ N / ceil(V / H)``, a power of two): peak memory is the gradients plus ~one hidden-sized
buffer.

Ignored tokens (``target == ignore_index``) add nothing to the loss or to any gradient, so when
skipping them saves whole chunks, only the other rows are computed (one host sync to count
them): they are gathered chunk by chunk into the not-yet-written part of ``grad_h`` (its compact
first rows), which then receives their input gradients, and is expanded to the token positions
in place at the end -- the same peak memory, ~10% fewer GEMM FLOPs at 10% ignored tokens (more
with masked prompts). The CE kernel's second pass walks each row backwards, so it starts with
the blocks the first pass read last (likely still in L2).

Options: ``ignore_index``; ``softcap`` (Gemma 2 final-logit soft-capping, ``cap * tanh(x / cap)``);
``z_loss`` (adds ``z_loss * lse^2`` per token); ``reduction`` ``"mean" | "sum" | "none"``;
``return_count`` (also return the number of non-ignored tokens, so a caller can normalise a
token-loss sum over many micro-batches / ranks itself). Losses are fp32; gradients come back
in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl

from ._utils import LazyKernel, cdiv, empty, next_pow2, poisoning, use_triton, warps_for

REDUCTIONS = ("mean", "sum", "none")

# --------------------------------------------------------------------------- reference


def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, *, ignore_index: int = -100,
                                         softcap: float | None = None, z_loss: float = 0.0,
                                         reduction: str = "mean", return_count: bool = False):
    """Plain PyTorch: materialise the logits, then (soft-cap and) cross-entropy in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    tok = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        tok = tok + torch.where(valid, z_loss * lse.pow(2), torch.zeros_like(lse))
    count = valid.sum()
    if reduction == "sum":
        loss = tok.sum()
    elif reduction == "mean":
        loss = tok.sum() / count
    elif reduction == "none":
        loss = tok
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return (loss, count) if return_count else loss


# --------------------------------------------------------------------------- kernel


def _ce_kernel(X, DX, stride_x, stride_dx, TARGET, LOSS, LSE, ROW_SCALE, stride_scale, V, ignore_index, softcap, z_loss,
               HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
               HAS_ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    t = tl.load(TARGET + row).to(tl.int64)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)

    # pass 1: online max / sum-exp over the vocabulary
    # the lowest finite float, not -inf: a first block of -inf logits (a masking bias) must not
    # give exp(-inf - -inf) = NaN; a logit at the lowest float still counts
    m = -3.4028234663852886e38
    s = 0.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        x = tl.where(mask, x, float("-inf"))
        new_m = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    lse = m + tl.log(s)

    # the target logit (read before pass 2 overwrites the row)
    xt = tl.load(x_row + t_safe).to(tl.float32)
    if HAS_SOFTCAP:
        xt = softcap * (2.0 * tl.sigmoid(2.0 * xt / softcap) - 1.0)
    loss = lse - xt
    if HAS_ZLOSS:
        loss += z_loss * lse * lse
    loss = tl.where(valid, loss, 0.0)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)

    # pass 2: d loss / d logits, written over the logits (each element is read before it is written)
    if COMPUTE_GRAD:
        coef = tl.where(valid, 1.0, 0.0)
        if HAS_ROW_SCALE:
            coef = coef * tl.load(ROW_SCALE + row * stride_scale).to(tl.float32)
        pscale = 1.0
        if HAS_ZLOSS:
            pscale = 1.0 + 2.0 * z_loss * lse
        # last block first: the blocks pass 1 read last are the likeliest to still be in L2
        n_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, n_blocks):
            cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                th = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
                z = softcap * th
            else:
                z = x
            g = tl.exp(z - lse) * pscale - tl.where(cols == t_safe, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            tl.store(dx_row + cols, (g * coef).to(DX.dtype.element_ty), mask=mask)


_kernel = LazyKernel(_ce_kernel, name="cross_entropy")


def default_chunk_size(N: int, V: int, H: int) -> int:
    """Rows per chunk: one chunk of logits ~ the size of the hidden states, a power of two."""
    chunks = max(1, cdiv(V, max(H, 1)))
    return max(1, min(next_pow2(cdiv(max(N, 1), chunks)), next_pow2(max(N, 1))))


def _block_v(V: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(next_pow2(V), 32768)
    return min(next_pow2(V), 4096)  # interpreter: a small cap so several blocks are exercised


def _run_chunk(logits, target_c, loss_c, lse_c, row_scale, ignore_index, softcap, z_loss, compute_grad):
    """Launch the CE kernel on one chunk; returns the buffer holding d_logits (the logits
    buffer itself, or a fresh NaN-poisoned one in poisoning mode). `row_scale` multiplies each
    row's gradient: a [rows] tensor, a 1-element tensor (the same for all rows) or None."""
    rows, V = logits.shape
    dx = logits
    if compute_grad and poisoning():
        dx = empty(logits.shape, logits.dtype, logits.device)  # every element must be written
    BLOCK_V = _block_v(V, logits.device)
    _kernel[(rows,)](
        logits, dx, logits.stride(0), dx.stride(0), target_c, loss_c, lse_c,
        row_scale if row_scale is not None else lse_c,
        (1 if row_scale.numel() > 1 else 0) if row_scale is not None else 0,
        V, ignore_index, float(softcap) if softcap is not None else 1.0, float(z_loss),
        HAS_SOFTCAP=softcap is not None, HAS_ZLOSS=bool(z_loss), COMPUTE_GRAD=compute_grad,
        HAS_ROW_SCALE=row_scale is not None, BLOCK_V=BLOCK_V,
        num_warps=warps_for(BLOCK_V) if logits.is_cuda else 4,
    )
    return dx


def _chunk_logits(h_c, weight, bias):
    if bias is None:
        return h_c @ weight.t()
    return torch.addmm(bias, h_c, weight.t())


def _plan_rows(target, ignore_index, n_valid, N, C, explicit):
    """Which rows to compute, in chunks of how many.

    Ignored tokens add nothing to the loss or to any gradient, so when dropping them saves
    whole chunks (of ~C rows: three GEMMs each), only the non-ignored rows are computed, in
    balanced chunks: returns ``(rows, ignored, C)`` with the sorted indices of both. Otherwise
    ``(None, None, C)``: all rows, in contiguous chunks."""
    if n_valid >= N or cdiv(n_valid, C) >= cdiv(N, C):
        return None, None, C
    # stable sort of "ignored?": the non-ignored indices first, ascending, then the ignored ones
    perm = torch.sort((target == ignore_index).to(torch.uint8), stable=True).indices
    rows, ignored = perm[:n_valid], perm[n_valid:]
    if n_valid and not explicit:
        chunks = cdiv(n_valid, C)
        balanced = cdiv(n_valid, chunks)
        C = min(C, cdiv(balanced, 16) * 16) if C >= 16 else balanced
    return rows, ignored, C


def _expand_rows(buf, rows, ignored, block):
    """`buf[:n]` holds, in order, the rows that belong at positions ``rows`` (ascending, so
    ``rows[j] >= j``): move them there, in place, then zero the rows at ``ignored``. Blocks go
    last to first through a block-sized copy; a block's destinations lie at or after its own
    sources and before the destinations already written, so no unread source is overwritten."""
    n = rows.numel()
    for end in range(n, 0, -block):
        start = max(0, end - block)
        buf.index_copy_(0, rows[start:end], buf[start:end].clone())
    if ignored.numel():
        buf.index_fill_(0, ignored, 0)


def _chunks(hidden, weight, bias, rows, C, target_r, loss_r, lse_r, row_scale_r, ignore_index, softcap, z_loss,
            compute_grad, grad_h, grad_w, grad_b):
    """The chunk loop. With `rows` (see `_plan_rows`), chunk i covers rows[i*C:(i+1)*C]; its
    hidden rows are gathered into grad_h[i*C:(i+1)*C] -- the compact slot its own input gradient
    is written to next (expanded afterwards by `_expand_rows`) -- so gathering costs no memory.
    `target_r`, `loss_r`, `lse_r`, `row_scale_r` are indexed like the computed rows. grad_W: the
    first chunk writes it (`mm(out=)`), the others accumulate (`addmm_`) in its dtype."""
    n = hidden.shape[0] if rows is None else rows.numel()
    per_row_scale = row_scale_r is not None and row_scale_r.numel() > 1
    for i, start in enumerate(range(0, n, C)):
        end = min(start + C, n)
        if rows is None:
            h_c = hidden[start:end]
        elif grad_h is not None:
            h_c = torch.index_select(hidden, 0, rows[start:end], out=grad_h[start:end])
        else:
            h_c = hidden.index_select(0, rows[start:end])
        logits = _chunk_logits(h_c, weight, bias)
        d = _run_chunk(logits, target_r[start:end], loss_r[start:end], lse_r[start:end],
                       row_scale_r[start:end] if per_row_scale else row_scale_r,
                       ignore_index, softcap, z_loss, compute_grad)
        if compute_grad:
            if grad_w is not None:
                if i == 0:
                    torch.mm(d.t(), h_c, out=grad_w)
                else:
                    grad_w.addmm_(d.t(), h_c)
            if grad_b is not None:
                grad_b += d.sum(0, dtype=torch.float32)  # no fp32 copy of the chunk
            if grad_h is not None:
                # last: h_c may be this very slice of grad_h, needed by the grad_W update above
                torch.mm(d, weight, out=grad_h[start:end])
        del logits, d
    return n


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    saves_output = False  # RoPE may rotate this output in place (kernels.rope._producer_forbids_in_place)

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, softcap, z_loss, reduction, chunk_size, need_grad):
        N, H = hidden.shape
        V = weight.shape[0]
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        target = target.contiguous()
        valid = target != ignore_index
        count = valid.sum()
        out_of_range = (valid & ((target < 0) | (target >= V))).sum()
        # the one host sync: how many rows there are to compute, and whether a target is outside the vocabulary
        n_valid, n_bad = torch.stack([count, out_of_range]).tolist()
        if n_bad:
            bad = target[valid & ((target < 0) | (target >= V))][0].item()
            raise IndexError(
                f"target {bad} is out of bounds for the {V} logits of the head ({n_bad} such label(s); labels are token "
                f"ids or ignore_index {ignore_index}): tokenize with the model's own tokenizer, or resize the "
                "embeddings and head after adding tokens (model.resize_token_embeddings(len(tokenizer)))")
        C = chunk_size or default_chunk_size(N, V, H)
        rows, ignored, C = _plan_rows(target, ignore_index, n_valid, N, C, chunk_size is not None)
        n = N if rows is None else n_valid
        target_r = target if rows is None else target.index_select(0, rows)
        loss_r = empty((n,), torch.float32, hidden.device)
        lse_r = empty((n,), torch.float32, hidden.device)
        # fp16: gradients computed here would be rounded to fp16 before the loss scale that backward
        # brings (GradScaler), so small ones underflow and, with the sum reduction, large grad_W
        # entries overflow whatever the scale; they are computed in backward then, from recomputed
        # logits, scaled by the incoming gradient as transformers' unfused loss is
        defer = need_grad and reduction != "none" and _defers(hidden.dtype, weight.dtype)
        grads_now = need_grad and reduction != "none" and not defer
        # "mean": the kernel scales d_logits by 1 / count, read from device memory (no sync)
        mean_scale = (1.0 / count.clamp(min=1).float()).reshape(1) if grads_now and reduction == "mean" else None
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = empty(hidden.shape, hidden.dtype, hidden.device) if grads_now and want_h else None
        grad_w = None
        if grads_now and want_w:
            grad_w = empty(weight.shape, weight.dtype, weight.device) if n > 0 else torch.zeros_like(weight)
        grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if grads_now and want_b else None
        _chunks(hidden, weight, bias, rows, C, target_r, loss_r, lse_r, mean_scale, ignore_index, softcap, z_loss,
                grads_now, grad_h, grad_w if n > 0 else None, grad_b)
        if rows is not None and grad_h is not None:
            _expand_rows(grad_h, rows, ignored, C)
        if reduction == "none":
            loss = loss_r if rows is None else torch.zeros(N, dtype=torch.float32, device=hidden.device).index_copy_(
                0, rows, loss_r)
        else:
            loss = loss_r.sum()
            if reduction == "mean":
                loss = loss / count
        ctx.reduction = reduction
        ctx.defer = defer
        ctx.mark_non_differentiable(count)
        if reduction == "none" or defer:
            ctx.count = count if reduction == "mean" else None
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.opts = (ignore_index, softcap, z_loss, C, want_h, want_w, want_b)
            ctx.rows = (rows, ignored)
        else:
            ctx.grads = (grad_h, grad_w, grad_b)
            ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        if ctx.reduction != "none" and not ctx.defer:
            if ctx.grads is None:
                raise RuntimeError(
                    "a second backward through unsloth_dist's fused linear cross-entropy (retain_graph=True): its "
                    "gradients were computed in the forward and handed out once. Backward once per forward, or "
                    "patch the model without it (patch_model(model, fused_cross_entropy=False))"
                )
            grad_h, grad_w, grad_b = ctx.grads
            ctx.grads = None
            g = grad_loss.float()
            # the usual `loss.backward()` passes 1: skip two passes over grad_h / grad_W then
            # (one host sync, as the backward starts)
            if not (g.numel() == 1 and float(g) == 1.0):
                if grad_h is not None:
                    grad_h.mul_(g)
                if grad_w is not None:
                    grad_w.mul_(g)
                if grad_b is not None:
                    grad_b = grad_b * g
            if grad_b is not None:
                grad_b = grad_b.to(ctx.bias_dtype)
            return grad_h, grad_w, grad_b, None, None, None, None, None, None, None

        hidden, weight, bias, target = ctx.saved_tensors
        ignore_index, softcap, z_loss, C, want_h, want_w, want_b = ctx.opts
        rows, ignored = ctx.rows
        ctx.rows = None
        N = hidden.shape[0]
        n = N if rows is None else rows.numel()
        target_r = target if rows is None else target.index_select(0, rows)
        if ctx.reduction == "none":
            row_scale = grad_loss.float().contiguous()
            if rows is not None:
                row_scale = row_scale.index_select(0, rows)
        else:  # deferred sum / mean: one scale for every row
            row_scale = grad_loss.float().reshape(1)
            if ctx.count is not None:
                row_scale = row_scale / ctx.count.clamp(min=1).float()
            ctx.count = None
        grad_h = empty(hidden.shape, hidden.dtype, hidden.device) if want_h else None
        grad_w = None
        if want_w:
            grad_w = empty(weight.shape, weight.dtype, weight.device) if n > 0 else torch.zeros_like(weight)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_b else None
        scratch_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        scratch_lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        _chunks(hidden, weight, bias, rows, C, target_r, scratch_loss, scratch_lse, row_scale, ignore_index, softcap,
                z_loss, True, grad_h, grad_w if n > 0 else None, grad_b)
        if rows is not None and grad_h is not None:
            _expand_rows(grad_h, rows, ignored, C)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def reads_weight_in_backward(hidden: torch.Tensor, reduction: str) -> bool:
    """Whether :func:`fused_linear_cross_entropy` on `hidden` keeps `weight` for its backward: the
    PyTorch reference (no Triton for this device) is plain autograd (``F.linear`` saves it) and the
    ``"none"`` reduction and fp16 recompute the logits; the Triton path with ``"sum"`` / ``"mean"`` in
    bf16 / fp32 computes every gradient in the forward and does not. (An FSDP2 head of its own need not be gathered again
    for backward then: models.patching.)"""
    if reduction not in ("sum", "mean") or not use_triton(hidden):
        return True
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _defers(dtype, dtype)


def _defers(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether the sum / mean reductions compute their gradients in backward (fp16: see the forward)."""
    return torch.float16 in (hidden_dtype, weight_dtype)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               softcap: float | None = None, z_loss: float = 0.0, reduction: str = "mean",
                               return_count: bool = False, chunk_size: int | None = None):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target`` without materialising
    the full logits. ``hidden`` is ``[N, H]`` (leading dims are flattened), ``target`` ``[N]``.

    Returns the loss (fp32; a scalar, or ``[N]`` for ``reduction="none"``), and with
    ``return_count=True`` also the number of non-ignored tokens (int64 tensor).
    Triton on CUDA / under TRITON_INTERPRET=1, the PyTorch reference otherwise."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    H = hidden.shape[-1]
    hidden = hidden.reshape(-1, H)
    target = target.reshape(-1)
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target has {target.shape[0]} tokens, hidden has {hidden.shape[0]}")
    if weight.shape[-1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {H}")
    if not use_triton(hidden):
        return fused_linear_cross_entropy_reference(hidden, weight, target.to(hidden.device), bias,
                                                    ignore_index=ignore_index, softcap=softcap, z_loss=z_loss,
                                                    reduction=reduction, return_count=return_count)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # what F.linear does under autocast: compute in the autocast dtype
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    need_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    with torch.autocast(dev, enabled=False):
        loss, count = FusedLinearCrossEntropyFunction.apply(
            hidden, weight, bias, target.to(hidden.device), int(ignore_index), softcap, float(z_loss), reduction,
            chunk_size, need_grad)
    return (loss, count) if return_count else loss
