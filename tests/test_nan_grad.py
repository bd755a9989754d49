"""A finite loss with a non-finite gradient (one weight's gradient made inf at step 2): nan_policy
stop raises before the update, naming the step and the gradient norm; skip leaves the weights as
they were and goes on. (ZeRO, which reports its norm only from inside DeepSpeed's step, is covered
by tests/workers/zero_one_rank.py.)"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch


def _run(tmp_path, policy: str, backend="single"):
    from tiny import poison_grad, ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    poison_grad(model.model.layers[0].mlp.up_proj.weight)
    snaps = {}

    class Snap:
        def on_step_end(self, trainer, step, loss):
            snaps[step] = {n: p.detach().clone() for n, p in trainer.backend.module.named_parameters()}

    trainer = Trainer(model, ragged_dataset(n=16, seed=1, vocab=128, max_len=12, min_len=4), backend=backend,
                      callbacks=[Snap()], args={
                          "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 3,
                          "learning_rate": 1e-3, "disable_tqdm": True, "nan_policy": policy})
    return trainer, snaps


def test_inf_gradient_stops_before_the_update(tmp_path):
    trainer, snaps = _run(tmp_path, "stop")
    with pytest.raises(FloatingPointError, match=r"step 2: the gradient norm is inf.*nan_policy"):
        trainer.train()
    assert list(snaps) == [1]
    for n, p in trainer.backend.module.named_parameters():
        assert torch.equal(p, snaps[1][n]), n  # step 2 changed nothing


def test_inf_gradient_is_skipped_under_skip(tmp_path):
    trainer, snaps = _run(tmp_path, "skip")
    result = trainer.train()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert math.isnan(result.grad_norms[1]) and math.isfinite(result.grad_norms[2])
    assert all(torch.equal(snaps[1][n], snaps[2][n]) for n in snaps[1])  # step 2: no update
    assert any(not torch.equal(snaps[2][n], snaps[3][n]) for n in snaps[2])  # step 3 trained
    assert all(bool(torch.isfinite(t).all()) for t in snaps[3].values())
    skipped = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "skipped" in line]
    assert [r["step"] for r in skipped] == [2]


def test_fp16_mixed_skip_lowers_the_loss_scale_and_goes_on(tmp_path, monkeypatch):
    """fp16-mixed (single / ddp: GradScaler) with nan_policy skip: a NaN loss at step 2 is skipped, the
    scaler ends that step (scale halved) and step 3 trains. fp16-mixed runs on GPUs only; the CPU
    refusal is lifted here (GradScaler and fp16 autocast work on CPU)."""
    import unsloth_dist.distributed as D
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    real = D.check_runtime
    monkeypatch.setattr(D, "check_runtime", lambda cfg, b, env: real(cfg.model_copy(update={"precision": "bf16-mixed"}), b, env))
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    calls = [0]

    def nan_at_step_2(mod, inp, out):
        calls[0] += 1
        return out * float("nan") if calls[0] == 2 else out

    model.lm_head.register_forward_hook(nan_at_step_2)
    trainer = Trainer(model, ragged_dataset(n=16, seed=1, vocab=128, max_len=12, min_len=4), backend="single", args={
        "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3,
        "disable_tqdm": True, "precision": "fp16-mixed", "nan_policy": "skip"})
    scale = trainer.backend.scaler.get_scale()
    result = trainer.train()
    assert math.isnan(result.losses[1]) and math.isfinite(result.losses[2]), result.losses
    assert trainer.backend.scaler.get_scale() == scale / 2


def test_fp16_overflow_skipped_by_the_scaler_holds_the_lr_schedule(tmp_path, monkeypatch):
    """fp16-mixed: an inf gradient (finite loss) at step 2 makes GradScaler skip that update; the LR
    schedule does not advance for it (as transformers does), and the metrics say so."""
    import unsloth_dist.distributed as D
    from tiny import poison_grad, ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    real = D.check_runtime
    monkeypatch.setattr(D, "check_runtime", lambda cfg, b, env: real(cfg.model_copy(update={"precision": "bf16-mixed"}), b, env))
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    poison_grad(model.model.layers[0].mlp.up_proj.weight)
    trainer = Trainer(model, ragged_dataset(n=16, seed=1, vocab=128, max_len=12, min_len=4), backend="single", args={
        "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3,
        "warmup_steps": 4, "logging_steps": 1, "disable_tqdm": True, "precision": "fp16-mixed"})
    scale = trainer.backend.scaler.get_scale()
    result = trainer.train()
    assert all(math.isfinite(x) for x in result.losses)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "lr" in r]
    # the rate each step ran with, warmup 0/4, 1/4, 2/4 of 1e-3: step 2's update was skipped, so the
    # schedule held and step 3 runs at step 2's rate
    assert lrs == pytest.approx([0.0, 2.5e-4, 2.5e-4, 5e-4]), lrs
    assert [r["step"] for r in recs if r.get("overflow_skipped")] == [2]
    assert trainer.backend.scaler.get_scale() == scale / 2


class _InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward (so the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fsdp_fused_adamw_steps_before_the_read_and_skips_on_the_device(tmp_path, monkeypatch, policy):
    """FSDP with torch's fused AdamW (the Trainer's optimizer on GPUs; forced here on CPU) issues the
    optimizer step before it reads the loss and the norm; the non-finite norm of step 2 (an inf
    gradient through up_proj's output, finite loss) makes the fused kernel skip the update on the
    device: stop raises with the weights of step 1, skip goes on and step 3 trains (optimizer step
    count 2). The poison is a module hook, which FSDP2's parameter swap keeps."""
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    monkeypatch.setattr(Trainer, "_make_optimizer",
                        lambda self, groups: torch.optim.AdamW(groups, lr=self.cfg.learning_rate, fused=True))
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    done = {"step": 0}
    model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, i, o: _InfGrad.apply(o) if done["step"] == 1 and torch.is_grad_enabled() else o)
    snaps = {}

    class Snap:
        def on_step_end(self, trainer, step, loss):
            done["step"] = step
            snaps[step] = {n: p.detach().full_tensor().clone() for n, p in trainer.backend.module.named_parameters()}

    had = {k for k in _PG_VARS if k in os.environ}
    trainer = Trainer(model, ragged_dataset(n=16, seed=1, vocab=128, max_len=12, min_len=4), backend="fsdp",
                      callbacks=[Snap()], args={
                          "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 3,
                          "learning_rate": 1e-3, "disable_tqdm": True, "nan_policy": policy})
    calls = []
    real_step = type(trainer.backend).step

    def step(self, loss=None):
        calls.append(loss is not None)  # the Trainer passes the loss on the step-before-read path
        return real_step(self, loss)

    monkeypatch.setattr(type(trainer.backend), "step", step)
    try:
        _check_fsdp_fused(trainer, snaps, calls, policy)
    finally:  # the one-rank process group and its variables must not leak into later tests
        from unsloth_dist import distributed as D

        D.shutdown()
        for key in _PG_VARS - had:
            os.environ.pop(key, None)


_PG_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def _check_fsdp_fused(trainer, snaps, calls, policy):
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"step 2: the gradient norm is (inf|nan).*nan_policy"):
            trainer.train()
        assert list(snaps) == [1] and calls == [True, True]
        assert trainer.backend.step_before_read()
        for n, p in trainer.backend.module.named_parameters():
            assert torch.equal(p.detach().full_tensor(), snaps[1][n]), n  # the step-2 update was skipped
        return
    result = trainer.train()
    assert calls == [True, True, True]
    assert math.isnan(result.grad_norms[1]) and math.isfinite(result.grad_norms[2])
    assert all(torch.equal(snaps[1][n], snaps[2][n]) for n in snaps[1])  # step 2: no update
    assert any(not torch.equal(snaps[2][n], snaps[3][n]) for n in snaps[2])  # step 3 trained
    assert all(bool(torch.isfinite(t).all()) for t in snaps[3].values())
    steps = {float(s["step"]) for s in trainer.backend.optimizer.state.values()}
    assert steps == {2.0}, steps  # the skipped step is not counted (Adam's bias correction)
