"""torch DistributedDataParallel."""
from __future__ import annotations

from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Backend, LocalOptimizerMixin, OptimizerFactory, cpu_state_dict, place_model


def _fp32_allreduce_hook(process_group, bucket):
    """All-reduce a bf16/fp16 gradient bucket in fp32 (mean over ranks), then cast back."""
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    wide = buf.to(torch.float32).div_(dist.get_world_size(group))
    fut = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def _back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(_back)


class DDPBackend(LocalOptimizerMixin, Backend):
    name = "ddp"

    def setup(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> nn.Module:
        place_model(model, self.device, self.model_dtype)
        self.module = model
        b = self.bcfg
        self.model = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=b.find_unused_parameters,
            bucket_cap_mb=b.bucket_cap_mb,
            static_graph=b.static_graph,
            gradient_as_bucket_view=b.gradient_as_bucket_view,
        )
        # bf16 weights: widen each bucket to fp32 for the reduction (backend.reduce_dtype: fp32);
        # with one rank there is nothing to reduce, and the hook's casts would be pure cost
        if self.model_dtype != torch.float32 and b.reduce_dtype == "fp32" and dist.get_world_size() > 1:
            self.model.register_comm_hook(None, _fp32_allreduce_hook)
        self._build_optimizer(model, optimizer_factory)
        return self.model

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is a share of the global token mean,
        # so scale by the world size to make the reduction a sum.
        self._scaled(loss * self.env.world_size).backward()

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        return cpu_state_dict(self.module) if dist.get_rank() == 0 else None
