"""Backends, found by name through one registry.

Adding a backend is one new module plus one line in `_REGISTRY`.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from unsloth_dist.distributed import LaunchEnv

from .base import Backend

_REGISTRY = {
    "single": "unsloth_dist.backends.single:SingleBackend",
    "ddp": "unsloth_dist.backends.ddp:DDPBackend",
    "fsdp": "unsloth_dist.backends.fsdp:FSDPBackend",
    "zero1": "unsloth_dist.backends.deepspeed:ZeroBackend",
    "zero2": "unsloth_dist.backends.deepspeed:ZeroBackend",
    "zero3": "unsloth_dist.backends.deepspeed:ZeroBackend",
}


def available() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise KeyError(f"no backend named {name!r}; registered: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(cfg: Any, backend_cfg: Any, env: LaunchEnv, device: torch.device) -> Backend:
    """Instantiate the backend named by a resolved (non-auto) backend config."""
    return get_backend_class(backend_cfg.name)(cfg, backend_cfg, env, device)


__all__ = ["Backend", "available", "get_backend_class", "make_backend"]
