"""Charts of training runs from their `metrics.jsonl` (what rank 0 of the Trainer writes).

    from unsloth_dist.plotting import plot_metrics
    plot_metrics(["outputs/run_ddp", "outputs/run_fsdp"], "runs.png")

or `unsloth-dist plot outputs/run_ddp outputs/run_fsdp -o runs.png`. One panel per metric,
every run on each panel (to compare backends and world sizes); eval_loss is drawn on the
loss panel. Rendering is headless (matplotlib's Agg canvas, no pyplot, no display needed).

The rows of metrics.jsonl (unsloth_dist.trainer.Trainer._log, unsloth_dist.checkpoint.save):

    {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "backend", "world_size"}
    {"step", "eval_loss"}
    {"step", "skipped": true, "loss": NaN}           nan_policy: skip
    {"step", "resumed_from": "<checkpoint dir>"}     a resumed run starts here
    {"step", "checkpoint": "<dir>", "save_s"}

A resumed run appends to the file of the run it continues, so steps after the checkpoint
appear twice: the later rows win (everything logged after the resume step by the earlier
attempt is dropped). A fresh run appended to an old file (steps going back to the start
without a `resumed_from` row) is treated the same way.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

logger = logging.getLogger("unsloth_dist")

DEFAULT_METRICS = ("loss", "lr", "tokens_per_s", "peak_mem_gib")
METRICS_FILE = "metrics.jsonl"

# panel title, y-axis label
_PANELS = {
    "loss": ("training loss", "loss (token-mean cross-entropy)"),
    "eval_loss": ("eval loss", "loss (token-mean cross-entropy)"),
    "lr": ("learning rate", "learning rate"),
    "grad_norm": ("gradient norm (before clipping)", "L2 norm"),
    "tokens_per_s": ("throughput, all ranks", "tokens/s"),
    "peak_mem_gib": ("peak memory, rank 0", "GiB"),
    "epoch": ("epoch", "epoch"),
    "save_s": ("checkpoint save time", "seconds"),
}

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

PathLike = Union[str, os.PathLike]


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted; the message names the file and the fix."""


@dataclass
class Run:
    """One run's metrics after resolving resumes: `series[metric] = [(step, value), ...]` sorted by step."""

    path: Path  # the metrics.jsonl
    name: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)
    world_sizes: list[int] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        parts = [self.name]
        if self.backends:
            b = "→".join(self.backends)
            if self.world_sizes:
                b += " ×" + "→".join(str(w) for w in self.world_sizes)
            parts.append(b)
        if self.resumed_at:
            parts.append("resumed at step " + ", ".join(str(s) for s in self.resumed_at))
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped step(s)")
        return " · ".join(parts)


def metrics_file(run: PathLike) -> Path:
    """The metrics.jsonl of a run directory (or the file itself); a PlotError saying what to give instead."""
    p = Path(run)
    if not p.exists():
        raise PlotError(
            f"{p}: no such file or directory; give a run's output_dir (the Trainer writes metrics.jsonl there) "
            "or the path of a metrics.jsonl file"
        )
    if p.is_dir():
        f = p / METRICS_FILE
        if not f.is_file():
            found = sorted(str(x.parent) for x in p.glob(f"*/{METRICS_FILE}"))
            hint = (f"; runs below it: {', '.join(found[:8])}" + (" ..." if len(found) > 8 else "")) if found else (
                "; rank 0 writes it into the run's output_dir once the first step is logged (every logging_steps steps)")
            raise PlotError(f"{p} has no {METRICS_FILE}: is it the run's output_dir?{hint}")
        return f
    return p


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_run(run: PathLike) -> Run:
    """Parse one run's metrics.jsonl (a run directory or the file), resolving resumed duplicates."""
    path = metrics_file(run)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"{path}: cannot be read ({exc}); is it a metrics.jsonl written by the Trainer?") from None
    if not text.strip():
        raise PlotError(
            f"{path} is empty: the run has not logged a step yet (rank 0 appends a row every logging_steps steps); "
            "wait for the first log, or lower logging_steps"
        )
    rows: list[tuple[int, dict]] = []  # (line number, row) in file order, after dropping superseded rows
    last_train_step: Optional[int] = None
    resumed_at: list[int] = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                # the unterminated last line of a run being written (or killed while writing)
                logger.warning("%s: its last line is incomplete (a run writing or killed while writing); skipped", path)
                continue
            snippet = line if len(line) <= 80 else line[:77] + "..."
            raise PlotError(
                f"{path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}): {snippet!r}; a run killed "
                "while writing can leave a partial line: delete or repair that line and plot again"
            ) from None
        if not isinstance(row, dict):
            raise PlotError(f"{path} line {lineno} is a JSON {type(row).__name__}, not an object with a 'step'; "
                            "delete that line (metrics.jsonl holds one object per line)")
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise PlotError(f"{path} line {lineno} has no integer 'step' (got {step!r}); delete or repair that line")
        if "resumed_from" in row:
            # the run continued from a checkpoint at `step`: what the earlier attempt logged after it is void
            rows = [(n, r) for n, r in rows if r["step"] <= step]
            resumed_at = [s for s in resumed_at if s < step] + [step]
            last_train_step = max((r["step"] for _, r in rows if _is_train(r)), default=None)
            continue
        if _is_train(row):
            if last_train_step is not None and step <= last_train_step:
                # steps went back without a resumed_from row: a new run appended to the same file
                rows = [(n, r) for n, r in rows if r["step"] < step]
                resumed_at = [s for s in resumed_at if s < step]
            last_train_step = step
        rows.append((lineno, row))

    name = path.parent.name if path.name == METRICS_FILE else path.name
    result = Run(path=path, name=name or str(path), resumed_at=resumed_at)
    values: dict[str, dict[int, float]] = {}
    for _, row in rows:
        step = row["step"]
        if row.get("skipped"):
            if step not in result.skipped:
                result.skipped.append(step)
            continue
        if _is_train(row):
            b, w = row.get("backend"), row.get("world_size")
            if isinstance(b, str) and (not result.backends or result.backends[-1] != b):
                result.backends.append(b)
            if isinstance(w, int) and (not result.world_sizes or result.world_sizes[-1] != w):
                result.world_sizes.append(w)
        for key, value in row.items():
            v = _number(value)
            if key in ("step", "world_size") or v is None:
                continue
            values.setdefault(key, {})[step] = v  # the later row of a step wins
    result.series = {k: sorted(v.items()) for k, v in values.items()}
    return result


def _is_train(row: dict) -> bool:
    return "loss" in row and not row.get("skipped")


def _parse_metrics(metrics: Union[str, Iterable[str]]) -> list[str]:
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for m in items:
        m = str(m).strip()
        if m and m not in out:
            out.append(m)
    if not out:
        raise PlotError("metrics: name at least one metric, e.g. loss,lr,tokens_per_s,peak_mem_gib")
    return out


def plot_metrics(
    run_dirs: Sequence[PathLike],
    out: PathLike,
    metrics: Union[str, Sequence[str]] = DEFAULT_METRICS,
    *,
    title: Optional[str] = None,
    on_note: Optional[Callable[[str], None]] = None,
) -> Path:
    """Draw `metrics` of every run in `run_dirs` (output_dirs or metrics.jsonl files) into `out`
    (PNG; .svg / .pdf also work), one panel per metric, one line per run; eval_loss goes on the
    loss panel. A metric no run has is left out with a note (`on_note`, default: logging); a
    PlotError if nothing at all can be drawn. The file is written atomically. Returns its path."""
    import logging

    note = on_note or logging.getLogger("unsloth_dist").warning
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise PlotError("no run given: pass one or more run directories (a run's output_dir) or metrics.jsonl files")
    wanted = _parse_metrics(metrics)
    runs = [read_run(r) for r in run_dirs]
    _disambiguate(runs)

    panels: list[str] = []
    missing: list[str] = []
    for m in wanted:
        if any(r.series.get(m) for r in runs):
            panels.append(m)
        elif m == "loss" and any(r.series.get("eval_loss") for r in runs):
            panels.append(m)  # only eval rows so far: the loss panel shows them
        else:
            missing.append(m)
    draw_eval = "loss" in panels and "eval_loss" not in panels
    if missing:
        have = sorted({k for r in runs for k in r.series})
        note(f"not in any run, left out: {', '.join(missing)} (these runs have: {', '.join(have) or 'no numeric metric'})")
    if not panels:
        files = ", ".join(str(r.path) for r in runs)
        have = sorted({k for r in runs for k in r.series})
        raise PlotError(
            f"nothing to plot: none of {', '.join(wanted)} is in {files}; "
            + (f"choose from: {', '.join(have)}" if have else "the file(s) hold no training step yet")
        )

    out = Path(out)
    if out.is_dir():
        out = out / "metrics.png"
    fmt = out.suffix.lstrip(".").lower() or "png"
    fig = _draw(runs, panels, draw_eval, title, missing)
    if fmt not in fig.canvas.get_supported_filetypes():
        raise PlotError(f"{out}: matplotlib cannot write .{fmt} files; use a .png (or .svg / .pdf) path")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=110)
        os.replace(tmp, out)  # readers never see a half-written image
    except OSError as exc:
        raise PlotError(f"{out}: cannot be written ({exc.strerror or exc}); choose another path (--out)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _disambiguate(runs: list[Run]) -> None:
    """Runs whose directories share a name are told apart by their parent directory."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            parent = r.path.parent.parent.name if r.path.name == METRICS_FILE else r.path.parent.name
            if parent:
                r.name = f"{parent}/{r.name}"


def _draw(runs: list[Run], panels: list[str], draw_eval: bool, title: Optional[str], missing: list[str]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    n = len(panels)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    legend_rows = len(runs) + 2
    fig = Figure(figsize=(6.2 * cols, 3.6 * rows + 0.22 * legend_rows), layout="constrained")
    FigureCanvasAgg(fig)  # headless, whatever matplotlib backend is configured
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    # runs that agree (the same recipe under two backends) draw on top of each other: the earlier run is
    # wider and each run has its own marker, so a run hidden under another still shows at its edges
    widths = [max(1.3, 1.3 + 1.0 * (len(runs) - 1 - i)) for i in range(len(runs))]
    markers = [_MARKERS[i % len(_MARKERS)] for i in range(len(runs))]
    multi_point = any(len(s) > 1 for r in runs for s in r.series.values())

    for ax, metric in zip(axes, panels):
        name, ylabel = _PANELS.get(metric, (metric, metric))
        has_eval = False
        for run, color, width, marker in zip(runs, colors, widths, markers):
            pts = run.series.get(metric, [])
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, linewidth=width, marker=marker if len(pts) <= 40 else None,
                        markersize=2.5 + 1.5 * width, markerfacecolor="none" if width > 1.3 else color)
            if metric == "loss" and draw_eval and run.series.get("eval_loss"):
                has_eval = True
                xs, ys = zip(*run.series["eval_loss"])
                ax.plot(xs, ys, color=color, linestyle="--", marker=marker, markersize=2.5 + 1.5 * width,
                        markerfacecolor="none" if width > 1.3 else color, linewidth=0.6 * width + 0.4)
            if metric == "loss" and run.skipped:
                ax.plot(run.skipped, [0] * len(run.skipped), linestyle="none", marker="x", color=color,
                        transform=ax.get_xaxis_transform(), clip_on=False, markersize=6)
            for s in run.resumed_at:
                ax.axvline(s, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
        if metric == "loss" and has_eval:
            name = "training and eval loss"
            ax.legend(handles=[Line2D([], [], color="0.3", linewidth=1.6, label="train"),
                               Line2D([], [], color="0.3", linestyle="--", linewidth=1.2, label="eval")],
                      loc="upper right", fontsize=8, frameon=False)
        ax.set_title(name, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        elif metric == "tokens_per_s":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            _from_zero(ax, runs, metric)
        elif metric == "peak_mem_gib":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            _from_zero(ax, runs, metric)
        if not multi_point:
            ax.margins(x=0.5)
    for ax in axes[n:]:
        ax.set_visible(False)

    # one legend above the panels: the title, a line per run, then what the marks mean
    handles = [Line2D([], [], color=c, linewidth=2.5, marker=m, markersize=6, label=r.label,
                      markerfacecolor="none" if w > 1.3 else c) for r, c, m, w in zip(runs, colors, markers, widths)]
    if any(r.resumed_at for r in runs):
        handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=1.2, label="resumed from a checkpoint here"))
    if any(r.skipped for r in runs):
        handles.append(Line2D([], [], color="0.3", linestyle="none", marker="x", label="step skipped (non-finite loss)"))
    if missing:
        handles.append(Line2D([], [], linestyle="none", label=f"not in any run, left out: {', '.join(missing)}"))
    if title is None:
        title = "training metrics" if len(runs) > 1 else f"training metrics: {runs[0].name}"
    fig.legend(handles=handles, loc="outside upper center", ncols=1, fontsize=9, frameon=False, title=title,
               title_fontproperties={"size": 13, "weight": "bold"})
    return fig


def _from_zero(ax, runs: list[Run], metric: str) -> None:
    """Amounts (tokens/s, GiB) read best against zero; leave headroom above the largest value."""
    top = max((v for r in runs for _, v in r.series.get(metric, []) if math.isfinite(v)), default=0.0)
    if top > 0:
        ax.set_ylim(0, top * 1.08)
