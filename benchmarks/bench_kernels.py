"""Kernel benchmarks: forward+backward time and peak memory of each op, for

* ``unsloth_dist``   -- our Triton kernels (``unsloth_dist.kernels``)
* ``torch``          -- the PyTorch reference of the same op, eager
* ``torch.compile``  -- ``torch.compile`` of that reference
* ``liger``          -- Liger-Kernel's functional ops (``liger_kernel.transformers.functional``), if installed

at Llama-3-8B sizes in bf16: hidden 4096, intermediate 14336, vocab 128256, 32 / 8 heads of 128,
16k tokens. Each measurement: a few warm-up runs, then the median (and p20 / p80) of repeated
runs timed with CUDA events, each behind a queued GPU spin so that the events see GPU time only
(the host has launched the op's kernels before the start event runs, as a model running ahead); peak memory is ``max_memory_allocated`` during one run minus what
was allocated before it (the inputs), i.e. what the op itself adds.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json
    python benchmarks/bench_kernels.py --ops fused_ce rmsnorm --impls unsloth_dist liger --reps 50

The gradient each op's backward receives is, as inside a model, a buffer nothing else refers to
(handed over by a tiny autograd node that lets go of it; prepared outside the timed region), so
an op may reuse it in place -- never a tensor the benchmark itself still holds.

``--check`` first runs each selected op of ``unsloth_dist`` once at the benchmark size (outputs
NaN-poisoned) and compares outputs and input gradients with the PyTorch reference computed in
fp32 on the same bf16 inputs (normwise relative error <= 1e-2, worst element <= 3e-2 of the
largest magnitude, as tests/test_gpu_kernels.py); any failure stops the run (exit status 1)
before timing.

A baseline that fails (not installed, compile error, out of memory) is recorded with its error
and the others still run. Prints a markdown table (every row's time and memory against liger and
against torch.compile) and a per-op summary; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_TOKENS, HIDDEN, INTER, VOCAB = 16384, 4096, 14336, 128256
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
IMPLS = ("unsloth_dist", "torch", "torch.compile", "liger")
OPS = ("rmsnorm", "rope", "swiglu", "geglu", "fused_ce", "lora")


# --------------------------------------------------------------------------- cases
# A case: make() -> (leaf inputs, prep) where prep(leaves) returns the tensors the op takes
# (non-leaf activations, as inside a model; prepared outside the timed region), and the
# grads are taken w.r.t. the tensors listed in `wrt` indices.


def _liger():
    import liger_kernel.transformers.functional as LF  # noqa: F401

    return LF


def case_rmsnorm(dev):
    from unsloth_dist.kernels import rms_norm, rms_norm_reference

    x = torch.randn(N_TOKENS, HIDDEN, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(HIDDEN, device=dev) * 0.1 + 1).bfloat16().requires_grad_()

    def prep():
        return [x.clone(), w]

    eps = 1e-5
    impls = {
        "unsloth_dist": lambda a, b: rms_norm(a, b, eps),
        "torch": lambda a, b: rms_norm_reference(a, b, eps),
        "torch.compile": _compiled(lambda a, b: rms_norm_reference(a, b, eps)),
        "liger": lambda a, b: _liger().liger_rms_norm(a, b, eps, 0.0, "llama"),
    }
    return prep, impls, f"x [{N_TOKENS}, {HIDDEN}] bf16, llama casting", lambda a, b: rms_norm_reference(a, b, eps)


def case_rope(dev):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from unsloth_dist.kernels import apply_rope, rope_reference

    B, T = 4, N_TOKENS // 4
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    rot = LlamaRotaryEmbedding(cfg).to(dev)
    qp = torch.randn(B, T, HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kp = torch.randn(B, T, KV_HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T, device=dev)[None]
    cos, sin = rot(qp, pos)

    def prep():
        return [qp.clone(), kp.clone()]  # the q / k projection outputs [B, T, heads * head_dim]

    def hf(fn):
        # as in HF attention: viewed [B, T, H, D] and transposed to [B, H, T, D] (strided views),
        # inside the op, so the gradients are w.r.t. the projection outputs (an in-place RoPE
        # consumes its q / k views; HF rebinds them to the results)
        return lambda a, b: fn(a.view(B, T, HEADS, HEAD_DIM).transpose(1, 2), b.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2))

    impls = {
        "unsloth_dist": hf(lambda q, k: apply_rope(q, k, cos, sin)),
        "torch": hf(lambda q, k: rope_reference(q, k, cos, sin)),
        "torch.compile": _compiled(hf(lambda q, k: rope_reference(q, k, cos, sin))),
        "liger": hf(lambda q, k: _liger().liger_rope(q, k, cos, sin)),
    }
    ref = hf(lambda q, k: rope_reference(q, k, cos.float(), sin.float()))
    return prep, impls, f"q [{B}, {HEADS}, {T}, {HEAD_DIM}], k [{B}, {KV_HEADS}, {T}, {HEAD_DIM}] bf16 (HF views), llama3 rope", ref


def _case_glu(dev, activation):
    from unsloth_dist.kernels import glu, glu_reference

    ga = torch.randn(N_TOKENS, INTER, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ub = torch.randn(N_TOKENS, INTER, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def prep():
        return [ga.clone(), ub.clone()]  # non-leaf activations, like gate_proj(x) / up_proj(x)

    liger_fn = "liger_swiglu" if activation == "silu" else "liger_geglu"
    impls = {
        "unsloth_dist": lambda a, b: glu(a, b, activation),
        "torch": lambda a, b: glu_reference(a, b, activation),
        "torch.compile": _compiled(lambda a, b: glu_reference(a, b, activation)),
        "liger": lambda a, b: getattr(_liger(), liger_fn)(a, b),
    }
    return prep, impls, f"gate, up [{N_TOKENS}, {INTER}] bf16, {activation}", lambda a, b: glu_reference(a, b, activation)


def case_swiglu(dev):
    return _case_glu(dev, "silu")


def case_geglu(dev):
    return _case_glu(dev, "gelu_tanh")


def case_fused_ce(dev):
    from unsloth_dist.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

    h0 = (torch.randn(N_TOKENS, HIDDEN, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, device=dev) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, VOCAB, (N_TOKENS,), device=dev)
    t[torch.rand(N_TOKENS, device=dev) < 0.1] = -100

    def prep():
        return [h0.clone(), w]

    impls = {
        "unsloth_dist": lambda h, W: fused_linear_cross_entropy(h, W, t),
        "torch": lambda h, W: fused_linear_cross_entropy_reference(h, W, t),
        "torch.compile": _compiled(lambda h, W: fused_linear_cross_entropy_reference(h, W, t)),
        "liger": lambda h, W: _liger().liger_fused_linear_cross_entropy(h, W, t),
    }
    def ref(h, W):  # fp32, chunked over tokens (exact: a mean of per-token terms) so the logits fit
        return _ChunkedReferenceCE.apply(h, W, t, (t != -100).sum())

    return prep, impls, f"hidden [{N_TOKENS}, {HIDDEN}] x lm_head [{VOCAB}, {HIDDEN}] bf16, mean, 10% ignored", ref


class _ChunkedReferenceCE(torch.autograd.Function):
    """The mean fused-CE reference over 2048-token chunks (for --check in fp32: the fp32
    logits of all tokens at once would take 8 GiB, their gradient as much again)."""

    @staticmethod
    def forward(ctx, h, W, t, n):
        from unsloth_dist.kernels import fused_linear_cross_entropy_reference

        loss = torch.zeros((), device=h.device, dtype=torch.float64)
        dh, dW = torch.empty_like(h), torch.zeros_like(W)
        for s in range(0, h.shape[0], 2048):
            with torch.enable_grad():
                hc, Wc = h[s:s + 2048].detach().requires_grad_(), W.detach().requires_grad_()
                lc = fused_linear_cross_entropy_reference(hc, Wc, t[s:s + 2048], reduction="sum")
                gh, gW = torch.autograd.grad(lc, (hc, Wc))
            dh[s:s + 2048] = gh
            dW += gW
            loss += lc.detach().double()
        ctx.save_for_backward(dh / n, dW / n)
        return (loss / n).float()

    @staticmethod
    def backward(ctx, g):
        dh, dW = ctx.saved_tensors
        return dh * g, dW * g, None, None


def case_lora(dev):
    """A LoRA-adapted up_proj (r=16): the frozen base GEMM plus the low-rank update, the way peft
    adds it (torch: scale and add passes) against ours (one addmm_ into the base output). The base
    GEMM dominates both; Liger has no LoRA op."""
    import torch.nn.functional as F

    from unsloth_dist.kernels import lora_delta, lora_delta_reference

    r, s = 16, 2.0
    x0 = torch.randn(N_TOKENS, HIDDEN, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(INTER, HIDDEN, device=dev) * HIDDEN ** -0.5).bfloat16()  # frozen
    a = (torch.randn(r, HIDDEN, device=dev) * HIDDEN ** -0.5).bfloat16().requires_grad_()
    b = (torch.randn(INTER, r, device=dev) * 0.05).bfloat16().requires_grad_()

    def prep():
        return [x0.clone(), a, b]

    def peft_like(x, a, b):
        return lora_delta_reference(F.linear(x, w), x, a, b, s)

    impls = {
        "unsloth_dist": lambda x, a, b: lora_delta(F.linear(x, w), x, a, b, s),
        "torch": peft_like,
        "torch.compile": _compiled(peft_like),
    }
    ref = lambda x, a, b: lora_delta_reference(F.linear(x, w.float()), x, a, b, s)  # noqa: E731
    return prep, impls, f"x [{N_TOKENS}, {HIDDEN}] bf16, frozen W [{INTER}, {HIDDEN}], LoRA r={r}", ref


CASES = {"rmsnorm": case_rmsnorm, "rope": case_rope, "swiglu": case_swiglu, "geglu": case_geglu,
         "fused_ce": case_fused_ce, "lora": case_lora}


def _compiled(fn: Callable) -> Callable:
    holder = {}

    def run(*args):
        if "fn" not in holder:
            holder["fn"] = torch.compile(fn, dynamic=False)
        return holder["fn"](*args)

    return run


# --------------------------------------------------------------------------- measuring


class _HandOver(torch.autograd.Function):
    """A scalar node above `out` whose backward hands `holder`'s tensor to `out` as its gradient
    and drops its own reference: the op's backward then gets a gradient buffer nothing else
    refers to, as inside a model (where it comes fresh from the next op's backward)."""

    @staticmethod
    def forward(ctx, out, holder):
        ctx.holder = holder
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.holder.pop(), None


def _fresh(grads_out: list) -> list:
    return [[g.clone()] for g in grads_out]


def _fwd_bwd(impl: Callable, ins: list, grads_out: list | None, fresh: list | None = None):
    """Forward, then the gradients w.r.t. the inputs that require grad, with `grads_out` (random,
    made on the first call) as the outputs' gradients -- handed over as owned copies (`fresh`,
    prepared by the caller outside any timed region, or made here)."""
    out = impl(*ins)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if grads_out is None:
        grads_out = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
    holders = fresh if fresh is not None else _fresh(grads_out)
    total = None
    for o, h in zip(outs, holders):
        term = _HandOver.apply(o, h)
        total = term if total is None else total + term
    del holders, fresh
    g = torch.autograd.grad(total, [x for x in ins if x.requires_grad])
    return outs, g, grads_out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_SPIN: dict = {}


def _gpu_spin(ms: float = 5.0) -> None:
    """Queue a kernel that keeps the GPU busy for about `ms` so that the host has launched the
    timed op's kernels before the start event runs: the events then measure GPU time alone, not
    Python / autograd / launch latency (which a model's forward hides by running ahead)."""
    if "cycles_per_ms" not in _SPIN:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        torch.cuda._sleep(1_000_000)
        b.record()
        b.synchronize()
        _SPIN["cycles_per_ms"] = 1_000_000 / max(a.elapsed_time(b), 1e-3)
    torch.cuda._sleep(int(ms * _SPIN["cycles_per_ms"]))


def _warm_gpu(seconds: float = 3.0) -> None:
    """Busy the GPU with large matmuls before timing anything. On a freshly started machine the
    first process's first ops measured up to 1.6-3x slower (H100, 2026-11-25: RMSNorm 0.43-0.71 ms
    vs 0.27 ms, RoPE 0.48-0.74 vs 0.25 ms) while clocks and memory came up."""
    if not torch.cuda.is_available():
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a
    torch.cuda.empty_cache()


def measure(prep: Callable, impl: Callable, warmup: int, reps: int) -> dict:
    if not torch.cuda.is_available():
        return _measure_cpu(prep, impl, warmup, reps)
    ins = prep()
    _, _, grads_out = _fwd_bwd(impl, ins, None)  # first call: JIT / compile
    del ins
    for _ in range(warmup):
        ins = prep()
        _fwd_bwd(impl, ins, grads_out)
        del ins
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        ins = prep()
        fresh = _fresh(grads_out)
        torch.cuda.synchronize()
        _gpu_spin()
        start.record()
        outs, g, _ = _fwd_bwd(impl, ins, grads_out, fresh)
        del fresh
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        del ins, outs, g
    # memory: what one forward+backward adds on top of its inputs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    ins = prep()
    fresh = _fresh(grads_out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs, g, _ = _fwd_bwd(impl, ins, grads_out, fresh)
    del fresh
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del ins, outs, g
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": reps,
            "peak_mem_mib": peak / 2**20, "extra_mem_mib": (peak - base) / 2**20}


def _measure_cpu(prep, impl, warmup, reps) -> dict:
    """--smoke on a machine without CUDA: wall-clock only, to check the script runs."""
    ins = prep()
    _, _, grads_out = _fwd_bwd(impl, ins, None)
    times = []
    for _ in range(reps):
        ins = prep()
        fresh = _fresh(grads_out)
        t0 = time.perf_counter()
        _fwd_bwd(impl, ins, grads_out, fresh)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[0], "p80_ms": times[-1], "reps": reps,
            "peak_mem_mib": 0.0, "extra_mem_mib": 0.0}


def run(ops, impls, warmup, reps, log=print) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op in ops:
        try:
            prep, table, shape, _ = CASES[op](dev)
        except Exception as exc:  # a case that cannot even build its inputs
            rows.append({"op": op, "impl": "*", "error": f"{type(exc).__name__}: {exc}"})
            log(f"[{op}] setup failed: {exc}")
            continue
        for name in impls:
            if name not in table:  # no such implementation of this op (Liger has no LoRA op)
                continue
            t0 = time.perf_counter()
            row = {"op": op, "impl": name, "shape": shape}
            try:
                row.update(measure(prep, table[name], warmup, reps))
            except Exception as exc:  # one failing baseline must not stop the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                _sync()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log(f"[{op}] {name}: " + (f"{row['median_ms']:.3f} ms, +{row['extra_mem_mib']:.0f} MiB"
                                      if "error" not in row else f"FAILED {row['error']}") + f" ({row['wall_s']} s)")
        del prep, table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _ratio(base: dict | None, r: dict, key: str, faster: bool) -> str:
    if not base or "error" in base:
        return ""
    if faster:  # > 1: this row is faster than the baseline
        return f"{base[key] / r[key]:.2f}x" if r[key] > 0 else ""
    return f"{r[key] / base[key]:.2f}x" if base[key] > 0 else ("0 / 0" if r[key] == 0 else "")


def markdown(rows: list[dict]) -> str:
    """Every row against liger and torch.compile: speed-up (baseline time / row time, > 1 means
    faster than the baseline) and memory (row extra MiB / baseline extra MiB)."""
    lines = ["| op | impl | fwd+bwd median ms (p20-p80) | extra peak MiB | speed-up vs liger | speed-up vs "
             "torch.compile | mem vs liger | mem vs torch.compile |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by = {(r["op"], r["impl"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lg, tc = by.get((r["op"], "liger")), by.get((r["op"], "torch.compile"))
        lines.append(f"| {r['op']} | {r['impl']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | "
                     f"{r['extra_mem_mib']:.0f} | {_ratio(lg, r, 'median_ms', True)} | {_ratio(tc, r, 'median_ms', True)} | "
                     f"{_ratio(lg, r, 'extra_mem_mib', False)} | {_ratio(tc, r, 'extra_mem_mib', False)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per op: ours / liger / torch.compile (ms and extra MiB) and our speed-ups."""
    by = {(r["op"], r["impl"]): r for r in rows if "error" not in r}
    lines = ["| op | ours ms / MiB | liger ms / MiB | torch.compile ms / MiB | ours speed-up vs liger | ours speed-up vs torch.compile |",
             "| --- | --- | --- | --- | --- | --- |"]
    cell = lambda r: f"{r['median_ms']:.3f} / {r['extra_mem_mib']:.0f}" if r else "-"  # noqa: E731
    for op in dict.fromkeys(r["op"] for r in rows):
        ours, lg, tc = by.get((op, "unsloth_dist")), by.get((op, "liger")), by.get((op, "torch.compile"))
        vs = lambda b: (f"{b['median_ms'] / ours['median_ms']:.2f}x" if ours and b else "-")  # noqa: E731
        lines.append(f"| {op} | {cell(ours)} | {cell(lg)} | {cell(tc)} | {vs(lg)} | {vs(tc)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- --check


def _compare(got: torch.Tensor, ref: torch.Tensor, what: str) -> tuple[bool, str]:
    if got.shape != ref.shape:
        return False, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if torch.isnan(got).any():
        return False, f"{what}: NaN (an element the kernel did not write)"
    g, r = got.float(), ref.float()
    rel = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
    worst = ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    ok = rel <= 1e-2 and worst <= 3e-2
    return ok, f"{what}: normwise {rel:.2e}, worst {worst:.2e}{'' if ok else '  <-- FAIL'}"


def check(ops, log=print) -> bool:
    """Each op of unsloth_dist once at the benchmark size (poisoned outputs) against its
    reference in fp32 on the same inputs: outputs and input gradients."""
    from unsloth_dist.kernels import poison_outputs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_ok = True
    for op in ops:
        prep, table, _, ref = CASES[op](dev)
        ins = prep()
        ref_ins = [x.detach().float().requires_grad_(x.requires_grad) for x in ins]  # before ours runs in place
        try:
            with poison_outputs():
                outs, grads, grads_out = _fwd_bwd(table["unsloth_dist"], ins, None)
            r = ref(*ref_ins)
            r = list(r) if isinstance(r, (tuple, list)) else [r]
            rg = torch.autograd.grad(r, [x for x in ref_ins if x.requires_grad], [g.float() for g in grads_out])
            results = [_compare(o, ro, f"{op} output {i}") for i, (o, ro) in enumerate(zip(outs, r))]
            results += [_compare(a, b, f"{op} grad {i}") for i, (a, b) in enumerate(zip(grads, rg))]
        except Exception as exc:
            results = [(False, f"{op}: {type(exc).__name__}: {exc}")]
        for ok, msg in results:
            log(f"[check] {msg}")
            all_ok &= ok
        del ins, ref_ins, prep, table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return all_ok


def environment() -> dict:
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        info["liger_kernel"] = version("liger-kernel")
    except Exception as exc:
        info["liger_kernel"] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check", action="store_true",
                    help="first check each op's outputs and gradients against the fp32 reference at the "
                         "benchmark size; stop (exit 1) on any failure")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (and CPU allowed, references only): check that the script runs")
    args = ap.parse_args(argv)
    if args.smoke:
        global N_TOKENS, HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM
        N_TOKENS, HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 64, 64, 96, 300, 4, 2, 16
        args.warmup, args.reps = 1, 2
    elif not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    info = environment()
    print(json.dumps(info))
    t0 = time.perf_counter()
    if args.check:
        if not check(args.ops):
            print("bench_kernels: --check FAILED (see [check] lines above); not timing", file=sys.stderr)
            return 1
        info["check_s"] = round(time.perf_counter() - t0, 1)
    _warm_gpu()
    rows = run(args.ops, args.impls, args.warmup, args.reps)
    info["total_s"] = round(time.perf_counter() - t0, 1)
    table = markdown(rows)
    print()
    print(f"{info.get('device', '?')}, torch {info['torch']}, triton {info.get('triton', '?')}, "
          f"liger-kernel {info['liger_kernel']}, {info['date']}")
    print(table)
    print()
    print(summary(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": info, "results": rows, "markdown": table,
                                                   "summary": summary(rows)}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
