"""FSDP2: `fully_shard` on every decoder layer and on the root."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from unsloth_dist.config import ConfigError

from .base import (
    PACKED_PARAMS,
    Backend,
    OptimizerFactory,
    check_consolidated,
    dcp_load,
    dcp_save,
    find_decoder_layers,
    param_groups,
)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers FSDP shards one by one (`base.find_decoder_layers`); none is an error."""
    layers = find_decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"backend fsdp: found no decoder layers to shard in {type(model).__name__} (no "
            "`_no_split_modules` and no ModuleList of blocks); use backend ddp or a zero backend for this model"
        )
    return layers


class FSDPBackend(Backend):
    name = "fsdp"

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.float32  # sharded master params stay fp32; MixedPrecisionPolicy casts for compute

    def _mesh(self):
        world, local = self.env.world_size, self.env.local_world_size
        dev = self.device.type
        sharding = self.bcfg.sharding
        if sharding == "hybrid":
            return init_device_mesh(dev, (world // local, local), mesh_dim_names=("replicate", "shard"))
        if sharding == "none":
            return init_device_mesh(dev, (world, 1), mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(dev, (world,), mesh_dim_names=("shard",))

    def setup(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> nn.Module:
        bf16 = self.cfg.precision == "bf16"
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                 reduce_dtype=torch.bfloat16 if self.bcfg.reduce_dtype == "bf16" else torch.float32)
            if self.cfg.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.bcfg.cpu_offload else OffloadPolicy()
        kwargs = dict(mesh=self._mesh(), mp_policy=mp, offload_policy=offload)
        reshard = self.bcfg.resolved_reshard_after_forward
        layers = decoder_layers(model)
        in_layers = {id(m) for layer in layers for m in layer.modules()}
        for i, layer in enumerate(layers):
            # one decoder layer at a time: placed on the GPU, cast, given rank 0's weights and sharded at
            # once, so no rank ever holds the whole model (moving the model first put every weight on
            # every GPU, trained ones in fp32, before any sharding: 4 bytes per parameter at setup
            # whatever the GPU count, NOTES 39); under cpu_offload the shard then goes to the CPU
            _place_and_broadcast(list(layer.modules()), self.device, bf16)
            # the last layer's backward comes right after the loss: keep its parameters gathered
            # instead of freeing them at the end of its forward and gathering them again at once
            fully_shard(layer, reshard_after_forward=reshard and i < len(layers) - 1, **kwargs)
        # the rest (embeddings, final norm, head, rotary buffers), before their own groups / the root
        _place_and_broadcast([m for m in model.modules() if id(m) not in in_layers], self.device, bf16)
        self._set_prefetch(layers)
        embed = _untied_input_embeddings(model) if reshard else None
        if embed is not None:
            # an untied input embedding is used once, at the start of forward: its own group, freed
            # after its forward (a frozen one, as under LoRA, is never gathered again; a trained one
            # is gathered again for its backward, at the end). Tied, it stays with the head in the root.
            fully_shard(embed, reshard_after_forward=True, **kwargs)
            if hasattr(embed, "set_unshard_in_backward") and not any(p.requires_grad for p in embed.parameters()):
                # frozen, its backward needs no weight (an embedding's only gradient is the weight's);
                # its output may still require grad (enable_input_require_grads, as peft's
                # prepare_model_for_kbit_training sets for checkpointing), which would make FSDP2's
                # pre-backward hook gather it again at the end of every backward
                embed.set_unshard_in_backward(False)
        head = _untied_output_head(model) if reshard else None
        if head is not None:
            # an untied head is its own group too, freed after its forward: in the root (which FSDP2
            # never reshards between forward and backward) its gathered copy stayed alive through the
            # whole backward, e.g. 0.98 GiB of the QLoRA 8B peak at one rank (NOTES 32). A trained head
            # is gathered again for its backward (FSDP2's pre-backward hook) and freed after it; a frozen
            # one under the fused cross-entropy's Triton path is not (its gradients came in the forward).
            fully_shard(head, reshard_after_forward=True, **kwargs)
            # the patched head forward may then skip its gather for backward (models.patching)
            head._unsloth_fsdp_own_group = hasattr(head, "set_unshard_in_backward")
        # the root keeps its parameters (final norm, tied embeddings and head) unsharded after
        # forward: backward needs them first
        fully_shard(model, reshard_after_forward=False, **kwargs)
        self.module = self.model = model
        self.optimizer = optimizer_factory(param_groups(model.named_parameters(), self.cfg.weight_decay))
        self._params = [p for p in model.parameters() if p.requires_grad]
        return model

    def _set_prefetch(self, layers: list[nn.Module]) -> None:
        """Explicit FSDP2 prefetching when asked: layer i's forward starts the all-gathers of the next
        `forward_prefetch` layers, its backward those of the `backward_prefetch` layers before it (in
        the order backward reaches them). The defaults (0, 1) leave FSDP2's implicit schedule alone."""
        fwd, bwd = self.bcfg.forward_prefetch, self.bcfg.backward_prefetch
        if fwd > 0:
            for i, layer in enumerate(layers[:-1]):
                layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + fwd])
        if bwd > 1:
            for i, layer in enumerate(layers[1:], start=1):
                layer.set_modules_to_backward_prefetch(layers[max(0, i - bwd) : i][::-1])

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def no_sync(self) -> ContextManager:
        return self._no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # reduce-scatter averages over ranks: scale so the reduction sums token losses
        (loss * self.env.world_size).backward()

    _pending_norm: Optional[torch.Tensor] = None

    def clip_gradients(self) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self._params, self._max_norm())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self._pending_norm = norm
        return norm

    def step_before_read(self) -> bool:
        # torch's fused Adam / AdamW take a device `found_inf` (as under a GradScaler) and skip the
        # update in the kernel when it is set (FSDP takes no fp16 loss scaler: config refuses fp16-mixed)
        opt = self.optimizer
        return type(opt) in (torch.optim.AdamW, torch.optim.Adam) and all(g.get("fused") for g in opt.param_groups)

    def step(self, loss: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`loss` (with `step_before_read`): the step's loss, also required finite for the update."""
        norm = self._pending_norm if self._pending_norm is not None else self.clip_gradients()
        self._pending_norm = None
        if self.step_before_read():
            # a non-finite norm (or loss) skips the update on the device: step issued before anything is read
            ok = torch.isfinite(norm)
            if loss is not None:
                ok = ok & torch.isfinite(loss.to(ok.device))
            self.optimizer.found_inf = (~ok).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else None

    # checkpoints: sharded DTensors through torch.distributed.checkpoint (reshardable)
    def _checkpoint_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_checkpoint(self, path) -> None:
        dcp_save(self._checkpoint_state(), path)

    def load_checkpoint(self, path) -> None:
        state = self._checkpoint_state()
        dcp_load(state, path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def load_consolidated(self, model: dict, optim: dict) -> None:
        # full tensors on every rank; set_state_dict shards them into the DTensors
        check_consolidated([n for n, p in self.module.named_parameters() if p.requires_grad], model, optim)
        _, current = get_state_dict(self.module, self.optimizer)
        wanted = {n for g in current["param_groups"] for n in g["params"]}
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=model,
            optim_state_dict={"state": {n: optim[n] for n in wanted}, "param_groups": current["param_groups"]},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )


def _kept_dtype(p: nn.Parameter, bf16: bool) -> Optional[torch.dtype]:
    """The dtype FSDP keeps parameter `p`'s shard in (None: as it is): fp32 for a trained one (the
    optimizer's master) and for everything outside precision bf16; bf16 for a frozen one under it
    (MixedPrecisionPolicy casts every parameter to bf16 for compute anyway and a frozen one never
    changes: peft's prepare_model_for_kbit_training leaves a QLoRA model's embeddings, head and norms in
    fp32, 3.9 GiB instead of 2 on the 8B shape, NOTES 32). Packed 4/8-bit weights stay packed."""
    if type(p).__name__ in PACKED_PARAMS or not p.is_floating_point():
        return None
    return torch.float32 if p.requires_grad or not bf16 else torch.bfloat16


def _untied(model: nn.Module, get: str, other: str, recurse: bool = True) -> Optional[nn.Module]:
    """The module ``model.<get>()`` returns when it has parameters and none of them is also one of
    ``model.<other>()``'s (tied input / output embeddings), else None."""
    fn = getattr(model, get, None)
    mod = fn() if callable(fn) else None
    if not isinstance(mod, nn.Module) or mod is model or not list(mod.parameters(recurse=recurse)):
        return None
    fn = getattr(model, other, None)
    twin = fn() if callable(fn) else None
    twin_params = {id(p) for p in twin.parameters()} if isinstance(twin, nn.Module) else set()
    return None if any(id(p) in twin_params for p in mod.parameters()) else mod


def _untied_input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's input embedding module when its weight is not also the output head's, else None."""
    return _untied(model, "get_input_embeddings", "get_output_embeddings", recurse=False)


def _untied_output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output head module when its weight is not also the input embedding's, else None."""
    return _untied(model, "get_output_embeddings", "get_input_embeddings")


@torch.no_grad()
def _place_and_broadcast(modules: list[nn.Module], device: torch.device, bf16: bool) -> None:
    """The parameters and buffers `modules` own themselves (not their children's): moved to `device`
    by the module's own conversion (as `module.to` does, so bitsandbytes quantizes a 4-bit weight on its
    way to the GPU), cast to what FSDP keeps (`_kept_dtype`; floating buffers fp32), and given rank 0's
    values. Every rank starts from rank 0's weights, as DDP and DeepSpeed make sure at wrapping:
    `fully_shard` keeps each rank's own slice, so a model built differently per rank (a script seeding
    with seed + rank, adapters initialised after rank-dependent draws) would train a mix of the ranks'
    inits. Packed quantized weights (uint8 / int8 storage) come from the checkpoint file on every rank
    and are left alone."""
    for mod in modules:
        mod._apply(lambda t: t.to(device=device), recurse=False)
    seen: set = set()
    tensors = []
    for mod in modules:
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            dtype = _kept_dtype(p, bf16)
            if dtype is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)
            tensors.append(p)
        for b in mod.buffers(recurse=False):
            if b.is_floating_point():
                b.data = b.data.float()
                tensors.append(b)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in tensors:
        if t.is_floating_point():
            dist.broadcast(t.data, src=0)
