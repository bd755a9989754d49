"""The seed-compatible API: ``UnslothTrainingArguments`` and ``UnslothTrainer``.

A thin layer for code written against transformers / TRL-style trainers. The arguments map onto a
:class:`~unsloth_dist.config.TrainConfig`; the trainer wraps the one :class:`~unsloth_dist.Trainer`
(no second training loop) and returns transformers-like results.

Decisions (documented here, tested in tests/test_seed_api.py):

* **precision**: ``bf16=True`` -> ``"bf16-mixed"`` for an fp32-loaded model (what ``bf16=True`` means
  in transformers: bf16 autocast over fp32 weights) and ``"bf16"`` for a bf16-loaded one (its weights
  stay bf16, the trained ones get fp32 master copies: nothing is upcast, a LoRA base keeps half the
  memory); ``fp16=True`` -> ``"fp16-mixed"``; both -> error. Neither given (and
  no ``precision=``): ``"bf16"`` when the model's weights are bf16, ``"fp16-mixed"`` when they
  are fp16, else ``"fp32"`` -- a half-precision model is never silently trained in fp32, an fp32
  model is trained as transformers would (fp32). ``bf16=False, fp16=False`` given explicitly -> fp32.
* **enable_distributed_training** (default True): True -> ``backend`` (default ``"auto"``: ddp under
  a multi-rank launch, single in one process). False -> one process only: ``backend="single"``, and
  under a multi-rank launch (WORLD_SIZE > 1) a clear error (launch one process instead, or set
  UNSLOTH_FORCE_SINGLE_GPU=1) -- N ranks each training its own copy silently is never what is meant.
* **distributed_backend** ``nccl`` | ``gloo`` -> ``TrainConfig.dist_backend``.
* **ddp_find_unused_parameters / ddp_bucket_cap_mb** -> the ddp backend's options (``backend="ddp"``, or
  ``"auto"`` resolving to ddp under a multi-rank launch); with another backend they are ignored with a
  warning.
* **optim**: AdamW variants only (``adamw_torch``, ``adamw_torch_fused``, ``adamw_hf``, ``adamw``;
  the bitsandbytes 8-bit / paged AdamW names are accepted with a warning: torch AdamW runs); anything
  else is an error.
* ``report_to`` ("tensorboard", "wandb"; other integrations are dropped with a warning) and ``run_name``
  map onto TrainConfig. ``warmup_steps`` below 1 is a ratio of the run (transformers 5).
  ``embedding_learning_rate`` is refused by name (one learning rate for every trained parameter).
* TRL SFTTrainer-style arguments given to ``UnslothTrainer`` itself: ``dataset_text_field``,
  ``max_seq_length`` / ``max_length`` (they win over the arguments'), ``formatting_func`` (one example
  -> its text, tokenized like a text column). ``trainer.state`` has transformers'
  ``global_step``, ``epoch``, ``max_steps`` and ``log_history`` (the logged metrics, on every rank).
  Positional arguments follow TRL's SFTTrainer: ``(model, args, data_collator, train_dataset, ...)``.
  Text samples get the tokenizer's EOS token appended unless they already end with it (as TRL's
  SFTTrainer does; ``eos_token=`` names another token, ``add_eos_token=False`` turns it off). Every
  text row is checked when the trainer is built (an error names the row and the field).
  ``max_seq_length`` and ``max_length`` given together must agree.
* transformers' defaults: ``save_strategy="steps"`` with ``save_steps=500`` (``save_strategy="no"``:
  no checkpoints; ``save_total_limit`` alone keeps the last N of those), ``eval_strategy="steps"``
  without ``eval_steps`` evaluates every ``logging_steps``, ``num_train_epochs`` 3.0. The arguments
  also read like transformers' (``args.local_rank``, ``process_index``, ``world_size``,
  ``save_strategy``, ``eval_strategy``, ...), from the launch environment.
* ``train()`` takes transformers' ``resume_from_checkpoint`` (True: the newest checkpoint in
  output_dir, a ValueError when there is none), ``trial`` and ``ignore_keys_for_eval`` (ignored,
  with a warning); ``evaluate()`` takes ``eval_dataset``, ``ignore_keys``, ``metric_key_prefix``.
  Any other keyword is a TypeError. ``trainer.state`` exists before ``train()`` (global_step 0).
* ``save_model()`` under single / ddp / zero1 / zero2 may be called on rank 0 alone (``if
  trainer.is_world_process_zero(): trainer.save_model()``): rank 0 writes, no collective. Under fsdp /
  zero3 it is collective and must be called on every rank; a rank-0-only call is an error saying so.
* Arguments that have no effect here (``logging_dir``, ``push_to_hub``, ...) are ignored, with a
  warning on rank 0 when their value would change what transformers / TRL do (``packing=True``, not
  ``packing=False`` or ``dataset_num_proc``). Unknown names are an error that names them, with a close
  match when there is one.
"""
from __future__ import annotations

import difflib
import logging
import math
import time
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .config import ConfigError, TrainConfig, load_config

logger = logging.getLogger("unsloth_dist")

# TrainingArguments names whose meaning is the same in TrainConfig
_DIRECT = (
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "num_train_epochs", "max_steps", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "lr_scheduler_kwargs",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint", "seed",
    "gradient_checkpointing", "dataloader_num_workers", "dataloader_pin_memory", "disable_tqdm",
    "global_batch_size", "nan_policy", "save_on_sigterm", "precision",
)
_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")
_ADAMW_8BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit")
# accepted, no effect here: a warning (rank 0) unless the value is one that changes nothing (ANY: none does)
ANY = object()
_IGNORED = {
    "logging_dir": (None,), "push_to_hub": (False,),
    "hub_model_id": (None,), "hub_token": (None,), "hub_strategy": (None, "every_save"), "overwrite_output_dir": ANY,
    "do_train": ANY, "do_eval": ANY, "do_predict": (False,), "remove_unused_columns": ANY,
    "logging_first_step": ANY, "logging_strategy": ("steps",), "data_seed": (None,), "tf32": (None,),
    "torch_compile": (False,), "include_num_input_tokens_seen": (False,), "group_by_length": (False,),
    # no sample is dropped: the global batch that ends a pass is completed from the next pass (the
    # sampler's epochs run on), close to transformers' default False; True gets its own warning below
    "dataloader_drop_last": ANY, "label_names": (None,), "load_best_model_at_end": (False,),
    "metric_for_best_model": (None,), "greater_is_better": (None,), "save_only_model": ANY,
    "save_safetensors": (True,), "gradient_checkpointing_kwargs": (None,), "local_rank": ANY,
    "dataloader_persistent_workers": ANY, "dataloader_prefetch_factor": ANY, "log_level": ANY,
    "log_level_replica": ANY, "dataset_num_proc": ANY, "dataset_batch_size": ANY, "packing": (False, None),
    "dataset_kwargs": (None, {}), "average_tokens_across_devices": ANY, "ddp_backend": (None, "nccl", "gloo"),
    "prediction_loss_only": ANY, "eval_accumulation_steps": ANY, "save_on_each_node": (False,),
    "skip_memory_metrics": ANY, "auto_find_batch_size": (False,), "full_determinism": (False,),
    "torch_empty_cache_steps": ANY, "use_cpu": (False,), "padding_free": (False,),
}
_EXTRA = ("enable_distributed_training", "distributed_backend", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
          "backend", "bf16", "fp16", "optim", "ddp_timeout", "eval_strategy", "evaluation_strategy",
          "save_strategy", "max_seq_length", "max_length", "dataset_text_field", "deepspeed", "fsdp", "report_to",
          "run_name", "eos_token", "add_eos_token")
_KNOWN = set(_DIRECT) | set(_IGNORED) | set(_EXTRA)


def _strategy(value: Any) -> str:
    """transformers' strategy values ("steps", IntervalStrategy.STEPS, ...) as a lower-case name."""
    v = getattr(value, "value", value)
    return str(v).rsplit(".", 1)[-1].lower()


class UnslothTrainingArguments:
    """transformers-style training arguments that map onto a TrainConfig (see the module docstring).

    Every argument stays readable as an attribute (``args.output_dir``, ``args.bf16``); ``to_train_config()``
    gives the validated TrainConfig."""

    def __init__(self, output_dir: str = "outputs", **kwargs: Any) -> None:
        if kwargs.get("embedding_learning_rate") is not None:
            raise ConfigError(
                "UnslothTrainingArguments: embedding_learning_rate (a separate learning rate for embed_tokens / "
                "lm_head, for continued pretraining) is not supported: every trained parameter uses learning_rate. "
                "Drop embedding_learning_rate, or train the embeddings in a separate run with their own learning_rate"
            )
        kwargs.pop("embedding_learning_rate", None)
        unknown = [k for k in kwargs if k not in _KNOWN]
        if unknown:
            lines = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(_KNOWN), n=1)
                lines.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"UnslothTrainingArguments: unknown argument(s) {', '.join(lines)}; see unsloth_dist.seed_api for "
                "the accepted names (TrainingArguments names that TrainConfig has, plus enable_distributed_training, "
                "distributed_backend, ddp_find_unused_parameters, ddp_bucket_cap_mb, dataloader_pin_memory, backend)")
        self._kwargs = dict(kwargs, output_dir=output_dir)
        for k, v in self._kwargs.items():
            object.__setattr__(self, k, v)
        # fail early on what needs no model or launch (the launch checks run in to_train_config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings come once, when the config is built
            self._base_fields(precision_default="fp32")

    def __getattr__(self, name: str) -> Any:
        # transformers' defaults for the common names that were not given (the values this run uses)
        if name.startswith("_"):
            raise AttributeError(name)
        defaults = {"bf16": False, "fp16": False, "optim": "adamw_torch", "report_to": "none",
                    "enable_distributed_training": True, "distributed_backend": None, "backend": "auto",
                    "max_seq_length": None, "max_length": None, "dataset_text_field": "text", "num_train_epochs": 3.0,
                    "max_steps": -1, "logging_strategy": "steps", "eos_token": None, "add_eos_token": True,
                    "packing": False, "dataset_num_proc": None, "dataset_kwargs": None, "dataloader_drop_last": False,
                    "remove_unused_columns": True, "push_to_hub": False, "load_best_model_at_end": False,
                    "logging_first_step": False}
        if name in defaults:
            return defaults[name]
        if name in ("eval_strategy", "evaluation_strategy"):
            ev = self._kwargs.get("eval_strategy", self._kwargs.get("evaluation_strategy"))
            return _strategy(ev) if ev is not None else ("steps" if self._kwargs.get("eval_steps") else "no")
        if name == "save_strategy":
            return "steps"
        if name in ("eval_steps", "save_steps", "save_total_limit"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._base_fields("fp32", rank=-1).get(name)
        if name in ("local_rank", "process_index", "local_process_index", "world_size", "should_save", "should_log",
                    "n_gpu", "train_batch_size", "eval_batch_size", "parallel_mode"):
            from . import distributed as D

            env = D.read_launch_env()
            return {
                # transformers: -1 outside a distributed launch, else the launcher's LOCAL_RANK
                "local_rank": env.local_rank if env.launcher != "none" else -1,
                "process_index": env.rank, "local_process_index": env.local_rank, "world_size": env.world_size,
                "should_save": env.rank == 0, "should_log": env.rank == 0,
                "n_gpu": 1 if torch.cuda.is_available() else 0,
                "train_batch_size": self.per_device_train_batch_size,
                "eval_batch_size": self.per_device_eval_batch_size,
                "parallel_mode": "distributed" if env.world_size > 1 else "not_parallel",
            }[name]
        if name in TrainConfig.model_fields:
            return TrainConfig.model_fields[name].default
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"UnslothTrainingArguments({', '.join(f'{k}={v!r}' for k, v in self._kwargs.items())})"

    # ------------------------------------------------------------------ mapping

    def _base_fields(self, precision_default: str, bf16_model: bool = False, rank: int = 0) -> dict:
        """TrainConfig fields from the arguments; warnings only where `rank` is 0."""
        kw = self._kwargs

        def warn(msg: str) -> None:
            if rank == 0:
                warnings.warn(msg, stacklevel=4)

        out: dict[str, Any] = {k: kw[k] for k in _DIRECT if k in kw}
        # transformers sentinels: max_steps=-1 / None means "use epochs", eval/save steps None = off
        if out.get("max_steps") in (-1, None):
            out.pop("max_steps", None)
        if "max_steps" not in out and out.get("num_train_epochs") is None:
            out["num_train_epochs"] = 3.0  # transformers' default
        for k in ("eval_steps", "save_steps", "logging_steps"):
            v = out.get(k)
            if isinstance(v, float):
                if v < 1 or not v.is_integer():
                    raise ConfigError(f"UnslothTrainingArguments: {k}={v} as a ratio of the run is not supported; "
                                      "give a number of steps")
                out[k] = int(v)
        ws = out.get("warmup_steps")
        if isinstance(ws, float) and not ws.is_integer():
            # transformers 5: a warmup_steps below 1 is a ratio of the run
            if not 0 < ws < 1:
                raise ConfigError(f"UnslothTrainingArguments: warmup_steps={ws}: give a number of steps, or a "
                                  "ratio of the run in (0, 1)")
            if out.get("warmup_ratio"):
                raise ConfigError("UnslothTrainingArguments: warmup_steps as a ratio and warmup_ratio are both set; "
                                  "give one")
            out.pop("warmup_steps")
            out["warmup_ratio"] = ws
        elif isinstance(ws, float):
            out["warmup_steps"] = int(ws)
        if out.get("warmup_steps") == 0 and "warmup_ratio" in out:
            out.pop("warmup_steps")
        if out.get("warmup_ratio") == 0.0 and out.get("warmup_steps"):
            out.pop("warmup_ratio")
        # precision
        bf16, fp16 = kw.get("bf16"), kw.get("fp16")
        if bf16 and fp16:
            raise ConfigError("UnslothTrainingArguments: bf16=True and fp16=True are both set; choose one")
        if "precision" in kw and (bf16 or fp16):
            raise ConfigError("UnslothTrainingArguments: give precision= or bf16= / fp16=, not both")
        if "precision" not in kw:
            if bf16:
                # a bf16-loaded model keeps its bf16 weights (fp32 copies of the trained ones only):
                # bf16-mixed would upcast every weight, the frozen LoRA base included (twice the memory)
                out["precision"] = "bf16" if bf16_model else "bf16-mixed"
            elif fp16:
                out["precision"] = "fp16-mixed"
            elif bf16 is False or fp16 is False:
                out["precision"] = "fp32"
            else:
                out["precision"] = precision_default
        # optimizer
        optim = str(kw.get("optim", "adamw_torch"))
        if optim in _ADAMW_8BIT:
            warn(f"optim={optim!r}: torch AdamW (32-bit states) is used; unsloth_dist has no 8-bit / paged optimizer")
        elif optim not in _ADAMW:
            raise ConfigError(f"UnslothTrainingArguments: optim={optim!r} is not supported; unsloth_dist trains with "
                              f"AdamW (use one of {', '.join(_ADAMW)})")
        # strategies (transformers: save_strategy "steps" every 500 steps by default; eval_strategy "steps"
        # without eval_steps evaluates every logging_steps)
        ev = kw.get("eval_strategy", kw.get("evaluation_strategy"))
        if ev is not None and _strategy(ev) not in ("steps", "no"):
            raise ConfigError(f"UnslothTrainingArguments: eval_strategy={ev!r} is not supported; use 'steps' with "
                              "eval_steps, or 'no'")
        if ev is not None and _strategy(ev) == "no":
            out.pop("eval_steps", None)
        elif ev is not None and out.get("eval_steps") is None:
            out["eval_steps"] = out.get("logging_steps") or TrainConfig.model_fields["logging_steps"].default
        sv = kw.get("save_strategy")
        if sv is not None and _strategy(sv) not in ("steps", "no"):
            raise ConfigError(f"UnslothTrainingArguments: save_strategy={sv!r} is not supported; use 'steps' with "
                              "save_steps, or 'no'")
        if sv is not None and _strategy(sv) == "no":
            out.pop("save_steps", None)
            out.pop("save_total_limit", None)
        elif out.get("save_steps") is None:
            out["save_steps"] = 500  # transformers' default: save_strategy "steps", save_steps 500
        if kw.get("deepspeed") is not None:
            raise ConfigError("UnslothTrainingArguments: deepspeed=<config> is not taken here; use backend='zero1' / "
                              "'zero2' / 'zero3' (the DeepSpeed config is generated from the arguments)")
        if kw.get("fsdp") not in (None, "", False, []):
            raise ConfigError("UnslothTrainingArguments: fsdp=... is not taken here; use backend='fsdp' (FSDP2)")
        if kw.get("ddp_timeout") is not None:
            out["dist_timeout_s"] = int(kw["ddp_timeout"])
        db = kw.get("distributed_backend")
        if db is not None:
            if str(db) not in ("nccl", "gloo", "auto"):
                raise ConfigError(f"UnslothTrainingArguments: distributed_backend={db!r}: use 'nccl' or 'gloo'")
            out["dist_backend"] = str(db)
        # report_to / run_name: TensorBoard and W&B run here (TrainConfig.report_to); other integrations
        # transformers knows are dropped with a warning
        rt = kw.get("report_to")
        if rt is not None:
            names = [rt] if isinstance(rt, str) else list(rt)
            names = [str(n) for n in names if str(n) not in ("none", "None", "")]
            keep = [n for n in names if n in ("tensorboard", "wandb")]
            if len(keep) < len(names):
                warn(f"UnslothTrainingArguments: report_to={rt!r}: only 'tensorboard' and 'wandb' are supported; "
                     f"ignoring {[n for n in names if n not in keep]}")
            out["report_to"] = keep
        if kw.get("run_name") is not None:
            out["run_name"] = str(kw["run_name"])
        for k, harmless in _IGNORED.items():
            if k in kw and harmless is not ANY and kw[k] not in harmless:
                warn(f"UnslothTrainingArguments: {k}={kw[k]!r} has no effect in unsloth_dist; ignored")
        if kw.get("dataloader_drop_last") is True:
            warn("UnslothTrainingArguments: dataloader_drop_last=True is ignored: unsloth_dist drops no sample (the "
                 "global batch that ends a pass over the data is completed from the next pass's order)")
        if kw.get("eos_token") is not None and not isinstance(kw["eos_token"], str):
            raise ConfigError(f"UnslothTrainingArguments: eos_token={kw['eos_token']!r} must be a token (a str)")
        return out

    def to_train_config(self, model: Optional[nn.Module] = None, environ: Any = None) -> TrainConfig:
        """The TrainConfig for this launch (the precision default looks at `model`'s dtype)."""
        from . import distributed as D

        default, bf16_model = "fp32", False
        if model is not None:
            dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
            if torch.bfloat16 in dtypes:
                default, bf16_model = "bf16", True
            elif torch.float16 in dtypes:
                default = "fp16-mixed"
        kw = self._kwargs
        env = D.read_launch_env(environ)
        data = self._base_fields(default, bf16_model, rank=env.rank)
        backend = kw.get("backend", "auto")
        name = backend if isinstance(backend, str) else (backend.get("name") if isinstance(backend, dict)
                                                         else getattr(backend, "name", None))
        if kw.get("enable_distributed_training", True) is False:
            if env.world_size > 1:
                raise ConfigError(
                    f"enable_distributed_training=False but this is a distributed launch with WORLD_SIZE="
                    f"{env.world_size}: launch one process (python script.py), or set enable_distributed_training=True")
            if name not in ("auto", "single", None):
                raise ConfigError(f"enable_distributed_training=False contradicts backend={name!r}; drop one of them")
            backend, name = "single", "single"
        ddp_opts = {}
        if kw.get("ddp_find_unused_parameters") is not None:
            ddp_opts["find_unused_parameters"] = bool(kw["ddp_find_unused_parameters"])
        if kw.get("ddp_bucket_cap_mb") is not None:
            ddp_opts["bucket_cap_mb"] = float(kw["ddp_bucket_cap_mb"])
        if ddp_opts:
            resolves_to_ddp = name == "ddp" or (name == "auto" and env.world_size > 1 and env.launcher != "deepspeed"
                                                and env.accelerate_mode is None)
            if resolves_to_ddp:
                base = backend if isinstance(backend, dict) else {"name": "ddp"}
                backend = {**base, "name": "ddp", **ddp_opts}
            elif env.rank == 0:
                warnings.warn(f"ddp_find_unused_parameters / ddp_bucket_cap_mb apply to the ddp backend only; ignored "
                              f"with backend {name!r}" + (" in one process" if env.world_size == 1 else ""), stacklevel=2)
        data["backend"] = backend
        return load_config(data)


# --------------------------------------------------------------------------- trainer


class TrainOutput(NamedTuple):
    """What transformers' ``Trainer.train()`` returns: a NamedTuple ``(global_step, training_loss, metrics)``."""

    global_step: int
    training_loss: float
    metrics: dict


# transformers' log_history names for the Trainer's record fields
_HF_LOG_NAMES = {"lr": "learning_rate"}
_HF_LOG_KEYS = ("loss", "grad_norm", "lr", "eval_loss", "epoch", "step")


class _LogHistory:
    """Collects the Trainer's logged records as transformers' ``state.log_history`` entries. The Trainer
    calls ``on_log`` on every rank (each rank's ``trainer.state.log_history`` fills, as in transformers);
    this only appends to a list, it writes nothing."""

    def __init__(self, into: list) -> None:
        self.into = into

    def on_log(self, trainer, record: dict) -> None:
        entry = {_HF_LOG_NAMES.get(k, k): record[k] for k in _HF_LOG_KEYS if k in record}
        if len(entry) - ("step" in entry) - ("epoch" in entry) < 1:
            return  # checkpoint / resume / skip markers are not metrics
        if "epoch" not in entry and "step" in entry:
            spe = getattr(getattr(trainer, "sampler", None), "steps_per_epoch", None)
            if spe:
                entry = {**entry, "epoch": record["step"] / spe}
                entry["step"] = entry.pop("step")  # (transformers' order: metrics, epoch, step)
        self.into.append(entry)


class TrainerState:
    """``trainer.state`` as transformers has it: ``global_step``, ``epoch``, ``max_steps``, ``log_history``
    (transformers' key names; it fills while training), ``is_world_process_zero`` /
    ``is_local_process_zero``. It exists before ``train()`` (global_step 0, empty log_history); after
    ``train()`` the Trainer's own result (``losses``, ``grad_norms``, ...) stays readable through it."""

    def __init__(self, result: Any = None, epoch: Optional[float] = None, max_steps: int = 0,
                 log_history: Optional[list] = None, is_world_process_zero: bool = True,
                 is_local_process_zero: bool = True) -> None:
        self._result = result
        self.global_step = result.global_step if result is not None else 0
        self.epoch, self.max_steps = epoch, max_steps
        self.log_history = log_history if log_history is not None else []
        self.is_world_process_zero, self.is_local_process_zero = is_world_process_zero, is_local_process_zero

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self.__dict__.get("_result") is None:
            raise AttributeError(name)
        return getattr(self._result, name)

    def __repr__(self) -> str:
        return (f"TrainerState(global_step={self.global_step}, epoch={self.epoch}, max_steps={self.max_steps}, "
                f"log_history=[{len(self.log_history)} entries])")


class _Tokenized:
    """A text dataset tokenized lazily to `max_length` (labels = input ids), with `eos_id` appended
    when the text does not already end with it (TRL's SFTTrainer does the same; None: nothing appended)."""

    def __init__(self, data: Any, tokenizer: Any, max_length: int, field_name: str, formatting_func: Any = None,
                 eos_id: Optional[int] = None) -> None:
        self.data, self.tok, self.max_length, self.field = data, tokenizer, max_length, field_name
        self.formatting_func, self.eos_id = formatting_func, eos_id

    def __len__(self) -> int:
        return len(self.data)

    def _text(self, i: int, row: Any = None) -> str:
        row = self.data[i] if row is None else row
        if self.formatting_func is None:
            return row[self.field]
        text = self.formatting_func(row)  # TRL's SFTTrainer(formatting_func=...): one example -> its text
        if isinstance(text, (list, tuple)) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise TypeError(f"formatting_func returned {type(text).__name__} for sample {i}; it must return the "
                            "sample's text (a str) for one example")
        return text

    def __getitem__(self, i: int) -> dict:
        text = self._text(i)
        enc = self.tok(text, truncation=True, max_length=self.max_length, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id) and len(ids) < self.max_length:
            ids.append(self.eos_id)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class _Columns:
    """A ``datasets.Dataset`` (or list of dicts) restricted to the columns the trainer reads."""

    KEEP = ("input_ids", "labels", "attention_mask", "position_ids")

    def __init__(self, data: Any, max_length: Optional[int] = None) -> None:
        self.data = data
        self.max_length = max_length  # pre-tokenized rows are cut to it, as TRL's SFTTrainer does

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        out = {k: row[k] for k in self.KEEP if k in row and row[k] is not None}
        if self.max_length:
            out = {k: v[: self.max_length] for k, v in out.items()}
        return out


def _first_null(ds: Any, column: str) -> Optional[int]:
    """The first row whose `column` is null in an Arrow-backed ``datasets.Dataset`` (None: no such row;
    -1: not an Arrow dataset, check row by row)."""
    table = getattr(ds, "data", None)
    if getattr(ds, "_indices", None) is not None or not hasattr(table, "column") or \
            column not in getattr(ds, "column_names", ()):
        return -1
    try:
        import pyarrow.compute as pc

        col = table.column(column)
        if col.null_count == 0:
            return None
        return int(pc.index(pc.is_null(col), True).as_py())
    except Exception:  # (an Arrow layout this does not expect: the row-by-row check)
        return -1


def _check_text_rows(ds: Any, name: str, text_field: str, formatting_func: Any, fmt: "_Tokenized") -> None:
    """Every row, before training: a str in `text_field` (or a str from `formatting_func`); the error
    names the row and the field."""
    if formatting_func is None:
        bad = _first_null(ds, text_field)
        if bad is None:
            features = getattr(ds, "features", None) or {}
            dtype = getattr(features.get(text_field), "dtype", None)
            if dtype in ("string", "large_string"):
                return  # an Arrow string column without nulls: every row is a str
        elif bad >= 0:
            raise ValueError(f"{name}[{bad}][{text_field!r}] is None; every row needs its text (a str) in "
                             f"{text_field!r}: drop or fix that row (e.g. dataset.filter(lambda r: r[{text_field!r}] "
                             "is not None))")
    for i in range(len(ds)):
        row = ds[i]
        if not isinstance(row, dict):
            raise TypeError(f"{name}[{i}] is a {type(row).__name__}; samples must be dicts with input_ids or "
                            f"{text_field!r}")
        if formatting_func is not None:
            try:
                fmt._text(i, row)
            except TypeError:
                raise
            except Exception as exc:
                raise ValueError(f"formatting_func failed on {name}[{i}]: {type(exc).__name__}: {exc}") from exc
            continue
        if text_field not in row:
            raise ValueError(f"{name}[{i}] has no {text_field!r} (got {sorted(row)}); every row needs its text in "
                             f"{text_field!r} (or input_ids)")
        text = row[text_field]
        if not isinstance(text, str):
            what = "None" if text is None else f"a {type(text).__name__}, not a str"
            raise ValueError(f"{name}[{i}][{text_field!r}] is {what}; every row needs its text (a str) in "
                             f"{text_field!r}: drop or fix that row")


def _check_token_rows(ds: Any, name: str) -> None:
    """Pre-tokenized rows in a ``datasets.Dataset`` (a list is checked row by row by the Trainer): no
    null input_ids anywhere (an Arrow null count, no pass over the rows)."""
    bad = _first_null(ds, "input_ids")
    if bad is not None and bad >= 0:
        raise ValueError(f"{name}[{bad}]['input_ids'] is None; every row needs its token ids: drop or fix that row")


def _prepare_dataset(ds: Any, tokenizer: Any, max_length: int, text_field: str, name: str,
                     formatting_func: Any = None, eos_id: Optional[int] = None) -> Any:
    if ds is None:
        return None
    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise TypeError(f"{name} must be a map-style dataset (datasets.Dataset or a list of dicts), "
                        f"not {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{name} is empty")
    first = ds[0]
    if not isinstance(first, dict):
        raise TypeError(f"{name}[0] is a {type(first).__name__}; samples must be dicts with input_ids or {text_field!r}")
    if "input_ids" in first and formatting_func is None:
        _check_token_rows(ds, name)
        return _Columns(ds, max_length)
    if formatting_func is None and text_field not in first:
        raise ValueError(f"{name}[0] has neither 'input_ids' nor {text_field!r} (got {sorted(first)}); tokenize the "
                         "data first, or set dataset_text_field")
    if tokenizer is None:
        if formatting_func is not None:
            raise ValueError(f"formatting_func was given for {name} but no tokenizer: pass tokenizer= (or "
                             "processing_class=) to tokenize its text")
        raise ValueError(f"{name} has {text_field!r} but no input_ids and no tokenizer was given: pass "
                         "tokenizer= (or processing_class=) to tokenize it, or tokenize it first")
    data = _Tokenized(ds, tokenizer, max_length, text_field, formatting_func, eos_id)
    # every row now, before any process group exists: a bad row fails here, not at its step
    _check_text_rows(ds, name, text_field, formatting_func, data)
    return data


def _eos_id(tokenizer: Any, eos_token: Optional[str], add_eos: bool) -> Optional[int]:
    """The id appended to text samples (TRL's SFTTrainer: the tokenizer's eos_token, or SFTConfig's
    ``eos_token``), None when off or the tokenizer has none."""
    if not add_eos or tokenizer is None:
        return None
    if eos_token is None:
        return getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos_token, str):
        raise ValueError(f"eos_token={eos_token!r} must be a token of the tokenizer (a str)")
    tid = tokenizer.convert_tokens_to_ids(eos_token)
    if tid is None or (tid == getattr(tokenizer, "unk_token_id", None) and eos_token != tokenizer.unk_token):
        raise ValueError(f"eos_token={eos_token!r} is not a token of the tokenizer's vocabulary")
    return int(tid)


# UnslothTrainer / SFTTrainer keywords that never change what training does here
_HARMLESS_TRAINER_KW = {"dataset_num_proc": ANY, "dataset_batch_size": ANY, "num_of_sequences": ANY,
                        "chars_per_token": ANY, "packing": (False, None), "dataset_kwargs": (None, {}),
                        "model_init_kwargs": (None, {}), "neftune_noise_alpha": (None,), "infinite": ANY}
# TRL SFTTrainer's parameters with no counterpart here: a warning when given
_NO_EFFECT_TRAINER_KW = ("compute_loss_func", "compute_metrics", "optimizers", "optimizer_cls_and_kwargs",
                         "preprocess_logits_for_metrics", "peft_config", "model_init")


class UnslothTrainer:
    """``UnslothTrainer(model=..., args=UnslothTrainingArguments(...), train_dataset=..., tokenizer=...)``: the
    transformers / TRL-style face of :class:`unsloth_dist.Trainer` (which does all the work: ``.trainer``).
    Positional arguments follow TRL's SFTTrainer: ``(model, args, data_collator, train_dataset,
    eval_dataset, processing_class, ...)``."""

    def __init__(self, model: nn.Module = None, args: Optional[UnslothTrainingArguments] = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_loss_func: Any = None, compute_metrics: Any = None,
                 callbacks: Optional[list] = None, optimizers: Any = (None, None), optimizer_cls_and_kwargs: Any = None,
                 preprocess_logits_for_metrics: Any = None, peft_config: Any = None, formatting_func: Any = None,
                 *, tokenizer: Any = None, **kwargs: Any) -> None:
        from . import distributed as D
        from .trainer import Trainer

        if model is None:
            raise ValueError("UnslothTrainer needs model=")
        env = D.read_launch_env()
        rank0 = env.rank == 0

        def warn(msg: str) -> None:
            if rank0:
                warnings.warn(msg, stacklevel=3)

        given = {"compute_loss_func": compute_loss_func, "compute_metrics": compute_metrics,
                 "optimizers": None if optimizers in ((None, None), None, []) else optimizers,
                 "optimizer_cls_and_kwargs": optimizer_cls_and_kwargs,
                 "preprocess_logits_for_metrics": preprocess_logits_for_metrics, "peft_config": peft_config,
                 "model_init": kwargs.pop("model_init", None)}
        for k in _NO_EFFECT_TRAINER_KW:
            if given[k] is not None:
                warn(f"UnslothTrainer: argument {k!r} has no effect in unsloth_dist; ignored")
        # TRL SFTTrainer-style arguments given to the trainer rather than to the arguments
        text_field_arg = kwargs.pop("dataset_text_field", None)
        trainer_lengths = {k: kwargs.pop(k) for k in ("max_seq_length", "max_length") if kwargs.get(k) is not None}
        kwargs.pop("max_seq_length", None), kwargs.pop("max_length", None)
        eos_token = kwargs.pop("eos_token", None)
        add_eos = kwargs.pop("add_eos_token", None)
        for k, v in kwargs.items():
            harmless = _HARMLESS_TRAINER_KW.get(k)
            if harmless is ANY or v is None or (harmless is not None and v in harmless):
                continue
            warn(f"UnslothTrainer: argument {k}={v!r} has no effect in unsloth_dist; ignored")
        if args is None:
            args = UnslothTrainingArguments()
        elif isinstance(args, dict):
            args = UnslothTrainingArguments(**args)
        elif not isinstance(args, UnslothTrainingArguments):
            raise TypeError(f"args must be UnslothTrainingArguments (or a dict of them), not {type(args).__name__}")
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("tokenizer= and processing_class= name different objects; give one")
        tok = tokenizer if tokenizer is not None else processing_class
        self.args = args
        self.tokenizer = self.processing_class = tok
        # max_seq_length / max_length: the trainer's win over the arguments'; two given together must agree
        args_lengths = {k: args._kwargs[k] for k in ("max_seq_length", "max_length") if args._kwargs.get(k) is not None}
        for where, lengths in (("UnslothTrainer", trainer_lengths), ("UnslothTrainingArguments", args_lengths)):
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{where}: max_seq_length={lengths['max_seq_length']} and max_length="
                                 f"{lengths['max_length']} differ; give one (they name the same limit)")
        max_len = next(iter(trainer_lengths.values()), None) or next(iter(args_lengths.values()), None) \
            or getattr(model, "max_seq_length", None) or getattr(tok, "model_max_length", None) or 2048
        max_len = int(min(max_len, 10**6))
        field_name = text_field_arg or args.dataset_text_field
        if eos_token is None:
            eos_token = args._kwargs.get("eos_token")
        if add_eos is None:
            add_eos = args._kwargs.get("add_eos_token", True)
        eos_id = _eos_id(tok, eos_token, bool(add_eos))
        self._max_len, self._text_field, self._formatting_func = max_len, field_name, formatting_func
        self._eos_id = eos_id
        # every sample is checked here, before the launch checks and the process group
        train = _prepare_dataset(train_dataset, tok, max_len, field_name, "train_dataset", formatting_func, eos_id)
        evals = _prepare_dataset(eval_dataset, tok, max_len, field_name, "eval_dataset", formatting_func, eos_id)
        cfg = args.to_train_config(model)
        kept = []
        for cb in callbacks or []:
            if type(cb).__module__.startswith("transformers"):
                warn(f"UnslothTrainer: transformers callback {type(cb).__name__} is not supported; ignored "
                     "(callbacks here define on_log(trainer, record) / on_step_end(trainer, step, loss))")
            else:
                kept.append(cb)
        self._log_history: list[dict] = []
        kept.append(_LogHistory(self._log_history))
        self.trainer = Trainer(model, train, args=cfg, eval_dataset=evals, data_collator=data_collator,
                               tokenizer=tok, callbacks=kept)
        self._user_model = model
        self.state = TrainerState(log_history=self._log_history, is_world_process_zero=self.is_world_process_zero(),
                                  is_local_process_zero=self.is_local_process_zero())

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> nn.Module:
        """The user's model (unwrapped from DDP / DeepSpeed; FSDP shards it in place)."""
        return self.trainer.backend.module if self.trainer.backend.module is not None else self._user_model

    @property
    def config(self) -> TrainConfig:
        return self.trainer.cfg

    @property
    def rank(self) -> int:
        return self.trainer.rank

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def is_world_process_zero(self) -> bool:
        """Whether this is the global rank 0 (transformers' ``Trainer.is_world_process_zero``)."""
        return self.trainer.rank == 0

    def is_local_process_zero(self) -> bool:
        """Whether this is the first rank of its node (transformers' ``Trainer.is_local_process_zero``)."""
        return self.trainer.env.local_rank == 0

    # ------------------------------------------------------------------ API

    def _epoch(self) -> float:
        return self.trainer.global_step / self.trainer.sampler.steps_per_epoch

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, ignore_keys_for_eval: Any = None,
              **kwargs: Any) -> TrainOutput:
        """transformers' ``Trainer.train``: ``resume_from_checkpoint`` True (the newest checkpoint in
        output_dir; ValueError when there is none, as transformers) or a checkpoint directory. ``trial`` /
        ``ignore_keys_for_eval`` are ignored (a warning); any other keyword is a TypeError."""
        if kwargs:
            _unexpected("train", kwargs, ("resume_from_checkpoint", "trial", "ignore_keys_for_eval"))
        for k, v in (("trial", trial), ("ignore_keys_for_eval", ignore_keys_for_eval)):
            if v is not None and self.trainer.rank == 0:
                warnings.warn(f"UnslothTrainer.train: {k} has no effect in unsloth_dist; ignored", stacklevel=2)
        if resume_from_checkpoint is True:
            from . import checkpoint

            out = self.trainer.cfg.output_dir
            found = checkpoint.resolve(True, out)
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({out})")
            resume_from_checkpoint = str(found)
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        result = self.trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        losses = result.losses
        mean = float(sum(losses) / len(losses)) if losses else float("nan")
        runtime = result.train_runtime_s
        gb = self.trainer.cfg.global_batch(self.trainer.world_size)
        steps = len(losses)
        metrics = {
            "train_runtime": runtime,
            "train_samples_per_second": steps * gb / runtime if runtime > 0 else math.nan,
            "train_steps_per_second": steps / runtime if runtime > 0 else math.nan,
            "train_loss": mean,
            "epoch": self._epoch(),
        }
        self.state = TrainerState(result, epoch=metrics["epoch"], max_steps=self.trainer.total_steps,
                                  log_history=self._log_history, is_world_process_zero=self.is_world_process_zero(),
                                  is_local_process_zero=self.is_local_process_zero())
        return TrainOutput(global_step=result.global_step, training_loss=mean, metrics=metrics)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Optional[list] = None, metric_key_prefix: str = "eval",
                 **kwargs: Any) -> dict:
        """transformers' ``Trainer.evaluate`` (collective: every rank calls it): ``{prefix}_loss`` (the
        global token-mean loss), ``{prefix}_runtime``, ``{prefix}_samples_per_second``,
        ``{prefix}_steps_per_second`` and ``epoch``; also appended to ``state.log_history``."""
        if kwargs:
            _unexpected("evaluate", kwargs, ("eval_dataset", "ignore_keys", "metric_key_prefix"))
        ds = None
        if eval_dataset is not None:
            ds = _prepare_dataset(eval_dataset, self.tokenizer, self._max_len, self._text_field, "eval_dataset",
                                  self._formatting_func, self._eos_id)
        used = ds if ds is not None else self.trainer.eval_dataset
        n = len(used) if used is not None else 0
        t0 = time.perf_counter()
        loss = self.trainer.evaluate(ds)
        runtime = time.perf_counter() - t0
        rounds = math.ceil(n / max(1, self.trainer.cfg.per_device_eval_batch_size * self.trainer.world_size))
        p = metric_key_prefix
        metrics = {f"{p}_loss": loss, f"{p}_runtime": runtime,
                   f"{p}_samples_per_second": n / runtime if runtime > 0 else math.nan,
                   f"{p}_steps_per_second": rounds / runtime if runtime > 0 else math.nan,
                   "epoch": self._epoch()}
        self._log_history.append({**metrics, "step": self.trainer.global_step})
        return metrics

    def save_model(self, output_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                   _internal_call: bool = False) -> str:
        """The LoRA adapter for a peft model, the full model otherwise (in its training dtype unless
        `dtype`), plus the tokenizer; rank 0 writes. Under single / ddp / zero1 / zero2 it may be called on
        rank 0 alone (transformers' ``if trainer.is_world_process_zero(): trainer.save_model()``): no
        collective. Under fsdp / zero3 (sharded weights) it is collective: call it on every rank (a call on
        rank 0 alone is an error saying so, after a bounded wait)."""
        from .models.export import save_lora_adapter, save_merged
        from .models.lora import is_peft_model

        out = output_dir or self.trainer.cfg.output_dir
        if is_peft_model(self.model):
            save_lora_adapter(self, None, out, tokenizer=self.tokenizer)
        else:
            if dtype is None:
                dtypes = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
                dtype = dtypes[0] if dtypes and dtypes[0] in (torch.bfloat16, torch.float16) else torch.float32
            save_merged(self, out, dtype=dtype, tokenizer=self.tokenizer)
        return str(out)

    def full_state_dict(self):
        return self.trainer.full_state_dict()


def _unexpected(method: str, kwargs: dict, known: Sequence[str]) -> None:
    parts = []
    for k in kwargs:
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{method}() got unexpected keyword argument(s) {', '.join(parts)}")
