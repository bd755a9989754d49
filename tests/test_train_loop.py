"""The training loop's bookkeeping against what transformers' Trainer users read: the logged loss
is the mean over the logging window, the logged learning rate the one the step used, and every
rank's callbacks see the records (one process here; the ranks' part in tests/workers)."""
from __future__ import annotations

import json
import math

import pytest


def _trainer(tmp_path, callbacks=(), **args):
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 6, "learning_rate": 1e-2,
            "disable_tqdm": True, "lr_scheduler_type": "linear", "warmup_steps": 2, "logging_steps": 3}
    return Trainer(model, ragged_dataset(n=16, seed=1, vocab=128, max_len=12, min_len=4), backend="single",
                   callbacks=list(callbacks), args=base | args)


def test_logged_loss_is_the_window_mean_and_lr_the_rate_the_step_used(tmp_path):
    trainer = _trainer(tmp_path)
    used = []
    real_step = trainer.backend.step

    def step(*a, **k):
        used.append(trainer.backend.optimizer.param_groups[0]["lr"])
        return real_step(*a, **k)

    trainer.backend.step = step
    res = trainer.train()
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "lr" in r]
    assert [r["step"] for r in rec] == [3, 6]
    # linear with 2 warm-up steps over 6: 0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3
    assert used == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert [r["lr"] for r in rec] == pytest.approx([used[2], used[5]])
    for r, window in zip(rec, (res.losses[0:3], res.losses[3:6])):
        assert r["loss"] == pytest.approx(sum(window) / 3, rel=1e-12)
    assert not math.isclose(rec[0]["loss"], res.losses[2], rel_tol=1e-9)  # not the window's last step alone


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_is_read_once_per_pass_when_the_data_is_not_a_multiple_of_the_batch(shuffle):
    # 10 samples, global batch 4: the batch that ends a pass is completed from the next pass (the
    # tail used to be dropped: with shuffle false samples 8 and 9 were never trained)
    from collections import Counter

    from unsloth_dist.data.sampler import GlobalBatchSampler

    s = GlobalBatchSampler(10, 4, seed=3, shuffle=shuffle)
    assert s.steps_per_epoch == 2.5 and s.steps_for_epochs(3) == 8 and s.steps_for_epochs(2) == 5
    stream = [i for step in range(5) for i in s.global_batch(step)]  # 20 samples = 2 passes
    assert Counter(stream[:10]) == Counter(range(10)) and Counter(stream[10:]) == Counter(range(10))
    if not shuffle:
        assert s.global_batch(2) == [8, 9, 0, 1]
    else:
        assert stream[:10] == s.epoch_order(0) and stream[10:] == s.epoch_order(1)
    # the ranks' micro-batches cover the global batch, whatever the world size
    for world, micro in ((1, 2), (2, 1), (2, 2), (4, 1)):
        got = [i for r in range(world) for m in s.local_micro_batches(2, r, world, micro) for i in m]
        assert Counter(got) == Counter(s.global_batch(2))
    # a multiple of the batch keeps the order it always had
    s16 = GlobalBatchSampler(16, 4, seed=3, shuffle=True)
    assert [i for st in range(4, 8) for i in s16.global_batch(st)] == s16.epoch_order(1)
    assert s16.steps_for_epochs(3) == 12 and s16.steps_for_epochs(0.5) == 2


@pytest.mark.slow
def test_ranks_start_from_rank0_weights_and_draw_their_own_dropout(tmp_path, deepspeed_cpu_ops):
    """2 gloo ranks that built different weights (base and LoRA adapters): ddp, fsdp and zero2 all
    start from rank 0's (FSDP2's fully_shard alone kept each rank's own slice), and the ranks'
    LoRA dropout masks differ (one seed everywhere gave them the same masks)."""
    import os

    from conftest import ROOT, run_cmd, torchrun

    proc = run_cmd(torchrun(2, os.path.join(ROOT, "tests", "workers", "rank_rng.py"), str(tmp_path), "ddp,fsdp,zero2"))
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    for backend, r in res.items():
        assert r["start_is_rank0"] and r["compared"] > 20, (backend, r)
        assert not r["same_masks"], backend


def test_a_checkpoint_of_the_old_order_resumes_with_a_notice(caplog):
    from unsloth_dist import checkpoint as C

    meta = {"format_version": C.FORMAT_VERSION, "global_batch_size": 4,
            "data": {"num_samples": 10, "shuffle": True, "seed": 1}}
    with caplog.at_level("WARNING", logger="unsloth_dist"):
        C.check_compatible(meta, backend_format="dcp", backend_name="single", world_size=1, global_batch=4,
                           shuffle=True, seed=1, num_samples=10)
    assert "dropped the last 2 sample(s) of every epoch" in caplog.text
    caplog.clear()
    meta["data"]["order"] = 2
    C.check_compatible(meta, backend_format="dcp", backend_name="single", world_size=1, global_batch=4,
                       shuffle=True, seed=1, num_samples=10)
    assert "dropped" not in caplog.text


def test_metrics_file_after_a_partial_line_and_a_fresh_run(tmp_path):
    """A run killed while writing left a partial last line: the next row starts on a line of its
    own (it was glued to it and the file became unplottable). A fresh run (no resume) in an
    output_dir with an earlier run's metrics keeps that file aside instead of appending to it."""
    from unsloth_dist.plotting import read_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.1}\n{"step": 2, "lo')
    trainer = _trainer(tmp_path, max_steps=2, logging_steps=1)
    trainer._log({"step": 3, "loss": 4.0, "lr": 0.1})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo' and json.loads(lines[2])["step"] == 3
    trainer.train()  # fresh: the earlier run's rows are kept aside, the row this Trainer logged first stays
    assert (tmp_path / "metrics.1.jsonl").read_text().splitlines() == lines[:2]
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [3, 1, 2]
    # plot skips an unterminated last line (a run being written) instead of refusing the file
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert read_run(tmp_path) is not None
