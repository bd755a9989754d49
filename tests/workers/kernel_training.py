"""Train a tiny Llama with and without the kernels patched in, under one backend, and save the
per-step losses, grad norms and final weights.

    torchrun --nproc_per_node 2 tests/workers/kernel_training.py BACKEND OUT_DIR VARIANT [VARIANT...]
    python tests/workers/kernel_training.py single OUT_DIR VARIANT [VARIANT...]
    VARIANT = {plain,patched}-{untied,tied}[-lora]
    torchrun --nproc_per_node 2 tests/workers/kernel_training.py --runs OUT_DIR BACKEND:VARIANT [...]

(--runs: several backends one after another in one launch; one process group, every Trainer
builds its own backend.)

Writes OUT_DIR/BACKEND-VARIANT.pt on rank 0. With TRITON_INTERPRET=1 in the environment (set
before the process starts) the patched model runs the Triton kernels in Triton's interpreter.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import add_lora, ragged_dataset, tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.kernels import LAUNCHES  # noqa: E402
from unsloth_dist.models import patch_model  # noqa: E402

GLOBAL_BATCH = 4
STEPS = int(os.environ.get("KT_STEPS", "4"))


def _count_fused_lora() -> list:
    """Counts the fused LoRA updates (kernels.lora_delta) from here on: [n]."""
    from unsloth_dist.kernels import lora as L

    n = [0]
    for fn in (L._AddLoraUpdate, L._FrozenLinearLora):  # the update after any base / over a frozen nn.Linear
        real = fn.__dict__.get("_real_apply") or fn.apply
        fn._real_apply = real

        def counted(*args, real=real):
            n[0] += 1
            return real(*args)

        fn.apply = staticmethod(counted)
    return n


def run(backend: str, variant: str, out_dir: str) -> None:
    parts = variant.split("-")
    kind, tie, lora = parts[0], parts[1] == "tied", "lora" in parts[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_llama(seed=0, tie=tie)
    if lora:
        model = add_lora(model, seed=1)
    report = None
    if kind == "patched":
        report = patch_model(model)
        want = ["rms_norm", "rope", "swiglu", "fused_cross_entropy"] + (["lora"] if lora else [])
        assert report.ops == want, str(report)
    lora_calls = _count_fused_lora()
    keys = list(model.state_dict())
    args = {
        "output_dir": os.path.join(out_dir, f"{backend}-{variant}"),
        "per_device_train_batch_size": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 1,
        "max_grad_norm": 1.0,
        "precision": "fp32",
        "seed": 3,
        "disable_tqdm": True,
    }
    data = ragged_dataset(n=GLOBAL_BATCH * STEPS, seed=5)
    evals = ragged_dataset(n=5, seed=9)
    backend_cfg = backend
    if backend == "zero3":
        # partition every parameter and release it after each use (the defaults keep these tiny ones
        # whole, or keep them gathered between uses), so lm_head.weight really is gathered only
        # inside lm_head's forward -- and the fused CE must run there
        backend_cfg = {"name": "zero3", "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1,
                       "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 1}
    trainer = Trainer(model, data, args=args, backend=backend_cfg, eval_dataset=evals)
    assert trainer.fused_loss == (kind == "patched"), "the Trainer did not pick up the fused loss"
    result = trainer.train()
    eval_loss = trainer.evaluate()
    sd = trainer.full_state_dict()
    if trainer.rank == 0:
        torch.save(
            {"losses": result.losses, "grad_norms": result.grad_norms, "eval_loss": eval_loss,
             "state_dict": sd, "keys_before": keys, "world_size": trainer.world_size,
             "backend": trainer.backend.name, "report": str(report) if report else None,
             "triton_launches": dict(LAUNCHES), "fused_lora_calls": lora_calls[0]},
            os.path.join(out_dir, f"{backend}-{variant}.pt"),
        )


if __name__ == "__main__":
    if sys.argv[1] == "--runs":
        out_dir, *runs = sys.argv[2:]
        for spec in runs:
            backend, v = spec.split(":")
            print(f"=== {backend} {v}", flush=True)
            run(backend, v, out_dir)
    else:
        backend, out_dir, *variants = sys.argv[1:]
        for v in variants:
            run(backend, v, out_dir)
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
