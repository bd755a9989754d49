"""Device-run workers of tests/test_gpu_models.py (also runnable on CPU with gloo, for a smoke check).

    torchrun --nproc_per_node 2 tests/workers/models_gpu.py qlora BACKEND[,BACKEND...] MODEL_DIR OUT_DIR
        QLoRA (4-bit NF4 base, LoRA r=16, gradient checkpointing) under BACKEND; rank 0 writes
        OUT_DIR/qlora-BACKEND.json: per-step losses and the peak memory of every rank.
    python tests/workers/models_gpu.py generate DEVICE_MAP MODEL_DIR OUT_JSON
        greedy generation with the model placed by DEVICE_MAP (e.g. "cuda:0" or "balanced"); writes the
        tokens and the device map used.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_common import token_dataset  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.models.loader import FastLanguageModel  # noqa: E402

STEPS = int(os.environ.get("MG_STEPS", "12"))
SEQ = int(os.environ.get("MG_SEQ", "256"))


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def qlora(backend: str, model_dir: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    model, tok = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, device_map="auto",
                                                   max_seq_length=SEQ)
    load_peak = _peak_gib(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=cuda,
                                             random_state=3)
    vocab = model.config.vocab_size
    data = token_dataset(n=8 * STEPS, seed=3, vocab=vocab, min_len=SEQ // 2, max_len=SEQ)
    args = {"output_dir": os.path.join(out_dir, f"qlora-{backend}-run"), "per_device_train_batch_size": 8 // world,
            "max_steps": STEPS, "learning_rate": 5e-3, "warmup_steps": 1, "seed": 1, "disable_tqdm": True,
            "precision": "bf16-mixed" if cuda else "fp32"}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(model, data, args=args, backend=backend, tokenizer=tok)
    result = trainer.train()
    elapsed = time.perf_counter() - t0
    peak = _peak_gib(trainer.device)
    packed = [m for m in trainer.backend.module.modules()
              if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
    mine = {"rank": trainer.rank, "peak_mem_gib": peak, "load_peak_mem_gib": load_peak,
            "device": str(trainer.device), "n_linear4bit": len(packed)}
    if trainer.world_size > 1:
        import torch.distributed as dist

        every = [None] * trainer.world_size
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if trainer.rank == 0:
        rec = {"backend": trainer.backend.name, "world_size": trainer.world_size, "losses": result.losses,
               "per_rank": every, "seconds": elapsed, "steps": STEPS, "seq": SEQ,
               "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
               "params": sum(p.numel() for p in model.parameters())}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"qlora-{backend}.json"), "w") as f:
            json.dump(rec, f, indent=2)
        print(json.dumps(rec))


def generate(device_map: str, model_dir: str, out_json: str) -> None:
    dm = json.loads(device_map) if device_map.startswith("{") else device_map
    model, tok = FastLanguageModel.from_pretrained(model_dir, device_map=dm, dtype=torch.bfloat16
                                                   if torch.cuda.is_available() else torch.float32,
                                                   load_in_4bit=False)
    FastLanguageModel.for_inference(model)
    first = next(model.parameters()).device
    ids = torch.tensor([[5, 9, 17, 33, 40, 41, 42, 43], [60, 61, 62, 63, 64, 65, 66, 67]], device=first)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)
        logits = model(input_ids=ids).logits.float().cpu()
    plan = model.unsloth_device_plan
    rec = {"device_map": {k: str(v) for k, v in plan.device_map.items()}, "tokens": out.cpu().tolist(),
           "devices": sorted({str(p.device) for p in model.parameters()}), "plan": str(plan),
           "first_logits": logits[:, -1, :8].tolist()}
    with open(out_json, "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps({k: rec[k] for k in ("devices", "plan")}))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "qlora":
        backends, model_dir, out_dir = rest
        for b in backends.split(","):  # several backends run one after another in one process group
            qlora(b, model_dir, out_dir)
    elif mode == "generate":
        generate(*rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
