"""bench/gpu.py --device cpu --quick: the GPU check's three parts run at toy sizes on CPU (gloo instead of NCCL)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

GPU_BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_gpu_bench_runs_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["device"] == "cpu" and set(res["seconds"]) == {"attention", "train_step", "torchrun"}
    rows = res["rows"]
    attn = [r for r in rows if r["part"] == "attention"]
    assert {(r["candidate"], r["dtype"]) for r in attn} == {
        (c, d) for c in ("diffclip wide", "diffclip split", "diffclip exact", "timm DiffAttention", "standard SDPA")
        for d in ("bfloat16", "float16")}
    steps = [r for r in rows if r["part"] == "train_step"]
    assert {(r["model"], r["compiled"], r["patch_dropout"]) for r in steps} == {
        (m, c, p) for m in ("DiffCLIP-Tiny-64", "open_clip tiny (same shape)") for c in (False, True) for p in (0.0, 0.5)}
    assert all(r["step_s"] > 0 and r["precision"] == "amp_bf16" for r in steps)
    # regional compilation (the default): the 10 blocks of each tower share a graph; the 0.5 models add one
    # dynamic-length graph for the vision block. Per model 2 + 1, so 6 in all (0 if nothing compiled, 40 if each
    # block compiled its own graph for each setting)
    compiled = [r for r in steps if r["compiled"]]
    assert {r["compile_scope"] for r in compiled} == {"blocks"} and {r["graphs_compiled"] for r in compiled} == {6}
    (run,) = [r for r in rows if r["part"] == "torchrun"]
    assert run["backend"] == "gloo" and run["steps"] == 3 and math.isfinite(run["loss"]) and run["samples_per_s"] > 0
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| part |") and len(table) == 2 + len(rows)
    assert any("torchrun training/main.py" in line for line in table)


def test_gpu_bench_compile_scope_model_compiles_the_whole_model_per_setting(tmp_path):
    """``--compile-scope model`` (the whole-model compilation of the 2026-12-04 H200 run): one graph per model and
    patch-dropout setting, 4 in all, where the default's blocks give 6."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--device", "cpu", "--quick", "--skip", "attention,torchrun",
                           "--compile-scope", "model", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [r for r in json.loads(out.read_text())["rows"] if r["part"] == "train_step" and r["compiled"]]
    assert len(compiled) == 4 and {r["compile_scope"] for r in compiled} == {"model"}
    assert {r["graphs_compiled"] for r in compiled} == {4}
    assert sum("compiled (model)" in line for line in proc.stdout.splitlines()) == 4
