"""The compiled Triton kernels on a CUDA GPU, in bf16 at real sizes (Llama-3-8B: hidden 4096,
intermediate 14336, vocab 128256, 32/8 heads of 128, 16k tokens), against the PyTorch references
computed in fp32 on the same bf16 inputs. Outputs are poisoned (NaN-filled) before every run.

RoPE is also checked in place on HF-layout projection views (no forward memory); the fused CE
also against its memory budget (grad_W + grad_h + one chunk of logits).

Criterion (bf16): normwise relative error <= 1e-2 and no element off by more than 3e-2 of the
largest magnitude (the fused CE's weight gradient is accumulated over ~32 chunks in bf16, as
Liger-Kernel's is).

    pytest -m gpu tests/test_gpu_kernels.py
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N_TOKENS, HIDDEN, INTER, VOCAB = 16384, 4096, 14336, 128256
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@pytest.fixture(autouse=True)
def _gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from unsloth_dist import kernels as K

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    with K.poison_outputs():
        yield K


def close(got, ref, what, worst_max=3e-2):
    assert got.shape == ref.shape, what
    assert not torch.isnan(got).any(), f"{what}: NaN (an element the kernel did not write)"
    g, r = got.float(), ref.float()
    rel = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
    worst = ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    print(f"{what}: normwise {rel:.2e}, worst {worst:.2e}")
    assert rel <= 1e-2 and worst <= worst_max, f"{what}: normwise rel error {rel:.3g}, worst element {worst:.3g}"


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rmsnorm_bf16(_gpu, gemma):
    K = _gpu
    x = torch.randn(N_TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(HIDDEN, device="cuda") * 0.1 + (0.0 if gemma else 1.0)).bfloat16().requires_grad_()
    off = 1.0 if gemma else 0.0
    y = K.rms_norm(x, w, 1e-5, off, gemma)
    assert K.LAUNCHES["rmsnorm_fwd"] > 0
    gy = torch.randn_like(y)
    dx, dw = _grads(y, (x, w), gy)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = K.rms_norm_reference(xf, wf, 1e-5, off, gemma)
    rdx, rdw = _grads(ref, (xf, wf), gy.float())
    close(y, ref, "rmsnorm y")
    close(dx, rdx, "rmsnorm dx")
    close(dw, rdw, "rmsnorm dw")


def test_rope_bf16_llama3_scaling_packed_positions(_gpu):
    K = _gpu
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    B, T = 4, N_TOKENS // 4
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    rot = LlamaRotaryEmbedding(cfg).cuda()
    # rows 0-1: one sequence each; rows 2-3: packed sequences restarting at 0
    pos = torch.arange(T, device="cuda").repeat(B, 1)
    pos[2] = torch.cat([torch.arange(1000), torch.arange(T - 1000)]).cuda()
    pos[3] = torch.arange(T, device="cuda") % 777
    q = torch.randn(B, T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    cos, sin = rot(q, pos)
    qo, ko = K.apply_rope(q, k, cos, sin)
    assert K.LAUNCHES["rope"] > 0
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = _grads((qo, ko), (q, k), (gq, gk))
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    rq, rk = K.rope_reference(qf, kf, cos.float(), sin.float())
    rdq, rdk = _grads((rq, rk), (qf, kf), (gq.float(), gk.float()))
    for a, b, n in ((qo, rq, "rope q"), (ko, rk, "rope k"), (dq, rdq, "rope dq"), (dk, rdk, "rope dk")):
        close(a, b, n)


def rope_in_place_case(K, device, B, T, HQ, HK, D, cos, sin):
    """HF's layout: q / k projection outputs [B, T, H*D] viewed and transposed. The forward
    rotates them in place (no new memory, results alias the projections); the backward gets
    gradients nothing else holds (here from `.float() * g`'s backward) and rotates them in
    place. Returns the extra peak memory of the forward (bytes)."""
    pq = torch.randn(B, T, HQ * D, device=device, dtype=torch.bfloat16, requires_grad=True)
    pk = torch.randn(B, T, HK * D, device=device, dtype=torch.bfloat16, requires_grad=True)
    gq = torch.randn(B, HQ, T, D, device=device)
    gk = torch.randn(B, HK, T, D, device=device)
    a, b = pq * 1, pk * 1  # non-leaf projection outputs
    q, k = a.view(B, T, HQ, D).transpose(1, 2), b.view(B, T, HK, D).transpose(1, 2)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    qo, ko = K.apply_rope(q, k, cos, sin)
    extra = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    assert qo.data_ptr() == a.data_ptr() and ko.data_ptr() == b.data_ptr(), "not rotated in place"
    dq, dk = _grads((qo.float() * gq).sum() + (ko.float() * gk).sum(), (pq, pk), torch.ones((), device=device))
    pf, kf = pq.detach().float().requires_grad_(), pk.detach().float().requires_grad_()
    rq, rk = K.rope_reference(pf.view(B, T, HQ, D).transpose(1, 2), kf.view(B, T, HK, D).transpose(1, 2),
                              cos.float(), sin.float())
    rdq, rdk = _grads((rq * gq).sum() + (rk * gk).sum(), (pf, kf), torch.ones((), device=device))
    for x, r, n in ((qo, rq, "in-place rope q"), (ko, rk, "in-place rope k"), (dq, rdq, "in-place rope dq"),
                    (dk, rdk, "in-place rope dk")):
        close(x, r, n)
    return extra


def test_rope_bf16_in_place_on_hf_projection_views(_gpu):
    K = _gpu
    B, T = 4, N_TOKENS // 4
    pos = torch.arange(T, device="cuda")[None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    emb = torch.cat([pos[..., None].float() * inv, pos[..., None].float() * inv], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    before = K.LAUNCHES["rope"]
    extra = rope_in_place_case(K, "cuda", B, T, HEADS, KV_HEADS, HEAD_DIM, cos, sin)
    assert K.LAUNCHES["rope"] - before == 2
    assert extra <= 2**20, f"in-place RoPE forward allocated {extra} bytes"


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_glu_bf16(_gpu, activation):
    K = _gpu
    a = torch.randn(N_TOKENS, INTER, device="cuda", dtype=torch.bfloat16).requires_grad_()
    b = torch.randn(N_TOKENS, INTER, device="cuda", dtype=torch.bfloat16).requires_grad_()
    h = K.glu(a, b, activation)
    assert K.LAUNCHES["glu_fwd"] > 0
    gh = torch.randn_like(h)
    da, db = _grads(h, (a, b), gh)
    af, bf = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = K.glu_reference(af, bf, activation)
    rda, rdb = _grads(ref, (af, bf), gh.float())
    close(h, ref, f"{activation} h")
    close(da, rda, f"{activation} d gate")
    close(db, rdb, f"{activation} d up")


def _ce_reference_fp32(K, h, w, t, chunk=2048, **opts):
    """The reference in fp32, chunked over tokens so the fp32 logits fit (exact: the loss and
    the weight gradient are sums over tokens)."""
    hf, wf = h.detach().float(), w.detach().float().requires_grad_()
    loss = torch.zeros((), device=h.device, dtype=torch.float64)
    dh = torch.empty_like(hf)
    red = opts.pop("reduction")
    n = int((t != -100).sum())
    scale = 1.0 / n if red == "mean" else 1.0
    for s in range(0, h.shape[0], chunk):
        hc = hf[s:s + chunk].clone().requires_grad_()
        lc = K.fused_linear_cross_entropy_reference(hc, wf, t[s:s + chunk], reduction="sum", **opts) * scale
        lc.backward()
        dh[s:s + chunk] = hc.grad
        loss += lc.detach().double()
    return loss.float(), dh, wf.grad


@pytest.mark.parametrize("opts", [dict(reduction="mean"), dict(reduction="sum", softcap=30.0, z_loss=1e-4)],
                         ids=["mean", "sum-softcap-zloss"])
def test_fused_linear_cross_entropy_bf16(_gpu, opts):
    K = _gpu
    h = (torch.randn(N_TOKENS, HIDDEN, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, device="cuda") * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, VOCAB, (N_TOKENS,), device="cuda")
    t[torch.rand(N_TOKENS, device="cuda") < 0.1] = -100
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, count = K.fused_linear_cross_entropy(h, w, t, return_count=True, **opts)
    assert K.LAUNCHES["cross_entropy"] > 0 and int(count) == int((t != -100).sum())
    dh, dw = _grads(loss, (h, w), torch.ones_like(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"fused CE peak memory {peak:.2f} GiB")
    # never the full [N, V] logits (bf16: 4.2 GB)
    assert peak < 2 * (h.numel() + w.numel()) * 2 / 2**30 + 1.0
    # what it adds: grad_W + grad_h + one [512, V] chunk of logits (+ a few small index / loss
    # vectors): computing only the non-ignored rows gathers them into grad_h, no extra buffer.
    # Poisoning (on for the correctness checks) gives d_logits a buffer of its own instead of the
    # logits' one, so measure that in a second run without it.
    extra_poisoned = torch.cuda.max_memory_allocated() - base
    chunk = 512 * VOCAB * 2
    budget = (w.numel() + h.numel()) * 2 + chunk + 2 * 2**20
    assert extra_poisoned <= budget + chunk, f"fused CE added {extra_poisoned / 2**20:.1f} MiB (poisoned)"
    with K.poison_outputs(False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss2, _ = K.fused_linear_cross_entropy(h, w, t, return_count=True, **opts)
        g2 = _grads(loss2, (h, w), torch.ones_like(loss2))
        extra = torch.cuda.max_memory_allocated() - base
        del g2, loss2
    print(f"fused CE extra memory {extra / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB)")
    assert extra <= budget, f"fused CE added {extra / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB"
    assert dh.dtype == dw.dtype == torch.bfloat16
    rl, rdh, rdw = _ce_reference_fp32(K, h, w, t, **dict(opts))
    assert abs(loss.item() - rl.item()) <= 1e-2 * abs(rl.item()), (loss.item(), rl.item())
    close(dh, rdh, "CE d hidden")
    close(dw, rdw, "CE d weight")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_cross_entropy_fp16_under_a_loss_scale(_gpu, reduction):
    """fp16 (T4 / V100 users, GradScaler): the gradients are computed in backward after the scale,
    as transformers' unfused loss; within 3x of its fp16 error against fp64, finite for the sum."""
    import torch.nn.functional as F

    K = _gpu
    N, S = 8192, 4096.0
    h0 = torch.randn(N, HIDDEN, device="cuda") * 0.5
    w0 = torch.randn(VOCAB, HIDDEN, device="cuda") * 0.02
    t = torch.randint(0, VOCAB, (N,), device="cuda")
    div = 1.0 if reduction == "mean" else float(N)  # the Trainer's sum / global count
    h64, w64 = h0.half().double().requires_grad_(), w0.half().double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), t, reduction=reduction).div(div).backward()
    hh, wh = h0.half().requires_grad_(), w0.half().requires_grad_()
    (F.cross_entropy(F.linear(hh, wh).float(), t, reduction=reduction) / div * S).backward()
    hf, wf = h0.half().requires_grad_(), w0.half().requires_grad_()
    (K.fused_linear_cross_entropy(hf, wf, t, reduction=reduction) / div * S).backward()
    assert torch.isfinite(wf.grad).all() and torch.isfinite(hf.grad).all()
    for name, got, hf_ref, ref in (("W", wf.grad, wh.grad, w64.grad), ("h", hf.grad, hh.grad, h64.grad)):
        e_ours = ((got.double() / S - ref).norm() / ref.norm()).item()
        e_hf = ((hf_ref.double() / S - ref).norm() / ref.norm()).item()
        print(f"fp16 {reduction} grad_{name}: rel err ours {e_ours:.2e}, transformers {e_hf:.2e}")
        assert e_ours <= 3 * e_hf + 1e-4, (name, e_ours, e_hf)


def test_master_adamw_bf16_against_torch_adamw(_gpu):
    """fused_master_adamw on the GPU: three steps (one clipped) over Llama-sized tensors against
    torch's fused AdamW on fp32 copies of the masters with clip_grad_norm_; the bf16 weights must be
    the masters rounded to nearest."""
    from unsloth_dist.kernels import adamw as A

    shapes = [(HIDDEN, HIDDEN), (INTER, HIDDEN), (HIDDEN,), (1000, 37)]
    params = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    masters = [p.float().clone().requires_grad_(True) for p in params]
    ref = [p.float().clone().requires_grad_(True) for p in params]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref_opt = torch.optim.AdamW(masters, fused=True, **kw), torch.optim.AdamW(ref, fused=True, **kw)
    assert A.supports(opt, params, masters) is None
    for step, max_norm in enumerate([1e9, 1.0, 1e9]):
        for p, r in zip(params, ref):
            p.grad = (torch.randn(p.shape, device="cuda") * 1e-2).to(torch.bfloat16)
            r.grad = p.grad.float()
        norm, coef = A.grad_norm_and_coef([p.grad for p in params], max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        A.master_adamw_step(opt, params, masters, coef)
        ref_opt.step()
        for i, (p, m, r) in enumerate(zip(params, masters, ref)):
            torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-5, atol=1e-6, msg=lambda s: f"step {step} {i}: {s}")
            assert torch.equal(p, m.detach().to(torch.bfloat16)), f"step {step} {i}"


def test_lora_delta_bf16_against_fp32(_gpu):
    """The fused LoRA update (cuBLAS addmm_ epilogue) at the 8B MLP shape, r=16, forward and backward,
    against the fp32 computation on the same bf16 inputs."""
    from unsloth_dist.kernels import lora_delta, lora_delta_reference

    r, s = 16, 2.0
    x = torch.randn(N_TOKENS // 4, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(INTER, HIDDEN, device="cuda") * HIDDEN ** -0.5).to(torch.bfloat16)
    a = (torch.randn(r, HIDDEN, device="cuda") * HIDDEN ** -0.5).to(torch.bfloat16).requires_grad_(True)
    b = (torch.randn(INTER, r, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(N_TOKENS // 4, INTER, device="cuda", dtype=torch.bfloat16)
    out = lora_delta(torch.nn.functional.linear(x, w), x, a, b, s)
    dx, da, db = torch.autograd.grad(out, (x, a, b), g)
    xf, af, bf = (t.detach().float().requires_grad_(True) for t in (x, a, b))
    ref = lora_delta_reference(torch.nn.functional.linear(xf, w.float()), xf, af, bf, s)
    rdx, rda, rdb = torch.autograd.grad(ref, (xf, af, bf), g.float())
    close(out, ref, "lora out")
    close(dx, rdx, "lora d x")
    close(da, rda, "lora d A")
    close(db, rdb, "lora d B")
    # the same through lora_linear (frozen base computed inside, saving nothing for it)
    from unsloth_dist.kernels import lora_linear

    out2 = lora_linear(x, w, None, a, b, s)
    dx2, da2, db2 = torch.autograd.grad(out2, (x, a, b), g)
    close(out2, ref, "lora_linear out")
    close(dx2, rdx, "lora_linear d x")
    close(da2, rda, "lora_linear d A")
    close(db2, rdb, "lora_linear d B")


@pytest.mark.parametrize("path", ["qlora-linear", "hooked-base"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_fused_path_on_gpu(_gpu, dropout, path, monkeypatch):
    """The QLoRA fused paths (x @ A^T first, then our one-node 4-bit GEMM + update, or bitsandbytes'
    CUDA 4-bit base + the in-place update) against peft on a GPU, under activation checkpointing: loss
    and LoRA gradients, and each layer's down_proj base run once (the recompute stops before it), the
    other bases twice."""
    pytest.importorskip("bitsandbytes")
    from test_lora_fused import test_qlora_recompute_stops_before_down_proj_4bit_base as check

    from unsloth_dist.models import patching

    monkeypatch.setattr(patching, "QLORA_LINEAR_MIN_TOKENS", 0)  # the check's 18 tokens take the one-node path too
    check(dropout, path, monkeypatch, device="cuda", hidden=512)


def test_qlora_decoding_keeps_bitsandbytes_fused_kernel(_gpu, monkeypatch):
    """Few tokens on CUDA (decoding, small batches): bitsandbytes' forward (its fused 4-bit GEMM / GEMV)
    under the in-place update, not the one-node path that dequantizes the whole weight; many tokens:
    the one-node path."""
    pytest.importorskip("bitsandbytes")
    from test_lora_fused import _Count, _tiny_qlora

    model = _tiny_qlora(0.0, "cuda", 512)
    from unsloth_dist.models.patching import patch_model

    patch_model(model, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False)
    count = _Count(monkeypatch)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 4), device="cuda"))
        assert count.n_4bit == 0 and count.n_delta == 8, (count.n_4bit, count.n_delta)
        model(input_ids=torch.randint(0, 64, (2, 1024), device="cuda"))
        assert count.n_4bit == 8, count.n_4bit


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_on_gpu_is_bitsandbytes_bit_for_bit(_gpu, quant_type, nested):
    """Our one-launch dequantization equals bitsandbytes' CUDA dequantization exactly (bf16 and fp32
    out), on an 8B-model MLP weight shape and a row that ends mid-block."""
    import copy

    bnbf = pytest.importorskip("bitsandbytes.functional")
    from unsloth_dist.kernels import LAUNCHES, dequantize_4bit

    for shape in [(14336, 4096), (33, 1000)]:
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested,
                                   quant_storage=torch.bfloat16)
        before = LAUNCHES["dequant4"]
        got = dequantize_4bit(q, qs)
        assert LAUNCHES["dequant4"] == before + 1
        assert torch.equal(got, bnbf.dequantize_4bit(q, qs)), (shape, (got.float() - bnbf.dequantize_4bit(q, qs).float()).abs().max())
        qs32 = copy.copy(qs)
        qs32.dtype = torch.float32
        assert torch.equal(dequantize_4bit(q, qs, torch.float32), bnbf.dequantize_4bit(q, qs32)), shape


@pytest.mark.parametrize("patched", [False, True], ids=["transformers", "patched-kernels"])
def test_activation_offload_on_cuda(_gpu, patched):
    """activation_offload on a GPU: the host copies on the side stream and the prefetch ahead of each
    recompute give the gradients of plain checkpointing bit for bit (bf16, dropout in attention, three
    micro-batches of different lengths as under gradient accumulation, the freed layer inputs
    overwritten before backward; the pinned pool ends at one buffer per layer);
    and between forward and backward the layer inputs are no longer held. (The allocated-bytes drop is
    checked loosely: once freed blocks wait for the side stream's copy, later allocations land in other
    blocks, whose unsplit remainders the allocator counts as allocated: on the H200, 36 of the 50 MB
    of layer inputs showed as freed in one run of this test after the others, all of them run alone.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unsloth_dist.models.lora import enable_gradient_checkpointing
    from unsloth_dist.models.offload import enable_activation_offload, host_pool

    layers, hidden, batch, seq = 6, 1024, 2, 2048
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, attention_dropout=0.1,
                      max_position_embeddings=seq, attn_implementation="eager")
    # three micro-batches as under gradient accumulation, of three padded lengths: the pinned pool
    # grows (1024 -> 2048 tokens: new buffers, the outgrown ones released) and serves a shorter one
    lengths = (seq // 2, seq, 3 * seq // 4)
    ids = [torch.randint(0, 32000, (batch, n), device="cuda", generator=torch.Generator("cuda").manual_seed(i))
           for i, n in enumerate(lengths)]

    def run(offload):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
        if patched:
            from unsloth_dist.models import patch_model

            patch_model(model)
        enable_gradient_checkpointing(model, True)
        if offload:
            assert enable_activation_offload(model) == layers
            host_pool(torch.device("cuda")).clear()  # the growth from the shortest length on
        held, losses, alive, seen = [], [], [], []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(
                lambda m, a, k: seen.append(weakref.ref(a[0] if a else k["hidden_states"])), with_kwargs=True)
        for i, x in enumerate(ids):
            torch.manual_seed(100 + i)
            seen.clear()
            before = torch.cuda.memory_allocated()
            out = model(input_ids=x, labels=x)
            gc.collect()
            held.append(torch.cuda.memory_allocated() - before)
            alive.append(sum(r() is not None for r in seen))
            # reuse the freed blocks of the layers' size: a layer input read after it was freed would read NaN
            junk = [torch.full((batch, x.shape[1], hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
                    for _ in range(2 * layers)]
            del junk
            out.loss.backward()
            losses.append(out.loss.detach())
        torch.cuda.synchronize()
        return losses, {n: p.grad for n, p in model.named_parameters()}, held, alive

    plain_losses, plain_grads, plain_held, plain_alive = run(False)
    losses, grads, held, alive = run(True)
    assert plain_alive == [layers] * 3 and alive == [0] * 3, (plain_alive, alive)
    pool = host_pool(torch.device("cuda"))  # one pinned buffer per layer, of the longest input's size
    assert pool.in_use == 0 and pool.bytes == layers * batch * seq * hidden * 2, (pool.in_use, pool.bytes)
    for a, b in zip(plain_losses, losses):
        assert torch.equal(a, b)
    for name, g in plain_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert torch.equal(g, grads[name]), name
    # the allocator's accounting of the freed inputs depends on what ran before (10.4 of 25 MB at the
    # shortest length after the fp16 CE tests, run 12): checked over the three lengths together; that
    # no layer input stays alive is the exact check above
    inputs = [layers * batch * n * hidden * 2 for n in lengths]  # bf16 layer inputs plain checkpointing holds
    freed = [p - o for p, o in zip(plain_held, held)]
    assert sum(freed) >= 0.4 * sum(inputs), (freed, inputs)
