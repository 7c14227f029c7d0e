"""torch.compile warm-up, whole model vs each transformer block (regional compilation), on this machine.

``bench/gpu.py`` compiles each block by default (``--compile-scope blocks``); this measures, with inductor on the
device given, the first two training steps (compilation included) of each model of a ``bench/train_step.py``
suite compiled both ways, without and with patch dropout 0.5 (a second sequence length), plus the graphs compiled
and the step time after it (the patch-dropout 0.5 model, mean of 3). Each candidate in a fresh process (inductor's caches off), so neither reuses the
other's work.

    python bench/compile_time.py [--suite Tiny-64] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(suite_name: str, scope: str, batch: int, device: str) -> dict:
    import torch
    from gpu import compile_blocks
    from torch._dynamo.utils import counters
    from train_step import SUITES, make_inputs, make_optimizer, set_patch_dropout, train_step

    from diffclip.loss import ClipLoss

    suite, loss_fn = SUITES[suite_name], ClipLoss()
    images, texts = make_inputs(batch, suite["image_size"], suite["ctx"], device)
    out = {}
    for name in [k for k in suite["models"] if "(ours)" not in k]:
        torch.manual_seed(0)
        t0, g0 = time.perf_counter(), counters["stats"]["unique_graphs"]
        for p in (0.0, 0.5):
            model = suite["models"][name]().to(device).train()
            set_patch_dropout(model, p)
            fwd = torch.compile(model) if scope == "model" else model
            if scope == "blocks":
                compile_blocks(model, "inductor")
            opt = make_optimizer(name, model)
            for _ in range(2):
                train_step(fwd, opt, loss_fn, images, texts)
        warm = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(3):
            train_step(fwd, opt, loss_fn, images, texts)
        out[name] = dict(warmup_s=warm, graphs=counters["stats"]["unique_graphs"] - g0,
                         step_s=(time.perf_counter() - t1) / 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="Tiny-64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.suite, args.child, args.batch, args.device)))
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    res = {}
    for scope in ("model", "blocks"):
        proc = subprocess.run([sys.executable, __file__, "--suite", args.suite, "--batch", str(args.batch),
                               "--device", args.device, "--child", scope], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        res[scope] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"| {args.suite}, batch {args.batch}, {args.device} | compile scope | warm-up s (2 settings x 2 steps) | "
          "graphs | step s after (patch dropout 0.5) |\n|---|---|---|---|---|")
    for name in res["model"]:
        for scope in ("model", "blocks"):
            r = res[scope][name]
            print(f"| {name} | {scope} | {r['warmup_s']:.1f} | {r['graphs']} | {r['step_s']:.3f} |")
        print(f"| {name} | blocks / model | **{res['blocks'][name]['warmup_s'] / res['model'][name]['warmup_s']:.2f}×**"
              f" | | {res['blocks'][name]['step_s'] / res['model'][name]['step_s']:.2f}× |")


if __name__ == "__main__":
    main()
