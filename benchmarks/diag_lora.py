"""Diagnostic (not a benchmark): peak memory / time of peft LoRA vs the fused LoRA update on a few
8B-shaped decoder layers, with and without activation checkpointing."""
import sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from unsloth_dist.models.patching import patch_model
from unsloth_dist.models.lora import enable_gradient_checkpointing

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=L, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, attn_implementation="sdpa")
for fused in (False, True):
    for ckpt in (True, False):
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear")).to(torch.bfloat16)
        patch_model(m, lora=fused)
        if ckpt:
            enable_gradient_checkpointing(m, True)
        m.train()
        ids = torch.randint(0, 32000, (4, 2048), device="cuda")
        for it in range(3):
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            out = m(input_ids=ids, labels=ids, loss_reduction="sum")
            torch.cuda.synchronize(); fwd_peak = torch.cuda.max_memory_allocated() - base; after_fwd = torch.cuda.memory_allocated() - base
            out.loss.backward()
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() - base
            m.zero_grad(set_to_none=True); del out
        print(f"DIAG fused={fused} ckpt={ckpt} layers={L}: after fwd {after_fwd/2**30:.2f} GiB, fwd peak {fwd_peak/2**30:.2f}, "
              f"total peak {peak/2**30:.2f} GiB, {dt*1e3:.0f} ms", flush=True)
        del m; torch.cuda.empty_cache()
