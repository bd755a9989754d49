"""What is alive at the peak of GPU memory, from torch's allocator trace.

`bench_train.py --memory-peak DIR` records the CUDA caching allocator's history over the training
steps (`torch.cuda.memory._record_memory_history`) and, at the end, replays the trace of the device:
the allocated bytes start at what was allocated when recording began (the model, its shards, ...: the
"baseline"), every `alloc` adds its block and every `free_completed` removes it, and the live blocks at
the highest point are grouped by the first call site outside torch itself. That names what to cut when
a run's peak is just above a target (e.g. QLoRA's peak against half of transformers + peft's).

The allocator keeps the last 2,000,000 trace entries: run few steps (e.g. `--steps 2 --warmup 1`), or the
replay starts after allocations it never saw. `peak_live_set` is a pure function of the trace (tested on
CPU with a synthetic one); the capture has not run on a GPU yet (written 2026-12-03 without device time).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

_SKIP = ("/torch/", "<frozen", "contextlib.py", "/threading.py", "/functools.py")


def site(frames: list) -> str:
    """The innermost frame outside torch / the standard library (``file:line function``), or the
    innermost frame at all; '?' without frames."""
    if not frames:
        return "?"
    for f in frames:
        name = str(f.get("filename", ""))
        if not any(s in name for s in _SKIP):
            break
    else:
        f = frames[0]
    name = str(f.get("filename", "?"))
    for root in ("site-packages/", "/work/main/", "/tmp/site/"):
        if root in name:
            name = name.split(root, 1)[1]
    return f"{name}:{f.get('line', '?')} {f.get('name', '?')}"


def peak_live_set(trace: list, baseline: int = 0, top: int = 20) -> dict:
    """Replay one device's allocator trace: ``{"peak_bytes", "baseline_bytes", "traced_live_bytes",
    "sites": [(bytes, count, site), ...]}`` for the blocks alive at the highest allocated point
    (largest sites first, at most `top`)."""
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
        elif act == "free_completed":
            cur -= sizes.pop(ev["addr"], 0)
    live: dict = {}
    for ev in trace[: peak_at + 1]:
        act = ev.get("action")
        if act == "alloc":
            live[ev["addr"]] = ev
        elif act == "free_completed":
            live.pop(ev["addr"], None)
    groups: dict = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[site(ev.get("frames") or [])]
        g[0] += ev["size"]
        g[1] += 1
    sites = sorted(((b, n, s) for s, (b, n) in groups.items()), reverse=True)[:top]
    return {"peak_bytes": peak, "baseline_bytes": baseline, "traced_live_bytes": peak - baseline, "sites": sites}


class MemoryPeak:
    """Records the allocator history between `start` and `finish` (CUDA, when `out_dir` is set)."""

    def __init__(self, out_dir, device, name: str) -> None:
        self.out_dir, self.device, self.name, self.baseline = out_dir, device, name, None

    def start(self) -> None:
        import torch

        if not self.out_dir or self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)

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
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.json").write_text(json.dumps(res, indent=1))
        gib = 2**30
        print(f"MEMPEAK {self.name}: peak {res['peak_bytes'] / gib:.3f} GiB (max_memory_allocated "
              f"{res['max_memory_allocated'] / gib:.3f}), baseline {self.baseline / gib:.3f}, traced live "
              f"{res['traced_live_bytes'] / gib:.3f}", flush=True)
        for b, n, s in res["sites"][:15]:
            print(f"MEMPEAK   {b / gib:8.3f} GiB {n:6d} blocks  {s[:150]}", flush=True)
