"""unsloth_dist.plotting and `unsloth-dist plot`: metrics.jsonl files (synthetic, and one written by a
real Trainer run that resumed) become a PNG with a panel per metric and a line per run; resumed
duplicates resolve to the later rows; bad input is a PlotError naming the file (and line)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from unsloth_dist.cli import app
from unsloth_dist.plotting import PlotError, _draw, plot_metrics, read_run

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours: run 1, run 2


def train_row(step, backend="ddp", world=2, loss=None, tps=1000.0, mem=1.5):
    return {"step": step, "epoch": step / 40, "loss": 3.0 * math.exp(-step / 20) if loss is None else loss,
            "lr": 1e-3 * (1 - step / 50), "grad_norm": 1.0 / step, "tokens_per_s": tps, "peak_mem_gib": mem,
            "backend": backend, "world_size": world}


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_run(root: Path, name: str, backend="ddp", world=2, steps=range(5, 41, 5), tps=1000.0, mem=1.5) -> Path:
    rows = []
    for s in steps:
        rows.append(train_row(s, backend, world, tps=tps, mem=mem))
        if s % 10 == 0:
            rows.append({"step": s, "eval_loss": 3.2 * math.exp(-s / 20)})
    rows.append({"step": steps[-1], "checkpoint": str(root / name / f"checkpoint-{steps[-1]}"), "save_s": 0.25})
    write_rows(root / name / "metrics.jsonl", rows)
    return root / name


def png_info(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def pixels_of(path: Path, rgb) -> int:
    import matplotlib.image as mpimg

    img = (mpimg.imread(str(path))[..., :3] * 255).round().astype(int)
    return int((np.abs(img - np.array(rgb)).sum(axis=-1) <= 6).sum())


# --------------------------------------------------------------------------- reading


def test_read_run_series_label_and_kinds(tmp_path):
    run = read_run(make_run(tmp_path, "r_ddp", "ddp", 2))
    assert [s for s, _ in run.series["loss"]] == list(range(5, 41, 5))
    assert run.series["loss"][0][1] == pytest.approx(3.0 * math.exp(-0.25))
    assert [s for s, _ in run.series["eval_loss"]] == [10, 20, 30, 40]
    assert run.series["save_s"] == [(40, 0.25)]
    assert "world_size" not in run.series and "backend" not in run.series
    assert run.backends == ["ddp"] and run.world_sizes == [2]
    assert run.label == "r_ddp · ddp ×2"
    # a metrics.jsonl path works as well as its directory
    assert read_run(tmp_path / "r_ddp" / "metrics.jsonl").series == run.series


def test_resumed_run_later_rows_win(tmp_path):
    # the first attempt logged every step up to 7 (eval at 6) and died; the run resumed from the checkpoint
    # of step 4 and logged every 2nd step: nothing the first attempt logged after step 4 may remain
    first = [train_row(s, loss=10.0 + s) for s in range(1, 8)] + [{"step": 6, "eval_loss": 99.0}]
    second = [{"step": 4, "resumed_from": "out/checkpoint-4"}] + [train_row(s, loss=20.0 + s) for s in (6, 8, 10)]
    second.insert(3, {"step": 8, "eval_loss": 50.0})
    run = read_run(write_rows(tmp_path / "run" / "metrics.jsonl", first + second))
    assert run.series["loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (6, 26.0), (8, 28.0), (10, 30.0)]
    assert run.series["eval_loss"] == [(8, 50.0)]
    assert run.resumed_at == [4]
    assert "resumed at step 4" in run.label


def test_fresh_run_appended_to_old_file_replaces_it(tmp_path):
    old = [train_row(s, backend="fsdp", loss=5.0) for s in (2, 4, 6, 8)]
    new = [train_row(s, backend="ddp", loss=1.0) for s in (1, 2, 3)]
    run = read_run(write_rows(tmp_path / "run" / "metrics.jsonl", old + new))
    assert run.series["loss"] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert run.backends == ["ddp"]


def test_skipped_steps(tmp_path):
    rows = [train_row(1), {"step": 2, "skipped": True, "loss": float("nan")}, train_row(3)]
    run = read_run(write_rows(tmp_path / "run" / "metrics.jsonl", rows))
    assert run.skipped == [2]
    assert [s for s, _ in run.series["loss"]] == [1, 3]


# --------------------------------------------------------------------------- errors


def test_missing_dir_and_missing_file(tmp_path):
    with pytest.raises(PlotError, match=r"no such file or directory.*output_dir") as e:
        read_run(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    make_run(tmp_path / "sweep", "lr1")
    with pytest.raises(PlotError, match=r"has no metrics\.jsonl") as e:
        read_run(tmp_path / "sweep")
    assert str(tmp_path / "sweep" / "lr1") in str(e.value)  # points at the runs below it


def test_empty_file(tmp_path):
    p = tmp_path / "run" / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text("\n")
    with pytest.raises(PlotError, match="is empty") as e:
        read_run(p)
    assert str(p) in str(e.value)


def test_corrupt_line_names_its_number(tmp_path):
    p = write_rows(tmp_path / "run" / "metrics.jsonl", [train_row(1), train_row(2), '{"step": 3, "loss": 1.2', train_row(4)])
    with pytest.raises(PlotError, match=r"line 3 is not valid JSON") as e:
        read_run(p)
    assert str(p) in str(e.value)
    write_rows(p, [train_row(1), "[1, 2]"])
    with pytest.raises(PlotError, match="line 2 is a JSON list"):
        read_run(p)
    write_rows(p, [train_row(1), {"loss": 1.0}])
    with pytest.raises(PlotError, match="line 2 has no integer 'step'"):
        read_run(p)


def test_absent_metric_is_skipped_with_a_note_and_nothing_to_plot_is_an_error(tmp_path):
    run = make_run(tmp_path, "r")
    notes = []
    out = plot_metrics([run], tmp_path / "a.png", ["loss", "bogus_metric"], on_note=notes.append)
    assert out.is_file() and len(notes) == 1 and "bogus_metric" in notes[0] and "loss" in notes[0]
    with pytest.raises(PlotError, match=r"nothing to plot.*bogus_metric.*choose from: .*tokens_per_s"):
        plot_metrics([run], tmp_path / "b.png", ["bogus_metric"], on_note=notes.append)
    assert not (tmp_path / "b.png").exists()


# --------------------------------------------------------------------------- drawing


def test_png_one_run(tmp_path):
    run = make_run(tmp_path, "r_ddp")
    out = plot_metrics([run], tmp_path / "charts" / "one.png")
    assert out == tmp_path / "charts" / "one.png"
    w, h = png_info(out)
    assert 800 <= w <= 3000 and 500 <= h <= 3000
    assert out.stat().st_size > 20_000
    assert pixels_of(out, C0) > 500  # the run's lines are drawn
    assert pixels_of(out, C1) == 0
    assert [p.name for p in out.parent.iterdir()] == ["one.png"]  # no temporary file left behind


def test_png_several_runs_on_one_chart(tmp_path):
    a = make_run(tmp_path, "r_ddp", "ddp", 2, tps=2000.0, mem=1.2)
    b = make_run(tmp_path, "r_fsdp", "fsdp", 4, tps=1500.0, mem=0.6)
    out = plot_metrics([a, b / "metrics.jsonl"], tmp_path / "runs.png")
    png_info(out)
    assert pixels_of(out, C0) > 500 and pixels_of(out, C1) > 500
    # overwriting in place works (os.replace)
    plot_metrics([a], out)
    assert pixels_of(out, C1) == 0


def test_panels_titles_and_labels(tmp_path):
    a = read_run(make_run(tmp_path / "x", "run", "ddp", 2))
    b = read_run(make_run(tmp_path / "y", "run", "zero3", 8))
    from unsloth_dist.plotting import _disambiguate

    _disambiguate([a, b])
    fig = _draw([a, b], ["loss", "lr", "tokens_per_s", "peak_mem_gib"], True, None, [])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["training and eval loss", "learning rate", "throughput, all ranks",
                                               "peak memory, rank 0"]
    assert axes[2].get_ylabel() == "tokens/s" and axes[3].get_ylabel() == "GiB"
    assert all(ax.get_xlabel() == "optimizer step" for ax in axes)
    assert len(axes[0].get_lines()) == 4  # two runs x (train, eval)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["x/run · ddp ×2", "y/run · zero3 ×8"]
    fig = _draw([a], ["loss", "grad_norm", "lr"], True, None, ["bogus"])
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    assert any("bogus" in t.get_text() for t in fig.legends[0].get_texts())


def test_unknown_image_format_writes_nothing(tmp_path):
    run = make_run(tmp_path, "r")
    with pytest.raises(PlotError, match=r"\.xyz"):
        plot_metrics([run], tmp_path / "out" / "chart.xyz")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PlotError, match="cannot be written"):
        plot_metrics([run], tmp_path / "a_file" / "chart.png")


# --------------------------------------------------------------------------- CLI


def test_cli_plot_help():
    r = runner.invoke(app, ["plot", "--help"])
    assert r.exit_code == 0 and "Usage" in r.output and "--metrics" in r.output and "--out" in r.output


def test_cli_plot_one_run_default_out(tmp_path):
    run = make_run(tmp_path, "r_ddp")
    r = runner.invoke(app, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert f"wrote {run / 'metrics.png'}" in r.output
    png_info(run / "metrics.png")


def test_cli_plot_several_runs_default_out_and_metrics(tmp_path, monkeypatch):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", "fsdp")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["plot", "a", "b"])
    assert r.exit_code == 0, r.output
    assert "wrote runs.png" in r.output
    png_info(tmp_path / "runs.png")
    r = runner.invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "o" / "x.png"), "--metrics", "loss,nope"])
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "nope" in r.output
    png_info(tmp_path / "o" / "x.png")


def test_cli_plot_errors_exit_2(tmp_path):
    p = write_rows(tmp_path / "bad" / "metrics.jsonl", [train_row(1), "not json"])
    r = runner.invoke(app, ["plot", str(p.parent)])
    assert r.exit_code == 2
    assert "error:" in r.output and "line 2" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such file or directory" in r.output
    assert not (tmp_path / "bad" / "metrics.png").exists()


# --------------------------------------------------------------------------- a real run that resumed


def test_real_trainer_metrics_with_resume(tmp_path):
    """metrics.jsonl as the Trainer writes it: 4 steps with checkpoints at 2 and 4, then the run resumed
    from checkpoint-2 and re-did steps 3-4 (appending to the same file): one point per step."""
    from tiny import ragged_dataset, tiny_llama

    from unsloth_dist import Trainer

    out = tmp_path / "run"
    args = {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "precision": "fp32",
            "logging_steps": 1, "save_steps": 2, "disable_tqdm": True, "learning_rate": 1e-2}
    first = Trainer(tiny_llama(seed=0), ragged_dataset(16), args=args, backend="single").train()
    again = Trainer(tiny_llama(seed=0), ragged_dataset(16), args=args, backend="single").train(
        resume_from_checkpoint=str(out / "checkpoint-2"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == 6  # steps 1-4, then 3-4 again
    run = read_run(out)
    assert [s for s, _ in run.series["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in run.series["loss"]] == pytest.approx(first.losses[:2] + again.losses)
    assert run.resumed_at == [2] and run.backends == ["single"] and run.world_sizes == [1]
    png = plot_metrics([out], out / "metrics.png")
    png_info(png)
    assert pixels_of(png, C0) > 200
