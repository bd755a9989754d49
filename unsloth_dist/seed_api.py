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
  -> its text, tokenized like a text column). ``trainer.state`` after ``train()`` has transformers'
  ``global_step``, ``epoch``, ``max_steps`` and ``log_history`` (rank 0's logged metrics).
* Arguments that have no effect here (``logging_dir``, ``push_to_hub``, ...)
  are ignored with a warning. Unknown names are an error that names
  them, with a close match when there is one.
"""
from __future__ import annotations

import difflib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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
# accepted, no effect here (a warning unless the value is the harmless default)
_IGNORED = {
    "logging_dir": (None,), "push_to_hub": (False,),
    "hub_model_id": (None,), "hub_token": (None,), "hub_strategy": (None, "every_save"), "overwrite_output_dir": (False, True),
    "do_train": (False, True), "do_eval": (False, True), "do_predict": (False,), "remove_unused_columns": (True, False),
    "logging_first_step": (False, True), "logging_strategy": ("steps",), "data_seed": (None,), "tf32": (None,),
    "torch_compile": (False,), "include_num_input_tokens_seen": (False,), "group_by_length": (False,),
    "dataloader_drop_last": (False,), "label_names": (None,), "load_best_model_at_end": (False,),
    "metric_for_best_model": (None,), "greater_is_better": (None,), "save_only_model": (False,),
    "save_safetensors": (True,), "gradient_checkpointing_kwargs": (None,), "local_rank": (-1, 0, None),
    "dataloader_persistent_workers": (False,), "dataloader_prefetch_factor": (None,), "log_level": ("passive",),
    "dataset_num_proc": (None,), "packing": (False,), "dataset_kwargs": (None,), "average_tokens_across_devices": (True, False),
}
_EXTRA = ("enable_distributed_training", "distributed_backend", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
          "backend", "bf16", "fp16", "optim", "ddp_timeout", "eval_strategy", "evaluation_strategy",
          "save_strategy", "max_seq_length", "max_length", "dataset_text_field", "deepspeed", "fsdp", "report_to",
          "run_name")
_KNOWN = set(_DIRECT) | set(_IGNORED) | set(_EXTRA)


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
        # transformers' defaults for the common names that were not given
        defaults = {"bf16": False, "fp16": False, "optim": "adamw_torch", "report_to": "none",
                    "enable_distributed_training": True, "distributed_backend": None, "backend": "auto",
                    "max_seq_length": None, "dataset_text_field": "text"}
        if name in defaults:
            return defaults[name]
        if name in TrainConfig.model_fields:
            return TrainConfig.model_fields[name].default
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"UnslothTrainingArguments({', '.join(f'{k}={v!r}' for k, v in self._kwargs.items())})"

    # ------------------------------------------------------------------ mapping

    def _base_fields(self, precision_default: str, bf16_model: bool = False) -> dict:
        kw = self._kwargs
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
            warnings.warn(f"optim={optim!r}: torch AdamW (32-bit states) is used; unsloth_dist has no 8-bit / paged "
                          "optimizer", stacklevel=3)
        elif optim not in _ADAMW:
            raise ConfigError(f"UnslothTrainingArguments: optim={optim!r} is not supported; unsloth_dist trains with "
                              f"AdamW (use one of {', '.join(_ADAMW)})")
        # strategies
        ev = kw.get("eval_strategy", kw.get("evaluation_strategy"))
        if ev is not None and str(ev) not in ("steps", "no", "IntervalStrategy.STEPS", "IntervalStrategy.NO"):
            raise ConfigError(f"UnslothTrainingArguments: eval_strategy={ev!r} is not supported; use 'steps' with "
                              "eval_steps, or 'no'")
        if ev is not None and "no" in str(ev).lower():
            out.pop("eval_steps", None)
        sv = kw.get("save_strategy")
        if sv is not None and str(sv) not in ("steps", "no", "IntervalStrategy.STEPS", "IntervalStrategy.NO"):
            raise ConfigError(f"UnslothTrainingArguments: save_strategy={sv!r} is not supported; use 'steps' with "
                              "save_steps, or 'no'")
        if sv is not None and "no" in str(sv).lower():
            out.pop("save_steps", None)
            out.pop("save_total_limit", None)
        elif sv is not None and out.get("save_steps") is None:
            out["save_steps"] = 500  # transformers' default interval for save_strategy "steps"
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
                warnings.warn(f"UnslothTrainingArguments: report_to={rt!r}: only 'tensorboard' and 'wandb' are supported; "
                              f"ignoring {[n for n in names if n not in keep]}", stacklevel=3)
            out["report_to"] = keep
        if kw.get("run_name") is not None:
            out["run_name"] = str(kw["run_name"])
        for k, harmless in _IGNORED.items():
            if k in kw and kw[k] not in harmless:
                warnings.warn(f"UnslothTrainingArguments: {k}={kw[k]!r} has no effect in unsloth_dist; ignored",
                              stacklevel=3)
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
        data = self._base_fields(default, bf16_model)
        kw = self._kwargs
        env = D.read_launch_env(environ)
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
            else:
                warnings.warn(f"ddp_find_unused_parameters / ddp_bucket_cap_mb apply to the ddp backend only; ignored "
                              f"with backend {name!r}" + (" in one process" if env.world_size == 1 else ""), stacklevel=2)
        data["backend"] = backend
        return load_config(data)


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainOutput:
    """What transformers' ``Trainer.train()`` returns (a NamedTuple there; fields and order kept)."""

    global_step: int
    training_loss: float
    metrics: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.global_step, self.training_loss, self.metrics))


# transformers' log_history names for the Trainer's record fields
_HF_LOG_NAMES = {"lr": "learning_rate"}
_HF_LOG_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "eval_loss")


class _LogHistory:
    """Collects the Trainer's logged records (rank 0) as transformers' ``state.log_history`` entries."""

    def __init__(self, into: list) -> None:
        self.into = into

    def on_log(self, trainer, record: dict) -> None:
        entry = {_HF_LOG_NAMES.get(k, k): record[k] for k in _HF_LOG_KEYS if k in record}
        if len(entry) > 1:  # more than the step (checkpoint / resume records are not metrics)
            self.into.append(entry)


class TrainerState:
    """``trainer.state`` after ``train()``, as transformers has it: ``global_step``, ``epoch``,
    ``max_steps``, ``log_history`` (rank 0's logged metrics, transformers' key names); the Trainer's
    own result (``losses``, ``grad_norms``, ...) stays readable through it."""

    def __init__(self, result: Any, epoch: float, max_steps: int, log_history: list) -> None:
        self._result = result
        self.global_step, self.epoch, self.max_steps, self.log_history = result.global_step, epoch, max_steps, log_history

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._result, name)


class _Tokenized:
    """A text dataset tokenized lazily to `max_length` (labels = input ids)."""

    def __init__(self, data: Any, tokenizer: Any, max_length: int, field_name: str, formatting_func: Any = None) -> None:
        self.data, self.tok, self.max_length, self.field = data, tokenizer, max_length, field_name
        self.formatting_func = formatting_func

    def __len__(self) -> int:
        return len(self.data)

    def _text(self, i: int) -> str:
        row = self.data[i]
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
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class _Columns:
    """A ``datasets.Dataset`` (or list of dicts) restricted to the columns the trainer reads."""

    KEEP = ("input_ids", "labels", "attention_mask", "position_ids")

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        return {k: row[k] for k in self.KEEP if k in row and row[k] is not None}


def _prepare_dataset(ds: Any, tokenizer: Any, max_length: int, text_field: str, name: str,
                     formatting_func: Any = None) -> Any:
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
    if "input_ids" in first:
        return _Columns(ds)
    if formatting_func is not None:
        if tokenizer is None:
            raise ValueError(f"formatting_func was given for {name} but no tokenizer: pass tokenizer= (or "
                             "processing_class=) to tokenize its text")
        data = _Tokenized(ds, tokenizer, max_length, text_field, formatting_func)
        data._text(0)  # a formatting_func that cannot format the first sample fails here, not mid-run
        return data
    if text_field in first:
        if tokenizer is None:
            raise ValueError(f"{name} has {text_field!r} but no input_ids and no tokenizer was given: pass "
                             "tokenizer= (or processing_class=) to tokenize it, or tokenize it first")
        return _Tokenized(ds, tokenizer, max_length, text_field)
    raise ValueError(f"{name}[0] has neither 'input_ids' nor {text_field!r} (got {sorted(first)}); tokenize the "
                     "data first, or set dataset_text_field")


class UnslothTrainer:
    """``UnslothTrainer(model=..., args=UnslothTrainingArguments(...), train_dataset=..., tokenizer=...)``: the
    transformers-style face of :class:`unsloth_dist.Trainer` (which does all the work: ``.trainer``)."""

    def __init__(self, model: nn.Module = None, args: Optional[UnslothTrainingArguments] = None,
                 train_dataset: Any = None, eval_dataset: Any = None, tokenizer: Any = None,
                 processing_class: Any = None, data_collator: Any = None, callbacks: Optional[list] = None,
                 **ignored: Any) -> None:
        from .trainer import Trainer

        if model is None:
            raise ValueError("UnslothTrainer needs model=")
        # TRL SFTTrainer-style arguments given to the trainer rather than to the arguments
        text_field_arg = ignored.pop("dataset_text_field", None)
        max_len_arg = ignored.pop("max_seq_length", None) or ignored.pop("max_length", None)
        formatting_func = ignored.pop("formatting_func", None)
        for k, v in ignored.items():
            if v is not None:
                warnings.warn(f"UnslothTrainer: argument {k!r} has no effect in unsloth_dist; ignored", stacklevel=2)
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
        cfg = args.to_train_config(model)
        max_len = max_len_arg or args.max_seq_length or args._kwargs.get("max_length") \
            or getattr(model, "max_seq_length", None) or getattr(tok, "model_max_length", None) or 2048
        max_len = int(min(max_len, 10**6))
        field_name = text_field_arg or args.dataset_text_field
        self._max_len, self._text_field, self._formatting_func = max_len, field_name, formatting_func
        train = _prepare_dataset(train_dataset, tok, max_len, field_name, "train_dataset", formatting_func)
        evals = _prepare_dataset(eval_dataset, tok, max_len, field_name, "eval_dataset", formatting_func)
        kept = []
        for cb in callbacks or []:
            if type(cb).__module__.startswith("transformers"):
                warnings.warn(f"UnslothTrainer: transformers callback {type(cb).__name__} is not supported; ignored "
                              "(callbacks here define on_log(trainer, record) / on_step_end(trainer, step, loss))",
                              stacklevel=2)
            else:
                kept.append(cb)
        self._log_history: list[dict] = []
        kept.append(_LogHistory(self._log_history))
        self.trainer = Trainer(model, train, args=cfg, eval_dataset=evals, data_collator=data_collator,
                               tokenizer=tok, callbacks=kept)
        self._user_model = model
        self.state = None

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

    # ------------------------------------------------------------------ API

    def train(self, resume_from_checkpoint: Any = None, **ignored: Any) -> TrainOutput:
        if isinstance(resume_from_checkpoint, bool):
            resume_from_checkpoint = "latest" if resume_from_checkpoint else None
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
            "epoch": result.global_step / self.trainer.sampler.steps_per_epoch,
        }
        self.state = TrainerState(result, epoch=metrics["epoch"], max_steps=self.trainer.total_steps,
                                  log_history=self._log_history)
        return TrainOutput(global_step=result.global_step, training_loss=mean, metrics=metrics)

    def evaluate(self, eval_dataset: Any = None, **ignored: Any) -> dict:
        ds = None
        if eval_dataset is not None:
            ds = _prepare_dataset(eval_dataset, self.tokenizer, self._max_len, self._text_field, "eval_dataset",
                                  self._formatting_func)
        return {"eval_loss": self.trainer.evaluate(ds)}

    def save_model(self, output_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
        """Collective (call on every rank; rank 0 writes): the LoRA adapter for a peft model, the full
        model otherwise (in its training dtype unless `dtype`), plus the tokenizer."""
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
