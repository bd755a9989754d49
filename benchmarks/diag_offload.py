"""Activation offload on one GPU: host <-> device copy bandwidth (pinned memory, alone and beside a
GEMM load), and a few decoder layers' forward / backward time and memory with and without offload.

    python benchmarks/diag_offload.py [--layers 8] [--hidden 4096] [--tokens 8192]

Prints a few lines; nothing is written. (Issue: training performance; NOTES 34.)
"""
from __future__ import annotations

import argparse
import time

import torch


def bandwidth(nbytes: int, reps: int = 10, load: bool = False) -> tuple[float, float]:
    dev = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = []
    for direction in ("d2h", "h2d"):
        torch.cuda.synchronize()
        if load:
            for _ in range(40):
                torch.mm(a, a)  # queued on the compute stream while the copies run on the side stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record(side)
            for _ in range(reps):
                if direction == "d2h":
                    host.copy_(dev, non_blocking=True)
                else:
                    dev.copy_(host, non_blocking=True)
            end.record(side)
        torch.cuda.synchronize()
        out.append(nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9)
    return out[0], out[1]


def lag(layers: int, hidden: int, tokens: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import unsloth_dist.models.offload as O
    from unsloth_dist.models.lora import enable_gradient_checkpointing

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                      max_position_embeddings=2048, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    enable_gradient_checkpointing(model, True)
    ids = torch.randint(0, 32000, (tokens // 2048, 2048), device="cuda")
    for offload in (False, False, True, True):  # the first of each warms up
        if offload:
            O.enable_activation_offload(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated()
        out = model(input_ids=ids, labels=ids)
        held = torch.cuda.memory_allocated() - before
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"offload={offload}: forward {1e3 * (t1 - t0):.1f} ms, backward {1e3 * (t2 - t1):.1f} ms, held after "
              f"forward {held / 2**20:.0f} MiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        model.zero_grad(set_to_none=True)
        del out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192)
    a = p.parse_args()
    n = a.tokens * a.hidden * 2
    for load in (False, True):
        d2h, h2d = bandwidth(n, load=load)
        print(f"pinned copies of {n / 2**20:.0f} MiB{' beside GEMMs' if load else ''}: D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s",
              flush=True)
    lag(a.layers, a.hidden, a.tokens)


if __name__ == "__main__":
    main()
