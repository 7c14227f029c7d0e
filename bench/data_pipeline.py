"""Data pipeline throughput: samples/s from webdataset shards through ``training.data.get_wds_loader`` (tar
reading, sample check, shuffle buffer, decode, per-sample seeded augmentation, tokenise, batching) vs the same
decode + augment + tokenise + batching over encoded images held in memory, in one run, one process each.

The overhead of the pipeline is ``pipeline time / raw time - 1`` (target: < 10%), from the CPU time of this
process (``time.process_time``; both run in this process with one torch thread, so CPU time stolen by other
processes on a shared machine does not count); wall-clock figures are printed beside. Each measurement is
repeated (interleaved, the order alternating) and the fastest repeat is kept.

Data: crops of scikit-image photos stored at 256 px (like img2dataset's default output), and the Google Noto
emoji at 64 px when ``scripts/get_demo_data.sh`` has installed them. Transforms: the train transforms of
``DiffCLIP-Tiny-64`` and ``DiffCLIP-ViT-B-16``.

    python bench/data_pipeline.py [--samples 768] [--batch-size 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from diffclip.training import make_shards as shards
from diffclip.training import sources
from diffclip.training.data import get_wds_loader
from PIL import Image

import diffclip

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "data" / "sources" / "emoji-datasource-google"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat",
          "camera", "coins", "moon", "grass"]


def photo_records(folder: Path, n: int) -> list:
    """n crops (different places and sizes) of the scikit-image photos, as JPEG files with captions."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    records = []
    for i in range(n):
        photo, name = photos[i % len(photos)], PHOTOS[i % len(photos)]
        w, h = photo.size
        frac = 0.5 + 0.5 * ((i * 7919) % 97) / 96
        cw, ch = int(w * frac), int(h * frac)
        left, top = (i * 31) % (w - cw + 1), (i * 17) % (h - ch + 1)
        path = folder / f"{i:05d}.jpg"
        photo.crop((left, top, left + cw, top + ch)).save(path, quality=90)
        records.append(sources.Record(str(path), f"a crop of the {name.replace('_', ' ')} photo, number {i}"))
    return records


def read_samples(shard_dir: Path) -> list[tuple[bytes, str]]:
    """(encoded image, caption) of every sample of the shards, read once into memory."""
    samples = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in sorted(files.items()):
            if name.endswith(".jpg"):
                samples.append((data, files[name[:-4] + ".txt"].decode()))
    return samples


def raw_epoch(samples, preprocess, tokenizer, batch_size: int) -> int:
    """The raw work: decode (as wds.decode("pil") does), augment, tokenise, collate; no pipeline around it."""
    n, images, texts = 0, [], []
    for data, caption in samples:
        with io.BytesIO(data) as stream:
            im = Image.open(stream)
            im.load()
            im = im.convert("RGB")
        images.append(preprocess(im))
        texts.append(tokenizer([caption])[0])
        if len(images) == batch_size:
            torch.stack(images), torch.stack(texts)
            n += batch_size
            images, texts = [], []
    return n


def pipeline_epoch(urls, preprocess, tokenizer, batch_size: int, num_samples: int, workers: int) -> int:
    info = get_wds_loader(urls, preprocess, tokenizer, batch_size=batch_size, num_samples=num_samples, seed=0,
                          workers=workers)
    n = 0
    for images, _ in info.dataloader:
        n += images.shape[0]
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=768, help="samples per data set")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the pipeline (0: same process "
                   "as the raw loop, the fair comparison)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = diffclip.get_tokenizer("DiffCLIP-Tiny-64")
    transforms = {name: diffclip.image_transform(diffclip.get_model_config(name)["preprocess_cfg"],
                                                 diffclip.get_model_config(name)["vision_cfg"]["image_size"], True)
                  for name in ("DiffCLIP-Tiny-64", "DiffCLIP-ViT-B-16")}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"photos-256px": (photo_records(tmp / "photos", args.samples), 256)}
        if (EMOJI / "emoji.json").is_file():
            sets["noto-emoji-64px"] = (sources.read_emoji_source(EMOJI), 64)
        else:
            print(f"(noto emoji not installed in {EMOJI}: run scripts/get_demo_data.sh to bench them too)")
        per_shard = max(1, args.samples // 8)
        for set_name, (records, size) in sets.items():
            out = tmp / set_name
            shards.write_shards(records, out, samples_per_shard=per_shard, image_size=size,
                                     resize_mode="shorter", max_samples=args.samples, progress=False)
            urls = [str(u) for u in sorted(out.glob("*.tar"))]
            samples = read_samples(out)
            usable = len(samples) // args.batch_size * args.batch_size
            for model, preprocess in transforms.items():
                best = {k: float("inf") for k in ("raw_wall", "raw_cpu", "pipeline_wall", "pipeline_cpu")}
                for r in range(args.repeats):
                    for kind in (("raw", "pipeline") if r % 2 == 0 else ("pipeline", "raw")):  # alternate the order
                        wall, cpu = time.perf_counter(), time.process_time()
                        if kind == "raw":
                            n = raw_epoch(samples, preprocess, tokenizer, args.batch_size)
                        else:
                            n = pipeline_epoch(urls, preprocess, tokenizer, args.batch_size, usable, args.workers)
                        best[f"{kind}_wall"] = min(best[f"{kind}_wall"], time.perf_counter() - wall)
                        best[f"{kind}_cpu"] = min(best[f"{kind}_cpu"], time.process_time() - cpu)
                        assert n == usable, (kind, n, usable)
                row = {"data": set_name, "transform": model, "samples": usable, "batch_size": args.batch_size,
                       "workers": args.workers}
                for key, value in best.items():
                    row[key.replace("_wall", "_samples_per_s").replace("_cpu", "_samples_per_cpu_s")] = round(
                        usable / value, 1)
                row["overhead"] = round(best["pipeline_cpu"] / best["raw_cpu"] - 1, 4)
                row["overhead_wall"] = round(best["pipeline_wall"] / best["raw_wall"] - 1, 4)
                results.append(row)
                print(f"{set_name:16s} {model:18s} samples per CPU-second: raw {row['raw_samples_per_cpu_s']:7.1f}, "
                      f"pipeline {row['pipeline_samples_per_cpu_s']:7.1f} -> overhead {100 * row['overhead']:+5.1f}%"
                      f"   (wall clock: {row['raw_samples_per_s']:.1f} vs {row['pipeline_samples_per_s']:.1f} "
                      f"samples/s, {100 * row['overhead_wall']:+.1f}%)", flush=True)
    worst = max(r["overhead"] for r in results)
    print(f"worst pipeline overhead: {100 * worst:+.1f}% (target < 10%): {'OK' if worst < 0.10 else 'ABOVE TARGET'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
