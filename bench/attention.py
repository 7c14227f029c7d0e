"""Benchmark: forward+backward time and peak memory of attention layers at ViT-B/16 and text shapes.

Candidates, run side by side in one process with interleaved repetitions (median time reported; ratios are
medians over rounds of the ratio within a round):
ours as built (``path="auto"``: the exact path with materialised maps on CPU, "wide" elsewhere), ours
fused "wide" (two SDPA calls, value width 2d), ours fused "split" (one SDPA call over 4h heads of equal width,
flash-capable), ours exact (``path="exact"``: materialised fp32 maps), timm's ``DiffAttention`` at the same width,
and standard SDPA attention.
Peak memory is the growth of the peak resident set (VmHWM) of a spawned child that runs one forward+backward
(CPU has no allocator statistics; on CUDA ``torch.cuda.max_memory_allocated`` is used instead).

    python bench/attention.py [--batch 32] [--reps 11] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import time

import timm.layers
import torch

from diffclip.attention import Attention, DiffAttention

SHAPES = {"vision (ViT-B/16)": dict(n=197, dim=768, heads=12, causal=False),
          "text (causal)": dict(n=77, dim=512, heads=8, causal=True)}


def candidates(dim: int, heads: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    auto = DiffAttention(dim, heads)
    wide, split, exact = copy.deepcopy(auto), copy.deepcopy(auto), copy.deepcopy(auto)
    wide.path, split.path, exact.path = "wide", "split", "exact"
    return {"diffclip (auto)": auto, "diffclip fused wide": wide, "diffclip fused split-V": split,
            "diffclip exact": exact,
            "timm DiffAttention": timm.layers.DiffAttention(dim, num_heads=heads // 2, qkv_bias=True),
            "standard SDPA": Attention(dim, heads)}


def step(layer: torch.nn.Module, x: torch.Tensor, causal: bool) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x, is_causal=causal).float().pow(2).mean().backward()


def _child_peak(name, dim, heads, batch, n, causal, device, q):
    layer = candidates(dim, heads)[name].to(device)
    x = torch.randn(batch, n, dim, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(layer, x, causal)
        q.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base = _vm_hwm_kib()
    step(layer, x, causal)
    q.put((_vm_hwm_kib() - base) / 1024)


def _vm_hwm_kib() -> int:
    """Peak resident set of this process image (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_mib(name, dim, heads, batch, n, causal, device) -> float:
    ctx = mp.get_context("spawn")  # a fresh process: forking after OpenMP threads ran can deadlock
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(name, dim, heads, batch, n, causal, device, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {args.reps} interleaved repetitions")
    for title, s in SHAPES.items():
        layers = {k: v.to(args.device) for k, v in candidates(s["dim"], s["heads"]).items()}
        x = torch.randn(args.batch, s["n"], s["dim"], device=args.device, requires_grad=True)
        with torch.no_grad():  # same weights everywhere -> same outputs (sanity check)
            ref = layers["diffclip exact"](x, is_causal=s["causal"])
            for k in ("diffclip (auto)", "diffclip fused wide", "diffclip fused split-V"):
                err = (layers[k](x, is_causal=s["causal"]) - ref).abs().max().item()
                assert err < 1e-4, f"{k} differs from the exact path by {err}"
        for layer in layers.values():  # warm-up
            step(layer, x, s["causal"])
        times = {k: [] for k in layers}
        names = list(layers)
        for r in range(args.reps):  # the order rotates each round: no candidate always follows the same one
            for k in names[r % len(names):] + names[:r % len(names)]:
                layer = layers[k]
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step(layer, x, s["causal"])
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        # ratios: the median over rounds of the ratio within a round (robust to a machine's drift), times: medians
        med = {k: statistics.median(v) for k, v in times.items()}
        rel = {k: statistics.median(x / y for x, y in zip(v, times["diffclip (auto)"])) for k, v in times.items()}
        print(f"\n{title}: B={args.batch}, N={s['n']}, C={s['dim']}, {s['heads']} heads")
        print("| layer | fwd+bwd ms | peak MiB | vs diffclip (auto) |")
        print("|---|---|---|---|")
        for k in layers:
            mem = peak_mib(k, s["dim"], s["heads"], args.batch, s["n"], s["causal"], args.device)
            print(f"| {k} | {med[k] * 1000:.1f} | {mem:.0f} | {rel[k]:.2f}x |")
        print(f"exact / fused wide = {rel['diffclip exact'] / rel['diffclip fused wide']:.2f}; (auto) / timm = "
              f"{1 / rel['timm DiffAttention']:.2f} (target <= 1.05); (auto) / standard = "
              f"{1 / rel['standard SDPA']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
