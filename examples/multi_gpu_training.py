"""Multi-GPU training with the seed API, unchanged from a single-GPU script: FastLanguageModel.from_pretrained
+ get_peft_model + UnslothTrainingArguments + UnslothTrainer. The same file runs on one process or many.

    python examples/multi_gpu_training.py --model DIR                       # one process
    torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --lora   # DDP, one replica per rank
    torchrun --nproc_per_node 2 examples/multi_gpu_training.py --model DIR --backend zero3 --lora

DIR is a local Hugging Face model directory with its tokenizer (or a hub id where the hub is
reachable). The training data is a small built-in text set (or --data FILE.jsonl with a "text"
field), tokenized by the trainer. --backend auto (the default) is ddp under torchrun with several
ranks and single in one process; --backend fsdp / zero1 / zero2 / zero3 pick another. --lora trains
LoRA adapters, --load-in-4bit a QLoRA (bitsandbytes NF4) base (see examples/qlora_fsdp.py for QLoRA
under FSDP2 on GPUs). The adapter is saved to OUT/adapter, a fully fine-tuned model to OUT/model;
rank 0 writes OUT/summary.json (steps, losses, backend, world size) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = "the cat dog sat on mat ran to a red blue big small house tree and".split()


def builtin_texts(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))} for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (or hub id)")
    p.add_argument("--out", default="outputs/multi_gpu_training")
    p.add_argument("--data", default=None, help="JSONL file with a 'text' field")
    p.add_argument("--backend", default="auto", help="auto | single | ddp | fsdp | zero1 | zero2 | zero3")
    p.add_argument("--dist-backend", default=None, help="nccl | gloo (default: nccl with GPUs, gloo without)")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the full model")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base (implies --lora)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from datasets import Dataset

    from unsloth_dist import FastLanguageModel
    from unsloth_dist.trainer import UnslothTrainer, UnslothTrainingArguments

    if args.data:
        rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    else:
        rows = builtin_texts()
    ds = Dataset.from_list(rows)

    # ---- the seed snippet
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model, device_map="auto",
                                                         load_in_4bit=args.load_in_4bit)
    if args.lora or args.load_in_4bit:
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    dist_backend = args.dist_backend or ("nccl" if _cuda() else "gloo")
    training_args = UnslothTrainingArguments(
        enable_distributed_training=True,
        distributed_backend=dist_backend,
        backend=args.backend,
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        learning_rate=2e-3,
        logging_steps=1,
        report_to="none",
    )
    trainer = UnslothTrainer(model=model, args=training_args, train_dataset=ds, tokenizer=tokenizer)
    out = trainer.train()
    # ----
    trainer.save_model(os.path.join(args.out, "adapter" if (args.lora or args.load_in_4bit) else "model"))
    if trainer.rank == 0:
        summary = {"global_step": out.global_step, "training_loss": out.training_loss, "world_size": trainer.world_size,
                   "backend": trainer.trainer.backend.name, "losses": trainer.state.losses,
                   "precision": trainer.config.precision, "dist_backend": trainer.config.dist_backend}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    rc = main()
    from unsloth_dist.distributed import shutdown

    shutdown()  # after main(): the trainer and models are gone; the ranks end together, groups destroyed
    sys.exit(rc)
