"""GPU check: differential attention, the DiffCLIP training step and a torchrun run of the trainer, in one go.

Three parts, each timed in one process with interleaved repetitions (median reported), one JSON out (``--out``)
and one Markdown table printed:

1. ``attention``: forward + backward of one attention layer (``bench/attention.py``'s candidates: our
   differential attention on its ``wide``, ``split`` and ``exact`` paths, timm's ``DiffAttention`` and standard
   SDPA attention) at the ViT-B/16 shape (N=197, C=768, 12 heads) and the ViT-L/14 shape (N=257, C=1024, 16 heads),
   under bf16 and fp16 autocast; peak memory above the inputs (``torch.cuda.max_memory_allocated``).
2. ``train_step``: one contrastive step (forward, CLIP loss, backward, AdamW; ``bench/train_step.py``'s step) of
   ``DiffCLIP-ViT-B-16`` and open_clip's ``ViT-B-16`` at batch 128 under ``amp_bf16``, eager and
   ``torch.compile``d, without and with patch dropout 0.5; peak memory above the weights and AdamW state. By default
   each transformer block is compiled on its own (PyTorch's regional compilation: the identical blocks of a tower
   share one compiled graph, so the warm-up compiles a block per tower and shape, not the whole model per setting);
   ``--compile-scope model`` compiles the whole model, one per patch-dropout setting.
3. ``torchrun``: ``torchrun --standalone --nproc_per_node 1 training/main.py`` (NCCL) training
   ``DiffCLIP-ViT-B-16`` under ``amp_bf16`` on webdataset shards of synthetic images it writes first
   (``training/make_shards.py``'s writer); samples/s and step time from the run's ``results.jsonl``.

``--device cpu --quick`` runs the same code at toy sizes (a 17-token attention, ``DiffCLIP-Tiny-64`` against an
open_clip CLIP of its shape, batch 4, a few repetitions, ``torch.compile`` with the ``eager`` backend, gloo
instead of NCCL): what the test suite runs, to keep this script working without a GPU. Memory is measured on
CUDA only.

    python bench/gpu.py [--out bench_gpu.json] [--device cuda] [--reps 10] [--quick] [--skip attention,...]
                        [--no-compile | --compile-scope blocks|model]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
from attention import candidates
from attention import step as attention_step
from PIL import Image
from torch._dynamo.utils import counters
from train_step import SUITES, make_inputs, make_optimizer, set_patch_dropout, sync, time_interleaved, train_step

from diffclip.files import write_text
from diffclip.loss import ClipLoss
from diffclip.runtime import get_autocast

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("attention", "train_step", "torchrun")
#: attention layers of bench/attention.py timed here: the three paths, timm's layer and the standard baseline
ATTENTION = {"diffclip fused wide": "diffclip wide", "diffclip fused split-V": "diffclip split",
             "diffclip exact": "diffclip exact", "timm DiffAttention": "timm DiffAttention",
             "standard SDPA": "standard SDPA"}


def settings(quick: bool, device: str) -> dict:
    """The sizes of each part: the real ones, or toy ones for ``--quick``."""
    if quick:
        return dict(attn_batch=2, attn_shapes={"toy (N=17, C=64, 4 heads)": (17, 64, 4)}, suite="Tiny-64",
                    step_batch=4, compile_backend="eager", run_model="DiffCLIP-Tiny-64", run_batch=4, run_steps=3,
                    run_image=32, run_workers=2, run_precision="amp_bf16",
                    dist_backend="gloo" if device == "cpu" else "nccl")
    return dict(attn_batch=64, attn_shapes={"ViT-B/16 (N=197, C=768, 12 heads)": (197, 768, 12),
                                            "ViT-L/14 (N=257, C=1024, 16 heads)": (257, 1024, 16)},
                suite="ViT-B/16", step_batch=128, compile_backend="inductor", run_model="DiffCLIP-ViT-B-16",
                run_batch=128, run_steps=16, run_image=64, run_workers=8, run_precision="amp_bf16",
                dist_backend="gloo" if device == "cpu" else "nccl")


def peak_mib(fn, device: str) -> float | None:
    """Peak memory of ``fn()`` above what was allocated before it (MiB; CUDA only, else None)."""
    if not device.startswith("cuda"):
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_attention(s: dict, reps: int, device: str) -> list[dict]:
    rows = []
    for shape, (n, dim, heads) in s["attn_shapes"].items():
        layers = {label: candidates(dim, heads)[name].to(device) for name, label in ATTENTION.items()}
        x = torch.randn(s["attn_batch"], n, dim, device=device, requires_grad=True)
        for dtype in (torch.bfloat16, torch.float16):
            autocast = get_autocast("amp_bf16" if dtype == torch.bfloat16 else "amp_fp16", device.split(":")[0])

            def stepper(layer, x=x, autocast=autocast):
                def run():
                    with autocast():
                        attention_step(layer, x, False)
                return run

            steps = {k: stepper(layer) for k, layer in layers.items()}
            for fn in steps.values():  # warm-up (kernel selection, allocator)
                fn()
            times = time_interleaved(steps, reps, device)
            for k, fn in steps.items():
                rows.append(dict(part="attention", shape=shape, batch=s["attn_batch"], dtype=str(dtype).split(".")[-1],
                                 candidate=k, ms=1e3 * statistics.median(times[k]), peak_mib=peak_mib(fn, device)))
    return rows


#: what ``--compile-scope`` compiles: each transformer block (the default) or the whole model
COMPILE_SCOPES = ("blocks", "model")


def compile_blocks(model: torch.nn.Module, backend: str) -> int:
    """``torch.compile`` every transformer block of ``model`` in place (``nn.Module.compile``): timm's
    ``visual.blocks``, our and open_clip's ``resblocks``. PyTorch's regional compilation recipe: identical blocks
    reuse one compiled graph. Returns how many blocks; raises ValueError where the model has none."""
    n = 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("blocks", "resblocks"):
            for blk in mod:
                blk.compile(backend=backend)
                n += 1
    if not n:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no 'blocks' or 'resblocks' to compile")
    return n


def bench_train_step(s: dict, reps: int, device: str, compile_scope: str | None):
    """Yields the rows of the eager pass, then those of the compiled pass (``compile_scope``: one of
    :data:`COMPILE_SCOPES`, or None for eager only)."""
    suite = SUITES[s["suite"]]
    names = [k for k in suite["models"] if "(ours)" not in k]  # DiffCLIP and open_clip's model (not our twin)
    images, texts = make_inputs(s["step_batch"], suite["image_size"], suite["ctx"], device)
    autocast = get_autocast("amp_bf16", device.split(":")[0])
    loss_fn = ClipLoss()
    torch.manual_seed(0)
    variants = {}  # (model, patch dropout) -> (model, optimizer): one model per setting, the same initial weights
    for k in names:
        model = suite["models"][k]().to(device).train()
        for p in (0.0, 0.5):
            m = copy.deepcopy(model) if p else model
            set_patch_dropout(m, p)
            variants[(k, p)] = m, make_optimizer(k, m)
    for compiled in (False, True) if compile_scope else (False,):
        rows, steps = [], {}
        for key, (model, opt) in variants.items():
            fwd = model
            if compiled and compile_scope == "model":  # a graph per sequence length: a model per patch-dropout setting
                fwd = torch.compile(model, backend=s["compile_backend"])
            elif compiled:  # in place, after the eager pass; the second sequence length recompiles once per block type
                compile_blocks(model, s["compile_backend"])

            def run(fwd=fwd, opt=opt):
                train_step(fwd, opt, loss_fn, images, texts, autocast=autocast)

            steps[key] = run
        graphs0, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        for fn in steps.values():  # warm-up: AdamW state, compilation
            fn()
        warm, graphs = time.perf_counter() - t0, counters["stats"]["unique_graphs"] - graphs0
        times = time_interleaved(steps, reps, device)
        for (k, p), fn in steps.items():
            med = statistics.median(times[(k, p)])
            rows.append(dict(part="train_step", model=k, batch=s["step_batch"], precision="amp_bf16",
                             compiled=compiled, compile_scope=compile_scope if compiled else None,
                             patch_dropout=p, step_s=med, samples_per_s=s["step_batch"] / med,
                             peak_mib=peak_mib(fn, device), warmup_s=warm, graphs_compiled=graphs))
        del steps
        yield rows


def write_synthetic_shards(out: Path, n: int, size: int, n_shards: int) -> Path:
    """``n`` synthetic images (smooth colour fields with noise) and captions naming their colour, as webdataset
    shards in the img2dataset layout (``training/make_shards.py``'s writer)."""
    from diffclip.training.make_shards import write_shards
    from diffclip.training.sources import Record

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}
    img_dir = out / "images"
    img_dir.mkdir(parents=True)
    records = []
    ramp = np.linspace(0.5, 1.0, size)[None, :, None]
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        pixels = np.clip(np.asarray(rgb) * ramp + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        path = img_dir / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        records.append(Record(str(path), f"a synthetic {name} picture, number {i}"))
    shards = out / "shards"
    write_shards(records, shards, samples_per_shard=max(1, n // n_shards), progress=False)
    return shards


def bench_torchrun(s: dict, device: str, workdir: Path) -> list[dict]:
    n = s["run_batch"] * s["run_steps"]
    shards = write_synthetic_shards(workdir, n, s["run_image"], n_shards=2 * s["run_workers"])
    logs = workdir / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "training" / "main.py"), "--model", s["run_model"], "--train-data", str(shards),
           "--train-num-samples", str(n), "--batch-size", str(s["run_batch"]), "--epochs", "1", "--warmup", "1",
           "--precision", s["run_precision"], "--workers", str(s["run_workers"]), "--device", device.split(":")[0],
           "--dist-backend", s["dist_backend"], "--logs-dir", str(logs), "--name", "run", "--log-every-n-steps", "1",
           "--save-frequency", "0", "--zeroshot-frequency", "0", "--no-export"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"torchrun training/main.py exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    train = [json.loads(line) for line in (logs / "run" / "results.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("type") == "train"]
    last = train[-1]
    # the first step carries compilation and cuDNN autotuning: the steady rate is the median of the others
    steady = [r["samples_per_second"] for r in train[1:]] or [last["samples_per_second"]]
    return [dict(part="torchrun", model=s["run_model"], batch=s["run_batch"], precision=s["run_precision"],
                 backend=s["dist_backend"], steps=last["step"], loss=last["loss"],
                 samples_per_s=statistics.median(steady), batch_time_s=statistics.median(r["batch_time"] for r in train),
                 data_time_s=statistics.median(r["data_time"] for r in train), wall_s=wall)]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    """One table for all three parts."""
    out = ["| part | what | setting | time | samples/s | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "attention":
            out.append(f"| attention {r['shape']}, B={r['batch']} | {r['candidate']} | {r['dtype']} | "
                       f"{r['ms']:.2f} ms fwd+bwd | - | {_fmt(r['peak_mib'], '.0f')} |")
        elif r["part"] == "train_step":
            mode = f"compiled ({r.get('compile_scope') or 'model'})" if r["compiled"] else "eager"
            setting = (f"{r['precision']}, {mode}, patch dropout "
                       f"{r['patch_dropout']:g}")
            out.append(f"| train step, batch {r['batch']} | {r['model']} | {setting} | {r['step_s'] * 1e3:.1f} ms | "
                       f"{r['samples_per_s']:.0f} | {_fmt(r['peak_mib'], '.0f')} |")
        else:
            out.append(f"| torchrun training/main.py, batch {r['batch']}, {r['steps']} steps | {r['model']} | "
                       f"{r['precision']}, {r['backend']} | {r['batch_time_s'] * 1e3:.1f} ms compute + "
                       f"{r['data_time_s'] * 1e3:.1f} ms data wait per step, {r['wall_s']:.0f} s in all | "
                       f"{r['samples_per_s']:.0f} | - |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the test suite's CPU run)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate (default 10; quick 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows of the training step")
    ap.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks",
                    help="torch.compile each transformer block (default: regional compilation) or the whole model")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {', '.join(PARTS)}")
    ap.add_argument("--out", default="bench_gpu.json", help="the JSON written (default bench_gpu.json)")
    args = ap.parse_args(argv)
    skip = {p for p in args.skip.split(",") if p}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {', '.join(sorted(skip - set(PARTS)))}; known: {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu --quick for the CPU check")
    reps = args.reps or (2 if args.quick else 10)
    s = settings(args.quick, args.device)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=args.device,
                device_name=name, torch=torch.__version__, timm=timm.__version__, open_clip=open_clip.__version__,
                quick=args.quick, reps=reps)
    print(f"{name}: torch {torch.__version__}, timm {timm.__version__}, open_clip {open_clip.__version__}; "
          f"median of {reps} interleaved repetitions{' (quick: toy sizes)' if args.quick else ''}", flush=True)
    rows, seconds = [], {}

    def save() -> None:  # after each part: what was measured survives a later part's failure or a time limit
        write_text(args.out, json.dumps({**meta, "seconds": seconds, "rows": rows}, indent=1) + "\n")

    for part in PARTS:
        if part in skip:
            continue
        t0 = time.perf_counter()
        if part == "attention":
            rows += bench_attention(s, reps, args.device)
        elif part == "train_step":
            for chunk in bench_train_step(s, reps, args.device, None if args.no_compile else args.compile_scope):
                rows += chunk
                save()
        else:
            with tempfile.TemporaryDirectory(prefix="bench_gpu.") as tmp:
                rows += bench_torchrun(s, args.device, Path(tmp))
        seconds[part] = time.perf_counter() - t0
        save()
        print(f"{part}: {seconds[part]:.0f} s", flush=True)
    table = markdown(rows)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
