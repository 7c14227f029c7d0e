"""The shard writer: image-caption records (:mod:`diffclip.sources`) to webdataset tar shards in the img2dataset
layout (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, ``sizes.json``, an optional ``val/`` split), images converted to
RGB on white and resized, shards written to temporary names and renamed when complete. ``training/make_shards.py``
is its command line."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffclip.errors import InputError
from diffclip.files import write_json
from diffclip.images import to_rgb
from diffclip.sources import Record, SkipSample, record_caption

__all__ = ["IMAGE_FORMATS", "RESIZE_MODES", "encode_image", "write_shards"]

log = logging.getLogger("diffclip.shards")

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESIZE_MODES = ("pad", "shorter", "crop")


# ---------------------------------------------------------------------------------------------------------- images
def _resize(im: Image.Image, size: int | None, mode: str) -> Image.Image:
    if not size:
        return im
    w, h = im.size
    if mode == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        if (nw, nh) == (size, size):
            return im
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if mode == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def encode_image(path: str, image_size: int | None = None, resize_mode: str = "pad", fmt: str = "jpg",
                 quality: int = 95) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Loads an image file (raster, or SVG through cairosvg), makes it RGB on white, resizes and encodes it.

    Returns ``(encoded bytes, original (w, h), written (w, h))``. Raises :class:`SkipSample` when the file is
    missing or cannot be decoded.
    """
    try:
        if path.lower().endswith(".svg"):
            import cairosvg

            png = cairosvg.svg2png(url=path, output_width=(image_size or 256) * 2 if image_size else None)
            im = Image.open(io.BytesIO(png))
        else:
            im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise SkipSample("missing image") from None
    except Exception as exn:  # undecodable image: PIL, cairosvg and XML errors alike
        raise SkipSample(f"undecodable image ({type(exn).__name__})") from None
    original = im.size
    im = _resize(to_rgb(im, (255, 255, 255)), image_size, resize_mode)
    out = io.BytesIO()
    if fmt == "jpg":
        im.save(out, format="JPEG", quality=quality)
    elif fmt == "webp":
        im.save(out, format="WEBP", quality=quality)
    else:
        im.save(out, format="PNG")
    return out.getvalue(), original, im.size


@dataclass(frozen=True)
class _Options:
    image_size: int | None
    resize_mode: str
    fmt: str
    quality: int


def _load(job: tuple[Record, _Options]):
    """Worker function: ``(image bytes, caption, meta)`` or ``(None, reason, None)`` for a skipped record."""
    rec, opts = job
    try:
        caption, meta = record_caption(rec)
        if not caption or not caption.strip():
            raise SkipSample("empty caption")
        data, original, size = encode_image(rec.path, opts.image_size, opts.resize_mode, opts.fmt, opts.quality)
    except SkipSample as exn:
        return None, str(exn), None
    meta.pop("svg", None)
    meta.update(caption=caption, original_width=original[0], original_height=original[1], width=size[0],
                height=size[1])
    return data, caption, meta


# ---------------------------------------------------------------------------------------------------------- writer
class _SplitWriter:
    """One split (train or val): a webdataset ShardWriter whose shards are written as ``.tar.tmp`` and renamed."""

    def __init__(self, directory: Path, samples_per_shard: int, fmt: str):
        import webdataset as wds

        self.directory, self.fmt, self.sizes = directory, fmt, {}
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = wds.ShardWriter(str(directory / "%05d.tar.tmp"), maxcount=samples_per_shard, verbose=0,
                                      post=self._finished, encoder=False, mtime=0)
        self.count = 0

    def _finished(self, fname: str) -> None:
        count = self.writer.count
        if count == 0:
            os.remove(fname)
            return
        final = fname[: -len(".tmp")]
        os.replace(fname, final)
        self.sizes[os.path.basename(final)] = count

    def write(self, data: bytes, caption: str, meta: dict) -> None:
        key = f"{self.count:09d}"
        meta = {"key": key, **meta}
        self.writer.write({"__key__": key, self.fmt: data, "txt": caption.encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")})
        self.count += 1

    def close(self) -> dict:
        self.writer.close()
        if self.sizes:
            write_json(self.directory / "sizes.json", self.sizes, indent=1)
        return {"shards": len(self.sizes), "samples": sum(self.sizes.values())}


def _clear_output(out: Path, overwrite: bool) -> None:
    existing = [p for d in (out, out / "val") if d.is_dir()
                for p in list(d.glob("*.tar")) + list(d.glob("*.tar.tmp")) + list(d.glob("sizes.json"))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({len(existing)} files); pass --overwrite to replace them")
    for p in existing:
        p.unlink()


def write_shards(records: list[Record], output: str | os.PathLike, *, samples_per_shard: int = 1000,
                 image_size: int | None = None, resize_mode: str = "pad", fmt: str = "jpg", quality: int = 95,
                 max_samples: int | None = None, seed: int = 0, val_fraction: float = 0.0, workers: int = 1,
                 overwrite: bool = False, progress: bool = True, source: str = "") -> dict:
    """Writes ``records`` as shards to ``output`` (and ``output/val``); returns the summary it also saves as
    ``output/make_shards.json``: shards and samples per split, skipped records and why.

    Raises:
        FileExistsError: ``output`` already holds shards and ``overwrite`` is False.
        ValueError: bad options, or no record could be written.
    """
    from tqdm import tqdm

    if fmt not in IMAGE_FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(IMAGE_FORMATS)}")
    if resize_mode not in RESIZE_MODES:
        raise InputError(f"unknown --resize-mode {resize_mode!r}; choose from {', '.join(RESIZE_MODES)}")
    if samples_per_shard < 1:
        raise InputError("--samples-per-shard must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError("--val-fraction must be in [0, 1)")
    out = Path(output)
    _clear_output(out, overwrite)
    records = list(records)
    random.Random(seed).shuffle(records)
    if max_samples is not None:
        records = records[:max_samples]
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)
    opts = _Options(image_size or None, resize_mode, fmt, quality)
    writers = {"train": _SplitWriter(out, samples_per_shard, fmt)}
    if n_val:
        writers["val"] = _SplitWriter(out / "val", samples_per_shard, fmt)
    skipped: collections.Counter = collections.Counter()
    jobs = [(r, opts) for r in records]
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
        results = pool.imap(_load, jobs, chunksize=16)
    else:
        results = map(_load, jobs)
    try:
        bar = tqdm(results, total=len(jobs), desc=f"shards -> {out}", unit="img", disable=not progress)
        for i, (data, caption, meta) in enumerate(bar):
            if data is None:
                skipped[caption] += 1
                log.debug("skipped %s: %s", records[i].path, caption)
                continue
            writers["val" if i < n_val else "train"].write(data, caption, meta)
    finally:
        if pool is not None:
            pool.terminate()
        summary_splits = {name: w.close() for name, w in writers.items()}
    summary = {"output": str(out), "source": source, "records": len(records), **summary_splits,
               "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped),
               "options": {"samples_per_shard": samples_per_shard, "image_size": image_size,
                           "resize_mode": resize_mode, "format": fmt, "seed": seed, "val_fraction": val_fraction,
                           "max_samples": max_samples}}
    if not any(s["samples"] for s in summary_splits.values()):
        raise InputError(f"no sample could be written from {len(records)} record(s); skipped: {dict(skipped)}")
    write_json(out / "make_shards.json", summary, indent=1)
    return summary


