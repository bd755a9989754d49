"""The fused LoRA update (`kernels.lora_delta`, patched into peft's LoRA linears by `patch_model`):
exact against peft's arithmetic (dropout included), taken on the plain-LoRA path, and never taken
where peft's own forward does something else (disabled / merged / several adapters, DoRA, autocast)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unsloth_dist.kernels import lora as L
from unsloth_dist.kernels import lora_delta, lora_delta_reference
from unsloth_dist.models.patching import patch_model, unpatch_model


def test_lora_delta_gradcheck_against_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b, w):
        return lora_delta(nn.functional.linear(x, w), x, a, b, 0.7)

    def ref(x, a, b, w):
        return lora_delta_reference(nn.functional.linear(x, w), x, a, b, 0.7)

    torch.testing.assert_close(fused(x, a, b, w), ref(x, a, b, w), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x, a, b, w))
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    got = torch.autograd.grad(fused(x, a, b, w), (x, a, b, w), g)
    want = torch.autograd.grad(ref(x, a, b, w), (x, a, b, w), g)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_lora_linear_gradcheck_with_bias_and_dropped_adapter_input():
    """lora_linear: frozen base (with bias) on x, the adapter on another input (dropout applied),
    against autograd of the plain expression, float64."""
    from unsloth_dist.kernels import lora_linear

    torch.manual_seed(2)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 5, 8) > 0.3).double() / 0.7
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    def fused(x, a, b):
        return lora_linear(x, w, bias, a, b, 0.7, x_lora=x * mask)

    def ref(x, a, b):
        return lora_delta_reference(nn.functional.linear(x, w, bias), x * mask, a, b, 0.7)

    torch.testing.assert_close(fused(x, a, b), ref(x, a, b), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x, a, b))
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    for u, v in zip(torch.autograd.grad(fused(x, a, b), (x, a, b), g), torch.autograd.grad(ref(x, a, b), (x, a, b), g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_lora_delta_bf16_close_to_peft_rounding():
    """bf16: the scaling is applied inside the GEMM (fp32 accumulate), peft scales the bf16 product;
    the difference is bf16 rounding."""
    torch.manual_seed(1)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    a, b = torch.randn(4, 32, dtype=torch.bfloat16) * 0.2, torch.randn(48, 4, dtype=torch.bfloat16) * 0.2
    base = torch.randn(64, 48, dtype=torch.bfloat16)
    got = lora_delta(base.clone(), x, a, b, 2.0).float()
    want = (base.float() + (x.float() @ a.float().t() @ b.float().t()) * 2.0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


class _Count:
    """Counts fused LoRA updates, either path: `lora_linear` over a frozen nn.Linear base (n_linear,
    with the base weights it ran on) or `lora_delta` after any other base (n_delta)."""

    def __init__(self, monkeypatch):
        from unsloth_dist.kernels import quant as Q

        self.n_linear = self.n_delta = self.n_4bit = 0
        self.weights: list[torch.Tensor] = []
        real_delta, real_linear, real_4bit = L._AddLoraUpdate.apply, L._FrozenLinearLora.apply, Q._Frozen4bitLinearLora.apply

        def q4(*args):
            self.n_4bit += 1
            return real_4bit(*args)

        monkeypatch.setattr(Q._Frozen4bitLinearLora, "apply", staticmethod(q4))

        def delta(*args):
            self.n_delta += 1
            return real_delta(*args)

        def linear(*args):
            self.n_linear += 1
            self.weights.append(args[3])
            return real_linear(*args)

        monkeypatch.setattr(L._AddLoraUpdate, "apply", staticmethod(delta))
        monkeypatch.setattr(L._FrozenLinearLora, "apply", staticmethod(linear))

    @property
    def n(self) -> int:
        return self.n_linear + self.n_delta + self.n_4bit

    @n.setter
    def n(self, value: int) -> None:
        self.n_linear, self.n_delta, self.n_4bit = value, 0, 0


def _tiny_peft(dropout=0.0, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_llama

    model = tiny_llama(seed=0, vocab=64, hidden=32, layers=2)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                  target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                                  **lora_kw))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model


def _fwd_bwd(model, ids):
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _compare(ref, pat, ids, rtol=1e-5, atol=1e-6):
    lr, gr = _fwd_bwd(ref, ids)
    lp, gp = _fwd_bwd(pat, ids)
    torch.testing.assert_close(lp, lr, rtol=rtol, atol=atol)
    assert gr.keys() == gp.keys() and gr
    for n in gr:
        torch.testing.assert_close(gp[n], gr[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"grad {n}: {m}")


def test_patched_lora_takes_the_fused_path_and_matches_peft(monkeypatch):
    ref = _tiny_peft()
    pat = copy.deepcopy(ref)
    report = patch_model(pat, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False)
    assert report.ops == ["lora"] and report.count("lora") == 8, str(report)
    count = _Count(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    ref.train(), pat.train()
    _compare(ref, pat, ids)
    assert count.n == 8  # every LoRA linear, once
    unpatch_model(pat)
    count.n = 0
    _compare(ref, pat, ids)
    assert count.n == 0


def test_fused_lora_under_gradient_checkpointing(monkeypatch):
    ref = _tiny_peft()
    pat = copy.deepcopy(ref)
    patch_model(pat)
    for m in (ref, pat):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    count = _Count(monkeypatch)
    _compare(ref, pat, torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4)))
    # forward + recompute, except each layer's down_proj: its output only feeds the residual add, and
    # everything its backward needs was saved before its base GEMM, so the recompute stops before it
    per_weight = {}
    for w in count.weights:
        per_weight[id(w)] = per_weight.get(id(w), 0) + 1
    for name, m in pat.named_modules():
        if name.endswith(("q_proj", "v_proj", "gate_proj", "down_proj")) and hasattr(m, "base_layer"):
            want = 1 if name.endswith("down_proj") else 2
            assert per_weight.get(id(m.base_layer.weight)) == want, (name, per_weight.get(id(m.base_layer.weight)))
    assert count.n == 14 and count.n_delta == 0


def test_fused_lora_with_dropout_matches_peft_under_the_same_seed(monkeypatch):
    """LoRA dropout in training: the fused path applies it to the adapter input after the base
    layer, as peft does, so the same seed draws the same masks: same loss, same gradients."""
    ref = _tiny_peft(dropout=0.3)
    pat = copy.deepcopy(ref)
    patch_model(pat)
    count = _Count(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ref.train(), pat.train()
    torch.manual_seed(9)
    lr, gr = _fwd_bwd(ref, ids)
    torch.manual_seed(9)
    lp, gp = _fwd_bwd(pat, ids)
    assert count.n == 8
    torch.testing.assert_close(lp, lr, rtol=1e-5, atol=1e-6)
    for n in gr:
        torch.testing.assert_close(gp[n], gr[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")
    torch.manual_seed(10)  # another seed, other masks: the loss changes (dropout really applied)
    l2, _ = _fwd_bwd(pat, ids)
    assert not torch.equal(l2, lp)


@pytest.mark.parametrize("case", ["disabled", "merged", "two-adapters", "dora", "autocast", "lora-bias"])
def test_peft_forward_runs_where_the_fused_path_does_not_apply(case, monkeypatch):
    from peft import LoraConfig

    kw = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora-bias" else {}
    ref = _tiny_peft(**kw)
    if case == "two-adapters":
        ref.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        ref.base_model.set_adapter(["default", "second"])
    pat = copy.deepcopy(ref)
    patch_model(pat)
    count = _Count(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ref.train(), pat.train()
    if case == "disabled":  # base only (frozen: no gradients)
        with ref.disable_adapter(), pat.disable_adapter():
            with torch.no_grad():
                torch.testing.assert_close(pat(input_ids=ids).logits, ref(input_ids=ids).logits)
    elif case == "merged":  # adapters folded into the base weights
        for m in (ref, pat):
            m.base_model.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(pat(input_ids=ids).logits, ref(input_ids=ids).logits)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _compare(ref, pat, ids, rtol=1e-2, atol=1e-3)
    else:
        _compare(ref, pat, ids)
    # two adapters: the layers with only `default` (v, gate, down) are plain LoRA and fused
    assert count.n == (6 if case == "two-adapters" else 0)


@pytest.mark.parametrize("dims", [(64, 96), (65, 3)], ids=["one-node-4bit", "odd-size-falls-back"])
def test_fused_lora_on_a_4bit_base(monkeypatch, dims):
    """QLoRA: peft's bitsandbytes Linear4bit wrapper, base NF4 on CPU, bf16 compute: the one-node 4-bit
    path (kernels.qlora_linear), or, for a weight with an odd element count (3 x 65, which the
    dequantize kernel does not cover), bitsandbytes' forward under the in-place update."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    n_in, n_out = dims
    lin = nn.Linear(n_in, n_out, bias=False)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                          quant_storage=torch.bfloat16)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 quant_storage=torch.bfloat16, module=q)
    q = q.to("cpu")
    wrapper = nn.Sequential(q)
    wrapper.is_loaded_in_4bit = True  # what peft reads to pick its bitsandbytes LoRA wrapper
    ref = get_peft_model(wrapper, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    for n, p in ref.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.data = p.data.to(torch.bfloat16).normal_(0, 0.1)
    layer = ref.base_model.model[0]
    assert type(layer).__name__ == "Linear4bit" and type(layer).__module__.startswith("peft"), type(layer)
    pat = copy.deepcopy(ref)
    assert patch_model(pat).count("lora") == 1
    count = _Count(monkeypatch)
    x = torch.randn(2, 5, n_in, dtype=torch.bfloat16)
    ref.train(), pat.train()
    outs, grads = [], []
    for m in (ref, pat):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.float().square().sum().backward()
        outs.append(y.detach().float())
        grads.append([xi.grad.float()] + [p.grad.float() for n, p in m.named_parameters() if "lora_" in n])
    assert count.n == 1 and count.n_4bit == (1 if dims == (64, 96) else 0)
    if dims == (64, 96):  # inference with a few tokens: bitsandbytes' own forward (its CPU / GEMV kernels)
        with torch.no_grad():
            torch.testing.assert_close(pat(x).float(), outs[0], rtol=2e-2, atol=2e-2)
        assert count.n == 2 and count.n_4bit == 1
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for u, v in zip(grads[1], grads[0]):  # bf16 rounding in another order: compare by norm
        assert ((u - v).norm() / v.norm()).item() < 2e-2


def test_fused_lora_in_inference_mode_and_generate(monkeypatch):
    """Inference through the patched adapters: torch.inference_mode forward and greedy generate give
    what peft gives, through the fused update."""
    ref = _tiny_peft()
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ref.eval(), pat.eval()
    count = _Count(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        torch.testing.assert_close(pat(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert count.n == 8
    mask = torch.ones_like(ids[:, :4])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pat.generate(input_ids=ids[:, :4], attention_mask=mask, **kw),
                       ref.generate(input_ids=ids[:, :4], attention_mask=mask, **kw))
    assert count.n > 8


def test_fused_path_with_a_base_output_it_cannot_write_into(monkeypatch):
    """A base layer returning a view (here a transposed copy seen transposed back) is not written
    in place: the LoRA update is added out of place, same result as peft."""
    ref = _tiny_peft()
    pat = copy.deepcopy(ref)
    patch_model(pat)
    for m in (ref, pat):
        q = m.base_model.model.model.layers[0].self_attn.q_proj
        lin = q.base_layer

        class ViewOut(nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.lin = lin

            def forward(self, x):
                return self.lin(x).transpose(-1, -2).contiguous().transpose(-1, -2)

        q.base_layer = ViewOut(lin)
    count = _Count(monkeypatch)
    ref.train(), pat.train()
    _compare(ref, pat, torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7)))
    assert count.n == 7  # 8 LoRA linears, one of them finished out of place


def _tiny_qlora(dropout=0.0, device="cpu", hidden=64):
    """A tiny bf16 Llama whose decoder linears are bitsandbytes NF4 Linear4bit (quantized on `device`),
    with peft LoRA on q / v / gate / down: peft's Linear4bit wrappers."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_llama

    model = tiny_llama(seed=0, vocab=64, hidden=hidden, layers=2).to(device=device, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for cname, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", quant_storage=torch.bfloat16)
                q.weight = bnb.nn.Params4bit(child.weight.data.float().clone(), requires_grad=False, quant_type="nf4",
                                             quant_storage=torch.bfloat16, module=q)
                setattr(parent, cname, q.to(device))
    model.is_loaded_in_4bit = True
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                          target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(device=device, dtype=torch.bfloat16).normal_(0, 0.05)
    return pm


@pytest.mark.parametrize("path", ["qlora-linear", "hooked-base"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_recompute_stops_before_down_proj_4bit_base(dropout, path, monkeypatch, device="cpu", hidden=64):
    """QLoRA under non-reentrant checkpointing: the adapter's x @ A^T is saved before the 4-bit base
    runs, so each layer's recompute stops before down_proj's base (dequantize + matmul); the other
    bases run twice. Loss and LoRA gradients as peft's (same dropout masks under the same seed).
    Both fused paths: `qlora-linear` (the one-node 4-bit GEMM, kernels.qlora_linear; counted by the
    forward dequantizations of each weight) and `hooked-base` (a forward hook on each base layer, which
    keeps bitsandbytes' own forward: lora_xa, base, lora_add; counted by the hook).
    tests/test_gpu_kernels.py runs the same on a GPU (bitsandbytes' CUDA 4-bit path)."""
    from unsloth_dist.kernels import quant as Q

    ref = _tiny_qlora(dropout, device, hidden)
    assert type(ref.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    pat = copy.deepcopy(ref)
    assert patch_model(pat, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False).count("lora") == 8
    calls: dict[str, int] = {}
    bases = {name: m for name, m in pat.named_modules() if name.endswith(".base_layer")}
    if path == "hooked-base":
        for name, m in bases.items():
            m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    else:
        by_packed = {m.weight.data_ptr(): name for name, m in bases.items()}
        real_fwd = Q._Frozen4bitLinearLora.forward

        def counting_forward(ctx, x, xa, b, packed, *rest):
            calls[by_packed[packed.data_ptr()]] = calls.get(by_packed[packed.data_ptr()], 0) + 1
            return real_fwd(ctx, x, xa, b, packed, *rest)

        monkeypatch.setattr(Q._Frozen4bitLinearLora, "forward", staticmethod(counting_forward))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4)).to(device)
    results = []
    for m in (ref, pat):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        torch.manual_seed(7)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}))
    (lr, gr), (lp, gp) = results
    torch.testing.assert_close(lp, lr, rtol=1e-2, atol=1e-2)
    assert gr.keys() == gp.keys() and len(gr) == 16
    for n in gr:  # bf16 rounding in another order: compare by norm
        assert ((gp[n] - gr[n]).norm() / gr[n].norm()).item() < 3e-2, n
    assert len(calls) == 8
    for name, n in calls.items():
        assert n == (1 if ".down_proj." in name else 2), (name, n, calls)
