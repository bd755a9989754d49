"""ZeRO-2 on ONE rank under precision bf16: the DeepSpeed config passes the bf16 gradients on as they
are (communication_data_type bf16, nothing to sum), and training matches the fp32 round trip
(backend.reduce_dtype fp32 forced into the config) bit for bit, with gradient accumulation. It
also turns overlap_comm off (nothing to overlap on one rank), and DeepSpeed's per-gradient inf/NaN
scan off (nan_policy stop, the only policy ZeRO takes: the Trainer stops on a non-finite grad norm
itself). A gradient made inf at step 2 (finite loss) checks that the run stops there. And a
bf16-loaded model under precision fp32 trains fp32 parameters, with single's losses.

    torchrun --nproc_per_node 1 tests/workers/zero_one_rank.py OUT.pt
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reduce_dtype import engine_reduce_dtype  # noqa: E402
from tiny import poison_grad, ragged_dataset, tiny_llama  # noqa: E402

import unsloth_dist.backends.deepspeed as ZB  # noqa: E402  (where the ZeRO backend takes its config builder from)
from unsloth_dist import Trainer  # noqa: E402


def run(out_dir: str) -> dict:
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=2)
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend={"name": "zero2"}, args={
        "output_dir": out_dir, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 3, "learning_rate": 1e-3, "precision": "bf16", "seed": 3, "disable_tqdm": True,
        "max_grad_norm": 1.0})
    result = trainer.train()
    zopt = trainer.backend.engine.optimizer
    return {"engine": engine_reduce_dtype(trainer), "losses": result.losses, "grad_norms": result.grad_norms,
            "overlap_comm": zopt.overlap_comm, "check_grad_overflow": zopt.check_grad_overflow}


def run_inf_grad(out_dir: str) -> dict:
    """Step 2's gradient of one weight is inf (the loss stays finite): the steps that ended, the error."""
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=2)
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    poison_grad(model.model.layers[0].mlp.up_proj.weight)
    ended = []

    class Ended:
        def on_step_end(self, trainer, step, loss):
            ended.append(step)

    trainer = Trainer(model, data, backend={"name": "zero2"}, callbacks=[Ended()], args={
        "output_dir": out_dir, "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3,
        "precision": "bf16", "seed": 3, "disable_tqdm": True, "max_grad_norm": 1.0})
    try:
        trainer.train()
    except FloatingPointError as exc:
        return {"error": str(exc), "steps": ended}
    return {"error": None, "steps": ended}


def bf16_loaded(model):
    """A model loaded in bf16 (from_pretrained(dtype=bf16)): bf16 parameters, fp32 rotary buffer."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def run_bf16_loaded_fp32(out_dir: str, backend: str) -> dict:
    """precision fp32 on a bf16-loaded model: the parameters are trained in fp32 (as single does)."""
    model = bf16_loaded(tiny_llama(seed=0, vocab=128, hidden=64, layers=2))
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend={"name": backend}, args={
        "output_dir": out_dir, "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
        "precision": "fp32", "seed": 3, "disable_tqdm": True, "max_grad_norm": 1.0})
    dtypes = sorted({str(p.dtype) for p in trainer.backend.module.parameters()})
    return {"param_dtypes": dtypes, "losses": trainer.train().losses}


def run_lora_zero3(out_dir: str, bucket) -> dict:
    """LoRA under zero3: the reduction bucket DeepSpeed allocated, the trainable count, the losses."""
    from unsloth_dist.models.lora import add_lora

    model = add_lora(tiny_llama(seed=0, vocab=128, hidden=64, layers=2), r=4, lora_alpha=8)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend={"name": "zero3", **({"reduce_bucket_size": bucket} if bucket else {})},
                      args={"output_dir": out_dir, "per_device_train_batch_size": 2, "max_steps": 3,
                            "learning_rate": 1e-2, "precision": "bf16", "seed": 3, "disable_tqdm": True})
    zopt = trainer.backend.engine.optimizer
    return {"bucket": zopt.reduce_bucket_size, "n_train": n_train, "losses": trainer.train().losses}


def main(out: str) -> None:
    records = {"default": run(os.path.join(os.path.dirname(out), "default"))}
    for backend in ("zero2", "single"):
        records[f"bf16-loaded-fp32-{backend}"] = run_bf16_loaded_fp32(os.path.join(os.path.dirname(out), f"bl-{backend}"), backend)
    real = ZB.deepspeed_config

    def fp32_comm(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds["communication_data_type"] = "fp32"
        return ds

    base = os.path.dirname(out)
    records["lora-zero3-default"] = run_lora_zero3(os.path.join(base, "lz-default"), None)
    records["lora-zero3-set"] = run_lora_zero3(os.path.join(base, "lz-set"), 500_000_000)
    records["inf-stop"] = run_inf_grad(os.path.join(base, "inf-stop"))
    ZB.deepspeed_config = fp32_comm
    records["fp32"] = run(os.path.join(os.path.dirname(out), "fp32"))
    torch.save(records, out)


if __name__ == "__main__":
    main(sys.argv[1])
