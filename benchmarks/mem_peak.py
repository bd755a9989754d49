"""What is alive at the peak of GPU memory, from torch's allocator trace.

`bench_train.py --memory-peak DIR` records the CUDA caching allocator's history over the training
steps (`torch.cuda.memory._record_memory_history`) and, at the end, replays the trace of the device:
the allocated bytes start at what was allocated when recording began (the model, its shards, ...: the
"baseline"), every `alloc` adds its block and its `free_requested` removes it (as torch's allocated-bytes
statistic does; a block used on another stream through `record_stream` is reused only at its
`free_completed`, but it no longer counts in max_memory_allocated), and the live blocks at the highest
point are grouped by the first call site outside torch itself. That names what to cut when
a run's peak is just above a target (e.g. QLoRA's peak against half of transformers + peft's).

The allocator keeps the last 2,000,000 trace entries: run few steps (e.g. `--steps 2 --warmup 1`), or the
replay starts after allocations it never saw. `peak_live_set` is a pure function of the trace (tested on
CPU with a synthetic one).

Python stacks only (`stacks="python"`, `context="alloc"`). A first GPU run (2026-12-03, torch 2.11, the
default C++ + Python stacks) failed inside activation checkpointing's recompute: `SystemError: ... apply
... returned NULL without setting an exception` at the Function whose saved tensor is the recompute's
last one, i.e. where torch's non-reentrant checkpoint raises its internal early-stop exception; the
recording apparently lost that exception. With Python stacks only it runs (QLoRA 8B, fsdp and zero3).
"""
from __future__ import annotations

import gc
import json
import re
from collections import defaultdict
from pathlib import Path

_SKIP = ("/torch/", "<frozen", "contextlib.py", "/threading.py", "/functools.py")


def _short(f: dict) -> str:
    name = str(f.get("filename", "?"))
    for root in ("site-packages/", "/work/main/", "/tmp/site/"):
        if root in name:
            name = name.split(root, 1)[1]
    return f"{name}:{f.get('line', '?')} {f.get('name', '?')}"


def site(frames: list, depth: int = 1) -> str:
    """The innermost frame outside torch / the standard library (``file:line function``) and up to
    ``depth - 1`` of its callers outside them (joined by `` < ``), or the innermost frame at all; '?'
    without frames."""
    if not frames:
        return "?"
    outside = [f for f in frames if not any(s in str(f.get("filename", "")) for s in _SKIP)]
    return " < ".join(_short(f) for f in outside[:depth]) if outside else _short(frames[0])


def peak_live_set(trace: list, baseline: int = 0, top: int = 20, depth: int = 2) -> dict:
    """Replay one device's allocator trace: ``{"peak_bytes", "baseline_bytes", "traced_live_bytes",
    "sites": [(bytes, count, site), ...], "peak_site"}`` for the blocks alive at the highest allocated
    point (largest sites first, at most `top`; a site is `depth` call sites outside torch) and where in
    the step the peak came (the call sites of the allocation that reached it)."""
    sizes: dict = {}
    cur = peak = baseline
    peak_at = -1
    for i, ev in enumerate(trace):
        act = ev.get("action")
        if act == "alloc":
            sizes[ev["addr"]] = ev["size"]
            cur += ev["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif act in ("free_requested", "free_completed"):
            cur -= sizes.pop(ev["addr"], 0)
    live: dict = {}
    for ev in trace[: peak_at + 1]:
        act = ev.get("action")
        if act == "alloc":
            live[ev["addr"]] = ev
        elif act in ("free_requested", "free_completed"):
            live.pop(ev["addr"], None)
    groups: dict = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[site(ev.get("frames") or [], depth)]
        g[0] += ev["size"]
        g[1] += 1
    sites = sorted(((b, n, s) for s, (b, n) in groups.items()), reverse=True)[:top]
    peak_site = site(trace[peak_at].get("frames") or [], 6) if peak_at >= 0 else "?"
    return {"peak_bytes": peak, "baseline_bytes": baseline, "traced_live_bytes": peak - baseline, "sites": sites,
            "peak_site": peak_site}


def live_tensors(device, named=(), top: int = 20) -> dict:
    """What the baseline is made of: every tensor the Python heap can reach on `device`, one entry per
    storage, grouped by the parameter / buffer name it belongs to (from `named`: (name, tensor) pairs,
    layer indices folded to ``*``; a DTensor counts its local shard) or else by shape and dtype:
    ``{"tensor_bytes", "groups": [(bytes, count, label), ...]}`` (largest first, at most `top`).
    Memory held only by C++ (e.g. communication buffers) is not reachable: compare with the allocator."""
    import torch

    device = torch.device(device)
    names: dict = {}
    for name, t in named:
        local = getattr(t, "_local_tensor", t)
        try:
            names.setdefault(local.untyped_storage().data_ptr(), re.sub(r"\.\d+\.", ".*.", name))
        except (RuntimeError, NotImplementedError):
            continue
    seen: dict = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
        except ReferenceError:  # a weakref proxy whose object is gone
            continue
        t = getattr(obj, "_local_tensor", obj)
        try:
            if t.device != device or t.is_meta:
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if nbytes and ptr not in seen:
            seen[ptr] = (nbytes, names.get(ptr) or f"unnamed {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
    groups: dict = defaultdict(lambda: [0, 0])
    for nbytes, label in seen.values():
        groups[label][0] += nbytes
        groups[label][1] += 1
    out = sorted(((b, n, lab) for lab, (b, n) in groups.items()), reverse=True)[:top]
    return {"tensor_bytes": sum(b for b, _ in seen.values()), "groups": out}


class MemoryPeak:
    """Records the allocator history between `start` and `finish` (CUDA, when `out_dir` is set)."""

    def __init__(self, out_dir, device, name: str) -> None:
        self.out_dir, self.device, self.name, self.baseline = out_dir, device, name, None

    def start(self, named=()) -> None:
        """`named`: (name, tensor) pairs (the model's parameters and buffers) to label the baseline."""
        import torch

        if not self.out_dir or self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        self.at_start = live_tensors(self.device, named)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python", context="alloc")

    def finish(self) -> None:
        import torch

        if self.baseline is None:
            return
        torch.cuda.synchronize(self.device)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        res = peak_live_set(snap["device_traces"][index], self.baseline)
        res["max_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        res["baseline_tensors"] = self.at_start
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.json").write_text(json.dumps(res, indent=1))
        gib = 2**30
        print(f"MEMPEAK {self.name}: peak {res['peak_bytes'] / gib:.3f} GiB (max_memory_allocated "
              f"{res['max_memory_allocated'] / gib:.3f}), baseline {self.baseline / gib:.3f}, traced live "
              f"{res['traced_live_bytes'] / gib:.3f}", flush=True)
        print(f"MEMPEAK   at {res['peak_site'][:400]}", flush=True)
        print(f"MEMPEAK   baseline: {self.at_start['tensor_bytes'] / gib:.3f} GiB in tensors Python reaches", flush=True)
        for b, n, s in self.at_start["groups"][:10]:
            print(f"MEMPEAK   baseline {b / gib:8.3f} GiB {n:6d}  {s[:200]}", flush=True)
        for b, n, s in res["sites"][:15]:
            print(f"MEMPEAK   {b / gib:8.3f} GiB {n:6d} blocks  {s[:220]}", flush=True)
