"""Checkpoint policy: where, when, atomically; what the trainer adds to the backend's state.

Layout of `<output_dir>`:

    checkpoint-40/                  one complete checkpoint
        state/                      the backend's native files (DCP shards, or DeepSpeed's own)
        trainer_state.pt            LR scheduler state (rank 0)
        rng_state_<rank>.pth        every rank's RNG states
        unsloth_checkpoint.json     step, backend, format, world size, ... -- written last
    latest                          the name of the newest complete checkpoint (written after it)

A checkpoint is written into `.checkpoint-<step>.tmp/`, flushed to disk, and renamed into
place only once every rank has finished; `latest` is replaced atomically after that, and old
checkpoints of the same run (resumes included) are pruned (`save_total_limit`) only then. A save
killed half-way leaves a `.tmp` directory that is never taken for a checkpoint. Saving a step that
already has a checkpoint moves the old copy aside (`.checkpoint-<step>.old`) before the new one
is renamed in; a save killed between those two renames leaves two complete hidden copies and no
`checkpoint-<step>`, which :func:`recover_interrupted` (run by every resume and save) renames back,
the newer first. Directories are deleted by renaming them to `.<name>.deleting` first, so a
deletion killed half-way never leaves a directory that looks like a complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed as D
from .config import ConfigError

logger = logging.getLogger("unsloth_dist")

PREFIX = "checkpoint-"
META = "unsloth_checkpoint.json"
LATEST = "latest"
STATE = "state"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used for what was asked; the message says why and what to do."""


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a complete unsloth_dist checkpoint (no {META}); it may be a save that was "
            "interrupted. Resume from another checkpoint-* directory or from 'latest'"
        ) from None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under output_dir, oldest first."""
    found = []
    for p in Path(output_dir).glob(f"{PREFIX}*"):
        suffix = p.name[len(PREFIX):]
        if p.is_dir() and suffix.isdigit() and is_complete(p):
            found.append((int(suffix), p))
    return sorted(found)


def _remove_dir(path: Path) -> None:
    """Delete a directory so that it never looks half there: renamed to a hidden `.deleting` name
    first (atomic), then removed; a leftover of a killed deletion goes at the next prune."""
    trash = path.with_name(f".{path.name.lstrip('.')}.deleting")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def recover_interrupted(output_dir: Any, cleanup: bool = False) -> list[Path]:
    """Put back a checkpoint a save killed between its two renames left hidden: for a step with no
    `checkpoint-<step>` but a complete `.checkpoint-<step>.tmp` (the new copy, written in full) or
    `.old` (the previous copy), that copy is renamed back, the new one first. Safe to run on every
    rank at once (a rename another rank made first is skipped). `cleanup` (rank 0, when saving):
    also delete the hidden copies a checkpoint in place makes stale. Returns the restored directories."""
    out = Path(output_dir)
    restored: list[Path] = []
    if not out.is_dir():
        return restored
    steps = set()
    for hidden in out.glob(f".{PREFIX}*"):
        for suffix in (".tmp", ".old"):
            step = hidden.name[len(PREFIX) + 1:-len(suffix)]
            if hidden.name.endswith(suffix) and step.isdigit():
                steps.add(step)
    for step in sorted(steps, key=int):
        final = out / f"{PREFIX}{step}"
        if final.exists():
            continue
        for copy in (out / f".{PREFIX}{step}.tmp", out / f".{PREFIX}{step}.old"):
            if is_complete(copy):
                try:
                    os.replace(copy, final)
                except OSError:  # another rank restored it (or a copy is already in place)
                    pass
                else:
                    restored.append(final)
                break
    if cleanup:
        for step in steps:
            old = out / f".{PREFIX}{step}.old"
            if (out / f"{PREFIX}{step}").exists() and old.exists():
                _remove_dir(old)
    return restored


def resolve(spec: Any, output_dir: str) -> Optional[Path]:
    """The checkpoint directory `resume_from_checkpoint` names, or None for a fresh start.

    "latest" (or True) is the newest complete checkpoint in output_dir, None if there is none
    (so a restart script can always pass it); a path must be a complete checkpoint."""
    if spec is None or spec is False:
        return None
    out = Path(output_dir)
    if spec is True or spec == "latest":
        recover_interrupted(out)
        marker = out / LATEST
        if marker.is_file():
            path = out / marker.read_text().strip()
            if is_complete(path):
                return path
        # no marker (or it names a pruned / broken directory): the newest complete one
        found = list_checkpoints(out)
        return found[-1][1] if found else None
    path = Path(spec)
    if not path.is_dir():
        recover_interrupted(path.parent)  # a save of it killed between its renames left it hidden
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {str(path)!r} does not exist; give a checkpoint-* directory or 'latest'")
    if not is_complete(path):
        read_meta(path)  # raises with the explanation
    return path


def check_compatible(meta: dict, *, backend_format: str, backend_name: str, world_size: int, global_batch: int,
                     shuffle: bool, seed: int, num_samples: Optional[int] = None) -> None:
    """Refuse a resume that cannot continue the same run, before anything is loaded.
    `num_samples` (the training set's length) is checked when known (after the data is built)."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    if meta["global_batch_size"] != global_batch:
        raise CheckpointError(
            f"the checkpoint was trained with a global batch of {meta['global_batch_size']} samples, this run "
            f"uses {global_batch} (per_device_train_batch_size x gradient_accumulation_steps x world size); "
            "keep the global batch (change gradient_accumulation_steps when the world size changes) so the "
            "data order carries on where it stopped"
        )
    data = meta.get("data")  # (checkpoints written before it was recorded are not checked)
    if data is None:
        return
    fresh = "or start a new run (leave resume_from_checkpoint unset) if the change is meant"
    if data["shuffle"] != shuffle:
        raise CheckpointError(
            f"the checkpoint's run had shuffle: {str(data['shuffle']).lower()}, this run has shuffle: "
            f"{str(shuffle).lower()}; the rest of the epoch would read other samples (some twice, some never). "
            f"Keep shuffle: {str(data['shuffle']).lower()} to resume, {fresh}"
        )
    if shuffle and data["seed"] != seed:
        raise CheckpointError(
            f"the checkpoint's run shuffled the data with seed: {data['seed']}, this run has seed: {seed}; the rest "
            f"of the epoch would read other samples (some twice, some never). Keep seed: {data['seed']} to resume, {fresh}"
        )
    if num_samples is not None and data["num_samples"] != num_samples:
        raise CheckpointError(
            f"the checkpoint's run trained on {data['num_samples']} samples, this run's training set has "
            f"{num_samples}; the data order (and the epoch) would not carry on where it stopped. Resume with "
            f"the same training data, {fresh}"
        )
    if data.get("order", 1) == 1 and data["num_samples"] % global_batch:
        logger.warning(
            "the checkpoint was written by a version that dropped the last %d sample(s) of every epoch; this "
            "version runs the epochs on into one another, so after the first epoch boundary the run reads "
            "other batches than that version would have (no sample is repeated or skipped within a pass)",
            data["num_samples"] % global_batch,
        )


def trainable_shapes(module) -> dict[str, list[int]]:
    """{name: full shape} of the parameters that train (a ZeRO-3 partition reports its full shape)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters() if p.requires_grad}


def check_same_trainable(meta: dict, module) -> None:
    """Refuse a resume into a model that trains other parameters than the checkpoint's run did (other
    LoRA settings, LoRA against full fine-tuning, another model), naming the first differences."""
    saved = meta.get("trainable")
    if saved is None:  # (written before it was recorded)
        return
    now = trainable_shapes(module)
    if now == saved:
        return
    missing = [n for n in saved if n not in now]
    extra = [n for n in now if n not in saved]
    reshaped = [f"{n} {saved[n]} -> {now[n]}" for n in saved if n in now and now[n] != saved[n]]
    parts = []
    for label, names in (("only in the checkpoint", missing), ("only in this model", extra), ("other shape", reshaped)):
        if names:
            parts.append(f"{label}: {len(names)} (e.g. {names[0]})")
    raise CheckpointError(
        f"the checkpoint's run trained {len(saved)} parameter tensors, this model trains {len(now)}; "
        + "; ".join(parts)
        + ". Resume with the same model and the same LoRA settings (r, target_modules, ...) or full "
        "fine-tuning as before; to start from these weights with other settings, export them and begin a new run"
    )


def needs_conversion(meta: dict, *, backend_format: str, backend_name: str, world_size: int,
                     precision: Optional[str] = None) -> bool:
    """Whether the backend cannot read the checkpoint natively: another format, or a DeepSpeed
    checkpoint of another stage, world size or precision (DeepSpeed names and lays out its files
    by its bf16 / fp16 / fp32 optimizer). DCP reshards natively across world sizes and between
    single / ddp / fsdp, and its fp32 state does not depend on the precision."""
    if meta["format"] != backend_format:
        return True
    if backend_format != "deepspeed":
        return False
    other_precision = precision is not None and meta.get("precision") not in (None, precision)
    return meta["world_size"] != world_size or meta["backend"] != backend_name or other_precision


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(trainer, losses: list[float]) -> Path:
    """Write a complete checkpoint of `trainer` at its current step (every rank calls this)."""
    cfg = trainer.cfg
    out = Path(cfg.output_dir)
    step = trainer.global_step
    final = out / f"{PREFIX}{step}"
    tmp = out / f".{PREFIX}{step}.tmp"
    rank = trainer.rank
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        recover_interrupted(out, cleanup=True)  # a complete copy left hidden by a killed save is put back first
        if tmp.exists():
            _remove_dir(tmp)  # left by a save that was killed
        tmp.mkdir()
    D.barrier()
    t0 = time.perf_counter()
    trainer.backend.save_checkpoint(tmp / STATE)
    torch.save(_rng_state(), tmp / f"rng_state_{rank}.pth")
    D.barrier()  # every rank's files are written
    if rank == 0:
        torch.save({"lr_scheduler": trainer.lr_scheduler.state_dict()}, tmp / "trainer_state.pt")
        hf_config = getattr(trainer.backend.module, "config", None)
        if hasattr(hf_config, "to_json_file"):  # so a consolidated export is a loadable HF folder
            hf_config.to_json_file(str(tmp / "config.json"))
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "backend": trainer.backend.name,
            "format": trainer.backend.checkpoint_format,
            "world_size": trainer.world_size,
            "global_batch_size": cfg.global_batch(trainer.world_size),
            "precision": cfg.precision,
            "seed": cfg.seed,
            # what a resume must train again: the trainable parameters' names and full shapes
            "trainable": trainable_shapes(trainer.backend.module),
            # the steps the learning-rate schedule spans (max_steps, or the steps of num_train_epochs):
            # a resume with another total says how the schedule changes
            "total_steps": trainer.total_steps,
            "run_id": trainer.run_id,  # the run (kept across resumes) whose checkpoints save_total_limit prunes
            # what fixes the data order: a resume must read the same samples in the same order
            # order 2: the epochs run on into one another (before, each epoch's tail was dropped)
            "data": {"num_samples": len(trainer.train_dataset), "shuffle": cfg.shuffle, "seed": cfg.seed, "order": 2},
            "losses": losses,
            "config": cfg.model_dump(mode="json"),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _fsync_tree(tmp)
        _write_atomic(tmp / META, json.dumps(meta, indent=1))
        if final.exists():  # the same step saved again (e.g. by a resumed run): the complete old
            # copy is moved aside and deleted only once the new one is in place
            old = out / f".{PREFIX}{step}.old"
            if old.exists():
                _remove_dir(old)
            os.replace(final, old)
            os.replace(tmp, final)  # (killed between the two: recover_interrupted puts tmp back)
            _remove_dir(old)
        else:
            os.replace(tmp, final)
        _write_atomic(out / LATEST, final.name)
        _prune(out, cfg.save_total_limit, keep=final, run_id=trainer.run_id)
    D.barrier()
    if rank == 0:
        trainer._log({"step": step, "checkpoint": str(final), "save_s": time.perf_counter() - t0})
    return final


def _prune(out: Path, limit: Optional[int], keep: Path, run_id: str) -> None:
    """Delete this run's oldest checkpoints beyond `limit`; another run's (an earlier one in the same
    output_dir, not resumed) are never deleted."""
    if not limit:
        return
    for trash in out.glob(f".{PREFIX}*.deleting"):  # deletions a killed process left unfinished
        shutil.rmtree(trash, ignore_errors=True)
    found = [p for _, p in list_checkpoints(out) if p != keep and read_meta(p).get("run_id") == run_id]
    for p in found[: max(0, len(found) - (limit - 1))]:
        _remove_dir(p)


def load(trainer, path: Path) -> dict:
    """Restore `trainer` (backend state, scheduler, RNG, step) from a complete checkpoint."""
    meta = read_meta(path)
    check_compatible(
        meta,
        backend_format=trainer.backend.checkpoint_format,
        backend_name=trainer.backend.name,
        world_size=trainer.world_size,
        global_batch=trainer.cfg.global_batch(trainer.world_size),
        shuffle=trainer.cfg.shuffle,
        seed=trainer.cfg.seed,
        num_samples=len(trainer.train_dataset),
    )
    check_same_trainable(meta, trainer.backend.module)
    backend = trainer.backend
    if needs_conversion(meta, backend_format=backend.checkpoint_format, backend_name=backend.name,
                        world_size=trainer.world_size, precision=trainer.cfg.precision):
        scratch = Path(trainer.cfg.output_dir) / f".convert-{meta['step']}.tmp"
        if trainer.rank == 0:
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir(parents=True)
            consolidate(path, scratch / "consolidated.pt", meta=meta, work_dir=scratch)
        D.barrier()
        portable = torch.load(scratch / "consolidated.pt", weights_only=False, map_location="cpu")
        backend.load_consolidated(portable["model"], portable["optim"])
        D.barrier()
        if trainer.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        backend.load_checkpoint(path / STATE)
    ts = torch.load(path / "trainer_state.pt", weights_only=False)
    trainer.lr_scheduler.load_state_dict(ts["lr_scheduler"])
    saved_lrs = list(trainer.lr_scheduler.get_last_lr())
    lrs = _reposition_schedule(trainer.lr_scheduler)
    # the optimizer's learning rate is the scheduler's (some optimizer loads keep their own)
    for group, lr in zip(trainer.backend.optimizer.param_groups, lrs):
        group["lr"] = lr
    if trainer.rank == 0:
        _warn_if_schedule_changed(trainer, meta, saved_lrs, lrs)
    rng = path / f"rng_state_{trainer.rank}.pth"
    if rng.is_file():  # a rank that did not exist in the saved run keeps its seeded state
        _set_rng_state(torch.load(rng, weights_only=False))
    trainer.global_step = int(meta["step"])
    return meta


def _reposition_schedule(scheduler) -> list:
    """The learning rates at the restored position (`last_epoch`) of the schedule this run built.

    The saved state carries the position and the saved run's last rates (`_last_lr`); the schedule
    itself (its lambdas: total steps, warm-up) is this run's, rebuilt from the config. Where the
    total grew or shrank (max_steps / num_train_epochs changed), the saved rates are the old
    schedule's and would drive the first step after the resume, with the new schedule's only from
    the second step on; so the rates are recomputed from this run's schedule at the position (where
    the schedule is unchanged this gives the saved rates exactly: the same product that stepping computed)."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):  # (every transformers schedule offered is one)
        return list(scheduler.get_last_lr())
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    scheduler._last_lr = list(lrs)
    return lrs


def _scheduled_total(meta: dict, trainer) -> Optional[int]:
    """The total steps the checkpoint's run scheduled its learning rate over (recorded since
    `total_steps` was added to the metadata; before, derived from its config)."""
    if meta.get("total_steps") is not None:
        return int(meta["total_steps"])
    cfg = meta.get("config") or {}
    if cfg.get("max_steps"):
        return int(cfg["max_steps"])
    if cfg.get("num_train_epochs") and getattr(trainer, "sampler", None) is not None:
        return trainer.sampler.steps_for_epochs(cfg["num_train_epochs"])
    return None


def _warn_if_schedule_changed(trainer, meta: dict, saved_lrs: list, lrs: list) -> None:
    """A resume whose schedule differs from the checkpoint's run (other total steps, or other
    schedule settings) follows this run's schedule from the saved step on: the learning-rate curve
    changes shape there, and may jump. Say so, with the numbers."""
    old_total, new_total = _scheduled_total(meta, trainer), trainer.total_steps
    lr_next = float(lrs[0]) if lrs else float("nan")
    lr_saved = float(saved_lrs[0]) if saved_lrs else float("nan")
    step = int(meta["step"])
    if old_total is not None and old_total != new_total:
        logger.warning(
            "resuming at step %d a run whose learning-rate schedule spanned %d steps; this run has %d "
            "(max_steps / num_train_epochs changed): the learning rate follows the %d-step schedule from "
            "step %d on (as transformers' Trainer rebuilds its scheduler for the new total; warm-up and "
            "decay as computed for %d steps): %.6g at the next step, where the saved run's schedule had "
            "%.6g. The steps already taken keep the %d-step schedule's rates, so the curve changes shape "
            "at step %d. The data order carries on unchanged",
            step, old_total, new_total, new_total, step, new_total, lr_next, lr_saved, old_total, step,
        )
    elif lr_next != lr_saved:
        logger.warning(
            "resuming at step %d with other learning-rate schedule settings than the checkpoint's run "
            "(lr_scheduler_type, warmup_steps / warmup_ratio, lr_scheduler_kwargs%s): the learning rate follows "
            "this run's schedule from step %d on: %.6g at the next step, where the saved run's schedule had %.6g",
            step, "" if old_total is not None else ", or the total steps", step, lr_next, lr_saved,
        )
    if new_total <= step:
        logger.warning("the checkpoint is at step %d, already at or past this run's %d steps: nothing is left "
                       "to train; raise max_steps (or num_train_epochs) to continue", step, new_total)


def backend_format(backend_name: str) -> str:
    return "deepspeed" if backend_name.startswith("zero") else "dcp"


def validate_resume_config(cfg, backend_name: str, world_size: int, num_samples: Optional[int] = None,
                           model=None) -> None:
    """Checks on `resume_from_checkpoint` that can run before any process group exists."""
    spec = cfg.resume_from_checkpoint
    try:
        path = resolve(spec, cfg.output_dir)
        if path is None:
            return
        check_compatible(
            read_meta(path),
            backend_format=backend_format(backend_name),
            backend_name=backend_name,
            world_size=world_size,
            global_batch=cfg.global_batch(world_size),
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            num_samples=num_samples,
        )
        if model is not None:
            check_same_trainable(read_meta(path), model)
    except CheckpointError as exc:
        raise ConfigError(f"resume_from_checkpoint: {exc}") from None


# --------------------------------------------------------------------------- consolidation


def consolidate(path: Path, out_file: Path, *, meta: Optional[dict] = None, work_dir: Optional[Path] = None) -> dict:
    """One file holding a checkpoint's full fp32 weights and Adam state, keyed by parameter
    name, whatever backend and world size wrote it: {"model": {name: tensor}, "optim": {name:
    {"step", "exp_avg", "exp_avg_sq"}}, "meta": meta}. This is the intermediate through which a
    checkpoint moves between the DCP backends and DeepSpeed, or between DeepSpeed world sizes.
    Runs in one process, no process group needed."""
    path = Path(path)
    meta = meta or read_meta(path)
    work = Path(work_dir) if work_dir is not None else out_file.parent / f".{out_file.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    if meta["format"] == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        tmp = work / "dcp.pt"
        dcp_to_torch_save(path / STATE, tmp)
        full = torch.load(tmp, weights_only=False, map_location="cpu")
        tmp.unlink()
        model = {k: v.float() if v.is_floating_point() else v for k, v in full["model"].items()}
        optim = {k: dict(v) for k, v in full["optim"]["state"].items()}
    else:
        model, optim = _read_deepspeed(path / STATE, work, int(meta["step"]))
    result = {"model": model, "optim": optim, "meta": meta}
    tmp = out_file.with_name(out_file.name + ".tmp")
    torch.save(result, tmp)
    os.replace(tmp, out_file)
    return result


def _read_deepspeed(state_dir: Path, work: Path, step_fallback: int) -> tuple[dict, dict]:
    """Full fp32 weights and Adam moments of a DeepSpeed ZeRO checkpoint, through DeepSpeed's
    universal-checkpoint converter (which reassembles the partitions of any stage)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    tag_dir = next((p for p in state_dir.iterdir() if p.is_dir()), None)
    if tag_dir is None:
        raise CheckpointError(f"{state_dir} holds no DeepSpeed checkpoint tag directory")
    uni = work / "universal"
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(uni), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    # weights DeepSpeed does not optimise (frozen ones) come from the module state (stages 1-2), or
    # under ZeRO-3 from every rank's fragment of them (`frozen_param_fragments`, in rank order)
    model: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}

    def rank_of(p: Path) -> int:
        m = re.search(r"zero_pp_rank_(\d+)_", p.name)
        return int(m.group(1)) if m else 0

    states = sorted(tag_dir.glob("*model_states.pt"), key=rank_of)
    if states:
        sd = torch.load(states[0], weights_only=False, map_location="cpu")
        for group in sd.get("param_shapes") or []:
            shapes.update(group)
        for k, v in (sd.get("module") or {}).items():
            if torch.is_tensor(v) and v.numel() > 0:  # ZeRO-3 keeps empty placeholders here
                model[k] = v.float() if v.is_floating_point() else v
        frozen = {k: torch.Size(v) for k, v in (sd.get("frozen_param_shapes") or {}).items() if k not in model}
        if frozen:
            frags = [sd.get("frozen_param_fragments") or {}]
            frags += [torch.load(p, weights_only=False, map_location="cpu").get("frozen_param_fragments") or {}
                      for p in states[1:]]
            for k, shape in frozen.items():
                parts = [f[k].reshape(-1) for f in frags if k in f]
                flat = torch.cat(parts) if parts else torch.empty(0)
                if flat.numel() < shape.numel():
                    raise CheckpointError(f"{tag_dir}: the frozen weight {k} has {flat.numel()} of its "
                                          f"{shape.numel()} values in the model-state files; the checkpoint is incomplete")
                t = flat[: shape.numel()].reshape(shape)
                model[k] = t.float() if t.is_floating_point() else t
    optim: dict[str, dict] = {}
    for pdir in sorted((uni / "zero").iterdir()):
        if not pdir.is_dir():
            continue

        def part(name: str) -> torch.Tensor:
            obj = torch.load(pdir / f"{name}.pt", weights_only=False, map_location="cpu")
            t = obj["param"] if isinstance(obj, dict) else obj
            shape = shapes.get(pdir.name)
            return t.reshape(shape) if shape is not None and t.numel() == torch.Size(shape).numel() else t

        model[pdir.name] = part("fp32").float()
        # ZeRO-3 universal checkpoints carry no per-parameter step: every Adam step of this
        # trainer is an optimizer step of the run (nan_policy skip is not offered with ZeRO)
        step = part("step").float().reshape(()) if (pdir / "step.pt").is_file() else torch.tensor(float(step_fallback))
        optim[pdir.name] = {"step": step, "exp_avg": part("exp_avg").float(), "exp_avg_sq": part("exp_avg_sq").float()}
    shutil.rmtree(uni, ignore_errors=True)
    return model, optim


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """Just the full weights of a checkpoint (for export)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return consolidate(Path(path), Path(tmp) / "c.pt")["model"]
