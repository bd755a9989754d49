"""The one training loop, behind the `Trainer` facade.

The trainer owns the data order, the loop, the LR schedule, the global-token loss
normalisation, evaluation and logging; the backend (single, ddp, fsdp, zero1/2/3) owns
wrapping, backward, the optimizer step and weight gathering.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint
from . import distributed as D
from .config import ConfigError, TrainConfig, load_config
from .data import IGNORE_INDEX, GlobalBatchSampler, PadCollator, WithLabels, check_sample, model_inputs, uses_varlen_attention
from .integrations import close_reporters, make_reporters
from .models.offload import (disable_activation_offload, offloadable_layers, release_host_memory,
                             uses_activation_offload)

logger = logging.getLogger("unsloth_dist")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose (shifted) label is not -100, in fp32."""
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TrainResult:
    losses: list[float]  # global loss of every optimizer step (same list on every rank)
    global_step: int
    grad_norms: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    train_runtime_s: float = 0.0
    start_step: int = 0  # the step this call started from (after a resume); losses[i] is step start_step + i + 1
    stopped_by_signal: bool = False  # SIGTERM arrived: a checkpoint was saved and training stopped early


class _MicroBatchIndices(torch.utils.data.Sampler):
    """Yields this rank's micro-batch index lists, step after step, from `start_step`."""

    def __init__(self, sampler: GlobalBatchSampler, start_step: int, total_steps: int, rank: int, world: int, micro: int):
        self.s, self.start, self.total, self.rank, self.world, self.micro = sampler, start_step, total_steps, rank, world, micro

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield from self.s.local_micro_batches(step, self.rank, self.world, self.micro)

    def __len__(self) -> int:
        return (self.total - self.start) * (self.s.global_batch_size // (self.micro * self.world))


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


class Trainer:
    """Train a causal LM under any backend with one loop.

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped); any module whose forward takes
            `input_ids`, `attention_mask` and returns an object with `.logits`.
        train_dataset: a map-style dataset (a list works) of dicts with `input_ids` and optional
            `labels` (-100 = not trained on) and `attention_mask`.
        args: a TrainConfig, a dict of its fields, or a YAML path.
        backend: a backend name or config; overrides `args.backend`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Optional[Sequence[dict]] = None,
        *,
        args: Any = None,
        backend: Any = None,
        eval_dataset: Optional[Sequence[dict]] = None,
        data_collator: Any = None,
        tokenizer: Any = None,
        callbacks: Optional[list] = None,
    ) -> None:
        cfg = load_config(args)
        if backend is not None:
            cfg = load_config(cfg, backend=backend)
        # ---- everything that can reject input runs before the process group exists
        self.env = D.read_launch_env()
        # under `accelerate launch`: the launch must agree with the config (process count,
        # accumulation, backend), and `auto` runs the backend accelerate's config file asks for
        from .launch.accelerate_config import check_accelerate_launch

        wanted = check_accelerate_launch(cfg)
        if wanted is not None and cfg.backend.name == "auto":
            cfg = load_config(cfg, backend=wanted)
        backend_cfg = D.resolve_backend(cfg.backend, self.env)
        D.check_runtime(cfg, backend_cfg, self.env)
        if cfg.fused_master_adamw is True and backend_cfg.name not in ("single", "ddp"):
            raise ConfigError(
                f"fused_master_adamw: true needs backend single or ddp (backend auto chose {backend_cfg.name!r} "
                "for this launch); leave fused_master_adamw unset, or pick backend single / ddp"
            )
        if cfg.nan_policy == "skip" and backend_cfg.name.startswith("zero"):
            raise ConfigError(
                "nan_policy: skip is not supported with the zero backends (DeepSpeed owns the optimizer step; "
                "its fp16 loss scaler already skips overflowing steps); use nan_policy: stop"
            )
        self._reporters = make_reporters(cfg, self.env.rank)  # report_to: packages checked on every rank; rank 0 reports
        self.cfg = cfg
        self.backend_cfg = backend_cfg
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        from .models.patching import _causal_lm, _custom_loss

        custom_loss = _custom_loss(_causal_lm(model))
        if custom_loss is not None:  # the loop trains the next-token cross-entropy, fused or from the logits
            raise ConfigError(
                f"{custom_loss}: this Trainer trains the next-token cross-entropy (transformers' ForCausalLMLoss) "
                "and would not train that loss; remove the custom loss, or train it with transformers' Trainer"
            )
        self._ckpt_off = _layers_without_checkpointing(model, cfg.gradient_checkpointing_layers)
        if cfg.activation_offload and not offloadable_layers(model):
            raise ConfigError(
                f"activation_offload: {type(model).__name__} has no transformers decoder layers (checkpointed one "
                "by one) whose inputs could be offloaded; set activation_offload: false"
            )
        if backend_cfg.name == "fsdp":  # a model FSDP cannot shard is refused before the process group
            from unsloth_dist.backends.fsdp import decoder_layers

            decoder_layers(model)
        if backend_cfg.name == "zero3" and "stage3_leaf_layers" in backend_cfg.model_fields_set:
            from unsloth_dist.backends.deepspeed import leaf_layers  # the same, for the leaf layers asked for

            leaf_layers(model, required=backend_cfg.stage3_leaf_layers)
        if cfg.data is not None and cfg.data.max_seq_length:
            # (a bound, not a length: the samples may all be shorter, so a warning only)
            _check_positions(model, cfg.data.max_seq_length, "data.max_seq_length", self.env.rank, exact=False)
        if train_dataset is None and cfg.data is not None:
            # the config's data section: tokenized once (rank 0; the others read the cache),
            # before any process group exists, so bad data stops the run here
            from .data import build_datasets

            if tokenizer is None:
                raise ConfigError("data: the data section needs the model's tokenizer; pass tokenizer= to the Trainer")
            train_dataset, built_eval, self.data_report = build_datasets(cfg.data, tokenizer, seed=cfg.seed)
            if eval_dataset is None:
                eval_dataset = built_eval
        longest_train = 0  # the longest training sample, where known (the memory pre-flight below)
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is None:
                continue
            if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
                raise TypeError(f"{name} must be a map-style dataset (len() and [i]), e.g. a list of dicts")
            if len(ds) == 0:
                raise ValueError(f"{name} is empty")
            if isinstance(ds, (list, tuple)):  # in memory: every row, now rather than at its step
                n = _check_rows(ds, name, model, self.env.rank)
            else:
                check_sample(ds[0], 0, name)
                n = 0
                if hasattr(ds, "max_token_id") and hasattr(ds, "longest_sample"):  # the data section's
                    n = _check_tokenized(ds, name, model, self.env.rank)
            if name == "train_dataset":
                longest_train = n
        checkpoint.validate_resume_config(cfg, backend_cfg.name, self.env.world_size,
                                          num_samples=len(train_dataset) if train_dataset is not None else None,
                                          model=model)
        if train_dataset is not None:
            # checks the dataset can fill one global batch at this world size
            self.sampler = GlobalBatchSampler(len(train_dataset), cfg.global_batch(self.env.world_size), cfg.seed,
                                              shuffle=cfg.shuffle)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.collator = (WithLabels(data_collator) if data_collator is not None
                         else PadCollator(pad if pad is not None else 0, flatten_packed=uses_varlen_attention(model)))
        self.callbacks = list(callbacks or [])
        self.memory_estimate = _memory_preflight(model, cfg, backend_cfg, self.env, longest_train)

        # ---- process group, then the backend
        self.device = D.device_for(self.env)
        D.init_process_group(cfg, backend_cfg, self.env, self.device)
        self.rank, self.world_size = D.rank(), D.world_size()
        self._cpu_group = D.cpu_group()  # the per-step counters are summed on the host
        torch.manual_seed(cfg.seed)
        if cfg.gradient_checkpointing:
            # unset: a model whose layers already offload (use_gradient_checkpointing="unsloth") keeps doing so
            offload = cfg.activation_offload if cfg.activation_offload is not None else uses_activation_offload(model)
            _enable_gradient_checkpointing(model, offload=offload)
            for layer in self._ckpt_off:  # selective: these layers keep their activations
                layer.gradient_checkpointing = False
        elif cfg.activation_offload is False:
            disable_activation_offload(model)  # a model set up with "unsloth" checkpoints without offload
        # a model patched with the fused linear cross-entropy (unsloth_dist.models) computes the
        # token-loss sum inside its own forward, so the [tokens, vocab] logits never exist
        self.fused_loss = bool(getattr(model, "unsloth_fused_loss", False))
        from unsloth_dist.backends import make_backend

        self.backend = make_backend(cfg, backend_cfg, self.env, self.device)
        self.model = self.backend.setup(model, self._make_optimizer)
        # the weights are rank 0's on every rank now (each backend broadcasts them at setup); from
        # here each rank draws its own dropout masks, as the micro-batches of one process would
        # (the same seed everywhere gave every rank's micro-batch the same mask)
        torch.manual_seed(cfg.seed + self.rank)
        from .models.export import install_save_pretrained

        install_save_pretrained(self)  # model.save_pretrained(dir) right after multi-rank training
        self.global_step = 0
        # names this run's checkpoints; a resume takes the checkpoint's (save_total_limit prunes the run's own only)
        self.run_id = uuid.uuid4().hex
        self._saved_step: Optional[int] = None  # the step of the newest checkpoint this run wrote or resumed from
        self._loss_history: list[float] = []
        self.lr_scheduler = None
        self._metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
        # the bytes an earlier run left in it: a fresh train() moves them aside (rows this Trainer
        # logs before training, such as an evaluation at step 0, stay)
        self._metrics_before = self._metrics_path.stat().st_size if self._metrics_path.is_file() else 0

    # ------------------------------------------------------------------ pieces

    def _make_optimizer(self, groups: list) -> torch.optim.Optimizer:
        c = self.cfg
        # one fused CUDA kernel for the whole update where every parameter is on a GPU (DTensor
        # shards included), as transformers' default adamw_torch_fused; foreach elsewhere
        params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                                 fused=fused or None)

    @property
    def total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return self.sampler.steps_for_epochs(self.cfg.num_train_epochs)

    def _make_scheduler(self, total: int):
        from transformers import get_scheduler

        c = self.cfg
        warmup = c.warmup_steps or math.ceil(c.warmup_ratio * total)
        return get_scheduler(
            c.lr_scheduler_type,
            optimizer=self.backend.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=c.lr_scheduler_kwargs or None,
        )

    def _loader(self, start: int, total: int) -> DataLoader:
        c = self.cfg
        batches = _MicroBatchIndices(self.sampler, start, total, self.rank, self.world_size, c.per_device_train_batch_size)
        return DataLoader(
            self.train_dataset,
            batch_sampler=batches,
            collate_fn=self.collator,
            num_workers=c.dataloader_num_workers,
            pin_memory=c.dataloader_pin_memory and self.device.type == "cuda",
            # its own generator: creating the iterator would otherwise draw from the global RNG (the
            # workers' base seed), after a resume restored it, and shift every later dropout mask
            generator=torch.Generator().manual_seed(c.seed),
        )

    def _forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # packed rows (the batch has position_ids) go in without the 2-D attention mask, so that
        # transformers builds the block-diagonal mask (or flash-attention's varlen boundaries)
        inputs = model_inputs(batch, self.device)
        if self.fused_loss:
            labels = batch["labels"].to(self.device, non_blocking=True)
            with self.backend.autocast():
                out = self.model(**inputs, labels=labels, use_cache=False, loss_reduction="sum")
            return out.loss.float()
        with self.backend.autocast():
            out = self.model(**inputs, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        return token_loss_sum(logits, batch["labels"])

    def _log(self, record: dict) -> None:
        # callbacks see every record on every rank (as transformers' on_log: a rank's
        # state.log_history is complete); the file and the reporters are rank 0's
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(self, record)
        if self.rank != 0:
            return
        self._metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._metrics_path, "a+b") as f:
            if f.tell() > 0:  # a run killed while writing may have left a partial last line: end it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode())
        for reporter in self._reporters:
            reporter.log(record)

    def _set_aside_earlier_metrics(self) -> None:
        """A fresh run (no resume) in an output_dir that holds an earlier run's metrics.jsonl: that
        run's rows move to metrics.<n>.jsonl (kept; plotted with this run's, the two runs would read
        as one curve)."""
        before, self._metrics_before = self._metrics_before, 0
        if self.rank != 0 or before == 0 or not self._metrics_path.is_file():
            return
        data = self._metrics_path.read_bytes()
        n = 1
        while (kept := self._metrics_path.with_name(f"metrics.{n}.jsonl")).exists():
            n += 1
        # the earlier run's part first (a crash between the two leaves its rows twice, never none)
        for dest, part in ((kept, data[:before]), (self._metrics_path, data[before:].lstrip(b"\n"))):
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(part)
            os.replace(tmp, dest)
        logger.warning("%s held an earlier run's metrics and this run does not resume it: kept as %s",
                       self._metrics_path, kept.name)

    # ------------------------------------------------------------------ public API

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint at the current step (call it on every rank)."""
        if self.lr_scheduler is None:
            self.lr_scheduler = self._make_scheduler(self.total_steps)
        path = checkpoint.save(self, self._loss_history)
        self._saved_step = self.global_step
        return path

    def train(self, resume_from_checkpoint: Any = None) -> TrainResult:
        """Train to `max_steps` (or the epochs asked for). `resume_from_checkpoint` ("latest" or
        a checkpoint directory; default: the config's) continues a saved run exactly."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        c = self.cfg
        total = self.total_steps
        gas = c.gradient_accumulation_steps
        if self.lr_scheduler is None:
            self.lr_scheduler = self._make_scheduler(total)
        spec = resume_from_checkpoint if resume_from_checkpoint is not None else c.resume_from_checkpoint
        path = checkpoint.resolve(spec, c.output_dir)
        if path is not None:
            meta = checkpoint.load(self, path)
            self.run_id = meta.get("run_id", self.run_id)
            self._saved_step = self.global_step
            self._loss_history = list(meta.get("losses", []))[: self.global_step]
            self._log({"step": self.global_step, "resumed_from": str(path)})
            if self.rank == 0:
                logger.info("resumed from %s at step %d", path, self.global_step)
        else:
            self._set_aside_earlier_metrics()
        if path is None and self.rank == 0 and c.save_steps:
            earlier = checkpoint.list_checkpoints(Path(c.output_dir))
            if earlier:
                logger.warning(
                    "output_dir %s holds %d checkpoint(s) of an earlier run (newest %s) and this run does not resume "
                    "them (resume_from_checkpoint unset): they stay (save_total_limit prunes this run's own only), "
                    "but one of the same step is replaced and 'latest' will name this run's newest; use "
                    "resume_from_checkpoint: latest to continue that run, or another output_dir",
                    c.output_dir, len(earlier), earlier[-1][1].name,
                )
        result = TrainResult(losses=[], global_step=self.global_step, start_step=self.global_step)
        stop = _SigtermFlag(c.save_on_sigterm)
        failed = True
        try:
            bar = None
            if self.rank == 0 and not c.disable_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=self.global_step, desc=f"train [{self.backend.name}]", dynamic_ncols=True)
            self.model.train()
            t_start = time.perf_counter()
            t_log, tokens_since_log = t_start, 0
            window_loss, window_steps = 0.0, 0  # the logged loss: the mean of the steps since the last log
            it = iter(self._loader(self.global_step, total))
            upcoming = [next(it) for _ in range(gas)] if self.global_step < total else []
            for step in range(self.global_step, total):
                micros = upcoming
                counts = torch.tensor(
                    [
                        sum(count_targets(mb["labels"]) for mb in micros),
                        sum(int(mb["attention_mask"].sum()) for mb in micros),
                        float(stop.raised),  # any rank's SIGTERM stops every rank at this boundary
                    ],
                    dtype=torch.float64,
                )
                # CPU tensors over a gloo group: reading them never waits for the GPU, which may
                # still run the previous optimizer step
                D.all_reduce_sum(counts, group=self._cpu_group)
                n_targets, n_tokens, n_stop = counts.tolist()
                if n_stop > 0:
                    if self._saved_step != self.global_step:  # (this step may have just been saved)
                        self.save_checkpoint()
                    result.stopped_by_signal = True
                    break
                norm = max(n_targets, 1.0)
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                for i, mb in enumerate(micros):
                    last = i == gas - 1
                    ctx = self.backend.no_sync() if not last else _nullctx()
                    with ctx:
                        s = self._forward_loss_sum(mb)
                        self.backend.backward(s / norm)
                    loss_sum += s.detach().double()
                # the next step's micro-batches are collated now, while the GPU still runs this
                # step's backward (the loss read below waits for it); same order as without
                upcoming = [next(it) for _ in range(gas)] if step + 1 < total else []
                loss_t = D.all_reduce_sum(loss_sum.to(self._comm_device))
                # clip now (no host sync), then read the loss and the grad norm together: one wait
                # per step, and the clipping launches overlap the tail of the backward
                norm_t = self.backend.clip_gradients()
                stepped = guarded = False  # guarded: a non-finite step was skipped on the device
                if norm_t is not None and self.backend.step_before_read():
                    # FSDP with torch's fused AdamW: the update of a non-finite norm or loss is skipped
                    # on the device, so the step goes out now and its host work overlaps the backward's tail
                    self.backend.step(loss_t)
                    stepped = guarded = True
                elif norm_t is None:
                    # ZeRO: DeepSpeed clips inside its step and reports the norm from there. The step
                    # is issued before the read, so its host work overlaps the end of the backward;
                    # ZeRO takes nan_policy stop only, and a non-finite loss or norm stops the run at
                    # this step either way (saved checkpoints untouched)
                    norm_t = self.backend.step()
                    stepped = True
                loss_v, norm_v = torch.stack([loss_t.to(norm_t.device).double(), norm_t.double()]).tolist()
                global_loss = loss_v / norm
                # a non-finite loss, or (without fp16's loss scaler, which skips overflowing steps
                # itself) a non-finite gradient norm, stops or skips the step (nan_policy)
                what = None
                if not math.isfinite(global_loss):
                    what = f"the loss is {global_loss}"
                elif c.precision != "fp16-mixed" and not math.isfinite(norm_v):
                    what = f"the gradient norm is {norm_v}"
                if what is None:
                    if not stepped:
                        self.backend.step()
                    grad_norm = norm_v
                elif c.nan_policy == "skip" and (not stepped or guarded):
                    self.backend.skip_step()
                    grad_norm = float("nan")
                    self._log({"step": step + 1, "skipped": True, "loss": global_loss})
                    if self.rank == 0:
                        logger.warning("step %d: %s; step skipped (nan_policy: skip)", step + 1, what)
                else:
                    raise FloatingPointError(
                        f"step {step + 1}: {what}; training stopped (nan_policy: stop). Lower the learning_rate, "
                        "check the data of this step, or set nan_policy: skip"
                    )
                lr_used = self.lr_scheduler.get_last_lr()[0]  # the rate this step's update used
                if what is None and not self.backend.step_applied():
                    # an fp16 loss scaler skipped the update (overflow): the LR schedule waits for it
                    self._log({"step": step + 1, "overflow_skipped": True})
                else:
                    self.lr_scheduler.step()
                self.global_step = step + 1
                result.losses.append(global_loss)
                self._loss_history.append(global_loss)
                result.grad_norms.append(grad_norm)
                tokens_since_log += n_tokens
                if what is None:
                    window_loss, window_steps = window_loss + global_loss, window_steps + 1
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, self.global_step, global_loss)
                if self.global_step % c.logging_steps == 0 or self.global_step == total:
                    now = time.perf_counter()
                    record = {
                        "step": self.global_step,
                        "epoch": self.global_step / self.sampler.steps_per_epoch,
                        "loss": window_loss / window_steps if window_steps else global_loss,
                        "lr": lr_used,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                        "peak_mem_gib": _peak_memory_gib(self.device),
                        "backend": self.backend.name,
                        "world_size": self.world_size,
                    }
                    t_log, tokens_since_log = now, 0
                    window_loss, window_steps = 0.0, 0
                    self._log(record)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{grad_norm:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['peak_mem_gib']:.1f}G",
                        )
                if bar is not None:
                    bar.update(1)
                if self.eval_dataset is not None and c.eval_steps and self.global_step % c.eval_steps == 0:
                    ev = self.evaluate()
                    result.eval_losses.append((self.global_step, ev))
                    self._log({"step": self.global_step, "eval_loss": ev})
                    t_log = time.perf_counter()  # tokens/s counts training time only
                if c.save_steps and self.global_step % c.save_steps == 0:
                    self.save_checkpoint()
                    t_log = time.perf_counter()
            failed = False
        finally:
            stop.restore()
            close_reporters(self._reporters, failed)
            release_host_memory()  # activation offload's pinned buffers: not held past training
        if bar is not None:
            bar.close()
        result.global_step = self.global_step
        result.train_runtime_s = time.perf_counter() - t_start
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self, result)
        return result

    @torch.no_grad()
    def evaluate(self, eval_dataset: Optional[Sequence[dict]] = None) -> float:
        """Global token-mean loss over the eval set (every sample counted once)."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the Trainer)")
        bs, world = self.cfg.per_device_eval_batch_size, self.world_size
        n = len(ds)
        rounds = math.ceil(n / (bs * world))
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self._comm_device)
        for r in range(rounds):
            start = r * bs * world + self.rank * bs
            idx = list(range(start, min(start + bs, n)))
            if idx:
                batch = self.collator([ds[i] for i in idx])
            else:
                # every rank must run the same number of forwards (FSDP / ZeRO-3 gather in forward):
                # a sample whose labels are all ignored contributes nothing
                batch = self.collator([ds[0]])
                batch["labels"].fill_(IGNORE_INDEX)
            totals[0] += float(self._forward_loss_sum(batch))
            totals[1] += count_targets(batch["labels"])
        D.all_reduce_sum(totals)
        if was_training:
            self.model.train()
        return float(totals[0] / max(float(totals[1]), 1.0))

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Consolidated weights on rank 0 (CPU tensors keyed like `model.state_dict()`), None elsewhere.
        Call it on every rank."""
        return self.backend.full_state_dict()

    @property
    def _comm_device(self) -> torch.device:
        # gloo reduces CPU tensors, NCCL CUDA ones
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class _SigtermFlag:
    """Records SIGTERM (preemption) instead of dying, so the loop can save at the next step
    boundary; the previous handler comes back when training ends."""

    def __init__(self, enabled: bool) -> None:
        import signal
        import threading

        self.raised = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _check_rows(ds: Sequence[dict], name: str, model: nn.Module, rank: int) -> int:
    """Every row of an in-memory dataset: its shape (`check_sample`), token ids inside the model's
    vocabulary (an id past it fails deep in the embedding, on a GPU as a device-side assert), and
    its length against the model's positions. Returns the longest row's length."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    longest = 0
    for i, row in enumerate(ds):
        check_sample(row, i, name)
        ids = row["input_ids"]
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        longest = max(longest, len(ids))
        if vocab is not None:
            bad = [t for t in ids if not 0 <= t < vocab]
            labels = row.get("labels")
            if not bad and labels is not None:
                labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
                bad = [t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"{name}[{i}] has token id {bad[0]}, outside the model's vocabulary of {vocab} (input "
                    "embeddings); tokenize with the model's own tokenizer, or resize the embeddings after "
                    "adding tokens (model.resize_token_embeddings(len(tokenizer)))"
                )
    _check_positions(model, longest, f"the longest {name} sample", rank)
    return longest


def _check_tokenized(ds: Any, name: str, model: nn.Module, rank: int) -> int:
    """The data section's tokenized samples, as `_check_rows` checks rows in memory: token ids inside
    the model's vocabulary and the longest sample against the model's positions (from the cache's
    token arrays and lengths, without reading the samples one by one)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    top = ds.max_token_id()
    if vocab is not None and top >= vocab:
        raise ConfigError(
            f"data: the tokenized {name} has token id {top}, outside the model's vocabulary of {vocab} (input "
            "embeddings); pass the model's own tokenizer, or resize the embeddings after adding tokens "
            "(model.resize_token_embeddings(len(tokenizer)))"
        )
    longest = ds.longest_sample()
    if longest:
        _check_positions(model, longest, f"the longest {name} sample", rank)
    return int(longest or 0)


def _memory_preflight(model: nn.Module, cfg: TrainConfig, backend_cfg: Any, env: Any, longest: int,
                      gpu_bytes: Optional[int] = None):
    """The memory planner's estimate for this run (unsloth_dist.launch.planner.estimate_model), before
    any process group or GPU allocation: rank 0 logs it against the GPU's memory, as a warning when it
    does not fit (the estimate is within -3% / +10% of measured peaks, benchmarks/RESULTS.md). Only on
    CUDA (or with `gpu_bytes` given); None where it cannot be sized (the sequence length unknown, a model
    the planner does not know). Returns the Estimate."""
    if gpu_bytes is None:
        if not torch.cuda.is_available():
            return None
        try:  # the device's properties: no context is created on it
            gpu_bytes = torch.cuda.get_device_properties(env.local_rank % max(torch.cuda.device_count(), 1)).total_memory
        except Exception:  # pragma: no cover - a broken driver is reported later, where it is used
            return None
    seq = longest or (cfg.data.max_seq_length if cfg.data is not None and cfg.data.max_seq_length else 0)
    if not seq:
        return None
    from .launch import planner as PL

    offload = cfg.activation_offload if cfg.activation_offload is not None else uses_activation_offload(model)
    try:
        est = PL.estimate_model(model, backend_cfg, cfg.precision, gpus=env.world_size,
                                micro_batch=cfg.per_device_train_batch_size, seq=seq,
                                gradient_checkpointing=cfg.gradient_checkpointing,
                                checkpoint_layers=cfg.gradient_checkpointing_layers,
                                activation_offload=bool(offload and cfg.gradient_checkpointing),
                                gpus_per_node=env.local_world_size)
    except ConfigError:
        return None
    if est is None or env.rank != 0:
        return est
    gib = 2**30
    what = (f"backend {est.backend}, precision {est.precision}, micro-batch {est.micro_batch} x {seq} tokens"
            f"{', LoRA' if est.lora and not est.qlora else ', QLoRA' if est.qlora else ''}"
            f"{', gradient checkpointing' if est.gradient_checkpointing else ''}, {est.gpus} GPU(s)")
    if est.reserved > gpu_bytes:
        logger.warning(
            "memory: the planner estimates ~%.1f GiB per GPU for this run (%s; peak allocated %.1f GiB + the "
            "allocator's slack and the CUDA context) and the GPU has %.1f GiB: it will likely run out of memory. "
            "Lower per_device_train_batch_size (raise gradient_accumulation_steps for the same global batch), turn "
            "on gradient_checkpointing, or pick a backend that shards more; `unsloth-dist plan --model <model dir> "
            "--gpus N --gpu-memory %.0f` lists what fits%s", est.reserved / gib, what, est.allocated / gib,
            gpu_bytes / gib, gpu_bytes / gib,
            "" if est.phase != "setup" else (" (the peak is at setup: this backend moves the whole model to each GPU "
                                              "before it shards it; a CPU-offloading variant does so too)"))
    else:
        logger.info("memory: the planner estimates ~%.1f GiB per GPU for this run (%s); the GPU has %.1f GiB",
                    est.reserved / gib, what, gpu_bytes / gib)
    return est


def _check_positions(model: nn.Module, length: int, what: str, rank: int, exact: bool = True) -> None:
    """`length` tokens against the model's position limit: learned position embeddings cannot go
    past it (an error when `length` is a real sample's); rotary ones can, untrained (a warning)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or length <= limit:
        return
    rotary = any(hasattr(config, a) for a in ("rope_theta", "rope_parameters", "rope_scaling"))
    if not rotary and exact:
        raise ConfigError(
            f"{what} is {length} tokens, past the {limit} positions of {type(model).__name__}; truncate the "
            "samples (data.max_seq_length) to at most that"
        )
    if rank == 0:
        logger.warning(
            "%s is %d tokens, past the model's %d positions: those positions were never trained (learned "
            "position embeddings fail there); set data.max_seq_length to at most %d, or extend the context on "
            "purpose (rope_scaling)",
            what, length, limit, limit,
        )


def _layers_without_checkpointing(model: nn.Module, n_checkpointed: Optional[int]) -> list[nn.Module]:
    """The decoder layers after the first `n_checkpointed` (gradient_checkpointing_layers), checked
    against the model before any process group exists."""
    if n_checkpointed is None:
        return []
    from unsloth_dist.backends.base import find_decoder_layers

    layers = find_decoder_layers(model)
    if not layers or not all(hasattr(m, "gradient_checkpointing") for m in layers):
        raise ConfigError(
            f"gradient_checkpointing_layers: {type(model).__name__} has no transformers decoder layers that "
            "checkpoint one by one; leave gradient_checkpointing_layers unset"
        )
    if n_checkpointed > len(layers):
        raise ConfigError(
            f"gradient_checkpointing_layers: {n_checkpointed} but the model has {len(layers)} decoder layers; "
            f"use at most {len(layers)} (or leave it unset to checkpoint every layer)"
        )
    return layers[n_checkpointed:]


def _enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> None:
    from .models.lora import enable_gradient_checkpointing

    try:
        enable_gradient_checkpointing(model, "unsloth" if offload else True)
    except ValueError as exc:
        raise ConfigError(f"gradient_checkpointing: {exc}; set gradient_checkpointing: false or use a transformers model") from None


# the single-GPU API users already know, as a thin layer over the Trainer above
from .seed_api import UnslothTrainer, UnslothTrainingArguments  # noqa: E402,F401
