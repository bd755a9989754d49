"""The backend interface and what the backends share.

A backend owns what differs between single-process, DDP, FSDP2 and ZeRO: wrapping or
sharding the model, building the optimizer around the (possibly sharded) parameters,
backward (loss scaling, gradient sync), the optimizer step (clipping, grad norm) and
gathering consolidated weights. The trainer owns everything else.

Loss contract: `backward(loss)` receives the loss already normalised by the *global*
number of target tokens of the optimizer step (sum of token losses / global count). Each
backend undoes whatever averaging its gradient reduction applies, so the summed gradient is
exactly the gradient of the global token-mean loss.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from unsloth_dist.config import TrainConfig
from unsloth_dist.distributed import LaunchEnv

OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DeepSpeed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


PACKED_PARAMS = ("Params4bit", "Int8Params")  # bitsandbytes' packed weights: never cast


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (possibly peft-wrapped) HF causal LM, [] when there are none.

    Uses the model's `_no_split_modules` (the classes HF never splits across devices: the
    decoder layers); falls back to the longest ModuleList of identical blocks."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if layers:
        return layers
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move `model` to `device` and cast its floating parameters to `dtype`. Buffers keep their
    dtype: `model.to(bfloat16)` would also round a rotary embedding's fp32 `inv_freq`, and the
    bf16-rounded frequencies misplace far positions (cos off by up to 0.86 at position 2047 of a
    Llama head), which transformers avoids by computing `inv_freq` in fp32 and DeepSpeed by casting
    parameters only. Parameters stay the same objects (their `.data` is replaced)."""
    model.to(device=device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and type(p).__name__ not in PACKED_PARAMS:
            p.data = p.data.to(dtype)
    return model


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Backend:
    """Base class; subclasses set `name` and implement `setup`."""

    name: str = "base"

    def __init__(self, cfg: TrainConfig, backend_cfg: Any, env: LaunchEnv, device: torch.device) -> None:
        self.cfg = cfg
        self.bcfg = backend_cfg
        self.env = env
        self.device = device
        self.model: Optional[nn.Module] = None  # what the trainer calls forward on
        self.module: Optional[nn.Module] = None  # the user's module (for state dicts)
        self.optimizer: Optional[torch.optim.Optimizer] = None  # the torch optimizer (LR scheduler target)
        self.scaler: Optional[torch.amp.GradScaler] = None

    # ------------------------------------------------------------------ interface

    def setup(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> nn.Module:
        raise NotImplementedError

    def autocast(self) -> ContextManager:
        """The autocast context for forward (the *-mixed precisions)."""
        p = self.cfg.precision
        if p in ("bf16-mixed", "fp16-mixed"):
            dtype = torch.bfloat16 if p == "bf16-mixed" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def no_sync(self) -> ContextManager:
        """Skip gradient synchronisation for a micro-batch that is not the last of a step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip_gradients(self) -> Optional[torch.Tensor]:
        """Clip the gradients now and return the global grad norm before clipping as a 0-d tensor
        (no host sync), for `step` to use; None where `step` clips itself (DeepSpeed): the Trainer
        then steps before it reads the loss and takes the norm `step` returns."""
        return None

    def step(self) -> torch.Tensor:
        """Clip (unless `clip_gradients` already did), optimizer step, zero grad; returns the global
        grad norm before clipping as a 0-d tensor (not read: reading it would wait for the GPU)."""
        raise NotImplementedError

    def step_before_read(self) -> bool:
        """Whether the Trainer may issue `step` right after `clip_gradients`, before it reads the loss
        and the norm: the step then skips the update on the device when the norm it clipped with is not
        finite (nothing is read), so nan_policy stop and skip hold, and the optimizer's host work
        overlaps the end of the backward instead of following a wait for it."""
        return False

    def step_applied(self) -> bool:
        """Whether the last `step` updated the weights: False when an fp16 loss scaler found an
        inf / NaN gradient and skipped it (the Trainer then holds the LR schedule, as transformers does)."""
        return True

    def skip_step(self) -> None:
        """Drop this step's gradients without updating (nan_policy: skip)."""
        self._pending_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.module is not None:
            for p in self.module.parameters():
                p.grad = None

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Consolidated weights (CPU tensors, keyed like `model.state_dict()`) on rank 0, None elsewhere.
        Every rank must call it (it may gather)."""
        raise NotImplementedError

    # native checkpoint format: "dcp" (torch.distributed.checkpoint: single, ddp, fsdp; any of
    # them can load another's, at any world size) or "deepspeed" (DeepSpeed's own)
    checkpoint_format: str = "dcp"

    def save_checkpoint(self, path: Path) -> None:
        """Write weights, optimizer state and loss scaler into the directory `path` (collective)."""
        raise NotImplementedError

    def load_checkpoint(self, path: Path) -> None:
        """Restore what `save_checkpoint` wrote (collective)."""
        raise NotImplementedError

    def load_consolidated(self, model: dict, optim: dict) -> None:
        """Restore full fp32 weights and Adam state keyed by parameter name (the intermediate
        `unsloth_dist.checkpoint.consolidate` writes from any backend's checkpoint)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers

    @property
    def model_dtype(self) -> torch.dtype:
        """dtype the model's parameters are kept in on this backend."""
        return torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32

    def _max_norm(self) -> float:
        return self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")


class LocalOptimizerMixin:
    """Optimizer handling for backends whose every rank holds full parameters and gradients
    (single, DDP): fp32 master weights under `precision: bf16`, GradScaler under fp16-mixed."""

    def _build_optimizer(self, module: nn.Module, optimizer_factory: OptimizerFactory) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._model_params = [p for _, p in named]
        if self.cfg.precision == "bf16":
            # bf16 weights for compute; the optimizer updates fp32 master copies
            self._master = [p.detach().float().clone().requires_grad_(True) for p in self._model_params]
            master_named = [(n, m) for (n, _), m in zip(named, self._master)]
            self.optimizer = optimizer_factory(param_groups(master_named, self.cfg.weight_decay))
        else:
            self._master = None
            self.optimizer = optimizer_factory(param_groups(named, self.cfg.weight_decay))
        if self.cfg.precision == "fp16-mixed":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self._fused_adamw = False
        wanted = self.cfg.fused_master_adamw  # None: wherever it can run on a GPU
        if wanted is not False:
            from unsloth_dist.kernels import adamw as K

            if self._master is None:
                why = f"precision is {self.cfg.precision}, not bf16 (no fp32 master copies)"
            else:
                why = K.supports(self.optimizer, self._model_params, self._master)
            # unset never picks Triton's CPU interpreter (it is there for tests)
            self._fused_adamw = why is None and (wanted is True or self._model_params[0].is_cuda)
            if wanted is True and not self._fused_adamw:
                from unsloth_dist.config import ConfigError

                raise ConfigError(f"fused_master_adamw: true cannot run here: {why}; leave fused_master_adamw unset or false")
        self._clip_coef: Optional[torch.Tensor] = None

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    _pending_norm: Optional[torch.Tensor] = None

    def clip_gradients(self) -> torch.Tensor:
        if self._fused_adamw:
            # the norm of the bf16 gradients (fp32 accumulation) and the clip coefficient stay on the
            # device; the fused step scales each gradient as it reads it
            from unsloth_dist.kernels import adamw as K

            grads = [p.grad for p in self._model_params if p.grad is not None]
            self._pending_norm, self._clip_coef = K.grad_norm_and_coef(grads, self._max_norm())
            return self._pending_norm
        if self._master is not None:
            for p, m in zip(self._model_params, self._master):
                m.grad = None if p.grad is None else p.grad.detach().float()
            params = self._master
        else:
            params = self._model_params
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._pending_norm = torch.nn.utils.clip_grad_norm_(params, self._max_norm())
        return self._pending_norm

    _step_applied = True

    def step_applied(self) -> bool:
        return self._step_applied

    def skip_step(self) -> None:
        super().skip_step()
        if self.scaler is not None:
            # clip_gradients unscaled this step (recording its inf / NaN): update() lowers the scale
            # and ends the step, else the next unscale_ finds the optimizer already unscaled
            self.scaler.update()

    def step(self) -> torch.Tensor:
        norm = self._pending_norm if self._pending_norm is not None else self.clip_gradients()
        self._pending_norm = None
        if self._fused_adamw:
            from unsloth_dist.kernels import adamw as K

            K.master_adamw_step(self.optimizer, self._model_params, self._master, self._clip_coef)
            self._clip_coef = None
            for p in self._model_params:
                p.grad = None
            return norm
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # (skips the update when unscale_ found an inf / NaN)
            self.scaler.update()
            self._step_applied = self.scaler.get_scale() >= scale  # update() lowers the scale after a skip
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._model_params, self._master)  # one multi-tensor kernel
            for p in self._model_params:
                p.grad = None
        return norm

    # ------------------------------------------------------------------ checkpoints (DCP)

    def _checkpoint_state(self) -> dict:
        """The state DCP saves / loads in place: FQN-keyed like FSDP's `get_state_dict`, so a
        checkpoint of one DCP backend loads into another at any world size."""
        opt_params = self._master if self._master is not None else self._model_params
        ensure_adam_state(self.optimizer)
        model_sd = self.module.state_dict()
        if self._master is not None:
            model_sd.update(zip(self._names, self._master))  # the fp32 master is the weight of record
        fqn = {id(p): n for n, p in zip(self._names, opt_params)}
        state = {"model": model_sd, "optim": optimizer_to_fqn(self.optimizer, fqn)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self, path: Path) -> None:
        dcp_save(self._checkpoint_state(), path)

    def load_checkpoint(self, path: Path) -> None:
        state = self._checkpoint_state()
        dcp_load(state, path)
        self.module.load_state_dict(state["model"])
        opt_params = self._master if self._master is not None else self._model_params
        fqn = {id(p): n for n, p in zip(self._names, opt_params)}
        self.optimizer.load_state_dict(optimizer_from_fqn(state["optim"], self.optimizer, fqn))
        if self._master is not None:
            with torch.no_grad():
                for p, m in zip(self._model_params, self._master):
                    p.copy_(m)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    def load_consolidated(self, model: dict, optim: dict) -> None:
        state = self._checkpoint_state()  # live tensors: copying into them restores in place
        check_consolidated(self._names, model, optim)
        with torch.no_grad():
            for k, t in state["model"].items():
                if k in model:
                    t.copy_(model[k])
            for name, st in state["optim"]["state"].items():
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    st[key].copy_(optim[name][key])
            if self._master is not None:
                for p, m in zip(self._model_params, self._master):
                    p.copy_(m)


def check_consolidated(trainable: list[str], model: dict, optim: dict) -> None:
    missing = [n for n in trainable if n not in model or n not in optim]
    if missing:
        from unsloth_dist.checkpoint import CheckpointError

        raise CheckpointError(
            f"the checkpoint has no weights or optimizer state for {len(missing)} trainable parameter(s) of this "
            f"model, e.g. {missing[:3]}; resume with the same model (and the same LoRA settings)"
        )


# --------------------------------------------------------------------------- DCP helpers


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a process group is meant, not a mistake
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(path), no_dist=not _dist_ready())


def dcp_load(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=not _dist_ready())


def ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero Adam state for parameters that have none yet, so DCP has tensors to load into."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"checkpointing supports Adam / AdamW optimizers, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_to_fqn(optimizer: torch.optim.Optimizer, fqn: dict[int, str]) -> dict:
    """`optimizer.state_dict()` with parameter indices replaced by parameter names (the
    layout of torch.distributed.checkpoint.state_dict.get_state_dict)."""
    osd = optimizer.state_dict()
    idx_name: dict[int, str] = {}
    for g_sd, group in zip(osd["param_groups"], optimizer.param_groups):
        for idx, p in zip(g_sd["params"], group["params"]):
            idx_name[idx] = fqn[id(p)]
    return {
        "state": {idx_name[i]: st for i, st in osd["state"].items()},
        "param_groups": [dict(g, params=[idx_name[i] for i in g["params"]]) for g in osd["param_groups"]],
    }


def optimizer_from_fqn(fqn_sd: dict, optimizer: torch.optim.Optimizer, fqn: dict[int, str]) -> dict:
    """The inverse of `optimizer_to_fqn` for this optimizer's parameter order."""
    name_idx: dict[str, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name_idx[fqn[id(p)]] = len(name_idx)
    groups = []
    for g in fqn_sd["param_groups"]:
        missing = [n for n in g["params"] if n not in name_idx]
        if missing:
            raise KeyError(f"checkpoint optimizer state for parameters this model does not train: {missing[:3]}")
        groups.append(dict(g, params=[name_idx[n] for n in g["params"]]))
    return {"state": {name_idx[n]: st for n, st in fqn_sd["state"].items()}, "param_groups": groups}
