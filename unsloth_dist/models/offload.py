"""Activation offload for gradient checkpointing: the input of each checkpointed decoder layer is
kept in (pinned) CPU memory between the layer's forward and its recompute in backward.

Under non-reentrant checkpointing a decoder layer keeps exactly one activation from its forward to
its backward: its input hidden states (tokens x hidden in the compute dtype), which torch's
checkpoint holds to recompute the layer. With every layer checkpointed these inputs are what grows
with depth x sequence length (2.1 GiB for a Llama-8B shape at 8192 tokens per micro-batch).
:func:`offloaded_checkpoint` is a drop-in for transformers' per-layer checkpoint function that
hands torch's checkpoint a :class:`_HostCopy` in place of that tensor:

* forward: the layer runs on the original GPU tensor (so autograd connects it as usual) while a
  copy to pinned host memory runs on a side stream; the GPU tensor is then no longer referenced
  (its memory is reused once the copy has read it: ``record_stream``).
* backward: the recompute gets the tensor back from the host copy. When layer i's recompute starts,
  the copy back of layer i-1's input (the next layer backward reaches) starts on the side stream,
  so in steady state the transfers overlap the recompute and backward of the layer before.

Host memory: the host copies come from a per-device pool of pinned buffers (:class:`HostPool`),
each a power of two of bytes (what torch's pinned-memory cache would round it to anyway), reused
best-fit across sizes: a buffer of a long step's layer input holds a shorter step's too. When a
request is larger than every free buffer, the free buffers smaller than it are released (and torch's
pinned cache emptied of them), so the pool never holds more than the most inputs alive at once
(about the number of checkpointed layers) times the largest input rounded up to a power of two: 1x
the offloaded bytes of the longest step where that size is a power of two (e.g. 64 MiB per 8B-layer
input at 8192 tokens), under 2x otherwise, however the padded length varies from step to step (with
torch's cache alone, one set of buffers per size class: up to ~4x). Every rank of a node pays its own.

The recompute reads exactly the bytes the forward read, so losses and gradients are bit-identical
to plain checkpointing. Everything else is torch's checkpoint with ``use_reentrant=False``
(early stop, RNG state, the backends' hooks): only the layer input changes where it lives. On a
machine without CUDA the "host copy" is a clone in CPU memory (the mechanism runs, nothing is
saved; the pool's buffers are plain CPU tensors), which is what the CPU tests exercise.
"""
from __future__ import annotations

import logging
import threading
import weakref
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger("unsloth_dist")
_local = threading.local()  # the last host copy made on this thread (links a forward's layers)
_streams: dict[int, Any] = {}
_anchors: dict[Any, torch.Tensor] = {}
_pools: dict[Any, "HostPool"] = {}
_MIN_BUFFER = 1 << 16


def _empty_pinned_cache() -> None:
    """Give torch's cached, unused pinned blocks back to the driver (torch >= 2.12 public API, the
    private one before)."""
    fn = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


class HostPool:
    """Host buffers (flat uint8) for the offloaded layer inputs of one device, reused best-fit.

    `take(n)` hands out the smallest free buffer of at least n bytes, or a new one of n rounded up
    to a power of two. A new one means no free buffer was large enough: the free buffers smaller
    than the request are released then (lengths grew; the new size serves every request they
    could), so the pool stays at most (buffers in use at once) x (largest request, rounded).
    `give(buf)` returns a buffer once its host copy is gone. Reuse needs no event: on a GPU every
    copy into or out of these buffers runs on the device's one side stream, in the order issued,
    and the host never touches them."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.bytes = 0  # held by the pool: free + in use
        self.in_use = 0  # buffers handed out and not yet given back

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                self.in_use += 1
                return buf
            size = max(_MIN_BUFFER, 1 << max(0, nbytes - 1).bit_length())
            smaller = [b for b in self._free if b.numel() < size]
            if smaller:
                self._free = [b for b in self._free if b.numel() >= size]
                self.bytes -= sum(b.numel() for b in smaller)
            self.in_use += 1
            self.bytes += size
        if smaller:
            del smaller  # back to torch's pinned cache, which gives them back to the driver now (rare:
            if self.pinned:  # only when the largest input grows to a new power of two)
                _empty_pinned_cache()
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            self.in_use -= 1

    def clear(self) -> None:
        """Drop the free buffers (e.g. after training; in-use ones return to the emptied pool)."""
        with self._lock:
            self.bytes -= sum(b.numel() for b in self._free)
            self._free = []
        if self.pinned:
            _empty_pinned_cache()


def host_pool(device: torch.device) -> HostPool:
    """The pool of host buffers the offloaded inputs of tensors on `device` use."""
    key = (device.type, device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device())
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = HostPool(pinned=device.type == "cuda")
    return pool


def release_host_memory() -> int:
    """Give back the free pinned buffers of every pool (the Trainer calls it when training ends);
    returns the bytes released."""
    released = 0
    for pool in list(_pools.values()):
        before = pool.bytes
        pool.clear()
        released += before - pool.bytes
    return released


def _side_stream(device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _streams.get(idx)
    if s is None:
        s = _streams[idx] = torch.cuda.Stream(device=idx)
    return s


def _anchor(device: torch.device) -> torch.Tensor:
    """An empty tensor on `device`, passed to torch's checkpoint beside the host copy: checkpoint
    stashes the RNG state of the devices of its tensor arguments, and the layer input (which would
    name the device) is no longer one of them. Without it a recompute on CUDA would draw other
    dropout masks than the forward did."""
    t = _anchors.get(device)
    if t is None:
        t = _anchors[device] = torch.empty(0, device=device)
    return t


class _HostCopy:
    """A layer input while it lives on the host. `get()` returns the original tensor on its first
    call (the forward) and a device copy of the host copy on every later call (the recompute)."""

    __slots__ = ("_tensor", "_host", "_copied", "_prefetched", "_prev", "_cuda", "_recomputed",
                 "requires_grad", "device", "__weakref__")

    def __init__(self, t: torch.Tensor, prev: Optional["_HostCopy"]) -> None:
        self.requires_grad = t.requires_grad
        self.device = t.device
        self._cuda = t.device.type == "cuda"
        self._tensor: Optional[torch.Tensor] = t
        self._prefetched: Optional[tuple[torch.Tensor, Any]] = None
        self._recomputed = False
        self._prev = weakref.ref(prev) if prev is not None else None
        pool = host_pool(t.device)
        nbytes = t.numel() * t.element_size()
        buf = pool.take(nbytes)
        weakref.finalize(self, pool.give, buf)
        host = buf[:nbytes].view(t.dtype).view(t.shape)
        if self._cuda:
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
            with torch.cuda.stream(stream):
                host.copy_(t.detach(), non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(stream)
            t.record_stream(stream)  # t's memory is not reused before the copy has read it
        else:
            host.copy_(t.detach())
            self._copied = None
        self._host = host

    def _to_device(self, stream) -> tuple[torch.Tensor, Any]:
        cur = torch.cuda.current_stream(self.device)
        out = torch.empty(self._host.shape, dtype=self._host.dtype, device=self.device)  # owned by `cur`
        stream.wait_stream(cur)  # `out`'s block may still be read or written by earlier kernels of `cur`
        stream.wait_event(self._copied)
        with torch.cuda.stream(stream):
            out.copy_(self._host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # a prefetched copy that is never used (its box dies first: backward through part of the
        # graph only, an error mid-backward) must not be reused before the side stream wrote it
        out.record_stream(stream)
        return out, done

    def prefetch(self) -> None:
        """Start the copy back to the device on the side stream (the recompute will need it next)."""
        if self._cuda and self._tensor is None and self._prefetched is None and not self._recomputed:
            self._prefetched = self._to_device(_side_stream(self.device))

    def get(self) -> torch.Tensor:
        t = self._tensor
        if t is not None:  # the forward: the original tensor, then forget it
            self._tensor = None
            return t
        self._recomputed = True
        if not self._cuda:
            out = self._host.clone()
        else:
            fetched, self._prefetched = self._prefetched, None
            if fetched is None:
                fetched = self._to_device(_side_stream(self.device))
            out, done = fetched
            torch.cuda.current_stream(self.device).wait_event(done)
            prev = self._prev() if self._prev is not None else None
            if prev is not None:  # the layer before this one is recomputed next
                prev.prefetch()
        return out.requires_grad_(self.requires_grad)


def _run(function: Callable, box: _HostCopy, anchor: Optional[torch.Tensor], *args: Any) -> Any:
    return function(box.get(), *args)


def offloaded_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint of ``function(*args)`` with ``args[0]`` (the layer's hidden
    states) kept in host memory until the recompute. Other calls (no grad, a first argument that
    is not a tensor) are plain checkpoints."""
    kwargs.setdefault("use_reentrant", False)
    if kwargs["use_reentrant"]:
        raise ValueError("activation offload works with non-reentrant checkpointing only (use_reentrant=False)")
    if not torch.is_grad_enabled():
        return checkpoint(function, *args, **kwargs)
    if not args and isinstance(function, partial) and isinstance(function.keywords.get("hidden_states"), torch.Tensor):
        # the layer was called with hidden_states=...: transformers put it in the partial; pass it first
        keywords = dict(function.keywords)
        args = (keywords.pop("hidden_states"),)
        function = partial(function.func, *function.args, **keywords)
    if not args or not isinstance(args[0], torch.Tensor):
        if not getattr(_local, "warned", False):
            _local.warned = True
            logger.warning("activation offload: a checkpointed layer was called without its hidden states as a "
                           "tensor (first argument or hidden_states=); that call is checkpointed without offload")
        return checkpoint(function, *args, **kwargs)
    x = args[0]
    prev = getattr(_local, "last", None)
    box = _HostCopy(x, prev() if prev is not None else None)
    _local.last = weakref.ref(box)
    anchor = _anchor(x.device) if x.device.type == "cuda" else None
    return checkpoint(partial(_run, function), box, anchor, *args[1:], **kwargs)


def offloadable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers checkpoints one by one (its decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in offloadable_layers(model)
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]


def enable_activation_offload(model: nn.Module) -> int:
    """Make every module of `model` that transformers checkpoints (its decoder layers, after
    ``gradient_checkpointing_enable``) offload its input; returns how many do."""
    layers = _checkpointed_layers(model)
    for m in layers:
        m._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)


def uses_activation_offload(model: nn.Module) -> bool:
    return any(m._gradient_checkpointing_func is offloaded_checkpoint for m in _checkpointed_layers(model))


def disable_activation_offload(model: nn.Module) -> int:
    """Plain non-reentrant checkpointing again for the layers that offload; returns how many."""
    layers = [m for m in offloadable_layers(model)
              if getattr(m, "_gradient_checkpointing_func", None) is offloaded_checkpoint]
    for m in layers:
        m._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return len(layers)
