"""LoRA training of a model loaded by FastLanguageModel under one backend, then both exports.

    torchrun --nproc_per_node 2 tests/workers/models_train.py MODEL_DIR OUT_DIR BACKEND [BACKEND...]
    (backend single: plain python, one process)

For each backend writes OUT_DIR/BACKEND.pt (rank 0): per-step losses, the names of the weights that
moved, fixed probe ids and the trained model's logits on them (computed collectively through the
backend's wrapped model), and the exports OUT_DIR/BACKEND-adapter/ and OUT_DIR/BACKEND-merged/ (fp32).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_common import token_dataset  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.models.export import save_lora_adapter, save_merged  # noqa: E402
from unsloth_dist.models.loader import FastLanguageModel  # noqa: E402

STEPS = int(os.environ.get("MT_STEPS", "8"))


def run(model_dir: str, out_dir: str, backend: str) -> None:
    model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, device_map="auto", load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=7)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = {
        "output_dir": os.path.join(out_dir, f"{backend}-run"),
        "per_device_train_batch_size": 4 // world,
        "max_steps": STEPS,
        "learning_rate": 2e-2,
        "precision": "fp32",
        "seed": 1,
        "disable_tqdm": True,
    }
    trainer = Trainer(model, token_dataset(n=4 * STEPS, seed=3), args=args, backend=backend, tokenizer=tok)
    result = trainer.train()
    sd = trainer.full_state_dict()
    save_lora_adapter(trainer, None, os.path.join(out_dir, f"{backend}-adapter"), tokenizer=tok)
    save_merged(trainer, os.path.join(out_dir, f"{backend}-merged"), dtype=torch.float32, tokenizer=tok)
    # the trained model's logits, through the backend's own (sharded / wrapped) model: collective
    ids = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 40, 41], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69]])
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(input_ids=ids.to(trainer.device), attention_mask=torch.ones_like(ids).to(trainer.device))
    logits = out.logits.float().cpu()
    if trainer.rank == 0:
        moved = sorted(k for k, v in initial.items() if not torch.equal(v.float().cpu(), sd[k].float()))
        torch.save({"losses": result.losses, "moved": moved, "ids": ids, "logits": logits,
                    "backend": trainer.backend.name, "world_size": trainer.world_size,
                    "n_keys": len(sd), "missing": sorted(set(initial) - set(sd))},
                   os.path.join(out_dir, f"{backend}.pt"))


if __name__ == "__main__":
    model_dir, out_dir, *backends = sys.argv[1:]
    for b in backends:
        run(model_dir, out_dir, b)
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
