"""Measured peak GPU memory per rank vs `unsloth-dist plan`'s estimate.

Trains a Llama-3.2-1B-shaped model (random weights) for a few steps with unsloth_dist's Trainer
under each backend on N GPUs (torchrun), full fine-tuning and LoRA, and compares
`torch.cuda.max_memory_allocated()` of every rank with the planner's `allocated` estimate for the
same backend, precision, micro-batch, sequence length and checkpointing.

    python benchmarks/bench_memory.py --gpus 2 --out results.json          # all cases
    python benchmarks/bench_memory.py --gpus 2 --cases fsdp:full zero3:lora
    python benchmarks/bench_memory.py --gpus 1 --parallel 3 --memory-peak DIR --cases ddp:full ddp:full:plain ddp:lora:gc

A case is BACKEND:full|lora|qlora[:OPT...] (qlora: an NF4 base built on the GPU as bench_train.py's qlora-8b); OPT `plain` leaves the model as transformers built it (default: its
kernels patched in with `patch_model`, what FastLanguageModel.from_pretrained gives), `gc` turns gradient
checkpointing on (as --checkpointing does for every case), `bf16` / `bf16-mixed` / `fp32` sets the
precision of that case (default --precision), `gpu` builds the model in bf16 on the GPU (fast for large
shapes). BACKEND is one of the planner's variants: single, ddp, zero1, zero2, zero3, fsdp, fsdp(grad_op),
zero2+offload_opt, zero3+offload_opt, zero3+offload_all, fsdp+cpu_offload. `--parallel K` runs K cases at once on the
same GPUs (each case's peak is its own process's; only the wall time changes). `--memory-peak DIR` also
names what is alive at each case's peak, by call site (benchmarks/mem_peak.py, rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CASES = ["ddp:full", "fsdp:full", "zero3:full", "ddp:lora", "fsdp:lora", "zero3:lora"]


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unsloth_dist import Trainer
    from unsloth_dist.launch import planner as PL

    backend, kind, *opts = args.case.split(":")
    variant = next((v for v in PL.VARIANTS if v.name == backend), None)
    if variant is None:
        raise SystemExit(f"case {args.case!r}: backend {backend!r} is none of the planner's {[v.name for v in PL.VARIANTS]}")
    # the planner's variant as a backend config
    backend_cfg: dict = {"name": variant.backend}
    if variant.backend == "fsdp":
        backend_cfg.update(sharding=variant.sharding, **({"cpu_offload": True} if variant.offload_param else {}))
    elif variant.backend.startswith("zero"):
        backend_cfg.update(**({"offload_optimizer": "cpu"} if variant.offload_optimizer else {}),
                           **({"offload_param": "cpu"} if variant.offload_param else {}))
    kernels = "plain" not in opts
    precision = next((o for o in opts if o in PL.PRECISIONS), args.precision)
    checkpointing = args.checkpointing or "gc" in opts
    shape = PL.resolve_model(args.model)
    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=max(args.seq, 4096), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if kind == "qlora" or "gpu" in opts:  # bf16 on the GPU (fast for large shapes; precision bf16 only)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda", torch.cuda.current_device()):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    else:
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg)
    if kind == "qlora":
        # NF4 base (double quantization, bf16 storage) as bench_train.py's qlora-8b builds it: the
        # decoder layers' linears quantized on the GPU; then LoRA through add_lora
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_train import quantize_4bit

        from unsloth_dist.models.lora import add_lora

        quantize_4bit(model, torch.bfloat16)
        model = add_lora(model, r=args.lora_r, lora_alpha=args.lora_r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        torch.cuda.empty_cache()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if kernels:
        from unsloth_dist.models import patch_model

        patch_model(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(1)
    n = args.micro_batch * world * args.steps
    data = [{"input_ids": torch.randint(0, shape.vocab, (args.seq,), generator=g).tolist()} for _ in range(n)]
    trainer = Trainer(model, data, backend=backend_cfg, args={
        "output_dir": args.out_dir, "precision": precision, "per_device_train_batch_size": args.micro_batch,
        "max_steps": args.steps, "learning_rate": 1e-5, "gradient_checkpointing": checkpointing,
        "disable_tqdm": True, "logging_steps": 1,
    })
    setup_peak = torch.cuda.max_memory_allocated()  # the Trainer's construction: the backend's setup
    torch.cuda.reset_peak_memory_stats()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mem_peak import MemoryPeak

    mem = MemoryPeak(args.memory_peak if int(os.environ.get("RANK", "0")) == 0 else None, torch.device("cuda", torch.cuda.current_device()),
                     args.case.replace(":", "_"))
    mem.start()
    result = trainer.train()
    mem.finish()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    peaks = torch.tensor([peak, reserved], dtype=torch.float64, device="cuda")
    import torch.distributed as dist

    gathered = [torch.zeros_like(peaks) for _ in range(world)]
    if dist.is_initialized():
        dist.all_gather(gathered, peaks)
    else:  # backend single: no process group
        gathered = [peaks]
    if trainer.rank == 0:
        est = PL.estimate(shape, variant, precision, gpus=world, micro_batch=args.micro_batch, seq=args.seq,
                          lora=kind == "lora", lora_r=args.lora_r, gradient_checkpointing=checkpointing,
                          kernels=kernels, qlora=kind == "qlora")
        record = {
            "case": args.case, "model": args.model, "backend": backend, "kind": kind, "gpus": world, "precision": precision,
            "micro_batch": args.micro_batch, "seq": args.seq, "checkpointing": checkpointing, "kernels": kernels,
            "params": shape.params, "losses": result.losses,
            "measured_allocated_gib": [float(x[0]) / 2**30 for x in gathered],
            "setup_peak_gib": setup_peak / 2**30,  # rank 0, before the steps (not in the peak above)
            "measured_reserved_gib": [float(x[1]) / 2**30 for x in gathered],
            "estimated_allocated_gib": est.allocated / 2**30, "estimated_reserved_gib": est.reserved / 2**30,
            # the Trainer's own pre-flight estimate (read off the model object): must be the same
            "trainer_estimate_gib": (trainer.memory_estimate.allocated / 2**30 if trainer.memory_estimate is not None
                                     else None),
            "estimate_parts_gib": {k: v / 2**30 for k, v in est.parts.items()},
        }
        record["ratio_estimated_to_measured"] = record["estimated_allocated_gib"] / max(record["measured_allocated_gib"])
        Path(args.result).write_text(json.dumps(record, indent=1))


def driver(args) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    results: dict = {}
    pending = list(enumerate(args.cases))
    running: list = []

    def launch(i: int, case: str):
        name = case.replace(":", "_")
        res = Path(args.out_dir) / f"{name}.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus),
               "--master_port", str(29600 + i), __file__, "--worker", "--case", case, "--result", str(res),
               "--model", args.model, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
               "--precision", args.precision, "--steps", str(args.steps), "--out-dir", str(Path(args.out_dir) / name),
               "--lora-r", str(args.lora_r)] + (["--checkpointing"] if args.checkpointing else []) + (
               ["--memory-peak", args.memory_peak] if args.memory_peak else [])
        log = open(Path(args.out_dir) / f"{name}.log", "w")
        return (i, case, res, log, time.time(), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))

    while pending or running:
        while pending and len(running) < max(1, args.parallel):
            running.append(launch(*pending.pop(0)))
        time.sleep(1)
        for item in [r for r in running if r[5].poll() is not None]:
            running.remove(item)
            i, case, res, log, t0, proc = item
            log.close()
            text = Path(log.name).read_text()
            for line in text.splitlines():
                if line.startswith("MEMPEAK"):
                    print(f"[{case}] {line}", flush=True)
            if proc.returncode != 0 or not res.is_file():
                tb = text.find("Traceback")  # the first rank's own error, not the launcher's summary
                err = text[tb:tb + 3000] if tb >= 0 else text[-3000:]
                print(f"[{case}] FAILED ({proc.returncode})\n{err}", flush=True)
                results[i] = {"case": case, "error": err}
                continue
            rec = json.loads(res.read_text())
            rec["wall_s"] = time.time() - t0
            if args.memory_peak:
                mp = Path(args.memory_peak) / f"{case.replace(':', '_')}.json"
                if mp.is_file():
                    rec["memory_peak"] = json.loads(mp.read_text())
            results[i] = rec
            print(f"[{case}] measured {max(rec['measured_allocated_gib']):.2f} GiB, estimated "
                  f"{rec['estimated_allocated_gib']:.2f} GiB (ratio {rec['ratio_estimated_to_measured']:.3f}), "
                  f"loss {rec['losses'][0]:.3f} -> {rec['losses'][-1]:.3f} ({rec['wall_s']:.0f}s)", flush=True)
    rows = [results[i] for i in sorted(results)]
    print("\n| case | GPUs | measured peak allocated GiB (max rank) | planner estimate GiB | estimate / measured |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | | failed | | |")
        else:
            print(f"| {r['case']} | {r['gpus']} | {max(r['measured_allocated_gib']):.2f} | "
                  f"{r['estimated_allocated_gib']:.2f} | {r['ratio_estimated_to_measured']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--case", default=None)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out-dir", default="/tmp/bench_memory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--parallel", type=int, default=1, help="cases run at once (same GPUs)")
    ap.add_argument("--memory-peak", default=None, help="folder: what is alive at each case's peak (rank 0)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
