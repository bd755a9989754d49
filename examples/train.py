"""Train a causal LM with unsloth_dist under any launcher.

    python examples/train.py                                   # one process
    torchrun --nproc_per_node 2 examples/train.py --backend fsdp
    deepspeed --num_gpus 2 examples/train.py --backend zero2
    accelerate launch --config_file FILE examples/train.py     # backend from accelerate's env

The same as `unsloth-dist train CONFIG` (both use unsloth_dist.recipes). Without --model it
builds a small Llama from a config and trains it as a byte-level language model (one token per
UTF-8 byte, so no tokenizer download is needed) on --text, by default this package's own
sources. With --model DIR it loads a local Hugging Face model directory and its tokenizer.
Under `accelerate launch` with backend auto, the backend (FSDP sharding, ZeRO stage, offload)
comes from the accelerate config, and a launch that disagrees with the recipe is an error.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--hidden", type=int, default=None, help="width of the built-in model (default 128; not with --model)")
    p.add_argument("--layers", type=int, default=None, help="depth of the built-in model (default 4; not with --model)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from unsloth_dist import ConfigError, load_config
    from unsloth_dist.distributed import LaunchError
    from unsloth_dist.launch.accelerate_config import AccelerateLaunchError
    from unsloth_dist.recipes import RecipeError, RecipeOptions, train_recipe  # noqa: F401

    opts = RecipeOptions(model=args.model, text=args.text, seq_len=args.seq_len, hidden=args.hidden, layers=args.layers)
    try:
        cfg = load_config(args.config, overrides=args.overrides, **({"backend": args.backend} if args.backend else {}))
        train_recipe(cfg, opts)
    except (ConfigError, LaunchError, AccelerateLaunchError, RecipeError, ValueError) as exc:  # user mistakes
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
