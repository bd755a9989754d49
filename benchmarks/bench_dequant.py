"""4-bit dequantization on a GPU: ours (`unsloth_dist.kernels.dequantize_4bit`, one Triton launch)
against bitsandbytes' `dequantize_4bit` (nested scales, then the weight), on the Llama-3.1-8B linear
shapes, NF4 with double quantization (QLoRA's default), bf16 out. Checks bit-equality first, then
times each with CUDA events (median of --reps after warm-up) and reports the ratio.

    python benchmarks/bench_dequant.py --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def _time(fn, reps: int) -> float:
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    import torch
    import bitsandbytes.functional as bnbf
    from unsloth_dist.kernels import dequantize_4bit

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name, shape in SHAPES.items():
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                   quant_storage=torch.bfloat16)
        equal = torch.equal(dequantize_4bit(q, qs), bnbf.dequantize_4bit(q, qs))
        ours = _time(lambda: dequantize_4bit(q, qs), args.reps)
        bnb = _time(lambda: bnbf.dequantize_4bit(q, qs), args.reps)
        rows.append({"weight": name, "shape": list(shape), "bit_equal": equal, "ours_us": ours, "bnb_us": bnb,
                     "ours_vs_bnb_speed": bnb / ours})
        print(f"{name:10s} {str(shape):14s} equal={equal} ours {ours:7.1f} us  bitsandbytes {bnb:7.1f} us  "
              f"speed {bnb / ours:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
