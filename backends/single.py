"""One process on one device."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Backend, LocalOptimizerMixin, OptimizerFactory, cpu_state_dict, place_model


class SingleBackend(LocalOptimizerMixin, Backend):
    name = "single"

    def setup(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> nn.Module:
        place_model(model, self.device, self.model_dtype)
        self.module = self.model = model
        self._build_optimizer(model, optimizer_factory)
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        return cpu_state_dict(self.module)
