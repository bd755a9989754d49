"""`report_to`: a real Trainer run (tiny Llama, backend single) sends what rank 0 writes to
metrics.jsonl to TensorBoard (read back with TensorBoard's own EventAccumulator) and to W&B
(offline; skipped unless wandb is installed); a missing package is a ConfigError before any
process group exists; the reporters are closed when train() ends, also on an exception."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tiny import ragged_dataset, tiny_llama

from unsloth_dist import Trainer
from unsloth_dist.config import ConfigError, load_config
from unsloth_dist.integrations import TensorBoardReporter, make_reporters, scalars


def args_for(out: Path, **extra) -> dict:
    return {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "precision": "fp32",
            "logging_steps": 1, "disable_tqdm": True, "learning_rate": 1e-2, **extra}


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_llama(seed=0), ragged_dataset(16), eval_dataset=ragged_dataset(8, seed=1), backend="single",
                      args=args_for(out, report_to=["tensorboard"], run_name="tb1", eval_steps=3))
    assert not (out / "runs").exists()  # nothing is written before the first logged row
    result = trainer.train()
    log_dir = out / "runs" / "tb1"
    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    got = tb_scalars(log_dir)
    rows = metrics_rows(out)
    train = [r for r in rows if "loss" in r]
    assert [s for s, _ in got["train/loss"]] == [r["step"] for r in train] == [1, 2, 3]
    # TensorBoard stores float32
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in got["train/loss"]] == pytest.approx(result.losses, rel=1e-6)
    assert [v for _, v in got["train/lr"]] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert [v for _, v in got["train/tokens_per_s"]] == pytest.approx([r["tokens_per_s"] for r in train], rel=1e-6)
    (ev,) = [r for r in rows if "eval_loss" in r]
    assert got["eval/loss"] == [(3, pytest.approx(ev["eval_loss"], rel=1e-6))]
    assert not any(tag.endswith(("/step", "/backend", "/world_size")) for tag in got)
    assert trainer._reporters[0]._writer is None  # closed at the end of train()


def test_reporters_closed_when_training_raises(tmp_path):
    class Boom:
        def on_step_end(self, trainer, step, loss):
            if step == 2:
                raise RuntimeError("boom at step 2")

    out = tmp_path / "run"
    trainer = Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single", callbacks=[Boom()],
                      args=args_for(out, report_to="tensorboard", run_name="crash"))
    with pytest.raises(RuntimeError, match="boom at step 2"):
        trainer.train()
    assert trainer._reporters[0]._writer is None
    got = tb_scalars(out / "runs" / "crash")
    assert got["train/loss"] == [(1, pytest.approx(metrics_rows(out)[0]["loss"], rel=1e-6))]


def test_tensorboard_resumed_run_purges_the_steps_it_redoes(tmp_path):
    """A run resumed from checkpoint-2 into the same run_name re-logs steps 3-4: its event file starts
    with TensorBoard's purge marker (a SessionLog START at step 3), so the later values win."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    out = tmp_path / "run"
    args = args_for(out, max_steps=4, save_steps=2, report_to=["tensorboard"], run_name="r")
    Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single", args=args).train()
    again = Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single", args=args)
    again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    first_file, second_file = sorted((out / "runs" / "r").glob("events.out.tfevents.*"),
                                     key=lambda p: (int(p.name.split(".")[3]), int(p.name.split(".")[-1])))  # time, counter
    marks = [(e.step, e.session_log.status) for e in EventFileLoader(str(second_file)).Load() if e.HasField("session_log")]
    assert marks == [(3, SessionLog.START)]
    assert not any(e.HasField("session_log") for e in EventFileLoader(str(first_file)).Load())
    got = tb_scalars(out / "runs" / "r")
    losses = {r["step"]: r["loss"] for r in metrics_rows(out) if "loss" in r}  # later rows win
    assert got["train/loss"] == [(s, pytest.approx(losses[s], rel=1e-6)) for s in (1, 2, 3, 4)]


def test_tensorboard_dir_is_timestamped_without_run_name_and_only_rank0_reports(tmp_path):
    cfg = load_config(args_for(tmp_path, report_to=["tensorboard"]))
    (rep,) = make_reporters(cfg, rank=0)
    assert isinstance(rep, TensorBoardReporter)
    assert rep.log_dir.parent == tmp_path / "runs" and re.fullmatch(r"\d{8}-\d{6}", rep.log_dir.name)
    assert make_reporters(cfg, rank=1) == []
    assert make_reporters(load_config(args_for(tmp_path)), rank=0) == []  # report_to: [] (default)


def test_scalars_are_the_numeric_fields():
    row = {"step": 5, "epoch": 0.5, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0,
           "peak_mem_gib": 1.0, "backend": "ddp", "world_size": 2}
    assert scalars(row) == {"train/epoch": 0.5, "train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": 0.5,
                            "train/tokens_per_s": 100.0, "train/peak_mem_gib": 1.0}
    assert scalars({"step": 5, "eval_loss": 1.5}) == {"eval/loss": 1.5}
    assert scalars({"step": 5, "checkpoint": "out/checkpoint-5", "save_s": 0.3}) == {"checkpoint/save_s": 0.3}
    assert scalars({"step": 5, "resumed_from": "out/checkpoint-5"}) == {}
    assert scalars({"step": 5, "skipped": True, "loss": float("nan")}).keys() == {"train/loss"}


@pytest.mark.parametrize("target, modules", [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                             ("wandb", ["wandb"])])
def test_missing_package_is_a_config_error_before_the_process_group(tmp_path, monkeypatch, target, modules):
    for name in modules:  # None in sys.modules: `import name` raises ImportError, as if it were not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="fsdp", args=args_for(tmp_path, report_to=[target]))
    msg = str(e.value)
    assert f"report_to: {target} needs the {target} package" in msg
    assert f"pip install {target}" in msg and f"remove {target} from report_to" in msg
    assert not dist.is_initialized()


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (LevelDB-log framing of wandb's protobuf Records: a
    7-byte ':W&B' header, 32 KiB blocks, 7-byte chunk headers: crc, length, type 1=full 2=first 3=middle 4=last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log (header {data[:7]!r})"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block padding
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("wandb.proto.wandb_internal_pb2")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "unsloth_dist_test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    trainer = Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single",
                      args=args_for(out, report_to=["wandb"], run_name="wb1"))
    trainer.train()
    assert trainer._reporters[0]._run is None  # finished
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # under output_dir, not the current directory
    records = list(wandb_records(log))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "unsloth_dist_test" and run.display_name == "wb1"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["max_steps"] == 3 and config["learning_rate"] == pytest.approx(1e-2) and config["run_name"] == "wb1"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    train = [r for r in metrics_rows(out) if "loss" in r]
    assert [h["_step"] for h in history] == [r["step"] for r in train] == [1, 2, 3]
    assert [h["train/loss"] for h in history] == pytest.approx([r["loss"] for r in train])
    assert [h["train/lr"] for h in history] == pytest.approx([r["lr"] for r in train])
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_wandb_calls(tmp_path, monkeypatch):
    """What the W&B reporter asks of the wandb module (a stand-in module here, so this runs where wandb is
    not installed): init on the first row with project/name/config/dir, log at the row's step, finish
    with exit code 1 when training raised."""
    import types

    calls = []

    class FakeRun:
        id = "abc123"

        def log(self, values, step=None):
            calls.append(("log", step, values))

        def finish(self, exit_code=None):
            calls.append(("finish", exit_code))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.delenv("WANDB_DIR", raising=False)

    class Boom:
        def on_step_end(self, trainer, step, loss):
            if step == 2:
                raise RuntimeError("boom")

    out = tmp_path / "run"
    trainer = Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single", callbacks=[Boom()],
                      args=args_for(out, report_to=["wandb"], run_name="n1"))
    assert calls == []
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    (kind, kw), (log1,), fin = calls[0], calls[1:-1], calls[-1]
    assert kind == "init" and kw["project"] == "proj" and kw["name"] == "n1" and kw["dir"] == str(out)
    assert kw["config"] == trainer.cfg.model_dump(mode="json")
    row = metrics_rows(out)[0]
    assert log1[:2] == ("log", 1) and log1[2]["train/loss"] == row["loss"] and "train/backend" not in log1[2]
    assert fin == ("finish", 1)
    calls.clear()
    Trainer(tiny_llama(seed=0), ragged_dataset(16), backend="single", args=args_for(out, max_steps=1, report_to="wandb")).train()
    assert [c[0] for c in calls] == ["init", "log", "finish"] and calls[-1] == ("finish", 0)
