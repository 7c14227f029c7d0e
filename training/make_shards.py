"""Writes image-caption shards in the img2dataset layout, the layout ``training/data.py`` reads.

Output::

    OUT/00000.tar, OUT/00001.tar, ...   samples KEY.jpg (or .png/.webp) + KEY.txt (caption) + KEY.json (metadata)
    OUT/sizes.json                      shard basename -> number of samples
    OUT/val/...                         the same for the held-out samples (--val-fraction)
    OUT/make_shards.json                what was written and what was skipped, and why

Sources:

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
RandomResizedCrop does the cropping), ``shorter`` (the shorter side to the size, as img2dataset's default) or
``crop`` (shorter side, then a centre crop to a square). Without ``--image-size`` the size is kept.

Records are shuffled with ``--seed`` before they are split into val and train and cut to ``--max-samples``, so
shards mix categories; for the same input and seed the shards are byte-identical. Each shard is written to
``NNNNN.tar.tmp`` and renamed when complete; ``sizes.json`` is written to a temporary name and renamed too.

Usage::

    python training/make_shards.py --source noto-emoji --output data/shards/noto --image-size 64 --val-fraction 0.1
    python training/make_shards.py --source csv --input captions.tsv --output shards/ --samples-per-shard 5000
"""

from __future__ import annotations

import logging

from diffclip.cli import ArgumentParser, UsageError, nonneg_int, positive_int, run, setup_logging, unit_interval
from diffclip.files import check_writable
from diffclip.shards import IMAGE_FORMATS, RESIZE_MODES, encode_image, write_shards
from diffclip.sources import (
    DEFAULT_INPUTS,
    EMOJI_TEMPLATES,
    SKIN_TONES,
    Record,
    SkipSample,
    SourceNotInstalled,
    emoji_caption,
    emoji_name,
    read_csv_source,
    read_emoji_source,
    read_openclipart_source,
    read_source,
)

__all__ = ["Record", "SourceNotInstalled", "SkipSample", "EMOJI_TEMPLATES", "SKIN_TONES", "emoji_name",
           "emoji_caption", "read_csv_source", "read_emoji_source", "read_openclipart_source", "read_source",
           "encode_image", "write_shards", "main", "cli"]

log = logging.getLogger("diffclip.shards")


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
