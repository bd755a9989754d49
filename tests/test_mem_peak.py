"""benchmarks/mem_peak.py: the replay of an allocator trace finds the highest point and names what is
alive there by its first call site outside torch (a synthetic trace; the capture itself is CUDA-only)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mem_peak as M  # noqa: E402


def _frames(*sites):
    return [{"filename": f, "line": ln, "name": n} for f, ln, n in sites]


def test_peak_live_set_replays_allocs_and_requested_frees():
    torch_frame = ("/x/site-packages/torch/nn/functional.py", 10, "linear")
    ours = ("/x/site-packages/unsloth_dist/kernels/quant.py", 120, "forward")
    peft = ("/x/site-packages/peft/tuners/lora/layer.py", 50, "forward")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": _frames(torch_frame, ours)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": _frames(peft)},
        # a block used on another stream (record_stream): torch counts it free (max_memory_allocated)
        # at the request, though it is reused only once the other stream's event completes
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 30, "frames": _frames(torch_frame, ours)},
        {"action": "alloc", "addr": 5, "size": 90, "frames": _frames(torch_frame, ours)},  # 170: the peak
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_requested", "addr": 5, "size": 90},
        {"action": "free_completed", "addr": 5, "size": 90},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},  # 140 live: below the peak of 170
        {"action": "segment_alloc", "addr": 9, "size": 10**6},  # segments are not allocations
    ]
    res = M.peak_live_set(trace, baseline=1000)
    assert res["peak_bytes"] == 1170 and res["traced_live_bytes"] == 170
    assert res["sites"] == [(120, 2, "unsloth_dist/kernels/quant.py:120 forward"),
                            (50, 1, "peft/tuners/lora/layer.py:50 forward")]
    assert res["peak_site"] == "unsloth_dist/kernels/quant.py:120 forward"  # alloc 5 reached the peak
    # a trace with completed frees only (no requests recorded) replays the same way
    only_completed = [e for e in trace if e["action"] != "free_requested"]
    assert M.peak_live_set(only_completed, baseline=1000)["peak_bytes"] == 1000 + 100 + 50 + 30 + 90


def test_site_falls_back_to_the_innermost_frame():
    only_torch = _frames(("/a/torch/autograd/graph.py", 7, "backward"), ("/a/torch/_tensor.py", 3, "backward"))
    assert M.site(only_torch) == "/a/torch/autograd/graph.py:7 backward"
    assert M.site([]) == "?"


def test_site_names_callers_outside_torch_up_to_depth():
    frames = _frames(("/a/torch/nn/functional.py", 1, "linear"), ("/s/site-packages/peft/lora.py", 5, "forward"),
                     ("/a/torch/nn/modules/module.py", 9, "_call_impl"), ("/w/unsloth_dist/trainer.py", 7, "train"))
    assert M.site(frames, depth=2) == "peft/lora.py:5 forward < /w/unsloth_dist/trainer.py:7 train"
    assert M.site(frames, depth=1) == "peft/lora.py:5 forward"


def test_live_tensors_labels_parameters_and_counts_each_storage_once():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    extra = torch.zeros(100, dtype=torch.float64)
    view = extra[:10]  # the same storage: counted once
    res = M.live_tensors("cpu", model.named_parameters(), top=10**6)
    groups = {label: (b, n) for b, n, label in res["groups"]}
    assert groups["0.weight"] == (8 * 4 * 4, 1) and groups["1.bias"] == (4 * 4, 1)
    assert groups["unnamed [100] float64"][0] == 800 or groups["unnamed [10] float64"][0] == 800
    assert res["tensor_bytes"] >= 800 + 4 * (32 + 4 + 16 + 4)
    del view


def test_live_tensors_skips_dead_weak_proxies():
    """gc.get_objects() can hand back weakref proxies whose object is gone (isinstance on them raises
    ReferenceError: the full CI run did)."""
    import weakref

    class Obj:
        pass

    obj = Obj()
    holder = [weakref.proxy(obj)]  # a list (tracked by gc) keeps the proxy alive after the object dies
    del obj
    assert M.live_tensors("cpu")["tensor_bytes"] >= 0
    del holder


def test_live_tensors_folds_layer_indices():
    import torch

    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False) for _ in range(3)])
    res = M.live_tensors("cpu", [(f"model.layers.{i}.weight", m.weight) for i, m in enumerate(layers)], top=10**6)
    assert (3 * 16, 3, "model.layers.*.weight") in res["groups"]
