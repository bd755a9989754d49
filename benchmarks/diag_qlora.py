"""Diagnostic (not a benchmark): the QLoRA fused path against peft on one device.

A few 8B-width decoder layers quantized to NF4 (benchmarks/bench_train.quantize_4bit), peft LoRA on every
linear, activation checkpointing on. Prints, for peft's forward, the fused update with the adapter product
computed after the base layer ("base-first", the order before 2026-12-02) and before it ("xa-first",
kernels.lora_xa + lora_add): the loss with lora_B = 0 (the base model alone: must be bit-identical), the
loss and LoRA gradients with random lora_B (relative to peft), a repeat of the same step (determinism),
and how often each layer's 4-bit bases ran (xa-first: down_proj once, the others twice).

    python benchmarks/diag_qlora.py [LAYERS] [cpu]     (on the device: bash benchmarks/gpu_session.sh qdiag)
"""
import copy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as B  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from unsloth_dist.kernels import lora_delta  # noqa: E402
from unsloth_dist.models import patching as P  # noqa: E402

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
dev = torch.device("cpu" if "cpu" in sys.argv[2:] else "cuda")
shape = dict(B.LLAMA_8B, num_hidden_layers=layers, vocab_size=32000) if dev.type == "cuda" else dict(
    B.TINY, num_hidden_layers=layers)
seq, micro = (2048, 2) if dev.type == "cuda" else (32, 2)


def base_first(self, x, *args, **kwargs):  # the fused path as it was: base layer, then x @ A^T
    name = P._lora_fast_adapter(self, x, kwargs) if not args else None
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    out = self.base_layer(x)
    return lora_delta(out, self.lora_dropout[name](x), self.lora_A[name].weight, self.lora_B[name].weight,
                      self.scaling[name])


def build(b_random: bool):
    model = B.build_model({"shape": shape}, dev, torch.bfloat16, seq, "sdpa")
    B.quantize_4bit(model, torch.bfloat16)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=B.LORA_TARGETS))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
            if b_random and "lora_B" in n:
                with torch.no_grad():
                    p.normal_(0, 0.02)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    return pm


def variant(model, kind):
    m = copy.deepcopy(model)
    if kind == "peft":
        return m, {}
    P.patch_model(m, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False)
    calls = {}
    for name, mod in m.named_modules():
        if P._is_peft_lora_linear(mod):
            if kind == "base-first":
                mod.forward = types.MethodType(base_first, mod)
            mod.base_layer.register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return m, calls


def step(m, ids):
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return loss.detach().float().item(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


ids = torch.randint(0, shape["vocab_size"], (micro, seq), generator=torch.Generator().manual_seed(1)).to(dev)
for b_random in (False, True):
    model = build(b_random)
    ref_loss, ref_grads = step(variant(model, "peft")[0], ids)
    print(f"DIAG lora_B {'random' if b_random else 'zero'}: peft loss {ref_loss!r}", flush=True)
    for kind in ("base-first", "xa-first"):
        m, calls = variant(model, kind)
        loss, grads = step(m, ids)
        calls_first = dict(calls)
        loss2, _ = step(m, ids)
        rel = max(((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref_grads.items())
        down = sorted({v for k, v in calls_first.items() if k.endswith("down_proj")})
        other = sorted({v for k, v in calls_first.items() if not k.endswith("down_proj")})
        print(f"DIAG   {kind:10s} loss {loss!r} (minus peft {loss - ref_loss:+.3e}; repeat {loss2 - loss:+.3e}); "
              f"max LoRA grad rel. diff {rel:.2e}; base calls per step: down_proj {down}, others {other}", flush=True)
        del m
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
