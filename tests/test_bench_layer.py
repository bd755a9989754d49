"""benchmarks/bench_layer.py stays runnable: the tiny shape on CPU, eager transformers against ours
(patched kernels' CPU paths), same first loss and gradient (the GPU figures come from device runs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_layer.py"

pytestmark = pytest.mark.slow


def test_bench_layer_tiny_runs_and_matches(tmp_path):
    out = tmp_path / "layer.json"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--seq", "32", "--micro", "2", "--layers", "2",
           "--variants", "hf,ours", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    assert set(recs) == {"hf", "ours"} and all(r["status"] == "ok" for r in recs.values())
    hf, ours = recs["hf"], recs["ours"]
    assert set(ours["kernels"]) >= {"rms_norm", "rope", "swiglu", "fused_cross_entropy"}, ours["kernels"]
    assert hf["kernels"] == []
    # fp32 on CPU: the patched model computes the same loss and q_proj gradient as transformers
    assert abs(ours["loss"] - hf["loss"]) < 1e-4, (ours["loss"], hf["loss"])
    assert abs(ours["q_grad_norm"] - hf["q_grad_norm"]) <= 1e-3 * hf["q_grad_norm"]
    assert len(ours["ms_all"]) == 2 and ours["ms"] > 0
    assert "| ours |" in proc.stdout and "WARNING" not in proc.stdout


def test_bench_layer_rejects_unknown_variant():
    proc = subprocess.run([sys.executable, str(BENCH), "--variants", "hf,turbo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--variants" in proc.stderr and "turbo" in proc.stderr
