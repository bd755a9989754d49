"""Run one backend on a Llama built from a config and save the per-step losses and final weights.

    torchrun --nproc_per_node 2 tests/workers/equivalence.py BACKEND[,BACKEND...] OUT_DIR VARIANT [VARIANT...]
    VARIANT = full-gas1 | full-gas2 | lora-gas1 | lora-gas2  (also runs with backend=single, one process);
              KIND+offload-gasN (e.g. lora+offload-gas2): with gradient checkpointing and activation_offload,
              and a check that every layer's input went through the offload (forward and recompute)

Several backends run one after another in one launch (one process group; every Trainer builds its
own backend). OUT_DIR/BACKEND-VARIANT.pt is written once the run passed its own checks on every rank.

Environment knobs (the GPU check uses them): EQ_PRECISION (default fp32), EQ_SIZE (tiny | medium:
a ~280M-parameter Llama), EQ_SEQ (max sample length), EQ_GLOBAL_BATCH, EQ_STEPS.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import add_lora, ragged_dataset, tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402

GLOBAL_BATCH = int(os.environ.get("EQ_GLOBAL_BATCH", "4"))
STEPS = int(os.environ.get("EQ_STEPS", "8"))
PRECISION = os.environ.get("EQ_PRECISION", "fp32")
SIZE = os.environ.get("EQ_SIZE", "tiny")
SEQ = int(os.environ.get("EQ_SEQ", "16"))
# medium: hidden 1024, 24 layers, GQA 16/4 heads, vocab 32000 -> about 280M parameters
SHAPES = {"tiny": dict(vocab=128, hidden=64, layers=2), "medium": dict(vocab=32000, hidden=1024, layers=24)}


def run(backend: str, variant: str, out_dir: str) -> None:
    kind, gas = variant.split("-gas")
    gas = int(gas)
    kind, _, extra = kind.partition("+")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shape = SHAPES[SIZE]
    model = tiny_llama(seed=0, **shape)
    if kind == "lora":
        model = add_lora(model, seed=1)
    args = {
        "output_dir": os.path.join(out_dir, f"{backend}-{variant}"),
        "per_device_train_batch_size": GLOBAL_BATCH // (world * gas),
        "gradient_accumulation_steps": gas,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "max_grad_norm": 1.0,
        "precision": PRECISION,
        "seed": 3,
        "disable_tqdm": True,
    }
    offload_calls = []
    if extra == "offload":
        import unsloth_dist.models.offload as offload

        args.update(gradient_checkpointing=True, activation_offload=True)
        plain_run = offload._run

        def counted(*a, **k):
            offload_calls.append(1)
            return plain_run(*a, **k)

        offload._run = counted
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    data = ragged_dataset(n=GLOBAL_BATCH * STEPS, seed=5, vocab=shape["vocab"], max_len=SEQ, min_len=min(6, SEQ))
    evals = ragged_dataset(n=7, seed=9, vocab=shape["vocab"], max_len=SEQ, min_len=min(6, SEQ))
    # zero3 gathers a whole decoder layer at a time (backend.stage3_leaf_layers, the default);
    # zero3-modules: DeepSpeed's module-by-module gathering
    spec = {"name": "zero3", "stage3_leaf_layers": False} if backend == "zero3-modules" else backend
    trainer = Trainer(model, data, args=args, backend=spec, eval_dataset=evals)
    if backend.startswith("zero3"):  # leaf layers by default, not under zero3-modules
        leaves = [getattr(m, "_z3_leaf", False) for m in trainer.backend.module.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert leaves and all(leaves) == (backend == "zero3") and any(leaves) == (backend == "zero3"), leaves
    result = trainer.train()
    if extra == "offload":
        offload._run = plain_run
        # each layer's input: once in the forward, once in the recompute, per micro-batch and step
        assert len(offload_calls) == 2 * shape["layers"] * gas * STEPS, (backend, variant, len(offload_calls))
    eval_loss = trainer.evaluate()
    sd = trainer.full_state_dict()
    # every rank saw the same global losses
    if trainer.world_size > 1:
        import torch.distributed as dist

        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, result.losses)
        assert all(g == gathered[0] for g in gathered), f"{backend} {variant}: ranks disagree on the global losses"
    if trainer.rank == 0:
        torch.save(
            {"losses": result.losses, "grad_norms": result.grad_norms, "eval_loss": eval_loss, "state_dict": sd,
             "backend": trainer.backend.name, "world_size": trainer.world_size,
             "initial": initial if trainer.world_size == 1 else None},
            os.path.join(out_dir, f"{backend}-{variant}.pt"),
        )


if __name__ == "__main__":
    backends, out_dir, *variants = sys.argv[1:]
    for backend in backends.split(","):
        for v in variants:
            print(f"=== {backend} {v}", flush=True)
            run(backend, v, out_dir)
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
