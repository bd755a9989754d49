"""Resuming with a larger total (max_steps or num_train_epochs raised) than the checkpoint's run: the
learning rate continues from the saved step on the schedule rebuilt for the new total, from the
first resumed step on (as transformers' Trainer rebuilds its scheduler for the new total and
restores its position); the data order is the one a run of the new total reads from the start; and
the user is told that the schedule changes shape there."""
from __future__ import annotations

import json
import logging

import pytest

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist import checkpoint as ckpt

BASE = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=2,
            precision="fp32", seed=3, disable_tqdm=True)
N_SAMPLES = 10  # not a multiple of the global batch (4): the epochs run on into one another


class _Recorded(list):
    """A list dataset that records the indices read."""

    def __init__(self, rows):
        super().__init__(rows)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(i)
        return list.__getitem__(self, i)


def _run(out, args: dict, resume=None):
    """Train; returns (lr each optimizer step applied, by step), (lr logged, by step), indices read."""
    data = _Recorded(ragged_dataset(n=N_SAMPLES, seed=5))
    tr = Trainer(tiny_llama(), data, args=dict(BASE, output_dir=str(out), **args), backend="single")
    used: list[float] = []
    tr.backend.optimizer.register_step_pre_hook(lambda opt, a, k: used.append(opt.param_groups[0]["lr"]))
    data.read.clear()
    res = tr.train(resume_from_checkpoint=resume)
    steps = list(range(res.start_step + 1, res.global_step + 1))
    assert len(used) == len(steps)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    return dict(zip(steps, used)), {s: logged[s] for s in steps}, list(data.read)


CASES = {
    # (the checkpoint's run, the resumed run), both saving at step 4
    "max_steps-linear": (dict(max_steps=4), dict(max_steps=8), "linear"),
    "epochs-cosine": (dict(num_train_epochs=1.6), dict(num_train_epochs=3.2), "cosine"),  # 4 -> 8 steps
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_a_larger_total_follows_the_new_schedule_from_the_saved_step(case, tmp_path, caplog):
    short, longer, sched = CASES[case]
    full_used, full_logged, full_read = _run(tmp_path / "full", dict(longer, lr_scheduler_type=sched))
    assert sorted(full_used) == list(range(1, 9))
    out = tmp_path / "run"
    _, _, read_before = _run(out, dict(short, lr_scheduler_type=sched, save_steps=4))
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        used, logged, read_after = _run(out, dict(longer, lr_scheduler_type=sched, save_steps=4), resume="latest")
    assert sorted(used) == [5, 6, 7, 8]
    # every resumed step, the first one included, applies the rate of the 8-step schedule at that step
    # (the old code applied the 4-step schedule's last rate, 0, at step 5, then jumped onto the new curve)
    assert used == {s: full_used[s] for s in used}
    assert used[5] > 0
    assert logged == used  # the logged lr is the one the step applied
    # the data: the same samples in the same order as the run that had 8 steps from the start
    assert read_before + read_after == full_read
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("spanned 4 steps" in m and "this run has 8" in m and "step 4" in m for m in warnings), warnings


def test_resume_with_the_same_total_keeps_the_saved_rates_and_says_nothing(tmp_path, caplog):
    full_used, _, _ = _run(tmp_path / "full", dict(max_steps=6))
    out = tmp_path / "run"
    _run(out, dict(max_steps=6, save_steps=3))
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        used, logged, _ = _run(out, dict(max_steps=6, save_steps=3), resume=str(out / "checkpoint-3"))
    assert used == logged == {s: full_used[s] for s in (4, 5, 6)}
    assert not [r for r in caplog.records if "schedule" in r.getMessage()]


def test_checkpoint_without_the_recorded_total_still_warns(tmp_path, caplog):
    """Checkpoints written before `total_steps` was recorded: the old total comes from their config."""
    out = tmp_path / "run"
    _run(out, dict(max_steps=4, save_steps=4))
    meta_path = out / "checkpoint-4" / ckpt.META
    meta = json.loads(meta_path.read_text())
    assert meta["total_steps"] == 4
    del meta["total_steps"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        used, _, _ = _run(out, dict(max_steps=6, save_steps=4), resume="latest")
    full_used, _, _ = _run(tmp_path / "full", dict(max_steps=6))
    assert used == {s: full_used[s] for s in (5, 6)}
    assert any("spanned 4 steps" in r.getMessage() and "this run has 6" in r.getMessage() for r in caplog.records)
