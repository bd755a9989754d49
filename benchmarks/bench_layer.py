"""Decoder-layer forward + backward time: eager transformers, our kernels, Liger-Kernel, and each of
them with the decoder layers under `torch.compile` — to decide whether compiling the layer pays
before building it into the Trainer (NOTES, "Not yet tried").

Builds the workload's Llama shape with `--layers` decoder layers and a small vocabulary (so the
head and loss are negligible), bf16 parameters (the compute dtype of fsdp / zero and of ours under
single / ddp), random tokens; times `loss.backward()` of the whole stack (no optimizer step).
Each variant runs in its own process (Liger patches transformers' classes globally).

    python benchmarks/bench_layer.py                          # 1B shape, every variant, on a GPU
    python benchmarks/bench_layer.py --variants ours,ours-compile --layers 8
    python benchmarks/bench_layer.py --shape tiny --variants hf,ours   # CPU smoke run

Prints per variant the median ms per step, ms per layer, the ratio to eager transformers, the
first step's loss (every variant must match eager's within bf16 rounding) and, for the compiled
variants, dynamo's graph count and graph breaks.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import LLAMA_1B, LLAMA_8B, TINY, build_model  # noqa: E402

SHAPES = {"1b": LLAMA_1B, "8b": LLAMA_8B, "tiny": TINY}
VARIANTS = ["hf", "hf-compile", "ours", "ours-compile", "liger", "liger-compile"]


def run_variant(args) -> dict:
    import torch

    variant = args.variant
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if variant.startswith("liger"):
        import liger_kernel.transformers.monkey_patch as LK

        LK.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                       fused_linear_cross_entropy=True)
    shape = dict(SHAPES[args.shape], num_hidden_layers=args.layers, vocab_size=min(SHAPES[args.shape]["vocab_size"], 1024))
    model = build_model({"shape": shape}, device, dtype, args.seq, "sdpa")
    cfg = model.config
    kernels = []
    if variant.startswith("ours"):
        from unsloth_dist.models.patching import patch_model

        kernels = patch_model(model).ops
    if variant.endswith("-compile"):
        for layer in model.model.layers:
            layer.compile()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.micro, args.seq), generator=g).to(device)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = step()
    first_loss = float(first)
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    grad_norm = float(grad.float().norm())
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out = dict(variant=variant, device=torch.cuda.get_device_name() if cuda else "cpu", layers=args.layers,
               shape=args.shape, seq=args.seq, micro=args.micro, ms=1e3 * statistics.median(times),
               ms_all=[round(1e3 * t, 2) for t in times], loss=first_loss, q_grad_norm=grad_norm, kernels=kernels)
    if variant.endswith("-compile"):
        from torch._dynamo.utils import counters

        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["graph_break_reasons"] = sorted(counters["graph_break"])[:8]
        out["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in this process
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    ap.add_argument("--out", help="write the records as JSON here")
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"--variants: unknown {bad}; choose from {VARIANTS}")
    records = []
    for v in variants:
        cmd = [sys.executable, __file__, "--variant", v, "--shape", args.shape, "--layers", str(args.layers),
               "--seq", str(args.seq), "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            records.append(dict(variant=v, status="timeout"))
            print(f"{v}: timed out after {args.timeout} s", flush=True)
            continue
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            records.append(dict(variant=v, status="failed", rc=p.returncode, tail=p.stderr[-2000:]))
            print(f"{v}: FAILED rc={p.returncode}\n{p.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[-1][len("RESULT "):])
        r["status"] = "ok"
        records.append(r)
    ok = [r for r in records if r["status"] == "ok"]
    base = next((r for r in ok if r["variant"] == "hf"), None)
    print(f"| variant | ms/step | ms/layer | vs hf eager | loss step 1 | q_proj grad norm | graphs / breaks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in ok:
        ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "–"
        gb = f"{r['unique_graphs']} / {r['graph_breaks']}" if "graph_breaks" in r else ""
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['ms'] / r['layers']:.2f} | {ratio} | {r['loss']:.5f} "
              f"| {r['q_grad_norm']:.4g} | {gb} |")
    if base:
        tol = 2e-2 if base["device"] != "cpu" else 1e-4
        for r in ok:
            if abs(r["loss"] - base["loss"]) > tol:
                print(f"WARNING loss: {r['variant']} step-1 loss {r['loss']:.5f} vs hf {base['loss']:.5f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(argv=sys.argv[1:], records=records), indent=1))
    if len(ok) < len(records):
        sys.exit(1)


if __name__ == "__main__":
    main()
