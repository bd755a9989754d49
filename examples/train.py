"""Train a causal LM with unsloth_dist under any launcher.

    python examples/train.py                                   # one process
    torchrun --nproc_per_node 2 examples/train.py --backend fsdp
    deepspeed --num_gpus 2 examples/train.py --backend zero2
    accelerate launch --config_file FILE examples/train.py     # backend from accelerate's env

Without --model it builds a small Llama from a config and trains it as a byte-level language
model (one token per UTF-8 byte, so no tokenizer download is needed) on --text, by default
this repository's own sources and docs. With --model DIR it loads a local Hugging Face model
directory and its tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_llama.yaml"), help="TrainConfig YAML")
    p.add_argument("--backend", default=None, help="single | ddp | fsdp | zero1 | zero2 | zero3 | auto (overrides the config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set backend.offload_optimizer=cpu)")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: a small Llama from config)")
    p.add_argument("--text", default=None, help="UTF-8 text file(s) to train on, comma separated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="width of the built-in model")
    p.add_argument("--layers", type=int, default=4, help="depth of the built-in model")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def default_corpus() -> list[Path]:
    files = sorted(ROOT.glob("unsloth_dist/**/*.py")) + sorted(ROOT.glob("backends/*.py")) + sorted(ROOT.glob("*.md"))
    return [f for f in files if f.is_file()]


def byte_samples(paths: list[Path], seq_len: int) -> list[dict]:
    data = b"\n".join(p.read_bytes() for p in paths)
    if len(data) < 2 * seq_len:
        sys.exit(f"error: --text has {len(data)} bytes; need at least {2 * seq_len} for --seq-len {seq_len}")
    return [{"input_ids": list(data[i : i + seq_len])} for i in range(0, len(data) - seq_len + 1, seq_len)]


def build_model(args, precision: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        path = Path(args.model)
        if not (path / "config.json").is_file():
            sys.exit(f"error: --model {args.model!r} is not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(args.seq_len, 256),
    )
    return LlamaForCausalLM(cfg), None


def main(argv=None) -> int:
    args = parse_args(argv)
    from unsloth_dist import ConfigError, Trainer, load_config
    from unsloth_dist.distributed import LaunchError

    try:
        cfg = load_config(args.config, overrides=args.overrides, **({"backend": args.backend} if args.backend else {}))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.text.split(",")] if args.text else default_corpus()
    for p in paths:
        if not p.is_file():
            print(f"error: --text file {str(p)!r} does not exist", file=sys.stderr)
            return 2
    model, tokenizer = build_model(args, cfg.precision)
    if tokenizer is not None:
        text = "\n".join(p.read_text() for p in paths)
        ids = tokenizer(text)["input_ids"]
        train = [{"input_ids": ids[i : i + args.seq_len]} for i in range(0, len(ids) - args.seq_len + 1, args.seq_len)]
    else:
        train = byte_samples(paths, args.seq_len)
    n_eval = max(1, len(train) // 20)
    train, evals = train[n_eval:], train[:n_eval]
    try:
        trainer = Trainer(model, train, args=cfg, eval_dataset=evals, tokenizer=tokenizer)
    except (ConfigError, LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    if trainer.rank == 0:
        print(
            f"backend={trainer.backend.name} world_size={trainer.world_size} steps={result.global_step} "
            f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}  eval {before:.4f} -> {after:.4f}  "
            f"({result.train_runtime_s:.1f}s)  metrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
