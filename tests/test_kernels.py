"""The Triton kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1), against their PyTorch
references: forward and backward on fresh random inputs -- non-power-of-two sizes, odd token
counts, rows shorter than one block, several blocks per row, several chunks -- fp32 to ~1e-5
relative, bf16 to 1e-2. Every buffer a kernel writes is allocated full of NaN first
(`poison_outputs`), so an element a kernel forgets to write fails the comparison, and every test
asserts that the Triton kernel really ran (launch counters).

Triton decides at import time whether its own library (tl.sum, ...) is interpreted, so
TRITON_INTERPRET=1 must be set before the first `import triton` of the process -- and importing
transformers' modeling code imports triton (through torch). When this module is imported before
that (e.g. `pytest tests/test_kernels.py ...` first on the command line) the checks run in this
process; otherwise (or on a machine with CUDA, where the rest of the session needs compiled
Triton) `test_kernel_checks_in_interpreter_child` re-runs this file in a child process that has
the variable set from the start.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import zlib

import torch


# TRITON_INTERPRET is prepared for the first `import triton` in tests/conftest.py

import pytest  # noqa: E402

from unsloth_dist import kernels as K  # noqa: E402
from unsloth_dist.kernels._utils import triton_interpreter_ready  # noqa: E402

IN_PROCESS = triton_interpreter_ready()
needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton already imported in compiled mode: "
                                  "covered by test_kernel_checks_in_interpreter_child")


def _rne_bf16_casts(monkeypatch) -> None:
    """Triton's interpreter converts fp32 -> bf16 by truncating the mantissa, where the GPU
    backends round to nearest even; truncation biases every bf16 result towards zero (up to 2^-7
    relative per rounding). Install round-to-nearest-even for that one conversion so the bf16
    checks measure the kernels, not the interpreter."""
    import numpy as np
    from triton.runtime import interpreter as ti

    import triton.language as tl

    original = ti.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return ti.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(ti.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """Triton interpreter on (bf16 casts rounding like a GPU), outputs poisoned, for every
    kernel check."""
    if IN_PROCESS:
        _rne_bf16_casts(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # stable across processes (str hash() is randomised); UNSLOTH_TEST_SEED shifts it for sweeps
    torch.manual_seed(zlib.crc32(request.node.name.encode()) + int(os.environ.get("UNSLOTH_TEST_SEED", "0")))
    with K.poison_outputs():
        yield


def launched(name: str):
    """Context: asserts that the Triton kernel `name` was launched inside."""
    class _C:
        def __enter__(self):
            self.before = K.LAUNCHES[name]

        def __exit__(self, *exc):
            if exc[0] is None:
                assert K.LAUNCHES[name] > self.before, f"Triton kernel {name} did not run (reference path taken?)"
            return False

    return _C()


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: elementwise rtol 1e-5 (atol 1e-5 of the largest magnitude). bf16 (against the fp32
    reference on the same bf16-rounded inputs): normwise relative error <= 1e-2 and no element off
    by more than 2e-2 of the largest magnitude (bf16 keeps ~3 significant digits; the fused CE
    stores d_logits and accumulates grad_W over chunks in bf16, like Liger-Kernel's).
    NaN anywhere (an unwritten poisoned element) fails."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN in result (an element the kernel did not write)"
    g, r = got.double(), ref.double()
    scale = max(r.abs().max().item(), 1e-12)
    if dtype == torch.float32:
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
    else:
        rel = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        worst = (g - r).abs().max().item() / scale
        assert rel <= 1e-2 and worst <= 2e-2, (
            f"{what}: normwise relative error {rel:.3g} (max 1e-2), worst element {worst:.3g} of the "
            "largest magnitude (max 2e-2)")


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# --------------------------------------------------------------------------- RMSNorm


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 7), (37, 96), (2, 5, 130)], ids=["short-row", "odd-rows", "3d-130"])
def test_rmsnorm(shape, gemma, dtype):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype).mul_(3).requires_grad_()
    w = (torch.randn(N) * 0.5 + (0.0 if gemma else 1.0)).to(dtype).requires_grad_()
    offset = 1.0 if gemma else 0.0
    with launched("rmsnorm_fwd"):
        y = K.rms_norm(x, w, 1e-6, offset, gemma)
    ref = K.rms_norm_reference(x, w, 1e-6, offset, gemma)
    assert y.dtype == ref.dtype
    gy = torch.randn_like(ref)
    with launched("rmsnorm_bwd"):
        dx, dw = grads(y, (x, w), gy)
    if dtype == torch.float32:
        rdx, rdw = grads(ref, (x, w), gy)
    else:  # bf16: against the same function in fp32 (on the same bf16-rounded inputs)
        xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = K.rms_norm_reference(xf, wf, 1e-6, offset, gemma)
        rdx, rdw = grads(ref, (xf, wf), gy.float())
    close(y, ref, dtype, "y")
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dw")


@needs_interp
def test_rmsnorm_mixed_dtypes_like_hf():
    """bf16 activations with an fp32 weight (autocast without casting the params): HF's Llama norm
    returns fp32 (weight * x.to(bf16)); Gemma's returns the input dtype."""
    x = torch.randn(9, 40, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    for gemma in (False, True):
        with launched("rmsnorm_fwd"):
            y = K.rms_norm(x, w, 1e-5, 1.0 if gemma else 0.0, gemma)
        ref = K.rms_norm_reference(x, w, 1e-5, 1.0 if gemma else 0.0, gemma)
        assert y.dtype == ref.dtype == (torch.bfloat16 if gemma else torch.float32)
        gy = torch.randn_like(ref)
        dx, dw = grads(y, (x, w), gy)
        rdx, rdw = grads(ref, (x, w), gy)
        assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
        close(y, ref, torch.bfloat16, "y")
        close(dx, rdx, torch.bfloat16, "dx")
        close(dw, rdw, torch.bfloat16, "dw")


# --------------------------------------------------------------------------- RoPE


def _hf_cos_sin(position_ids, head_dim, rope_parameters=None, dtype=torch.float32):
    """cos/sin exactly as transformers' Llama rotary module computes them (all rope types)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=64)
    if rope_parameters:
        kw["rope_parameters"] = rope_parameters
    cfg = LlamaConfig(**kw)
    rot = LlamaRotaryEmbedding(cfg)
    return rot(torch.zeros(1, dtype=dtype), position_ids)


def _qk(B, HQ, HK, T, D, dtype):
    # HF layout: projections viewed [B, T, H, D] then transposed to [B, H, T, D] (non-contiguous)
    q = torch.randn(B, T, HQ, D, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, HK, D, dtype=dtype).transpose(1, 2).requires_grad_()
    return q, k


ROPE_TYPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,D", [((4, 2), 16), ((3, 1), 24), ((2, 2), 6)], ids=["gqa4-2-d16", "gqa3-1-d24", "mha-d6"])
def test_rope(heads, D, dtype):
    B, T = 2, 7
    HQ, HK = heads
    q, k = _qk(B, HQ, HK, T, D, dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = _hf_cos_sin(pos, D, dtype=dtype)
    with launched("rope"):
        qo, ko = K.apply_rope(q, k, cos, sin)
    rq, rk = K.rope_reference(q, k, cos, sin)
    assert qo.dtype == rq.dtype and qo.shape == rq.shape and ko.shape == rk.shape
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    with launched("rope"):
        dq, dk = grads((qo, ko), (q, k), (gq, gk))
    rdq, rdk = grads((rq, rk), (q, k), (gq, gk))
    for a, b, n in ((qo, rq, "q"), (ko, rk, "k"), (dq, rdq, "dq"), (dk, rdk, "dk")):
        close(a, b, dtype, n)


@needs_interp
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rope_scaling_variants_and_broadcast_cos(rope_type):
    """cos/sin from HF's rotary module for every rope-scaling type; cos with batch dim 1 (HF's
    default position_ids) broadcast over the batch."""
    B, T, D = 3, 5, 16
    q, k = _qk(B, 4, 2, T, D, torch.float32)
    cos, sin = _hf_cos_sin(torch.arange(20, 20 + T)[None], D, ROPE_TYPES[rope_type])
    assert cos.shape[0] == 1
    with launched("rope"):
        qo, ko = K.apply_rope(q, k, cos, sin)
    rq, rk = K.rope_reference(q, k, cos, sin)
    g = torch.randn_like(rq), torch.randn_like(rk)
    dq, dk = grads((qo, ko), (q, k), g)
    rdq, rdk = grads((rq, rk), (q, k), g)
    for a, b, n in ((qo, rq, "q"), (ko, rk, "k"), (dq, rdq, "dq"), (dk, rdk, "dk")):
        close(a, b, torch.float32, f"{rope_type} {n}")


@needs_interp
def test_rope_packed_sequences_restart_at_zero():
    """A packed row whose position_ids restart at 0 rotates each sequence exactly as if it were
    alone in its own row."""
    D, lens = 16, (4, 6, 3)
    T = sum(lens)
    q, k = _qk(1, 4, 2, T, D, torch.float32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cos, sin = _hf_cos_sin(pos, D)
    with launched("rope"):
        qo, ko = K.apply_rope(q, k, cos, sin)
    start = 0
    for n in lens:
        c1, s1 = _hf_cos_sin(torch.arange(n)[None], D)
        sq, sk = K.apply_rope(q[:, :, start:start + n], k[:, :, start:start + n], c1, s1)
        close(qo[:, :, start:start + n], sq, torch.float32, "packed q")
        close(ko[:, :, start:start + n], sk, torch.float32, "packed k")
        start += n
    rq, rk = K.rope_reference(q, k, cos, sin)
    close(qo, rq, torch.float32, "q")
    close(ko, rk, torch.float32, "k")


@needs_interp
@pytest.mark.parametrize("block_t", [None, 1, 2, 4, 16], ids=lambda b: f"bt{b}")
@pytest.mark.parametrize("T", [1, 5, 9], ids=lambda t: f"T{t}")
def test_rope_token_tiling_tails(monkeypatch, block_t, T):
    """Several tokens per program (the BLOCK_T tunable, automatic or forced, with a forced warp
    count): token counts not a multiple of the tile (masked tails), one token, per-batch cos
    (COS_BATCHED) and broadcast cos, out of place (leaves) and in place (projection views);
    poisoned outputs catch unwritten tails, and the program count follows the tile."""
    from unsloth_dist.kernels import rope as R

    monkeypatch.setattr(R, "BLOCK_T", block_t)
    monkeypatch.setattr(R, "NUM_WARPS", None if block_t is None else 2)
    B, HQ, HK, D = 2, 3, 1, 12
    bt = R._config(HQ, HK, D, T)[0]
    assert bt >= 1 and bt & (bt - 1) == 0 and (block_t is None or bt == min(block_t, 1 << (T - 1).bit_length()))
    for batched_cos in (True, False):
        pos = (torch.arange(T)[None] + torch.tensor([[0], [5]])) if batched_cos else torch.arange(3, 3 + T)[None]
        cos, sin = _hf_cos_sin(pos, D)
        q, k = _qk(B, HQ, HK, T, D, torch.float32)
        with launched("rope"):
            qo, ko = K.apply_rope(q, k, cos, sin)  # leaves: out of place
        rq, rk = K.rope_reference(q, k, cos, sin)
        g = torch.randn_like(rq), torch.randn_like(rk)
        dq, dk = grads((qo, ko), (q, k), g)
        rdq, rdk = grads((rq, rk), (q, k), g)
        for a, b, n in ((qo, rq, "q"), (ko, rk, "k"), (dq, rdq, "dq"), (dk, rdk, "dk")):
            close(a, b, torch.float32, f"T={T} bt={bt} batched={batched_cos} {n}")
        x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
        qp, kp, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
        rq, rk = K.rope_reference(*_projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)[:2], cos, sin)
        ptr = qp.data_ptr()
        qo, ko = K.apply_rope(qp, kp, cos, sin)  # projection views: in place
        assert qo.data_ptr() == ptr, "not rotated in place"
        g = torch.randn_like(rq), torch.randn_like(rk)
        got = grads((qo, ko), (x, wq, wk), g)
        want = grads((rq, rk), (x, wq, wk), g)
        for a, b, n in ((qo, rq, "q"), (ko, rk, "k"), *zip(got, want, ("dx", "dwq", "dwk"))):
            close(a, b, torch.float32, f"in-place T={T} bt={bt} batched={batched_cos} {n}")


def test_rope_cheap_layout_and_alias_checks():
    """The O(1) host-side checks (cached per layout) agree with what they stand for."""
    from unsloth_dist.kernels import rope as R

    x = torch.randn(2, 6, 4, 8)
    v = x.transpose(1, 2)
    assert R._no_internal_overlap(v) and R._no_internal_overlap(v)  # second call: cached
    assert not R._no_internal_overlap(torch.randn(1, 4, 8).expand(3, 4, 8))
    assert R._no_internal_overlap(torch.randn(3, 1, 8).expand(3, 1, 8))  # size-1 dims ignored
    assert R._byte_range(v) == (x.data_ptr(), x.data_ptr() + x.numel() * 4)
    assert R._byte_range(torch.empty(0, 3))[1] == R._byte_range(torch.empty(0, 3))[0]
    assert R._may_alias(x[:, :3], x[:, 2:]) and not R._may_alias(x[:1], x[1:])
    assert not R._may_alias(x, torch.randn(2, 6, 4, 8))
    qkv = torch.randn(2, 5, 3 * 16)  # a fused projection: q and k interleave per token
    q, k = qkv[..., :16].view(2, 5, 2, 8), qkv[..., 16:32].view(2, 5, 2, 8)
    assert R._may_alias(q, k)


def _projected_qk(B, HQ, HK, T, D, dtype, x=None, wq=None, wk=None):
    """q, k as HF's attention makes them: projection outputs [B, T, H*D] viewed [B, T, H, D] and
    transposed to [B, H, T, D] (non-contiguous, non-leaf). Returns (q, k, q_proj_out, k_proj_out)."""
    pq = x @ wq.t()
    pk = x @ wk.t()
    return (pq.view(B, T, HQ, D).transpose(1, 2), pk.view(B, T, HK, D).transpose(1, 2), pq, pk)


def _proj_inputs(B, T, HQ, HK, D, dtype, E=12):
    x = torch.randn(B, T, E, dtype=dtype, requires_grad=True)
    wq = (torch.randn(HQ * D, E) * 0.3).to(dtype).requires_grad_()
    wk = (torch.randn(HK * D, E) * 0.3).to(dtype).requires_grad_()
    return x, wq, wk


def _sdpa_loss(qo, ko, v):
    o = torch.nn.functional.scaled_dot_product_attention(qo, ko, v, is_causal=True, enable_gqa=True)
    return (o.float() ** 2).sum()


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)], ids=["gqa4-2", "mha3", "mqa6-1"])
def test_rope_in_place_on_hf_projection_views(heads, dtype):
    """The HF path: q / k strided views of projection outputs are rotated in their own storage
    (no copy, no new buffer: the results are views of the projection outputs), and the
    gradients through attention -- whose backward hands over buffers the RoPE backward then
    overwrites -- match the reference."""
    B, T, D = 2, 6, 16
    HQ, HK = heads
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, dtype)
    v = torch.randn(B, HK, T, D, dtype=dtype, requires_grad=True)
    cos, sin = _hf_cos_sin(torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 0, 1, 2]]), D, dtype=dtype)
    q, k, pq, pk = _projected_qk(B, HQ, HK, T, D, dtype, x, wq, wk)
    assert not q.is_contiguous() and q.grad_fn is not None
    rq, rk = K.rope_reference(q, k, cos, sin)  # before: the kernel overwrites q / k
    with launched("rope"):
        qo, ko = K.apply_rope(q, k, cos, sin)
    assert qo.data_ptr() == pq.data_ptr() and ko.data_ptr() == pk.data_ptr(), "not rotated in place"
    for a, b in ((qo, q), (ko, k)):
        assert [st for st, n in zip(a.stride(), a.shape) if n > 1] == [st for st, n in zip(b.stride(), b.shape) if n > 1]
    close(qo, rq, dtype, "q")
    close(ko, rk, dtype, "k")
    with launched("rope"):
        got = grads(_sdpa_loss(qo, ko, v), (x, wq, wk, v), torch.ones(()))
    q2, k2, _, _ = _projected_qk(B, HQ, HK, T, D, dtype, x, wq, wk)
    want = grads(_sdpa_loss(*K.rope_reference(q2, k2, cos, sin), v), (x, wq, wk, v), torch.ones(()))
    for name, a, b in zip(("dx", "dWq", "dWk", "dv"), got, want):
        close(a, b, dtype, name)


@needs_interp
def test_rope_backward_overwrites_only_gradients_it_owns():
    """The backward rotates the incoming gradient in place only when nothing else refers to it:
    gradients passed by the caller are left untouched, and expanded ones (`.sum()`) work."""
    from unsloth_dist.kernels import rope as R

    B, T, HQ, HK, D = 2, 5, 4, 2, 8
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
    cos, sin = _hf_cos_sin(torch.arange(T)[None], D)
    q, k, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
    qo, ko = K.apply_rope(q, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    gq0, gk0 = gq.clone(), gk.clone()
    got = grads((qo, ko), (x, wq, wk), (gq, gk))
    assert torch.equal(gq, gq0) and torch.equal(gk, gk0), "a caller's gradient was modified"
    q2, k2, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
    want = grads(K.rope_reference(q2, k2, cos, sin), (x, wq, wk), (gq, gk))
    for a, b in zip(got, want):
        close(a, b, torch.float32, "d (caller's gradient)")
    # expanded incoming gradients (sum backward): made contiguous, then owned
    q, k, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
    qo, ko = K.apply_rope(q, k, cos, sin)
    got = grads(qo.sum() + 2 * ko.sum(), (x, wq, wk), torch.ones(()))
    q2, k2, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
    rq, rk = K.rope_reference(q2, k2, cos, sin)
    want = grads(rq.sum() + 2 * rk.sum(), (x, wq, wk), torch.ones(()))
    for a, b in zip(got, want):
        close(a, b, torch.float32, "d (expanded gradient)")
    # the ownership test itself on tensors it must never claim
    assert not R._owned_gradient(torch.randn(1, 4).expand(3, 4), torch.float32)
    assert not R._owned_gradient(torch.randn(3, 4), torch.bfloat16)


@needs_interp
@pytest.mark.parametrize("how", ["leaf", "view-of-leaf", "inplace-false", "auto-no-grad-fn", "fp32-cos", "q-is-k",
                                 "producer-saved-output", "expanded"])
def test_rope_falls_back_out_of_place_and_leaves_inputs_alone(how):
    B, T, HQ, HK, D = 2, 5, 2, 2, 8
    dtype = torch.bfloat16 if how == "fp32-cos" else torch.float32
    cos, sin = _hf_cos_sin(torch.arange(T)[None], D, dtype=torch.float32 if how == "fp32-cos" else dtype)
    kw = {}
    if how == "leaf":
        q, k = _qk(B, HQ, HK, T, D, dtype)
        x = q
        kw = dict(inplace=True)  # asked, but a leaf that requires grad cannot be modified
    elif how == "view-of-leaf":  # slices of leaves that require grad: have a grad_fn, still a leaf's memory
        ql, kl = _qk(B, HQ, HK, T + 2, D, dtype)
        q, k = ql[:, :, 1:-1], kl[:, :, 2:]
        x = ql  # gradients checked w.r.t. this leaf
        kw = dict(inplace=True)
    elif how == "auto-no-grad-fn":
        q, k = _qk(B, HQ, HK, T, D, dtype)
        q, k = q.detach(), k.detach()
    elif how == "producer-saved-output":  # exp saves its output for backward
        x = torch.randn(B, T, HQ * D, requires_grad=True)
        q = (x * 0.3).exp().view(B, T, HQ, D).transpose(1, 2)
        k = (x * 0.2).exp().view(B, T, HK, D).transpose(1, 2)
    elif how == "expanded":
        x = torch.randn(B, 1, HQ, D, requires_grad=True)
        q = (x * 1.0).expand(B, T, HQ, D).transpose(1, 2)
        k = (x * 2.0).expand(B, T, HK, D).transpose(1, 2)
        kw = dict(inplace=True)
    else:
        x, wq, wk = _proj_inputs(B, T, HQ, HK, D, dtype)
        q, k, _, _ = _projected_qk(B, HQ, HK, T, D, dtype, x, wq, wk)
        if how == "inplace-false":
            kw = dict(inplace=False)
        if how == "q-is-k":
            k = q
    q0, k0 = q.detach().clone(), k.detach().clone()
    rq, rk = K.rope_reference(q, k, cos, sin)
    with launched("rope"):
        qo, ko = K.apply_rope(q, k, cos, sin, **kw)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0), "input modified on a fallback"
    assert qo.dtype == rq.dtype
    close(qo, rq, dtype, "q")
    close(ko, rk, dtype, "k")
    if q.requires_grad:
        leaves = [x]
        g = torch.randn_like(rq), torch.randn_like(rk)
        got = torch.autograd.grad((qo, ko), leaves, g, retain_graph=True)
        want = torch.autograd.grad((rq, rk), leaves, g)
        for a, b in zip(got, want):
            close(a, b, dtype, "grad")


@needs_interp
def test_rope_in_place_with_inplace_true_under_no_grad():
    """The patched HF attention passes inplace=True: under no_grad (inference) the projection
    outputs have no grad_fn and are still rotated in place."""
    B, T, HQ, HK, D = 1, 4, 2, 1, 8
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
    cos, sin = _hf_cos_sin(torch.arange(T)[None], D)
    with torch.no_grad():
        q, k, pq, pk = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
        rq, rk = K.rope_reference(q, k, cos, sin)
        qo, ko = K.apply_rope(q, k, cos, sin, inplace=True)
    assert qo.data_ptr() == pq.data_ptr() and ko.data_ptr() == pk.data_ptr()
    close(qo, rq, torch.float32, "q")
    close(ko, rk, torch.float32, "k")


@needs_interp
def test_rope_in_place_a_saved_pre_rotation_tensor_fails_loudly():
    """Another op that saved q before the in-place rotation would compute a wrong gradient: the
    kernel bumps the version counter, so that backward raises instead (as for any in-place op)."""
    B, T, HQ, HK, D = 1, 4, 2, 1, 8
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
    cos, sin = _hf_cos_sin(torch.arange(T)[None], D)
    q, k, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
    side = (q * wq.sum()).sum()  # mul saves q
    qo, ko = K.apply_rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (side + qo.sum() + ko.sum()).backward()


@needs_interp
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_rope_in_place_under_activation_checkpointing(reentrant):
    """Activation checkpointing runs the forward again during backward: the in-place rotation
    then happens on the recomputed projections, never on a tensor rotated before, and the
    gradients match the reference."""
    from torch.utils.checkpoint import checkpoint

    B, T, HQ, HK, D = 2, 5, 4, 2, 8
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
    v = torch.randn(B, HK, T, D, requires_grad=True)
    cos, sin = _hf_cos_sin(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]]), D)

    def block(x, v, fn):
        q, k, _, _ = _projected_qk(B, HQ, HK, T, D, torch.float32, x, wq, wk)
        qo, ko = fn(q, k, cos, sin, inplace=True) if fn is K.apply_rope else fn(q, k, cos, sin)
        o = torch.nn.functional.scaled_dot_product_attention(qo, ko, v, is_causal=True, enable_gqa=True)
        return o * 1.5

    def backward_grads(loss):  # reentrant checkpointing supports .backward() only
        for t in (x, wq, wk, v):
            t.grad = None
        loss.backward()
        return [t.grad for t in (x, wq, wk, v)]

    before = K.LAUNCHES["rope"]
    out = checkpoint(block, x, v, K.apply_rope, use_reentrant=reentrant)
    got = backward_grads((out ** 2).sum())
    assert K.LAUNCHES["rope"] - before == 3, "forward, recomputed forward, backward"
    want = backward_grads((block(x, v, K.rope_reference) ** 2).sum())
    for name, a, b in zip(("dx", "dWq", "dWk", "dv"), got, want):
        close(a, b, torch.float32, name)


@needs_interp
@pytest.mark.parametrize("producer", ["rms_norm", "lora_delta", "foreign"])
def test_rope_after_a_custom_function_under_checkpointing_does_not_recompute_in_forward(producer):
    """q / k made by a custom autograd.Function (Qwen3's q_norm / k_norm through our RMSNorm, a
    fused LoRA projection, another library's Function) inside a non-reentrant checkpoint: deciding
    whether to rotate in place must not unpack the producer's saved tensors, which would run the
    checkpointed block again in the forward. Ours declare `saves_output = False` (in place); a
    foreign one is not inspected (out of place). Gradients match the reference either way."""
    from torch.utils.checkpoint import checkpoint

    from unsloth_dist.kernels import lora as L

    B, T, HQ, HK, D = 2, 5, 2, 2, 8
    x, wq, wk = _proj_inputs(B, T, HQ, HK, D, torch.float32)
    v = torch.randn(B, HK, T, D, requires_grad=True)
    nw = (torch.randn(D) * 0.1 + 1).requires_grad_()
    a = (torch.randn(4, x.shape[-1]) * 0.3).requires_grad_()
    bq, bk = (torch.randn(HQ * D, 4) * 0.3).requires_grad_(), (torch.randn(HK * D, 4) * 0.3).requires_grad_()
    cos, sin = _hf_cos_sin(torch.arange(T)[None].expand(B, T), D)
    calls = {"n": 0}

    class Foreign(torch.autograd.Function):  # saves its input only, declares nothing
        @staticmethod
        def forward(ctx, t):
            calls["n"] += 1
            ctx.save_for_backward(t)
            return t * 2.0

        @staticmethod
        def backward(ctx, g):
            return g * 2.0

    def block(x, v, rope, norm, lora):
        pq, pk = x @ wq.t(), x @ wk.t()
        if producer == "lora_delta":
            pq, pk = lora(pq, x, a, bq, 0.5), lora(pk, x, a, bk, 0.5)
        q, k = pq.view(B, T, HQ, D), pk.view(B, T, HK, D)
        if producer == "rms_norm":
            q, k = norm(q, nw, 1e-6), norm(k, nw, 1e-6)
        if producer == "foreign":
            q, k = Foreign.apply(q), Foreign.apply(k)
        qo, ko = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return torch.nn.functional.scaled_dot_product_attention(qo, ko, v, is_causal=True, enable_gqa=True)

    real = L._AddLoraUpdate.forward

    def counted_lora(ctx, *args):
        calls["n"] += 1
        return real(ctx, *args)

    def ours(q, k, cos, sin):
        out = K.apply_rope(q, k, cos, sin, inplace=None)
        calls["in_place"] = calls.get("in_place", True) and out[0].data_ptr() == q.data_ptr()
        return out

    def norm(t, w, eps):
        calls["n"] += 1
        return K.rms_norm(t, w, eps)

    L._AddLoraUpdate.forward = staticmethod(counted_lora)
    try:
        out = checkpoint(block, x, v, ours, norm, L.lora_delta, use_reentrant=False)
        assert calls["n"] == 2, f"{producer}: the producer ran {calls['n']} times in the forward (recomputed there)"
        leaves = (x, wq, wk, v, nw, a, bq, bk)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g, allow_unused=True)
        assert calls["n"] == 4  # and once more each in the backward's recompute
    finally:
        L._AddLoraUpdate.forward = staticmethod(real)
    assert calls["in_place"] == (producer != "foreign")
    want = torch.autograd.grad(block(x, v, K.rope_reference, lambda t, w, e: K.rms_norm_reference(t, w, e),
                                     L.lora_delta_reference), leaves, g, allow_unused=True)
    for i, (p, r) in enumerate(zip(got, want)):
        assert (p is None) == (r is None), i
        if p is not None:
            close(p, r, torch.float32, f"{producer} grad {i}")


# --------------------------------------------------------------------------- SwiGLU / GeGLU


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 37), (2, 1500)], ids=["short", "odd-3d", "multi-block"])
def test_glu(shape, activation, dtype):
    a = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    b = torch.randn(shape, dtype=dtype).requires_grad_()
    with launched("glu_fwd"):
        h = K.glu(a, b, activation)
    gh = torch.randn_like(h)
    with launched("glu_bwd"):
        da, db = grads(h, (a, b), gh)
    af, bf = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = K.glu_reference(af, bf, activation)
    rda, rdb = grads(ref, (af, bf), gh.float())
    assert h.dtype == dtype and da.dtype == dtype
    close(h, ref, dtype, "h")
    close(da, rda, dtype, "d gate")
    close(db, rdb, dtype, "d up")


@needs_interp
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_backward_reusing_activation_buffers(activation):
    """Without poisoning, the backward writes the gradients over the saved gate/up activations
    (intermediate tensors); the result must be the same."""
    with K.poison_outputs(False):
        x = torch.randn(11, 53, requires_grad=True)
        y = torch.randn(11, 53, requires_grad=True)
        a, b = x * 1.5, y - 0.25  # non-leaf activations, like gate_proj(x) / up_proj(x)
        with launched("glu_bwd"):
            dx, dy = grads(K.glu(a, b, activation), (x, y), torch.ones(11, 53))
        rdx, rdy = grads(K.glu_reference(x * 1.5, y - 0.25, activation), (x, y), torch.ones(11, 53))
    close(dx, rdx, torch.float32, "dx")
    close(dy, rdy, torch.float32, "dy")


@needs_interp
def test_second_backward_through_reusing_kernels_is_an_error():
    """retain_graph=True: the GLU backward wrote its gradients over the saved activations, the fused
    cross-entropy handed out the gradients it computed in forward; a second backward through either
    raises instead of returning wrong gradients (or a TypeError)."""
    with K.poison_outputs(False):
        x = torch.randn(5, 16, requires_grad=True)
        out = K.glu(x * 1.5, x - 0.25, "silu")
        out.sum().backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward through unsloth_dist's fused GLU"):
            out.sum().backward()
        h = torch.randn(6, 8, requires_grad=True)
        w = torch.randn(33, 8, requires_grad=True)
        loss = K.fused_linear_cross_entropy(h, w, torch.randint(0, 33, (6,)), reduction="sum")
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward through unsloth_dist's fused linear cross-entropy"):
            loss.backward()


# --------------------------------------------------------------------------- 4-bit dequantization (QLoRA)


def _quantized(shape, quant_type, nested, storage, blocksize, dtype=torch.bfloat16):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(shape) * 0.02).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                              quant_storage=storage)


@needs_interp
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16-storage"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
@pytest.mark.parametrize("quant_type,blocksize,shape", [("nf4", 64, (97, 192)), ("fp4", 128, (40, 384)),
                                                        ("nf4", 256, (7, 2304))], ids=["nf4-64", "fp4-128", "nf4-256"])
def test_dequantize_4bit_is_bitsandbytes_bit_for_bit(quant_type, blocksize, shape, nested, storage):
    """One launch, both levels of scales: the fp32 result equals bitsandbytes' exactly, the bf16 one
    equals its single rounding; sizes that end mid-program (poisoned output). (Rows are whole
    blocks here: bitsandbytes' CPU library dequantizes rows that end mid-block differently from its
    CUDA and generic code, which block the flat weight as this kernel does.)"""
    import copy

    import bitsandbytes.functional as bnbf

    q, qs = _quantized(shape, quant_type, nested, storage, blocksize)
    assert qs.nested == nested
    qs32 = copy.copy(qs)
    qs32.dtype = torch.float32
    ref32 = bnbf.dequantize_4bit(q, qs32)
    with launched("dequant4"):
        got32 = K.dequantize_4bit(q, qs, torch.float32)
        got = K.dequantize_4bit(q, qs)
    assert got.dtype == torch.bfloat16 and got.shape == shape
    assert torch.equal(got32, ref32)
    assert torch.equal(got, ref32.to(torch.bfloat16))
    assert torch.equal(got, bnbf.dequantize_4bit(q, qs))  # bitsandbytes' own bf16 output (round to nearest even)


@needs_interp
def test_dequantize_4bit_refuses_what_it_does_not_cover():
    """Too few packed bytes, or an odd element count (bitsandbytes packs (N*K+1)//2 bytes): an error
    naming the reference; `kernel_supports` is what the patched QLoRA forward checks first."""
    from unsloth_dist.kernels.quant import kernel_supports

    q, qs = _quantized((16, 64), "nf4", True, torch.uint8, 64)
    assert kernel_supports(q, qs)
    with pytest.raises(ValueError, match="dequantize_4bit_reference"):
        K.dequantize_4bit(q[: q.numel() // 2], qs)
    q, qs = _quantized((3, 65), "nf4", True, torch.uint8, 64)
    assert not kernel_supports(q, qs)
    with pytest.raises(ValueError, match="dequantize_4bit_reference"):
        K.dequantize_4bit(q, qs)


@needs_interp
def test_dequantize_4bit_decodes_with_the_fixed_table_as_bitsandbytes():
    """bitsandbytes decodes with its fixed table of the quant type, not the ``code`` a QuantState
    carries (e.g. one loaded from a checkpoint in another dtype): so does the kernel."""
    import bitsandbytes.functional as bnbf

    q, qs = _quantized((8, 128), "nf4", True, torch.uint8, 64)
    want = bnbf.dequantize_4bit(q, qs)
    qs.code = qs.code.to(torch.bfloat16) * 3
    assert torch.equal(bnbf.dequantize_4bit(q, qs), want)
    assert torch.equal(K.dequantize_4bit(q, qs), want)


@needs_interp
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_qlora_linear_against_dequantized_reference(bias):
    """qlora_linear = F.linear(x, dequantize(W), bias) + scaling * (x A^T) B^T, forward and the
    gradients of x, A and B (W and bias frozen), fp32 compute on an NF4 weight."""
    q, qs = _quantized((48, 128), "nf4", True, torch.uint8, 64, dtype=torch.float32)
    w = K.dequantize_4bit_reference(q, qs)
    b0 = torch.randn(48) if bias else None
    x = torch.randn(3, 5, 128, requires_grad=True)
    a = (torch.randn(4, 128) * 0.1).requires_grad_()
    bb = (torch.randn(48, 4) * 0.1).requires_grad_()
    with launched("dequant4"):
        y = K.qlora_linear(x, q, qs, b0, K.lora_xa(x, a), bb, 0.5)
    ref = torch.nn.functional.linear(x, w, b0) + torch.nn.functional.linear(torch.nn.functional.linear(x, a), bb) * 0.5
    close(y, ref, torch.float32, "qlora_linear forward")
    gy = torch.randn_like(ref)
    for got, want, what in zip(grads(y, (x, a, bb), gy), grads(ref, (x, a, bb), gy), ("x", "A", "B")):
        close(got, want, torch.float32, f"qlora_linear grad {what}")


# --------------------------------------------------------------------------- fused linear cross-entropy

CE_CASES = {
    # name: N, H, V, chunk, bias, softcap, z_loss, reduction
    "mean-chunks": (37, 24, 301, 8, False, None, 0.0, "mean"),
    "sum-bias-softcap": (29, 20, 157, 5, True, 5.0, 0.0, "sum"),
    "sum-zloss": (17, 16, 130, None, False, None, 1e-2, "sum"),
    "none-softcap-zloss": (23, 12, 99, 4, True, 3.0, 1e-3, "none"),
    "vocab-multi-block": (9, 16, 5003, 4, False, 30.0, 0.0, "mean"),
    "single-token": (1, 8, 33, None, False, None, 0.0, "sum"),
}


def _ce_inputs(N, H, V, bias, dtype, ignored="every-4th"):
    h = (torch.randn(N, H) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,))
    if ignored == "every-4th":
        t[::4] = -100
    elif ignored == "one":
        t[N // 2] = -100
    elif ignored == "runs":  # a masked prompt per "sequence": runs of ignored tokens
        for s in range(0, N, 11):
            t[s:s + 4] = -100
    return h, w, b, t


@needs_interp
@pytest.mark.parametrize("ignored", ["every-4th", "none", "one", "runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_fused_linear_cross_entropy(case, dtype, ignored):
    """`ignored`: which targets are -100. "every-4th" / "runs" drop whole chunks, so only the
    non-ignored rows are computed (gathered, compact grad_h expanded at the end); "none" / "one"
    take the contiguous-chunk path (with "one", an ignored row inside a chunk)."""
    N, H, V, chunk, bias, softcap, z_loss, reduction = CE_CASES[case]
    h, w, b, t = _ce_inputs(N, H, V, bias, dtype, ignored)
    opts = dict(softcap=softcap, z_loss=z_loss, reduction=reduction)
    with launched("cross_entropy") if (t != -100).any() else contextlib.nullcontext():
        loss, count = K.fused_linear_cross_entropy(h, w, t, b, chunk_size=chunk, return_count=True, **opts)
    assert loss.dtype == torch.float32
    assert int(count) == int((t != -100).sum())
    inputs = [h, w] + ([b] if bias else [])
    g = torch.rand_like(loss) + 0.5  # a non-trivial upstream gradient
    got = grads(loss, inputs, g)
    # reference in fp32 on the same (possibly bf16-rounded) inputs
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ref = K.fused_linear_cross_entropy_reference(ref_in[0], ref_in[1], t, ref_in[2] if bias else None, **opts)
    want = grads(ref, ref_in, g)
    close(loss, ref, dtype if reduction != "none" else torch.float32 if dtype == torch.float32 else dtype, "loss")
    for name, a, r, x in zip(("d hidden", "d weight", "d bias"), got, want, inputs):
        assert a.dtype == x.dtype, f"{name} dtype {a.dtype} != input dtype {x.dtype}"
        close(a, r, dtype, name)
    if reduction == "none":
        assert torch.all(loss[t == -100] == 0)


@needs_interp
def test_fused_ce_sum_and_count_give_the_mean_and_all_ignored_is_zero():
    h, w, _, t = _ce_inputs(21, 16, 77, False, torch.float32)
    s, n = K.fused_linear_cross_entropy(h, w, t, reduction="sum", return_count=True, chunk_size=4)
    m = K.fused_linear_cross_entropy(h, w, t, reduction="mean", chunk_size=8)
    close((s / n).reshape(()), m.reshape(()), torch.float32, "sum / count vs mean")
    # the plain `loss.backward()` (upstream gradient exactly 1) of the mean
    dh, dw = grads(m, (h, w), torch.ones(()))
    ref = K.fused_linear_cross_entropy_reference(h, w, t, reduction="mean")
    rdh, rdw = grads(ref, (h, w), torch.ones(()))
    close(dh, rdh, torch.float32, "mean d hidden")
    close(dw, rdw, torch.float32, "mean d weight")
    ignored = torch.full_like(t, -100)
    for chunk in (4, None):  # nothing to compute: no chunk at all, zero loss and gradients
        for red in ("sum", "none"):
            s0, n0 = K.fused_linear_cross_entropy(h, w, ignored, reduction=red, return_count=True, chunk_size=chunk)
            assert torch.all(s0 == 0) and int(n0) == 0 and s0.shape == ((21,) if red == "none" else ())
            dh, dw = grads(s0, (h, w), torch.ones_like(s0))
            assert dh.shape == h.shape and dw.shape == w.shape
            assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_fused_ce_row_plan_and_in_place_row_expansion():
    """Only non-ignored rows are computed when that saves whole chunks (balanced chunks, never
    larger than asked); the compact per-row results are then moved to their rows in place."""
    from unsloth_dist.kernels import cross_entropy as CE

    # benchmark sizes: 16k tokens, 10% ignored -> 29 chunks of <= 512 rows instead of 32
    N, V, H = 16384, 128256, 4096
    C0 = CE.default_chunk_size(N, V, H)
    assert C0 == 512
    t = torch.randint(0, V, (N,))
    t[torch.randperm(N)[:1638]] = -100
    rows, ignored, C = CE._plan_rows(t, -100, N - 1638, N, C0, explicit=False)
    assert C == 512 and -(-(N - 1638) // C) == 29
    assert torch.equal(rows, (t != -100).nonzero().squeeze(1)) and torch.equal(ignored, (t == -100).nonzero().squeeze(1))
    one = t.clone()
    one[:] = 3
    one[7] = -100  # one ignored token saves no chunk: contiguous chunks
    assert CE._plan_rows(one, -100, N - 1, N, C0, explicit=False)[0] is None
    assert CE._plan_rows(one.fill_(3), -100, N, N, C0, explicit=False)[0] is None
    # in-place expansion: every ignore pattern, block sizes from 1 to more than the rows
    for trial in range(40):
        n = int(torch.randint(1, 60, ()))
        valid = torch.rand(n) < [0.1, 0.5, 0.9, 1.0][trial % 4]
        rows, ignored = valid.nonzero().squeeze(1), (~valid).nonzero().squeeze(1)
        vals = torch.randn(n, 3)
        buf = torch.full((n, 3), float("nan"))
        buf[:rows.numel()] = vals[rows]
        CE._expand_rows(buf, rows, ignored, block=int(torch.randint(1, n + 2, ())))
        want = torch.where(valid[:, None], vals, torch.zeros(()))
        assert torch.equal(buf, want), (trial, valid)


@needs_interp
def test_fused_ce_no_grad_forward():
    h, w, _, t = _ce_inputs(13, 8, 50, False, torch.float32)
    with torch.no_grad(), launched("cross_entropy"):
        loss = K.fused_linear_cross_entropy(h, w, t, reduction="sum", chunk_size=4)
    ref = K.fused_linear_cross_entropy_reference(h, w, t, reduction="sum")
    close(loss, ref.detach(), torch.float32, "no-grad loss")


@needs_interp
def test_glu_reusing_buffers_makes_another_saver_of_gate_fail_loudly():
    """The GLU backward writes its gradients over the saved gate / up: another op that saved gate
    and runs its backward later (here gate * c, created before the GLU) must not read gradients as
    activations (it did silently: dc 100% off) -- the version counter makes it an error."""
    with K.poison_outputs(False):
        x = torch.randn(6, 40, requires_grad=True)
        c = torch.randn(6, 40, requires_grad=True)
        gate, up = x * 2.0, x + 1.0
        aux = (gate * c).sum()  # MulBackward saved gate; its backward runs after the GLU's
        h = K.glu(gate, up, "silu")
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (h.sum() + aux).backward()


@needs_interp
def test_fused_ce_target_outside_the_vocabulary_is_an_error():
    h, w = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    for bad in (50, 53, -1):
        t = torch.randint(0, 50, (6,))
        t[2] = bad
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds for the 50 logits"):
            K.fused_linear_cross_entropy(h, w, t, reduction="sum")
    t[2] = -100  # ignore_index stays fine
    K.fused_linear_cross_entropy(h, w, t, reduction="sum").backward()


@needs_interp
def test_fused_ce_a_first_block_of_minus_inf_logits():
    # a masking bias of -inf over the first vocabulary block: the online max started at -inf and
    # exp(-inf - -inf) made the loss NaN
    from unsloth_dist.kernels.cross_entropy import _block_v

    V = _block_v(5000, torch.device("cpu")) + 300
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(V, 8, requires_grad=True)
    bias = torch.zeros(V)
    bias[: V - 300] = float("-inf")  # the whole first block
    t = torch.randint(V - 300, V, (5,))
    with launched("cross_entropy"):
        loss = K.fused_linear_cross_entropy(h, w, t, bias, reduction="sum", chunk_size=5)
    ref = K.fused_linear_cross_entropy_reference(h, w, t, bias, reduction="sum")
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)


@needs_interp
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_ce_fp16_gradients_come_after_the_loss_scale(reduction):
    """fp16 (T4 / V100 training under GradScaler): the gradients were computed in the forward and
    rounded to fp16 before the scale -- mean underflowed (grad_W 80x HF's error), sum overflowed to
    inf whatever the scale. They are computed in backward now, as HF's unfused loss."""
    import torch.nn.functional as F

    if reduction == "mean":  # small gradients: 1 / N of a softmax over a large vocabulary
        N, H, V, S = 1024, 16, 4096, 65536.0
        h0, w0, t = torch.randn(N, H), torch.randn(V, H) * 0.05, torch.randint(0, V, (N,))
    else:  # large grad_W entries before the caller's 1 / N: many tokens of one target, large hidden
        N, H, V, S = 1024, 16, 64, 128.0
        h0, w0, t = torch.randn(N, H) + 80.0, torch.randn(V, H) * 0.01, torch.full((N,), 3)
    h64, w64 = h0.half().double().requires_grad_(), w0.half().double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), t, reduction=reduction).div(1 if reduction == "mean" else N).backward()
    hf, wf = h0.half().requires_grad_(), w0.half().requires_grad_()
    with launched("cross_entropy"):
        # a few chunks: the grad_W accumulation across chunks in fp16 is another matter (NOTES)
        loss = K.fused_linear_cross_entropy(hf, wf, t, reduction=reduction, chunk_size=N // 4)
    (loss / (1 if reduction == "mean" else N) * S).backward()
    assert torch.isfinite(wf.grad).all() and torch.isfinite(hf.grad).all()
    for got, ref in ((wf.grad, w64.grad), (hf.grad, h64.grad)):
        rel = ((got.double() / S - ref).norm() / ref.norm()).item()
        assert rel < 7e-4, (reduction, rel)  # HF's own fp16 error here ~3e-4; the old forward-side rounding 1.2e-3


def test_cpu_without_interpreter_uses_the_references(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = dict(K.LAUNCHES)
    x = torch.randn(4, 8, requires_grad=True)
    K.rms_norm(x, torch.ones(8)).sum().backward()
    K.glu(x, x).sum().backward()
    q = torch.randn(1, 2, 4, 8)
    K.apply_rope(q, q, torch.ones(1, 4, 8), torch.zeros(1, 4, 8))
    K.fused_linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, -100, 4])).backward()
    assert dict(K.LAUNCHES) == before


def test_kernel_checks_in_interpreter_child():
    """When this process cannot run the interpreter (triton was imported first, or CUDA is
    present), run this file's checks in a child that sets TRITON_INTERPRET=1 from the start."""
    if IN_PROCESS:
        pytest.skip("the kernel checks ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "not interpreter_child"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, capture_output=True,
        text=True, timeout=900)
    tail = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    summary = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1]
    assert " passed" in summary and "skipped" not in summary, tail
