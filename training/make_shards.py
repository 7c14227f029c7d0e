"""Writes image-caption shards in the img2dataset layout, the layout ``training/data.py`` reads.

Output::

    OUT/00000.tar, OUT/00001.tar, ...   samples KEY.jpg (or .png/.webp) + KEY.txt (caption) + KEY.json (metadata)
    OUT/sizes.json                      shard basename -> number of samples
    OUT/val/...                         the same for the held-out samples (--val-fraction)
    OUT/make_shards.json                what was written and what was skipped, and why

Sources (read by ``training/sources.py``, the demo's catalogue):

* ``csv``: a CSV, TSV or JSONL file of ``filepath, caption`` (paths relative to that file; a header names the
  columns, ``filepath``/``caption`` or their usual aliases; extra columns go to the JSON).
* ``noto-emoji`` / ``twitter-emoji`` (or ``emoji`` for any ``emoji-datasource-*`` folder): the emoji catalogue
  installed by ``scripts/get_demo_data.sh``; captions from ``name`` and ``short_names`` through a few templates,
  skin-tone variants included; category and subcategory go to the JSON.
* ``openclipart``: Debian's ``openclipart-png`` (or ``openclipart-svg``, rendered with cairosvg); captions from
  the SVG's ``<dc:title>`` and keywords (the artist's name removed) and the category folders.

Images are converted to RGB (transparent pixels composited on white, so transparent emoji and clip art stay on
white after JPEG encoding), then resized to ``--image-size`` by ``--resize-mode``: ``pad`` (default: the longer
side to the size, keeping the aspect ratio, centred on a white square; nothing is cropped away, the train-time
RandomResizedCrop does the cropping; img2dataset's default ``--resize_mode border`` does the same), ``shorter``
(the shorter side to the size: img2dataset's ``keep_ratio``) or ``crop`` (shorter side, then a centre crop to a
square: its ``center_crop``). Without ``--image-size`` the size is kept. A listed file
that is missing, not a regular file (a FIFO, a device, a folder: never opened) or not decodable is skipped and
counted by reason in ``make_shards.json``.

Records are shuffled with ``--seed`` before they are split into val and train and cut to ``--max-samples``, so
shards mix categories; for the same input and seed the shards are byte-identical. Each shard, ``sizes.json`` and
``make_shards.json`` are written by :mod:`diffclip.files` to a temporary ``.NAME.XXXXXXXX.tmp`` and renamed when
complete; a full disk ends the run with one line naming the file, its temporary removed (completed shards stay).

Usage::

    python training/make_shards.py --source noto-emoji --output data/shards/noto --image-size 64 --val-fraction 0.1
    python training/make_shards.py --source csv --input captions.tsv --output shards/ --samples-per-shard 5000
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import random
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from diffclip.training.sources import (
    DEFAULT_INPUTS,
    Record,
    SkipSample,
    SourceNotInstalled,
    read_csv_source,
    read_source,
    record_caption,
)
from PIL import Image

from diffclip.cli import ArgumentParser, UsageError, nonneg_int, positive_int, run, setup_logging, unit_interval
from diffclip.errors import InputError
from diffclip.files import atomic_write, check_writable, stale_temporaries, write_json
from diffclip.images import to_rgb

__all__ = ["IMAGE_FORMATS", "RESIZE_MODES", "encode_image", "write_shards", "read_csv_source", "build_parser", "main",
           "cli"]

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
    missing, not a regular file (a FIFO, a device or a folder: never opened, as reading one could wait forever)
    or cannot be decoded.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SkipSample("not a regular file")
        if path.lower().endswith(".svg"):
            import cairosvg

            png = cairosvg.svg2png(url=path, output_width=(image_size or 256) * 2 if image_size else None)
            im = Image.open(io.BytesIO(png))
        else:
            im = Image.open(path)
        im.load()
    except SkipSample:
        raise
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
class _Aborted(Exception):
    """Ends a shard whose split stops because of an error elsewhere."""


class _SplitWriter:
    """One split (train or val): webdataset tars of ``samples_per_shard`` samples, each written through
    :func:`diffclip.files.atomic_write` (a temporary ``.NNNNN.tar.XXXXXXXX.tmp``, renamed when the shard is
    complete; removed, and a full disk named, when it fails)."""

    max_bytes = 3e9  # as webdataset's ShardWriter: a shard also ends past 3 GB

    def __init__(self, directory: Path, samples_per_shard: int, fmt: str):
        self.directory, self.samples_per_shard, self.fmt = directory, samples_per_shard, fmt
        self.sizes: dict[str, int] = {}
        self.count = 0  # samples written in this split: the next key
        self._file = self._tar = None
        self._in_shard = self._bytes = 0

    def _open(self) -> None:
        import webdataset as wds

        self._name = f"{len(self.sizes):05d}.tar"
        self._file = atomic_write(self.directory / self._name, "wb")
        self._tar = wds.TarWriter(self._file.__enter__(), encoder=False, mtime=0)
        self._in_shard = self._bytes = 0

    def _finish(self) -> None:
        try:
            self._tar.close()
        except BaseException as e:
            self._drop(e)
            raise
        file, self._file = self._file, None
        file.__exit__(None, None, None)
        self.sizes[self._name] = self._in_shard

    def _drop(self, error: BaseException) -> None:
        """Ends the shard being written after ``error``: its temporary is removed, and a full disk is raised as
        the OSError naming the shard."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):  # marks tarfile's stream closed, or it flushes into a closed file
                self._tar.close()
            file.__exit__(type(error), error, error.__traceback__)

    def write(self, data: bytes, caption: str, meta: dict) -> None:
        """Adds one sample (``KEY.<fmt>``, ``KEY.txt``, ``KEY.json``). Raises OSError naming the shard when it
        cannot be written (a full disk: ``PATH: no space left on device``)."""
        if self._file is None:
            self._open()
        key = f"{self.count:09d}"
        meta = {"key": key, **meta}
        try:
            self._bytes += self._tar.write({"__key__": key, self.fmt: data, "txt": caption.encode("utf-8"),
                                            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()})
        except BaseException as e:
            self._drop(e)
            raise
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard or self._bytes >= self.max_bytes:
            self._finish()

    def abort(self) -> None:
        """Drops the shard being written, if any (its temporary is removed); completed shards stay."""
        self._drop(_Aborted())

    def close(self) -> dict:
        """Completes the last shard and writes ``sizes.json``; returns ``{"shards": n, "samples": n}``."""
        if self._file is not None:
            self._finish()
        if self.sizes:
            write_json(self.directory / "sizes.json", self.sizes, indent=1)
        return {"shards": len(self.sizes), "samples": sum(self.sizes.values())}


def _clear_output(out: Path, overwrite: bool) -> None:
    existing = [p for d in (out, out / "val") if d.is_dir()
                for p in list(d.glob("*.tar")) + list(d.glob("*.tar.tmp")) + list(d.glob("sizes.json"))
                + stale_temporaries(d)]  # left by a run killed while writing
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
        summary_splits = {name: w.close() for name, w in writers.items()}
    except BaseException:  # completed shards stay; the ones being written are removed
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    summary = {"output": str(out), "source": source, "records": len(records), **summary_splits,
               "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped),
               "options": {"samples_per_shard": samples_per_shard, "image_size": image_size,
                           "resize_mode": resize_mode, "format": fmt, "seed": seed, "val_fraction": val_fraction,
                           "max_samples": max_samples}}
    if not any(s["samples"] for s in summary_splits.values()):
        raise InputError(f"no sample could be written from {len(records)} record(s); skipped: {dict(skipped)}")
    write_json(out / "make_shards.json", summary, indent=1)
    return summary


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=["csv", "noto-emoji", "twitter-emoji", "emoji", "openclipart"])
    p.add_argument("--input", default=None, help="CSV/TSV/JSONL file (csv), emoji-datasource folder (emoji) or "
                   "Openclipart root; defaults: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_INPUTS.items()))
    p.add_argument("--output", required=True, help="folder for the shards (val/ inside it for --val-fraction)")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--image-size", type=positive_int, default=None, help="target size in pixels (none: keep the size)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="pad",
                   help="pad: longer side to the size, centred on white; shorter: shorter side to the size; "
                        "crop: shorter side, then centre crop")
    p.add_argument("--format", choices=list(IMAGE_FORMATS), default="jpg")
    p.add_argument("--quality", type=positive_int, default=95, help="JPEG/WebP quality")
    p.add_argument("--max-samples", type=positive_int, default=None, help="write at most this many records (random "
                   "subset)")
    p.add_argument("--seed", type=int, default=0, help="shuffling of records and the val split")
    p.add_argument("--val-fraction", type=unit_interval, default=0.0, help="fraction of records held out in "
                   "OUTPUT/val/")
    p.add_argument("--caption-style", choices=["varied", "plain"], default="varied",
                   help="emoji: captions from templates (varied) or the bare name (plain)")
    p.add_argument("--workers", type=nonneg_int, default=1, help="processes that load and encode images")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    check_writable(f"{args.output}/sizes.json", "--output")
    try:
        records = read_source(args.source, args.input, args.caption_style)
    except SourceNotInstalled as exn:
        raise UsageError(str(exn)) from None
    log.info("%s: %d records", args.source, len(records))
    summary = write_shards(records, args.output, samples_per_shard=args.samples_per_shard,
                           image_size=args.image_size, resize_mode=args.resize_mode, fmt=args.format,
                           quality=args.quality, max_samples=args.max_samples, seed=args.seed,
                           val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.no_progress, source=args.source)
    val = summary.get("val", {"shards": 0, "samples": 0})
    print(f"make_shards: wrote {summary['train']['samples']} samples in {summary['train']['shards']} shard(s) to "
          f"{summary['output']}, {val['samples']} in {val['shards']} val shard(s); skipped {summary['skipped']}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in summary['skipped_reasons'].items())})" if summary["skipped"] else ""))
    return 0


def cli() -> None:
    """The ``diffclip-make-shards`` console script."""
    run(main)


if __name__ == "__main__":
    cli()
