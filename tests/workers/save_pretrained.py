"""`model.save_pretrained(dir)` right after multi-rank training, called on every rank as a
single-GPU script run under a launcher does (2 ranks, gloo): under fsdp / zero3 it gathers the shards
(before: an error, or an adapter of empty tensors); under ddp rank 0 writes. Each output is compared
on rank 0 with the collective exporters' (save_lora_adapter / save_merged) output.

    torchrun --nproc_per_node 2 tests/workers/save_pretrained.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import add_lora, ragged_dataset, tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.models.export import save_lora_adapter, save_merged  # noqa: E402


def main(out: str) -> None:
    cases = [("ddp", True), ("fsdp", True), ("fsdp", False), ("zero3", True)]
    records = {}
    for backend, lora in cases:
        name = f"{backend}-{'lora' if lora else 'full'}"
        model = add_lora(tiny_llama(seed=0)) if lora else tiny_llama(seed=0)
        trainer = Trainer(model, ragged_dataset(n=16, seed=1), backend=backend, args={
            "output_dir": os.path.join(out, name, "run"), "per_device_train_batch_size": 2, "max_steps": 1,
            "learning_rate": 1e-2, "precision": "fp32", "disable_tqdm": True})
        trainer.train()
        model.save_pretrained(os.path.join(out, name, "save_pretrained"))  # every rank, no guard
        ref = os.path.join(out, name, "reference")
        if lora:
            save_lora_adapter(trainer, model, ref)
        else:
            save_merged(trainer, ref, dtype=torch.float32)
        dist.barrier()
        records[name] = sorted(os.listdir(os.path.join(out, name, "save_pretrained")))
    # rank 0 fails while writing (disk full): every rank raises, none goes on as if it were written
    import unsloth_dist.models.export as E

    if dist.get_rank() == 0:
        def disk_full(*a, **k):
            raise OSError("disk full")

        E._write_safetensors = disk_full
    try:
        save_merged(trainer, os.path.join(out, "failed"), dtype=torch.float32)
        outcome = "written"
    except Exception as exc:  # noqa: BLE001
        outcome = f"{type(exc).__name__}: {exc}"
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    records["failed-export"] = outcomes
    if dist.get_rank() == 0:
        with open(os.path.join(out, "records.json"), "w") as f:
            json.dump(records, f)
    del trainer, model
    from unsloth_dist.distributed import shutdown

    shutdown()  # not left to the interpreter's exit, where gloo can abort a rank


if __name__ == "__main__":
    main(sys.argv[1])
