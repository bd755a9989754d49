"""DeepSpeed ZeRO stage 1, 2 and 3.

DeepSpeed owns gradient accumulation, clipping and loss scaling here; the facade does none
of them a second time. The config passed to `deepspeed.initialize` is the one
`unsloth_dist.launch.deepspeed_config` derives from the TrainConfig.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from unsloth_dist.config import ConfigError
from unsloth_dist.launch.deepspeed_config import deepspeed_config

from .base import Backend, OptimizerFactory, find_decoder_layers, param_groups, place_model


def leaf_layers(model: nn.Module, required: bool) -> Optional[list[nn.Module]]:
    """The decoder layers `backend.stage3_leaf_layers` makes ZeRO-3 leaf modules. A model without
    decoder layers: None (module-by-module gathering), or an error when the setting was asked for."""
    layers = find_decoder_layers(model)
    if layers:
        return layers
    if not required:
        return None
    raise ConfigError(
        f"backend.stage3_leaf_layers: found no decoder layers in {type(model).__name__} (no "
        "`_no_split_modules` and no ModuleList of blocks); set stage3_leaf_layers: false"
    )


_HOOK = "_unsloth_leaf_hook"


def set_leaf_layers(model: nn.Module, on: bool, required: bool) -> int:
    """Make the decoder layers ZeRO-3 leaf modules (DeepSpeed's `set_z3_leaf_modules` on their
    classes: a layer's parameters are gathered together when it starts, forward and backward, and
    DeepSpeed hooks the layers instead of their submodules), or undo it (`on=False`, also clearing
    what an earlier Trainer set on the same model). Returns the number of leaf layers.

    ZeRO-3 releases a leaf module's parameters once the gradients of its positional inputs are
    computed; when none needs a gradient (the first trainable layer under LoRA / QLoRA: frozen
    embeddings) DeepSpeed releases them before the layer's own backward has run, which then fails
    on empty weights. Each layer holding trainable parameters therefore gets a forward pre-hook
    (registered before DeepSpeed's, so it runs first; once per layer however many Trainers) that makes
    the hidden states entering it require grad when they do not -- a tensor outside the graph only,
    what HF's `enable_input_require_grads` does at the embeddings, at the cost of that layer's input
    gradient -- and passes them positionally (DeepSpeed looks at positional inputs only)."""
    import inspect

    from deepspeed.utils import set_z3_leaf_modules

    layers = leaf_layers(model, required) if on else None
    for layer in find_decoder_layers(model):
        if not layers and getattr(layer, "_z3_leaf", False):
            layer._z3_leaf = False
    if not layers:
        return 0
    set_z3_leaf_modules(model, list({type(m): None for m in layers}))

    def hook(module, args, kwargs):
        if not torch.is_grad_enabled() or not getattr(module, "_z3_leaf", False):
            return None
        if not args and "hidden_states" in kwargs and getattr(module, "_unsloth_hidden_first", False):
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        elif not args:
            return None
        h = args[0]
        if torch.is_tensor(h) and h.is_floating_point() and not h.requires_grad:
            h = h.detach().requires_grad_()
        return (h, *args[1:]), kwargs

    for layer in layers:
        if getattr(layer, _HOOK, None) is not None or not any(p.requires_grad for p in layer.parameters()):
            continue
        params = list(inspect.signature(layer.forward).parameters)
        layer._unsloth_hidden_first = bool(params) and params[0] == "hidden_states"
        setattr(layer, _HOOK, layer.register_forward_pre_hook(hook, with_kwargs=True))
    return len(layers)


def _plain_linear() -> None:
    """`stage3_memory_efficient_linear: false`: DeepSpeed replaces torch.nn.functional.linear for
    the whole process when it is true and never puts it back; an earlier zero3 run in this process
    may have left it replaced. Restore torch's."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if F.linear is zero3_linear_wrap and original is not None:
        F.linear = original


class ZeroBackend(Backend):
    name = "zero"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = self.bcfg.name
        self.ds_config = deepspeed_config(self.cfg, self.bcfg, self.env.world_size)

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.float32  # DeepSpeed casts to bf16/fp16 itself and keeps fp32 masters

    def autocast(self):
        if self.cfg.precision == "fp16-mixed":  # DeepSpeed's fp16 mode: half weights + loss scaling
            import contextlib

            return contextlib.nullcontext()
        return super().autocast()

    def setup(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> nn.Module:
        import deepspeed

        if self.cfg.precision in ("bf16", "fp16-mixed"):
            model.to(device=self.device)  # DeepSpeed's bf16 / fp16 modes cast the parameters themselves
        else:
            # fp32 / bf16-mixed: DeepSpeed leaves the parameters as loaded (a bf16-loaded model would
            # train in bf16); fp32 like the other backends, buffers untouched
            place_model(model, self.device, self.model_dtype)
        if self.bcfg.stage == 3:
            set_leaf_layers(model, self.bcfg.stage3_leaf_layers, required="stage3_leaf_layers" in self.bcfg.model_fields_set)
            if not self.bcfg.stage3_memory_efficient_linear:
                _plain_linear()
        self.ds_config = _fit_reduce_bucket(self.ds_config, model, "reduce_bucket_size" in self.bcfg.model_fields_set)
        groups = param_groups(model.named_parameters(), self.cfg.weight_decay)
        optimizer = None if "optimizer" in self.ds_config else optimizer_factory(groups)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=groups,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.engine = self.model = engine
        self.module = engine.module
        # the LR scheduler drives the torch optimizer's param_groups, which ZeRO steps
        self.optimizer = optimizer if optimizer is not None else getattr(ds_optimizer, "optimizer", ds_optimizer)
        self._micro = 0
        return engine

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks; the loss already carries the 1/global-tokens
        # normalisation, so no division by accumulation steps (scale_wrt_gas=False) and a
        # world-size factor to make the reduction a sum.
        self.engine.backward(loss * self.env.world_size, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.cfg.gradient_accumulation_steps:
            self.engine.step()  # not a boundary: advances DeepSpeed's micro-step counter only

    def step(self) -> torch.Tensor:
        """DeepSpeed's step (it clips); returns its global grad norm as a 0-d tensor, not read here."""
        assert self.engine.is_gradient_accumulation_boundary(), "ZeRO step called off the accumulation boundary"
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(norm):
            return norm.detach().reshape(())
        return torch.tensor(float("nan") if norm is None else float(norm), dtype=torch.float64)

    def step_applied(self) -> bool:
        return self.engine.was_step_applied()  # False after an fp16 overflow DeepSpeed skipped

    # checkpoints: DeepSpeed's own (partitioned optimizer states, one file set per rank)
    checkpoint_format = "deepspeed"
    _TAG = "zero"

    def save_checkpoint(self, path) -> None:
        self.engine.save_checkpoint(str(path), tag=self._TAG, save_latest=False)

    def load_checkpoint(self, path) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=self._TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path}/{self._TAG}")

    def load_consolidated(self, model: dict, optim: dict) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from .base import check_consolidated

        named = list(self.engine.module.named_parameters())
        check_consolidated([n for n, p in named if p.requires_grad], model, optim)
        stage3 = self.bcfg.stage == 3
        dev = self.device
        zero_opt = self.engine.optimizer
        # Adam creates its state at the first step; give it zero state now so the moments have
        # somewhere to go (DeepSpeed's own step then continues from what is loaded)
        base = getattr(zero_opt, "optimizer", self.optimizer)
        flats = getattr(zero_opt, "fp32_partitioned_groups_flat", None) or getattr(
            zero_opt, "single_partition_of_fp32_groups", None
        ) or [p for g in base.param_groups for p in g["params"]]
        for flat in flats:
            st = base.state[flat]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(flat)
                st["exp_avg_sq"] = torch.zeros_like(flat)
        if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
            zero_opt._lazy_init_hp_params_optimizer_state()  # ZeRO 1/2 link Adam state to params lazily
        with torch.no_grad():
            for name, p in named:
                if name not in model:
                    continue
                full = model[name].to(dev)
                # the low-precision / module copy of the weight ...
                if stage3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if dist.get_rank() == 0:
                            p.data.copy_(full.to(p.dtype))
                else:
                    p.data.copy_(full.to(p.dtype))
                if not p.requires_grad:
                    continue
                # ... and the fp32 master partition and Adam moments the optimizer steps
                safe_set_full_fp32_param(p, full)
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, optim[name][key].to(dev), key)
        steps = {float(optim[n]["step"]) for n, p in named if p.requires_grad}
        if len(steps) != 1:
            raise ValueError(f"parameters of the checkpoint are at different optimizer steps {sorted(steps)}")
        value = steps.pop()
        for st in base.state.values():
            if "step" in st:
                st["step"] = torch.full_like(st["step"], value) if torch.is_tensor(st["step"]) else int(value)

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        import deepspeed

        is_main = dist.get_rank() == 0
        module = self.engine.module
        out: dict[str, torch.Tensor] = {}
        stage3 = self.bcfg.stage == 3
        # gather one module's own parameters at a time (ZeRO-3 partitions them)
        for prefix, sub in module.named_modules():
            own = list(sub.named_parameters(recurse=False))
            buffers = [
                (n, b)
                for n, b in sub.named_buffers(recurse=False)
                if n not in getattr(sub, "_non_persistent_buffers_set", set())
            ]
            if not own and not buffers:
                continue
            ctx = deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None) if stage3 else _null()
            with ctx:
                if is_main:
                    for n, t in own + buffers:
                        key = f"{prefix}.{n}" if prefix else n
                        out[key] = t.detach().to("cpu", copy=True)
        if not is_main:
            return None
        # keep the order (and tied-weight duplicates) of the module's own state_dict keys
        keys = list(module.state_dict().keys())
        return {k: out[k] for k in keys if k in out}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fit_reduce_bucket(ds_config: dict, model: nn.Module, user_set: bool) -> dict:
    """The config with `reduce_bucket_size` lowered to the number of trainable elements when the
    default is larger and the user did not set it. DeepSpeed allocates each reduction bucket at its
    full size up front (ZeRO-3: one buffer of that many elements in the communication dtype, 0.93 GiB
    in bf16 at the default 5e8 on one rank, 1.86 GiB in fp32 on several);
    under LoRA every gradient fits in a bucket of the adapters' size (41.9M elements on the 8B shape),
    so the rest was memory for nothing (NOTES 33). All gradients still go into one bucket, as they did."""
    zopt = ds_config.get("zero_optimization", {})
    n_train = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    if user_set or not 0 < n_train < zopt.get("reduce_bucket_size", 0):
        return ds_config
    return {**ds_config, "zero_optimization": {**zopt, "reduce_bucket_size": n_train}}
