"""Generation on several GPUs, two ways.

Model parallel, one process: the model is split across the GPUs by a device map (accelerate's
`infer_auto_device_map`, never splitting a decoder layer), for a model too large for one GPU:

    python examples/multi_gpu_inference.py --model DIR                        # device_map auto
    python examples/multi_gpu_inference.py --model DIR --device-map sequential --max-memory 0=20GiB,1=20GiB

Data parallel, one replica per rank: prompts are sharded over the ranks (prompt i goes to rank
i % world), every rank generates its share in batches, and rank 0 gathers the results back in the
prompt order:

    torchrun --nproc_per_node 2 examples/multi_gpu_inference.py --model DIR

Both print greedy and sampled completions (--no-sample for greedy only); --json FILE writes them
(rank 0). Prompts: --prompt (repeatable) or --prompts FILE (one per line). Works on the CPU too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = ["the cat sat on the", "a big red", "the dog ran to", "a small blue house and", "then it was"]


def parse_max_memory(text):
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, value = item.split("=", 1)
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def generate(model, tokenizer, prompts, max_new_tokens, sample, temperature, top_p, seed, batch_size, indices=None):
    """Completions of `prompts` in batches. Sampling seeds each batch with `seed` + the global index
    of its first prompt (`indices`: each prompt's index in the whole list; default 0, 1, ...), so
    ranks that hold different prompts never draw the same random stream."""
    import torch

    indices = list(range(len(prompts))) if indices is None else list(indices)
    tokenizer.padding_side = "left"  # decoder-only batch generation pads on the left
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if sample:
            torch.manual_seed(seed + indices[start])
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new:
            results.append({"tokens": row.tolist(), "text": tokenizer.decode(row, skip_special_tokens=True)})
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (or hub id)")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--device-map", default="auto", help="auto | balanced | sequential | cpu | cuda:K (one process)")
    p.add_argument("--max-memory", default=None, help="e.g. 0=20GiB,1=20GiB (one process)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: auto)")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-sample", action="store_true", help="greedy only")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    import torch
    import torch.distributed as dist

    from unsloth_dist.models import FastLanguageModel

    prompts = args.prompt or (Path(args.prompts).read_text().splitlines() if args.prompts else DEFAULT_PROMPTS)
    prompts = [x for x in prompts if x.strip()]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device_map = "auto"  # one whole replica on this rank's device
    else:
        device_map = args.device_map
    model, tok = FastLanguageModel.from_pretrained(
        args.model, dtype=args.dtype, device_map=device_map, max_memory=parse_max_memory(args.max_memory),
        load_in_4bit=args.load_in_4bit, kernels=not args.no_kernels)
    FastLanguageModel.for_inference(model)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer; generation needs one")
    plan = getattr(model, "unsloth_device_plan", None)
    if rank == 0 and plan is not None:
        print(f"[rank 0] {plan}")

    mine = [(i, pr) for i, pr in enumerate(prompts) if i % world == rank]
    texts = [pr for _, pr in mine]
    modes = [("greedy", False)] + ([] if args.no_sample else [("sampled", True)])
    local_results = {}
    for name, sample in modes:
        res = generate(model, tok, texts, args.max_new_tokens, sample, args.temperature, args.top_p, args.seed,
                       args.batch_size, indices=[i for i, _ in mine]) if texts else []
        local_results[name] = [(i, r) for (i, _), r in zip(mine, res)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local_results)
    else:
        gathered = [local_results]
    if rank == 0:
        out = {"world_size": world, "device_map": plan.device_map if plan is not None else None, "prompts": prompts}
        for name, _ in modes:
            rows = sorted((pair for g in gathered for pair in g[name]), key=lambda t: t[0])
            out[name] = [r for _, r in rows]
            for (i, r) in rows:
                print(f"[{name}] {prompts[i]!r} -> {r['text']!r}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
