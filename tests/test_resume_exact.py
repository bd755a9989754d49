"""Resume continues the same run exactly, on the in-process single backend: with dropout (the
data loader must not draw from the global RNG after a resume restored it), with a SIGTERM that
arrives on a save step (no second save that could lose the good copy), and refusing a resume whose
data order would differ (seed, shuffle, dataset size). The multi-rank kinds are in test_checkpoint."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist import checkpoint as ckpt
from unsloth_dist.config import ConfigError

ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=1e-3,
            warmup_steps=1, precision="fp32", seed=3, disable_tqdm=True, save_steps=3)


def _dropout_llama():
    model = tiny_llama(seed=0)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    return model


def test_resume_with_dropout_is_exact(tmp_path):
    data = ragged_dataset(n=24, seed=5)
    args = dict(ARGS, output_dir=str(tmp_path / "run"))
    full = Trainer(_dropout_llama(), data, args=args, backend="single").train()
    resumed = Trainer(_dropout_llama(), data, args=args, backend="single").train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.start_step == 3 and len(resumed.losses) == 3
    # dropout is active: the same batch gives another loss in training mode each time
    assert len(set(full.losses)) == len(full.losses)
    assert resumed.losses == full.losses[3:]


class _SigtermAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _saves(out) -> list[int]:
    import json

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "checkpoint" in r]


def test_sigterm_on_a_save_step_saves_once(tmp_path):
    out = tmp_path / "run"
    res = Trainer(tiny_llama(), ragged_dataset(n=24), args=dict(ARGS, output_dir=str(out), save_steps=2),
                  backend="single", callbacks=[_SigtermAt(4)]).train()
    assert res.stopped_by_signal and res.global_step == 4
    assert _saves(out) == [2, 4]  # step 4's own save; the signal does not save it a second time
    assert ckpt.resolve("latest", str(out)) == out / "checkpoint-4"


def test_saving_a_step_again_keeps_a_complete_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = Trainer(tiny_llama(), ragged_dataset(n=24), args=dict(ARGS, output_dir=str(out), max_steps=2, save_steps=2),
                 backend="single")
    tr.train()
    real_rmtree = ckpt.shutil.rmtree

    def killed_after(path, *a, **k):  # the process dies right after a directory is deleted
        real_rmtree(path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_after)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()  # step 2 again (a resumed run reaching the same step)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    path = ckpt.resolve("latest", str(out))
    assert path == out / "checkpoint-2" and ckpt.read_meta(path)["step"] == 2


@pytest.mark.parametrize("change, field", [
    (dict(seed=4), "seed: 3"),
    (dict(shuffle=False), "shuffle: true"),
    ("more data", "24 samples"),
])
def test_resume_that_would_change_the_data_order_is_refused_before_start(tmp_path, change, field):
    out = tmp_path / "run"
    Trainer(tiny_llama(), ragged_dataset(n=24), args=dict(ARGS, output_dir=str(out)), backend="single").train()
    data, args = ragged_dataset(n=24), dict(ARGS, output_dir=str(out), resume_from_checkpoint="latest")
    if change == "more data":
        data = ragged_dataset(n=28)
    else:
        args.update(change)
    with pytest.raises(ConfigError, match="resume_from_checkpoint") as err:
        Trainer(tiny_llama(), data, args=args, backend="single")
    assert field in str(err.value)
    assert not torch.distributed.is_initialized()


def test_resume_with_another_seed_but_no_shuffle_is_accepted(tmp_path):
    out = tmp_path / "run"
    args = dict(ARGS, output_dir=str(out), shuffle=False)
    full = Trainer(tiny_llama(), ragged_dataset(n=24), args=args, backend="single").train()
    res = Trainer(tiny_llama(), ragged_dataset(n=24), args=dict(args, seed=9, resume_from_checkpoint=str(out / "checkpoint-3")),
                  backend="single").train()
    assert res.losses == full.losses[3:]  # the order does not depend on the seed without shuffling


def test_a_fresh_run_never_prunes_an_earlier_runs_checkpoints(tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    Trainer(tiny_llama(), ragged_dataset(n=24), args=dict(ARGS, output_dir=str(out), max_steps=4, save_steps=2),
            backend="single").train()  # an earlier run: checkpoint-2, checkpoint-4
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        Trainer(tiny_llama(), ragged_dataset(n=24), backend="single", args=dict(
            ARGS, output_dir=str(out), max_steps=3, save_steps=1, save_total_limit=1)).train()  # not resumed
    assert any("checkpoint(s) of an earlier run (newest checkpoint-4)" in r.getMessage() for r in caplog.records)
    # the new run keeps one of its own (3); the earlier run's checkpoint-4 is not its to delete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    # a resume continues the same run: its own older checkpoints are pruned as before (its step 4
    # replaces the earlier run's checkpoint-4, as the warning said)
    Trainer(tiny_llama(), ragged_dataset(n=24), backend="single", args=dict(
        ARGS, output_dir=str(out), max_steps=5, save_steps=1, save_total_limit=1,
        resume_from_checkpoint=str(out / "checkpoint-3"))).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]


def _lora(r: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("other, says", [
    (lambda: _lora(8), "other shape: 8 (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight [4, 64] -> [8, 64])"),
    (tiny_llama, "only in this model"),  # full fine-tuning from a LoRA run
])
def test_resume_into_a_model_that_trains_other_parameters_is_refused_before_start(tmp_path, other, says):
    out = tmp_path / "run"
    Trainer(_lora(4), ragged_dataset(n=24), args=dict(ARGS, output_dir=str(out), max_steps=2, save_steps=2),
            backend="single").train()
    with pytest.raises(ConfigError, match="resume_from_checkpoint: the checkpoint's run trained 8 parameter tensors") as err:
        Trainer(other(), ragged_dataset(n=24), backend="single",
                args=dict(ARGS, output_dir=str(out), resume_from_checkpoint="latest"))
    assert says in str(err.value) and "same LoRA settings" in str(err.value)
    assert not torch.distributed.is_initialized()
    # the same settings resume
    res = Trainer(_lora(4), ragged_dataset(n=24), backend="single",
                  args=dict(ARGS, output_dir=str(out), max_steps=3, resume_from_checkpoint="latest")).train()
    assert res.start_step == 2
