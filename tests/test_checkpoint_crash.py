"""Checkpoints survive a process killed in the middle of their bookkeeping (one process, the
single backend; the kill is an exception raised from inside the save, as a SIGKILL would stop it):
a save of a step that already had a checkpoint, killed between moving the old copy aside and the
new one in; a pruning killed half-way through deleting a directory."""
from __future__ import annotations

import os
import shutil

import pytest

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist import checkpoint as ckpt


def _args(out, **kw):
    return {**dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3,
                   warmup_steps=1, precision="fp32", seed=3, disable_tqdm=True, save_steps=2, output_dir=str(out)), **kw}


def _train(out, **kw):
    return Trainer(tiny_llama(seed=0), ragged_dataset(n=24, seed=5), args=_args(out, **kw), backend="single").train()


def test_a_save_killed_between_its_renames_is_put_back_and_resumed(tmp_path, monkeypatch):
    _train(tmp_path)
    (tmp_path / "checkpoint-4" / "first-copy").write_text("")  # tells the old copy from the new one
    real = os.replace

    def killed_after_moving_the_old_copy(a, b):
        real(a, b)
        if str(b).endswith(".checkpoint-4.old"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.os, "replace", killed_after_moving_the_old_copy)
    with pytest.raises(KeyboardInterrupt):  # a resumed run reaches step 4 again and is killed saving it
        _train(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not (tmp_path / "checkpoint-4").exists()  # both copies complete, both hidden
    assert ckpt.is_complete(tmp_path / ".checkpoint-4.tmp") and ckpt.is_complete(tmp_path / ".checkpoint-4.old")
    keep = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, keep)  # the same state, resumed by its path instead of 'latest'
    assert ckpt.resolve(str(keep / "checkpoint-4"), str(keep)) == keep / "checkpoint-4"
    # 'latest' (which names checkpoint-4) finds it again: the new copy, put back
    assert ckpt.resolve("latest", str(tmp_path)) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-4" / "first-copy").exists()
    resumed = _train(tmp_path, resume_from_checkpoint="latest", max_steps=6)
    assert resumed.start_step == 4 and resumed.global_step == 6
    assert not (tmp_path / ".checkpoint-4.old").exists()  # the next save dropped the stale copy
    # had only the old copy been complete, it would have come back
    shutil.copytree(tmp_path / "checkpoint-6", tmp_path / ".checkpoint-6.old")
    shutil.rmtree(tmp_path / "checkpoint-6")
    (tmp_path / ".checkpoint-6.tmp").mkdir()  # a new copy killed before it was complete
    assert ckpt.recover_interrupted(tmp_path) == [tmp_path / "checkpoint-6"]


def test_a_pruning_killed_half_way_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    real = shutil.rmtree
    armed = {"on": False}

    def killed_while_deleting(path, *a, **k):
        if armed["on"]:
            os.unlink(os.path.join(path, "trainer_state.pt"))  # some files went, the metadata file stayed
            raise KeyboardInterrupt("killed while pruning")
        return real(path, *a, **k)

    class Arm:
        def on_step_end(self, trainer, step, loss):
            armed["on"] = step == 4

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_llama(seed=0), ragged_dataset(n=24, seed=5), args=_args(tmp_path, save_total_limit=1),
                backend="single", callbacks=[Arm()]).train()
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    # checkpoint-2 was being deleted: it is gone from view, not a broken checkpoint-2 that resumes fail on
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert (tmp_path / ".checkpoint-2.deleting").is_dir()
    resumed = _train(tmp_path, resume_from_checkpoint="latest", max_steps=6, save_total_limit=1)
    assert resumed.start_step == 4
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]
