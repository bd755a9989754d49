"""`report_to`: send what rank 0 logs to metrics.jsonl to TensorBoard and/or Weights & Biases.

    report_to: [tensorboard]      # SummaryWriter into output_dir/runs/<run_name or a timestamp>
    report_to: [wandb]            # project from $WANDB_PROJECT (default unsloth_dist), name run_name

`make_reporters` runs in Trainer.__init__ on every rank before the process group exists: a
missing package is a ConfigError there (on every rank, so none waits for the others). Only
rank 0 gets reporters. They open lazily at the first logged row (so a Trainer that never trains
writes nothing), take the numeric fields of each row (`train/loss`, `train/lr`, ...,
`eval/loss`, `checkpoint/save_s`) at the row's step, and are closed when train() ends, also
on an exception (W&B then marks the run failed). A row logged after that opens them again.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError

logger = logging.getLogger("unsloth_dist")

# what `report_to: X` imports, and the pip name that provides it
_NEEDS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics row, named for the dashboards: train/<key>, eval/<key>
    (for eval_<key>), checkpoint/<key> (a checkpoint row). `step` and booleans are left out."""
    prefix = "checkpoint/" if "checkpoint" in record else "train/"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "world_size") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "eval/" + key[len("eval_"):] if key.startswith("eval_") else prefix + key
        out[name] = float(value)
    return out


class Reporter:
    """One destination. `log(record)` takes a metrics.jsonl row; `close(failed)` flushes and ends it."""

    name = "reporter"

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardReporter(Reporter):
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None

    def log(self, record: dict) -> None:
        step = record.get("step")
        values = scalars(record)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run re-logs the steps after its checkpoint: purge_step hides what an earlier
            # attempt wrote to this log_dir from that step on (the later values win, as in the plots)
            purge = step + 1 if "resumed_from" in record and isinstance(step, int) else None
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        if values:
            self._writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


class WandbReporter(Reporter):
    name = "wandb"

    def __init__(self, cfg: Any) -> None:
        self.project = os.environ.get("WANDB_PROJECT", "unsloth_dist")
        self.run_name = cfg.run_name
        self.config = cfg.model_dump(mode="json")
        self.dir = os.environ.get("WANDB_DIR") or cfg.output_dir  # not the current directory
        self._run = None
        self._id: Optional[str] = None

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values:
            return
        if self._run is None:
            import wandb

            Path(self.dir).mkdir(parents=True, exist_ok=True)
            kwargs = {"id": self._id, "resume": "allow"} if self._id else {}  # logging again after close()
            self._run = wandb.init(project=self.project, name=self.run_name, config=self.config, dir=self.dir, **kwargs)
            self._id = self._run.id
        self._run.log(values, step=record.get("step"))

    def close(self, failed: bool = False) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=1 if failed else 0)


def make_reporters(cfg: Any, rank: int) -> list[Reporter]:
    """Check that every `cfg.report_to` package imports (ConfigError naming the fix if not), then
    return the reporters for rank 0 (an empty list on the other ranks)."""
    for target in cfg.report_to:
        module, package = _NEEDS[target]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"report_to: {target} needs the {package} package ({exc}): pip install {package}, "
                f"or remove {target} from report_to"
            ) from None
    if rank != 0:
        return []
    reporters: list[Reporter] = []
    for target in dict.fromkeys(cfg.report_to):
        if target == "tensorboard":
            run = (cfg.run_name or time.strftime("%Y%m%d-%H%M%S")).replace(os.sep, "_")
            reporters.append(TensorBoardReporter(Path(cfg.output_dir) / "runs" / run))
        else:
            reporters.append(WandbReporter(cfg))
    return reporters


def close_reporters(reporters: list[Reporter], failed: bool) -> None:
    """Close every reporter; a reporter that fails to close is logged, never raised (it must not hide
    the training's own exception, nor fail a finished run)."""
    for r in reporters:
        try:
            r.close(failed=failed)
        except Exception as exc:  # noqa: BLE001
            logger.warning("report_to %s: closing failed: %s", r.name, exc)
