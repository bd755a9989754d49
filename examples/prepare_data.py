"""Tokenize a dataset into the cache ahead of training and print the data report.

    python examples/prepare_data.py --tokenizer PATH_OR_NAME --config run.yaml
    python examples/prepare_data.py --tokenizer PATH_OR_NAME --paths examples/data/chat.jsonl \\
        --max-seq-length 1024 --packing --eval-split 0.05

`--config` reads the `data:` section of a training YAML (or a YAML that is only that section).
Training with the same data settings and tokenizer then reads the cache instead of tokenizing;
useful before a multi-node launch, or to see what the bad-data report says before using GPUs.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (or hub name if it is cached locally)")
    ap.add_argument("--config", help="YAML with a data: section")
    ap.add_argument("--paths", nargs="*", help="data files or folders (instead of --config)")
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--eval-split", type=float)
    ap.add_argument("--template")
    ap.add_argument("--cache-dir")
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    import yaml
    from transformers import AutoTokenizer

    from unsloth_dist.config import ConfigError
    from unsloth_dist.data import DataConfig, DataError, build_datasets

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.config:
            with open(args.config) as f:
                raw = yaml.safe_load(f) or {}
            section = raw.get("data", raw) if isinstance(raw, dict) else None
            if not isinstance(section, dict):
                print(f"{args.config}: no data: section", file=sys.stderr)
                return 2
            seed = raw.get("seed", args.seed)
            cfg = DataConfig(**section)
        else:
            if not args.paths:
                ap.error("give --config or --paths")
            seed = args.seed
            cfg = DataConfig(paths=args.paths, max_seq_length=args.max_seq_length, packing=args.packing,
                             eval_split=args.eval_split, template=args.template, cache_dir=args.cache_dir,
                             num_proc=args.num_proc)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        _, _, report = build_datasets(cfg, tokenizer, seed=seed)
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(report.summary())
    print("cache:", ", ".join(report.cache_paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
