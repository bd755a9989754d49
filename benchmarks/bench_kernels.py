"""Kernel benchmarks: forward+backward time and peak memory of each op, for

* ``unsloth_dist``   -- our Triton kernels (``unsloth_dist.kernels``)
* ``torch``          -- the PyTorch reference of the same op, eager
* ``torch.compile``  -- ``torch.compile`` of that reference
* ``liger``          -- Liger-Kernel's functional ops (``liger_kernel.transformers.functional``), if installed

at Llama-3-8B sizes in bf16: hidden 4096, intermediate 14336, vocab 128256, 32 / 8 heads of 128,
16k tokens. Each measurement: a few warm-up runs, then the median (and p20 / p80) of repeated
runs timed with CUDA events; peak memory is ``max_memory_allocated`` during one run minus what
was allocated before it (the inputs), i.e. what the op itself adds.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json
    python benchmarks/bench_kernels.py --ops fused_ce rmsnorm --impls unsloth_dist liger --reps 50

A baseline that fails (not installed, compile error, out of memory) is recorded with its error
and the others still run. Prints a markdown table; writes JSON to --out.
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
OPS = ("rmsnorm", "rope", "swiglu", "geglu", "fused_ce")


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
    return prep, impls, f"x [{N_TOKENS}, {HIDDEN}] bf16, llama casting"


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
        # as in HF attention: projection output viewed [B, T, H, D] and transposed to [B, H, T, D]
        q = qp.clone().view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        k = kp.clone().view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return [q, k]

    impls = {
        "unsloth_dist": lambda q, k: apply_rope(q, k, cos, sin),
        "torch": lambda q, k: rope_reference(q, k, cos, sin),
        "torch.compile": _compiled(lambda q, k: rope_reference(q, k, cos, sin)),
        "liger": lambda q, k: _liger().liger_rope(q, k, cos, sin),
    }
    return prep, impls, f"q [{B}, {HEADS}, {T}, {HEAD_DIM}], k [{B}, {KV_HEADS}, {T}, {HEAD_DIM}] bf16, llama3 rope"


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
    return prep, impls, f"gate, up [{N_TOKENS}, {INTER}] bf16, {activation}"


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
    return prep, impls, f"hidden [{N_TOKENS}, {HIDDEN}] x lm_head [{VOCAB}, {HIDDEN}] bf16, mean, 10% ignored"


CASES = {"rmsnorm": case_rmsnorm, "rope": case_rope, "swiglu": case_swiglu, "geglu": case_geglu,
         "fused_ce": case_fused_ce}


def _compiled(fn: Callable) -> Callable:
    holder = {}

    def run(*args):
        if "fn" not in holder:
            holder["fn"] = torch.compile(fn, dynamic=False)
        return holder["fn"](*args)

    return run


# --------------------------------------------------------------------------- measuring


def _fwd_bwd(impl: Callable, ins: list, grads_out: list | None):
    out = impl(*ins)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if grads_out is None:
        grads_out = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
    g = torch.autograd.grad(outs, [x for x in ins if x.requires_grad], grads_out)
    return outs, g, grads_out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
        torch.cuda.synchronize()
        start.record()
        outs, g, _ = _fwd_bwd(impl, ins, grads_out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        del ins, outs, g
    # memory: what one forward+backward adds on top of its inputs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    ins = prep()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs, g, _ = _fwd_bwd(impl, ins, grads_out)
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
        t0 = time.perf_counter()
        _fwd_bwd(impl, ins, grads_out)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[0], "p80_ms": times[-1], "reps": reps,
            "peak_mem_mib": 0.0, "extra_mem_mib": 0.0}


def run(ops, impls, warmup, reps, log=print) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op in ops:
        try:
            prep, table, shape = CASES[op](dev)
        except Exception as exc:  # a case that cannot even build its inputs
            rows.append({"op": op, "impl": "*", "error": f"{type(exc).__name__}: {exc}"})
            log(f"[{op}] setup failed: {exc}")
            continue
        for name in impls:
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


def markdown(rows: list[dict]) -> str:
    lines = ["| op | impl | fwd+bwd median ms (p20-p80) | extra peak MiB | vs liger time | vs liger mem |",
             "| --- | --- | --- | --- | --- | --- |"]
    liger = {r["op"]: r for r in rows if r.get("impl") == "liger" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | failed: {r['error'][:80]} | | | |")
            continue
        lg = liger.get(r["op"])
        vt = f"{lg['median_ms'] / r['median_ms']:.2f}x faster" if lg else ""
        vm = f"{r['extra_mem_mib'] / lg['extra_mem_mib']:.2f}x" if lg and lg["extra_mem_mib"] > 0 else ""
        lines.append(f"| {r['op']} | {r['impl']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | "
                     f"{r['extra_mem_mib']:.0f} | {vt} | {vm} |")
    return "\n".join(lines)


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
    rows = run(args.ops, args.impls, args.warmup, args.reps)
    info["total_s"] = round(time.perf_counter() - t0, 1)
    table = markdown(rows)
    print()
    print(f"{info.get('device', '?')}, torch {info['torch']}, triton {info.get('triton', '?')}, "
          f"liger-kernel {info['liger_kernel']}, {info['date']}")
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": info, "results": rows, "markdown": table}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
