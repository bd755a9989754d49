"""Measured peak GPU memory per rank vs `unsloth-dist plan`'s estimate.

Trains a Llama-3.2-1B-shaped model (random weights) for a few steps with unsloth_dist's Trainer
under each backend on N GPUs (torchrun), full fine-tuning and LoRA, and compares
`torch.cuda.max_memory_allocated()` of every rank with the planner's `allocated` estimate for the
same backend, precision, micro-batch, sequence length and checkpointing.

    python benchmarks/bench_memory.py --gpus 2 --out results.json          # all cases
    python benchmarks/bench_memory.py --gpus 2 --cases fsdp:full zero3:lora
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

    backend, kind = args.case.split(":")
    shape = PL.resolve_model(args.model)
    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=max(args.seq, 4096), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(1)
    n = args.micro_batch * world * args.steps
    data = [{"input_ids": torch.randint(0, shape.vocab, (args.seq,), generator=g).tolist()} for _ in range(n)]
    trainer = Trainer(model, data, backend=backend, args={
        "output_dir": args.out_dir, "precision": args.precision, "per_device_train_batch_size": args.micro_batch,
        "max_steps": args.steps, "learning_rate": 1e-5, "gradient_checkpointing": args.checkpointing,
        "disable_tqdm": True, "logging_steps": 1,
    })
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    peaks = torch.tensor([peak, reserved], dtype=torch.float64, device="cuda")
    import torch.distributed as dist

    gathered = [torch.zeros_like(peaks) for _ in range(world)]
    dist.all_gather(gathered, peaks)
    if trainer.rank == 0:
        variant = next(v for v in PL.VARIANTS if v.name == backend)
        est = PL.estimate(shape, variant, args.precision, gpus=world, micro_batch=args.micro_batch, seq=args.seq,
                          lora=kind == "lora", lora_r=args.lora_r, gradient_checkpointing=args.checkpointing)
        record = {
            "case": args.case, "backend": backend, "kind": kind, "gpus": world, "precision": args.precision,
            "micro_batch": args.micro_batch, "seq": args.seq, "checkpointing": args.checkpointing,
            "params": shape.params, "losses": result.losses,
            "measured_allocated_gib": [float(x[0]) / 2**30 for x in gathered],
            "measured_reserved_gib": [float(x[1]) / 2**30 for x in gathered],
            "estimated_allocated_gib": est.allocated / 2**30, "estimated_reserved_gib": est.reserved / 2**30,
            "estimate_parts_gib": {k: v / 2**30 for k, v in est.parts.items()},
        }
        record["ratio_estimated_to_measured"] = record["estimated_allocated_gib"] / max(record["measured_allocated_gib"])
        Path(args.result).write_text(json.dumps(record, indent=1))


def driver(args) -> int:
    rows = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for case in args.cases:
        res = Path(args.out_dir) / f"{case.replace(':', '_')}.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus),
               "--master_port", str(29600 + len(rows)), __file__, "--worker", "--case", case, "--result", str(res),
               "--model", args.model, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
               "--precision", args.precision, "--steps", str(args.steps), "--out-dir", args.out_dir,
               "--lora-r", str(args.lora_r)] + (["--checkpointing"] if args.checkpointing else [])
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not res.is_file():
            print(f"[{case}] FAILED ({proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            rows.append({"case": case, "error": proc.stderr[-2000:]})
            continue
        rec = json.loads(res.read_text())
        rec["wall_s"] = time.time() - t0
        rows.append(rec)
        print(f"[{case}] measured {max(rec['measured_allocated_gib']):.2f} GiB, estimated "
              f"{rec['estimated_allocated_gib']:.2f} GiB (ratio {rec['ratio_estimated_to_measured']:.3f}), "
              f"loss {rec['losses'][0]:.3f} -> {rec['losses'][-1]:.3f} ({rec['wall_s']:.0f}s)", flush=True)
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
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
