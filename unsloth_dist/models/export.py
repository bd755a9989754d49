"""Exports from any backend: the LoRA adapter (peft's layout) and the merged 16-bit model.

Both take a trainer (``unsloth_dist.Trainer`` or the seed API's ``UnslothTrainer``), a plain module or
a consolidated state dict. Only rank 0 writes. Whether every rank must call them depends on where the
weights are:

* sharded backends (fsdp, zero3): *collective* -- every rank must call them, because
  ``trainer.full_state_dict()`` gathers the shards onto rank 0. They first check that every rank came
  (a gloo ``monitored_barrier``; rank 0 waits at most :data:`ARRIVAL_TIMEOUT_S` seconds, bounded by
  the process-group timeout): a call on rank 0 alone (``if trainer.is_world_process_zero():``) is then a
  clear error instead of a hang until the process-group timeout. When rank 0 fails to write, every
  rank raises.
* replicated backends (single, ddp, zero1, zero2: rank 0 holds the whole model) and plain modules:
  no collective at all. Rank 0 writes, so a rank-0-only call (the transformers idiom
  ``if trainer.is_world_process_zero(): trainer.save_model()``) works; called on every rank, the other
  ranks return once rank 0 has written (they wait on the launch's key-value store, not in a
  collective), so every rank can read the export right after.

Writes are atomic: everything goes to a temporary sibling directory that is renamed onto (or, over
a previous export, swapped with) ``out_dir`` when complete, so a crash never leaves a half-written
export behind; the exception is an ``out_dir`` with subdirectories (a training output_dir with its
checkpoints), into which the files are moved one by one (see :class:`_AtomicDir`).

* :func:`save_lora_adapter` -> ``adapter_config.json`` + ``adapter_model.safetensors`` written by
  peft's own ``save_pretrained`` (given the gathered state dict): ``PeftModel.from_pretrained(base,
  out_dir)`` loads it.
* :func:`save_merged` -> ``config.json`` (+ ``generation_config.json``) and ``model.safetensors``
  (sharded above `max_shard_size`, with the index file) of the base architecture with
  ``W + scaling * B @ A`` merged in (in fp32, then cast to `dtype`); 4-bit bases are dequantised.
  Loadable by plain ``AutoModelForCausalLM.from_pretrained``; no peft needed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .lora import is_peft_model, merge_lora_state_dict

logger = logging.getLogger("unsloth_dist")

_EXPORT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHARDED_BACKENDS = ("fsdp", "zero3")
# how long a collective export waits for every rank to arrive before it says that the call must be
# made on every rank (bounded by the run's process-group timeout, dist_timeout_s)
ARRIVAL_TIMEOUT_S = 300.0


def _dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _any_rank_failed(failed: bool) -> bool:
    """Whether any rank reports a failure (a collective over the host group when a process group exists)."""
    from .. import distributed as D

    if not D.is_dist():
        return failed
    flag = torch.tensor([1.0 if failed else 0.0])
    D.all_reduce_sum(flag, group=D.cpu_group())
    return flag.item() > 0


@contextlib.contextmanager
def _rank0_writes(what: Path, collective: bool = True):
    """Around rank 0's writing of an export. `collective` (a sharded export, every rank here): it ends
    together on every rank, and when rank 0 failed every rank raises (rank 0 its own error) -- no rank
    goes on, or waits, as if it had been written. Otherwise rank 0's error is its own (no collective)."""
    if not collective:
        key = _done_key(what)
        try:
            yield
        except Exception as exc:
            _announce(key, f"{type(exc).__name__}: {exc}")
            raise
        _announce(key, "")
        return
    err = None
    try:
        yield
    except Exception as exc:  # (KeyboardInterrupt / SystemExit end the process anyway)
        err = exc
    if _any_rank_failed(err is not None):
        if err is not None:
            raise err
        raise RuntimeError(f"rank 0 failed to write {what}; its error is in rank 0's output")


# A replicated export (rank 0 holds the whole model) has no collective, so that rank 0 may call it
# alone; when the other ranks call it too they wait on the launch's key-value store (no collective:
# a rank-0-only call leaves a key nobody reads) until rank 0 says the files are in place, so they can
# read them right after. Keys are numbered per output path and call.
_export_calls: dict[str, int] = {}


def _done_key(out: Path) -> str:
    n = _export_calls.get(str(out), 0) + 1
    _export_calls[str(out)] = n
    return f"unsloth_dist/export/{out}#{n}"


def _store() -> Any:
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store() if dist.is_available() and dist.is_initialized() else None
    except Exception:  # no default store (a group made without one): no waiting
        return None


def _announce(key: str, error: str) -> None:
    store = _store()
    if store is not None:
        store.set(key, error or "ok")


def _wait_for_rank0(out: Path) -> None:
    """On a rank other than 0 of a replicated export: return once rank 0 has written `out` (raise
    when it failed)."""
    key = _done_key(out)
    store = _store()
    if store is None:
        return
    store.wait([key])
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"rank 0 failed to write {out}: {status}")


def _other_rank_done(trainer_or_state: Any, out: Path, sharded: bool, what: str) -> bool:
    """The start of an export on this rank. True: a rank other than 0 of a replicated export, done
    once rank 0 has written `out`. False: go on (rank 0, or a sharded export, after checking that
    every rank called it)."""
    if not sharded and _export_rank(trainer_or_state) != 0:
        _wait_for_rank0(out)  # the weights are whole on rank 0: it writes alone
        return True
    if sharded:
        check_all_ranks_called(trainer_or_state, what)
    return False


def _inner_trainer(obj: Any) -> Any:
    """The ``unsloth_dist.Trainer`` behind `obj` (itself, or the one a seed-API UnslothTrainer wraps), or None."""
    inner = getattr(obj, "trainer", None)
    if inner is not None and hasattr(inner, "full_state_dict") and hasattr(inner, "backend"):
        return inner
    if hasattr(obj, "full_state_dict") and hasattr(obj, "backend") and not isinstance(obj, nn.Module):
        return obj
    return None


def is_sharded_trainer(obj: Any) -> bool:
    """Whether `obj` is a trainer whose backend shards the weights over the ranks (fsdp, zero3): its
    exports are collective. False for single / ddp / zero1 / zero2, a module or a state dict."""
    inner = _inner_trainer(obj)
    return inner is not None and inner.world_size > 1 and inner.backend.name in SHARDED_BACKENDS


def _export_rank(obj: Any) -> int:
    inner = _inner_trainer(obj)
    return inner.rank if inner is not None else _dist_rank()


def check_all_ranks_called(trainer: Any, what: str = "the export") -> None:
    """Before a collective export of a sharded model: every rank must be here. A gloo
    ``monitored_barrier`` (on the trainer's host group) in which rank 0 gives up after
    ARRIVAL_TIMEOUT_S (at most the process-group timeout; the other ranks wait the process-group
    timeout) with an error that says to call it on every rank -- a rank-0-only call would otherwise
    wait in the gather until the process-group timeout."""
    import datetime

    import torch.distributed as dist

    from .. import distributed as D

    inner = _inner_trainer(trainer)
    if inner is None or inner.world_size <= 1 or not D.is_dist():
        return
    group = D.cpu_group()
    # rank 0 (the one a `rank == 0` guard leaves alone) gives up early; the others wait as long as any
    # collective would (rank 0 may legitimately arrive late, e.g. after rank-0-only generation)
    timeout = float(inner.cfg.dist_timeout_s)
    if inner.rank == 0:
        timeout = max(1.0, min(timeout, ARRIVAL_TIMEOUT_S))
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"{what} after {inner.backend.name} training is collective: the weights are sharded over the "
            f"{inner.world_size} ranks and every rank must call it (rank {inner.rank} waited {timeout:.0f} s for "
            "the others). Call it on every rank, not under `if trainer.is_world_process_zero():` / "
            "`if rank == 0:` (that guard works with the replicated backends single, ddp, zero1, zero2 only); "
            f"rank 0 writes. ({detail})") from None


def gather_state(trainer_or_state: Any, model: Optional[nn.Module] = None):
    """(consolidated state dict on rank 0 / None elsewhere, the user's module, rank)."""
    inner = getattr(trainer_or_state, "trainer", None)  # the seed API's UnslothTrainer wraps one
    if inner is not None and hasattr(inner, "full_state_dict"):
        trainer_or_state = inner
    if hasattr(trainer_or_state, "full_state_dict") and hasattr(trainer_or_state, "backend"):
        sd = trainer_or_state.full_state_dict()  # collective
        module = model if model is not None else trainer_or_state.backend.module
        return sd, module, trainer_or_state.rank
    if isinstance(trainer_or_state, dict):
        if model is None:
            raise ValueError("exporting a state dict needs the model it belongs to (peft_model= / model=)")
        return trainer_or_state, model, _dist_rank()
    if isinstance(trainer_or_state, nn.Module):
        module = trainer_or_state
        _refuse_sharded_module(module)
        sd = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return sd, (model if model is not None else module), _dist_rank()
    raise TypeError(
        f"export needs a Trainer, a model or a state dict, not {type(trainer_or_state).__name__}")


def _refuse_sharded_module(module: nn.Module) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, DTensor) for p in module.parameters()):
        raise ValueError(
            f"{type(module).__name__} holds FSDP-sharded parameters: export it through the trainer that sharded it "
            "(trainer.save_model(), FastLanguageModel.save_pretrained_merged(trainer, ...), or "
            "model.save_pretrained_merged(...) while that trainer exists), on every rank")


def _module_of(trainer_or_state: Any, model: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module an export writes, without gathering anything."""
    if model is not None:
        return model
    inner = _inner_trainer(trainer_or_state)
    if inner is not None:
        return inner.backend.module
    return trainer_or_state if isinstance(trainer_or_state, nn.Module) else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system does not offer it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0


class _AtomicDir:
    """Write into a temporary sibling directory; on success it becomes `out_dir` (a rename when
    `out_dir` does not exist yet). An existing `out_dir` holding files only (a previous export) is
    swapped for the new one in one atomic step where the system offers it (Linux renameat2), after
    its files that are not the previous export's weights (``*.safetensors``, their index) were linked
    into the new one: a crash leaves the old export or the new one, whole. Into an `out_dir` with
    subdirectories (the training output_dir with its checkpoints, as transformers' save_model()
    writes), or without the atomic swap, the export's files are moved in one by one, weights first
    and the files pointing at them last, replacing files of the same name; a previous export's other
    weight files are removed so they cannot be loaded with the new config (not atomic: a crash in
    between can leave new weights beside the old config). Nothing else there is touched."""

    def __init__(self, out_dir: Union[str, os.PathLike]) -> None:
        self.out = Path(out_dir).expanduser().resolve()
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return False
        if not self.out.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise NotADirectoryError(f"{self.out} exists and is not a directory; export into a directory")
        new = {p.name for p in self.tmp.iterdir()}
        stale = lambda n: n.endswith(".safetensors") or n.endswith(".safetensors.index.json")  # noqa: E731
        if all(p.is_file() for p in self.out.iterdir()):
            for p in self.out.iterdir():  # what the new export does not replace stays (tokenizer, notes...)
                if p.name not in new and not stale(p.name):
                    try:
                        os.link(p, self.tmp / p.name)
                    except OSError:
                        shutil.copy2(p, self.tmp / p.name)
            if _exchange(self.tmp, self.out):
                shutil.rmtree(self.tmp, ignore_errors=True)  # now the previous export
                return False
            for name in [p.name for p in self.tmp.iterdir() if p.name not in new]:
                (self.tmp / name).unlink()  # no atomic swap: the file-by-file path below
        for p in self.out.iterdir():  # the previous export's weights, not part of this one
            if p.is_file() and p.name not in new and stale(p.name):
                p.unlink()
        # weights first, the files that point at them (index, config) last
        for name in sorted(new, key=lambda n: (n.endswith(".json"), n)):
            target = self.out / name
            if target.is_dir() and not (self.tmp / name).is_dir():
                raise IsADirectoryError(f"{target} is a directory; the export writes a file of that name")
            if (self.tmp / name).is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(self.tmp / name, target)
        self.tmp.rmdir()
        return False


def save_lora_adapter(trainer_or_state: Any, peft_model: Optional[nn.Module], out_dir: Union[str, os.PathLike],
                      adapter: str = "default", tokenizer: Any = None) -> Path:
    """Write the LoRA adapter of `peft_model` in peft's ``save_pretrained`` layout; rank 0 writes.
    Collective after fsdp / zero3 training (call it on every rank); otherwise rank 0 may call it alone
    (see the module docstring). Returns `out_dir` on every rank that called it."""
    out = Path(out_dir).expanduser().resolve()
    sharded = is_sharded_trainer(trainer_or_state)
    known = _module_of(trainer_or_state, peft_model)
    if known is not None:
        _check_adapter(known, adapter)
    if _other_rank_done(trainer_or_state, out, sharded, "save_lora_adapter / trainer.save_model()"):
        return out
    with _rank0_writes(out, collective=sharded):  # (a failure in the gather too reaches every rank)
        sd, module, rank = gather_state(trainer_or_state, peft_model)
        _check_adapter(module, adapter)
        if rank == 0:
            _write_adapter(module, sd, out, adapter, tokenizer)
    return out


def _check_adapter(module: nn.Module, adapter: str) -> None:
    if not is_peft_model(module):
        raise TypeError(f"save_lora_adapter needs a peft model, got {type(module).__name__}; use save_merged "
                        "for a fully fine-tuned model")
    if adapter not in module.peft_config:
        raise ValueError(f"adapter {adapter!r} is not in the model (has {list(module.peft_config)})")


def _write_adapter(module: nn.Module, sd: dict, out: Path, adapter: str, tokenizer: Any) -> None:
    with _AtomicDir(out) as tmp:
        # peft's own writer, fed the gathered weights: the layout is exactly what PeftModel loads
        module.save_pretrained(str(tmp), state_dict=sd, selected_adapters=[adapter], safe_serialization=True)
        if adapter != "default":  # peft puts non-default adapters in a sub-directory
            sub = tmp / adapter
            if sub.is_dir():
                for f in sub.iterdir():
                    os.replace(f, tmp / f.name)
                sub.rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    logger.info("LoRA adapter %r written to %s", adapter, out)


def _base_model(module: nn.Module) -> nn.Module:
    return module.get_base_model() if is_peft_model(module) else module


def save_merged(trainer_or_state: Any, out_dir: Union[str, os.PathLike], dtype: torch.dtype = torch.bfloat16,
                tokenizer: Any = None, peft_model: Optional[nn.Module] = None, adapter: str = "default",
                max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write the merged model (LoRA folded into the base weights; a fully fine-tuned model as is)
    in `dtype` (bf16, fp16 or fp32) as safetensors + config.json, loadable by plain transformers; rank 0
    writes. Collective after fsdp / zero3 training (call it on every rank); otherwise rank 0 may call it
    alone (see the module docstring). Returns `out_dir` on every rank that called it."""
    if isinstance(dtype, str):
        from .loader import resolve_dtype

        dtype = resolve_dtype(dtype)
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype}: the merged export is written in bf16, fp16 or fp32")
    out = Path(out_dir).expanduser().resolve()
    sharded = is_sharded_trainer(trainer_or_state)
    if _other_rank_done(trainer_or_state, out, sharded, "save_merged / save_pretrained_merged / trainer.save_model()"):
        return out
    with _rank0_writes(out, collective=sharded):  # (a failure in the gather too reaches every rank)
        sd, module, rank = gather_state(trainer_or_state, peft_model)
        if rank == 0:
            if is_peft_model(module):
                merged = merge_lora_state_dict(sd, module, adapter=adapter, dtype=dtype)
            else:
                merged = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
            base = _base_model(module)
            config = copy.deepcopy(base.config)
            for attr in ("quantization_config", "_pre_quantization_dtype"):
                if hasattr(config, attr):
                    try:
                        delattr(config, attr)
                    except AttributeError:
                        pass
            config.dtype = dtype
            if getattr(config, "use_cache", None) is False:
                config.use_cache = True
            if getattr(config, "tie_word_embeddings", False):
                # tied when the merged tensors are equal: a LoRA (or a trained copy) on lm_head or on the
                # embeddings makes them differ, and re-tying on load would drop it
                emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
                head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
                names = {id(m): n for n, m in base.named_modules()}
                emb_key = f"{names[id(emb)]}.weight" if emb is not None and id(emb) in names else None
                head_key = f"{names[id(head)]}.weight" if head is not None and id(head) in names else None
                if head_key in merged and emb_key in merged and torch.equal(merged[head_key], merged[emb_key]):
                    merged.pop(head_key)  # transformers re-ties it on load
                elif head_key in merged and emb_key in merged:
                    config.tie_word_embeddings = False
            with _AtomicDir(out) as tmp:
                config.save_pretrained(str(tmp))
                gen = getattr(base, "generation_config", None)
                if gen is not None:
                    try:
                        gen.save_pretrained(str(tmp))
                    except Exception as exc:  # an invalid generation config must not lose the weights
                        logger.warning("generation_config not saved: %s", exc)
                _write_safetensors(merged, tmp, max_shard_size)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
            logger.info("merged %s model written to %s", str(dtype).removeprefix("torch."), out)
    return out


def _write_safetensors(sd: dict[str, torch.Tensor], out: Path, max_shard_size: Union[int, str]) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in sd.items()}
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- model.save_pretrained


_TRAINER_REF = "_unsloth_dist_trainer"


class _WeakTrainer:
    """A weak reference to the trainer that set a model up (the model does not keep a finished trainer
    alive); a copy or a pickle of the model gets an empty one."""

    def __init__(self, trainer: Any = None) -> None:
        import weakref

        self._ref = weakref.ref(trainer) if trainer is not None else None

    def __call__(self) -> Any:
        return self._ref() if self._ref is not None else None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._ref = None


def trainer_of(module: nn.Module) -> Any:
    """The live ``unsloth_dist.Trainer`` that last set `module` up (None when there is none, or its
    process group is gone)."""
    from .. import distributed as D

    ref = module.__dict__.get(_TRAINER_REF) if hasattr(module, "__dict__") else None
    trainer = ref() if ref is not None else None
    if trainer is None or getattr(trainer, "backend", None) is None or trainer.backend.module is not module:
        return None
    if trainer.world_size > 1 and not D.is_dist():
        return None
    return trainer


def install_save_pretrained(trainer: Any) -> None:
    """Make the notebook line ``model.save_pretrained(dir)`` right after multi-rank training (called by
    the Trainer once the backend is set up; per instance):

    * fsdp / zero3 (sharded weights): a collective -- call it on every rank, as a single-GPU script run
      under a launcher does; the shards are gathered and rank 0 writes (a peft model: its adapter, as
      :func:`save_lora_adapter`; another model: its full weights, as :func:`save_merged`, in their
      dtype). peft's own save would write empty or unreadable tensors there.
    * ddp / zero1 / zero2 (every rank holds the whole model): rank 0 writes, the other ranks return
      (no collective, so a ``if rank == 0:`` guard still works; no two ranks write the same files).
    A call with an explicit ``state_dict=`` goes to the model's own method unchanged."""
    module = trainer.backend.module
    module.__dict__.pop("save_pretrained", None)  # an earlier Trainer's (a later run on the same model)
    # the trainer that now holds the model: model.save_pretrained_merged(...) exports through it
    module.__dict__[_TRAINER_REF] = _WeakTrainer(trainer)
    method = getattr(type(module), "save_pretrained", None)
    if method is None or trainer.world_size <= 1:
        return
    original = method.__get__(module)
    sharded = trainer.backend.name in ("fsdp", "zero3")

    def save_pretrained(save_directory, *args, state_dict=None, **kwargs):
        if state_dict is not None:
            return original(save_directory, *args, state_dict=state_dict, **kwargs)
        if not sharded:
            return original(save_directory, *args, **kwargs) if trainer.rank == 0 else None
        if args or kwargs.get("selected_adapters") not in (None, ["default"]):
            logger.warning("model.save_pretrained after %s training writes the default adapter / the weights "
                           "only; other arguments are ignored", trainer.backend.name)
        if is_peft_model(module):
            save_lora_adapter(trainer, module, save_directory)
        else:
            dtypes = [p.dtype for p in module.parameters() if p.is_floating_point()]
            save_merged(trainer, save_directory, dtype=dtypes[0] if dtypes and dtypes[0] in _EXPORT_DTYPES else torch.float32)
        return None

    module.save_pretrained = save_pretrained
