"""Zero-shot evaluation throughput: images/s over a folder dataset, and where the time goes.

    nice .venv/bin/python bench/eval.py                          # tiny model (256 images) and B/16 (24 images)
    .venv/bin/python bench/eval.py --models DiffCLIP-Tiny-64 --images 512 --workers 0 2

Writes a folder of ImageNet-sized JPEGs (random 500x375 crops of scikit-image's photos, 10 class folders), then
for each model measures, in one run:

* loading: the DataLoader alone (decode + resize + crop + normalise) -> images/s;
* compute: ``zero_shot_logits`` on batches already in memory -> images/s;
* pipeline: the two together, as ``eval/zeroshot.py`` runs them; the time the main process waits for the next
  batch is the data-loading share of the run (it must stay under 20 % with the default worker count).

Models are randomly initialised (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffclip.eval import readers
from diffclip.eval.common import default_workers, make_loader
from PIL import Image

import diffclip
from diffclip.zero_shot import build_zero_shot_classifier, zero_shot_logits

PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 500x375 (quality 90) in 10 class folders, cut from scikit-image's photos."""
    import skimage.data
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, p)() for p in PHOTOS]
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        scale = max(375 / h, 500 / w) * rng.uniform(1.0, 1.3)
        img = Image.fromarray(src).resize((int(w * scale) + 1, int(h * scale) + 1), Image.BILINEAR)
        x, y = rng.integers(0, img.width - 500 + 1), rng.integers(0, img.height - 375 + 1)
        out = root / f"class_{i % 10}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.crop((x, y, x + 500, y + 375)).save(out, quality=90)


def measure(model_name: str, root: Path, n_images: int, batch_size: int, workers: int, repeats: int = 1) -> dict:
    torch.manual_seed(0)
    model, _, preprocess = diffclip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = diffclip.get_tokenizer(model_name)
    ds = readers.build_dataset("folder", root, "test", preprocess)
    ds.samples = ds.samples[:n_images]
    t0 = time.perf_counter()
    classifier = build_zero_shot_classifier(model, tokenizer, ds.classnames, ["a photo of a {}."])
    t_classifier = time.perf_counter() - t0

    # loading alone
    t0 = time.perf_counter()
    batches = list(make_loader(ds, batch_size, workers, torch.device("cpu")))
    t_load = time.perf_counter() - t0

    # compute alone (batches in memory)
    with torch.no_grad():
        zero_shot_logits(model, classifier, batches[0][0][:2])  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            for images, _ in batches:
                zero_shot_logits(model, classifier, images)
        t_compute = (time.perf_counter() - t0) / repeats

    # pipeline: time spent waiting for batches vs in the model
    wait = work = 0.0
    with torch.no_grad():
        t_start = time.perf_counter()
        it = iter(make_loader(ds, batch_size, workers, torch.device("cpu")))
        while True:
            t0 = time.perf_counter()
            try:
                images, _ = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            zero_shot_logits(model, classifier, images)
            wait, work = wait + (t1 - t0), work + (time.perf_counter() - t1)
        t_total = time.perf_counter() - t_start
    n = len(ds)
    return {"model": model_name, "images": n, "batch_size": batch_size, "workers": workers,
            "classifier_s": round(t_classifier, 3),
            "loading_only_img_s": round(n / t_load, 1), "compute_only_img_s": round(n / t_compute, 1),
            "pipeline_img_s": round(n / t_total, 1), "pipeline_s": round(t_total, 2),
            "loading_wait_share": round(wait / t_total, 3), "compute_share": round(work / t_total, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["DiffCLIP-Tiny-64", "DiffCLIP-ViT-B-16"])
    p.add_argument("--images", type=int, nargs="+", default=[256, 24],
                   help="images per model (one value, or one per model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[default_workers()],
                   help=f"worker counts to try (default: the CLIs' default, {default_workers()})")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    counts = args.images if len(args.images) == len(args.models) else args.images[:1] * len(args.models)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        write_folder(root, max(counts))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
              f"{max(counts)} JPEGs 500x375", flush=True)
        for model_name, n in zip(args.models, counts):
            for w in args.workers:
                r = measure(model_name, root, n, min(args.batch_size, n), w)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print()
    print("| model | images | workers | loading only (img/s) | compute only (img/s) | pipeline (img/s) | "
          "waiting for data |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['images']} | {r['workers']} | {r['loading_only_img_s']} | "
              f"{r['compute_only_img_s']} | {r['pipeline_img_s']} | {100 * r['loading_wait_share']:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
