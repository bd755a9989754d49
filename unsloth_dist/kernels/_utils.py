"""Shared helpers for the kernels: dispatch, lazy Triton compilation, launch counters, poisoning.

Dispatch rule (every public op): the Triton kernel runs when the input tensor is on CUDA, or
when the environment variable ``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the
kernel on CPU tensors, which is how the CPU tests exercise the Triton code); otherwise the
plain PyTorch reference in the op's file runs.

Triton decides between compiling and interpreting when a function is *decorated* with
``triton.jit``. So that flipping ``TRITON_INTERPRET`` inside one process (a test fixture) works,
kernels are written as plain functions and wrapped by :class:`LazyKernel`, which applies
``triton.jit`` on first launch, once per mode (compiled / interpreted).
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Callable, Iterator

import torch

try:  # triton is a Linux dependency; without it only the references run
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - platform without triton
    HAS_TRITON = False

#: number of Triton launches per kernel name (tests assert the Triton path really ran)
LAUNCHES: Counter = Counter()

_POISON = {"on": os.environ.get("UNSLOTH_KERNELS_POISON", "0") == "1"}


_INTERPRET_PARSED: dict = {}


def interpret_mode() -> bool:
    # read on every call (a test may flip the variable inside one process), parsed once per value
    raw = os.environ.get("TRITON_INTERPRET")
    mode = _INTERPRET_PARSED.get(raw)
    if mode is None:
        mode = _INTERPRET_PARSED[raw] = (raw or "0").strip().lower() in ("1", "true", "on", "yes")
    return mode


def triton_interpreter_ready() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1, i.e. its own library functions
    (tl.sum, tl.max, ...) are interpreter functions. Triton fixes that at import time, so the
    interpreter works in a process only if the variable was set before the first `import triton`
    (note: importing transformers' modeling code imports triton, through torch)."""
    ready = _INTERPRETER_READY.get("ready")
    if ready is None:  # fixed once triton is imported (it is, above, when HAS_TRITON): compute once
        ready = _INTERPRETER_READY["ready"] = _interpreter_ready()
    return ready


_INTERPRETER_READY: dict = {}


def _interpreter_ready() -> bool:
    if not HAS_TRITON:
        return False
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(getattr(std, "sum", None), InterpretedFunction)


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel should run for a tensor on this device."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    if interpret_mode():
        if not triton_interpreter_ready():
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but triton was imported before it was set, so its "
                "interpreter cannot run; set TRITON_INTERPRET=1 before anything imports triton "
                "(e.g. in the environment of the process)")
        return True
    return False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """While active, every buffer a Triton kernel writes into is allocated filled with NaN
    (integers with -1) instead of left uninitialised, so an element a kernel fails to write
    shows up in the result. For tests; also enabled by ``UNSLOTH_KERNELS_POISON=1``."""
    old = _POISON["on"]
    _POISON["on"] = enabled
    try:
        yield
    finally:
        _POISON["on"] = old


def poisoning() -> bool:
    return _POISON["on"]


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty`, or a NaN-filled tensor while poisoning."""
    if _POISON["on"]:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty_like(t, dtype=dtype)  # keeps t's strides for dense tensors
    if _POISON["on"]:
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


class LazyKernel:
    """A Triton kernel jitted on first launch, separately for compiled and interpreted mode.

    Usage: ``k = LazyKernel(py_fn)``; ``k[grid](*args, **meta)`` like a ``triton.jit`` kernel.
    Kernels must be self-contained (no calls to other jitted functions)."""

    def __init__(self, fn: Callable, name: str | None = None, **jit_kwargs) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.jit_kwargs = jit_kwargs
        self._compiled: dict[bool, object] = {}

    def _get(self):
        mode = interpret_mode()
        k = self._compiled.get(mode)
        if k is None:
            import triton

            # triton.jit reads TRITON_INTERPRET at decoration time: this picks the right kind
            k = triton.jit(self.fn, **self.jit_kwargs)
            self._compiled[mode] = k
        return k

    def __getitem__(self, grid):
        launcher = self._get()[grid]
        name = self.name

        def launch(*args, **kwargs):
            LAUNCHES[name] += 1
            return launcher(*args, **kwargs)

        return launch

    def launch(self, grid, *args, **kwargs):
        """``k.launch(grid, *args, **meta)`` == ``k[grid](*args, **meta)``, without building the
        two intermediate launcher closures per call (for host-overhead-sensitive kernels)."""
        LAUNCHES[self.name] += 1
        k = self._compiled.get(interpret_mode())
        if k is None:
            k = self._get()
        # triton's JITFunction / InterpretedFunction launch entry point (what `[grid](...)` calls)
        return k.run(*args, grid=grid, warmup=False, **kwargs)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs are enough to exercise the cross-program reduction


def warps_for(block: int) -> int:
    """num_warps for a row kernel over a block of `block` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
