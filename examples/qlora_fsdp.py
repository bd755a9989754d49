"""QLoRA under FSDP2: a 4-bit NF4 base model, sharded over the GPUs, with LoRA adapters trained on it.

    torchrun --nproc_per_node 2 examples/qlora_fsdp.py --model DIR

Needs CUDA GPUs (one process per GPU: --nproc_per_node up to the GPU count); on a machine without
one it stops with a message saying so. Options: --data, --seq-len, --max-steps, --batch-size,
--grad-accum, --lr, --r (LoRA rank), --sharding (full | grad_op | hybrid), --out.
DIR is a local Hugging Face model directory with its tokenizer (or a hub id where the hub is
reachable). What it does:

    model, tok = FastLanguageModel.from_pretrained(DIR, load_in_4bit=True)   # NF4, double quant, bf16 storage
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=True)
    Trainer(model, args={..., "data": {...}}, backend="fsdp", tokenizer=tok).train()

The 4-bit weights are stored packed in a bf16 tensor (`bnb_4bit_quant_storage` = the compute dtype),
so FSDP2 shards and gathers them like any other parameter and each GPU holds 1/N of the base model.
The data is --data (JSONL / JSON / CSV / Parquet in any format the data pipeline reads; default: the
shipped instruction set examples/data/instructions.jsonl), rendered with the tokenizer's chat template
(the built-in default when it has none), loss on the answers only, packed into rows of --seq-len tokens. Rank 0 writes the adapter to
OUT/adapter and OUT/summary.json (losses, peak memory of every rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NO_CUDA = (
    "examples/qlora_fsdp.py needs CUDA GPUs and none is visible here ({why}). QLoRA under FSDP2 shards "
    "bitsandbytes 4-bit weights across GPUs; run it on a GPU machine with "
    "`torchrun --nproc_per_node N_GPUS examples/qlora_fsdp.py --model DIR`. On a CPU, LoRA (not 4-bit) "
    "runs with `torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --lora`."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (or hub id)")
    p.add_argument("--data", default=str(ROOT / "examples" / "data" / "instructions.jsonl"),
                   help="training data file(s) or folder, comma separated (default: the shipped instruction set)")
    p.add_argument("--out", default="outputs/qlora_fsdp")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2, help="rows per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--sharding", default="full", help="full | grad_op | hybrid (backend.sharding)")
    return p.parse_args(argv)


def cuda_problem() -> str | None:
    """Why this machine cannot run the example, or None."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        return (f"torch {torch.__version__} is a CPU-only build" if built is None else
                f"torch {torch.__version__} (CUDA {built}) sees no GPU, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    # every rank prints: the launcher ends the others as soon as the first one exits
    why = cuda_problem()
    if why is not None:
        print(NO_CUDA.format(why=why), file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a bitsandbytes build without this CUDA
        print(f"examples/qlora_fsdp.py: load_in_4bit needs bitsandbytes, which failed to import ({exc}); "
              "pip install bitsandbytes", file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from unsloth_dist import ConfigError, FastLanguageModel, Trainer
    from unsloth_dist.distributed import LaunchError

    try:
        # ---- the QLoRA snippet
        model, tok = FastLanguageModel.from_pretrained(args.model, load_in_4bit=True, max_seq_length=args.seq_len)
        model = FastLanguageModel.get_peft_model(model, r=args.r, lora_alpha=args.r, use_gradient_checkpointing=True)
        config = {
            "output_dir": args.out,
            "precision": "bf16-mixed",
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": args.grad_accum,
            "learning_rate": args.lr,
            "warmup_steps": min(5, args.max_steps - 1),
            "logging_steps": 1,
            "data": {"paths": args.data.split(","), "max_seq_length": args.seq_len, "packing": True,
                     "truncation": "right"},
        }
        trainer = Trainer(model, args=config, backend={"name": "fsdp", "sharding": args.sharding}, tokenizer=tok)
        result = trainer.train()
        # ----
    except (ConfigError, LaunchError, FileNotFoundError) as exc:  # the user's input, not a bug
        print(f"error: {exc}", file=sys.stderr)
        return 2

    adapter = FastLanguageModel.save_pretrained_merged(trainer, Path(args.out) / "adapter", tok, save_method="lora")
    import torch

    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    peaks = [None] * trainer.world_size
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if trainer.rank == 0:
        summary = {"backend": trainer.backend.name, "world_size": trainer.world_size, "steps": result.global_step,
                   "losses": result.losses, "peak_mem_gib_per_rank": peaks, "adapter": str(adapter),
                   "gpu": torch.cuda.get_device_name(0)}
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"qlora fsdp world_size={trainer.world_size} steps={result.global_step} "
              f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} peak GiB/rank {[round(p, 2) for p in peaks]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
