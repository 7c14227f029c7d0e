"""Retrieval datasets: Karpathy splits (COCO, Flickr30k, Flickr8k), CSV / JSONL: readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from diffclip.eval.readers_base import DatasetNotFoundError, RetrievalDataset, TarShardDataset, exists_or_raise
from diffclip.eval.readers_registry import REGISTRY, register

from diffclip.errors import InputError

# ---------------------------------------------------------------------------------------------------------------
# Retrieval: Karpathy splits (COCO, Flickr30k, Flickr8k), CSV / JSONL
# ---------------------------------------------------------------------------------------------------------------

def _karpathy(root: Path, split: str, transform, name: str, json_name: str, image_dirs: Sequence[str],
              annotations: str | None = None):
    layout = (f"<root>/{json_name} (or <root>/annotations/{json_name}; Karpathy's split file) and the images in "
              f"<root>/<filepath>/<filename> or <root>/{{{','.join(image_dirs)}}}/<filename>")
    ann = Path(annotations) if annotations else next(
        (p for p in (root / json_name, root / "annotations" / json_name, root / "karpathy" / json_name)
         if p.is_file()), root / json_name)
    exists_or_raise(ann, name, layout, is_dir=False)
    images = [im for im in json.loads(ann.read_text(encoding="utf-8"))["images"] if im.get("split") == split]
    if not images:
        raise InputError(f"dataset {name!r}: {ann} has no images in split {split!r}")

    # where the images are is decided on the first one: <root>/<filepath>/<filename>, else one folder for all
    first = images[0]
    if first.get("filepath") and (root / first["filepath"] / first["filename"]).is_file():
        paths = [root / im.get("filepath", "") / im["filename"] for im in images]
    else:
        folder = next((root / d for d in image_dirs if (root / d / first["filename"]).is_file()), None)
        if folder is None:
            raise DatasetNotFoundError(f"dataset {name!r}: image {first['filename']} not found under {root}; "
                                       f"expected layout: {layout}")
        paths = [folder / im["filename"] for im in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"dataset {name!r}: {len(missing)} of {len(paths)} {split} images are missing "
                                   f"(e.g. {missing[0]}); expected layout: {layout}")
    captions = [[s["raw"].strip() for s in im["sentences"]] for im in images]
    return RetrievalDataset(paths, captions, transform)


_KARPATHY = {
    "mscoco": ("dataset_coco.json", ("", "val2014", "images"), ("mscoco", "coco"),
               "MS-COCO captions, Karpathy 5k test split (5 captions per image)"),
    "flickr30k": ("dataset_flickr30k.json", ("flickr30k-images", "images", "Images"), ("flickr30k",),
                  "Flickr30k, Karpathy 1k test split (5 captions per image)"),
    "flickr8k": ("dataset_flickr8k.json", ("Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images"),
                 ("flickr8k",), "Flickr8k, Karpathy 1k test split (5 captions per image)"),
}
for _name, (_json, _dirs, _subdirs, _desc) in _KARPATHY.items():
    def _make(root, split, transform, annotations=None, _n=_name, _j=_json, _d=_dirs):
        return _karpathy(root, split, transform, _n, _j, _d, annotations)
    _make.__doc__ = _desc
    register(_name, "retrieval", f"<root>/{_json} + images (Karpathy split file)", splits=("train", "val", "test",
              "restval"), subdirs=_subdirs)(_make)


_CSV_LAYOUT = ("a CSV/TSV file with a header row and columns 'filepath' and 'caption' (paths relative to the file's "
               "folder; rows with the same filepath are several captions of one image), or a JSONL file with the "
               "same keys per line")


def _caption_table(root: Path, split, transform, fmt: str, img_key="filepath", caption_key="caption", sep=None):
    exists_or_raise(root, fmt, _CSV_LAYOUT, is_dir=False)
    rows: list[dict] = []
    if fmt == "jsonl":
        with open(root, encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    else:
        sep = sep or ("\t" if root.suffix.lower() == ".tsv" else ",")
        with open(root, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=sep))
    if rows and (img_key not in rows[0] or caption_key not in rows[0]):
        raise InputError(f"{root} needs the keys {img_key!r} and {caption_key!r}, found {sorted(rows[0])}")
    grouped: dict[str, list[str]] = {}
    for r in rows:
        grouped.setdefault(r[img_key], []).append(str(r[caption_key]).strip())
    if not grouped:
        raise InputError(f"{root} holds no rows")
    paths = [p if os.path.isabs(p) else root.parent / p for p in grouped]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} images listed in {root} are missing (e.g. {missing[0]}); "
                                   f"expected layout: {_CSV_LAYOUT}")
    return RetrievalDataset(paths, list(grouped.values()), transform)


register("csv", "retrieval", _CSV_LAYOUT, splits=(), default_split="all")(
    lambda root, split, transform, **kw: _caption_table(root, split, transform, "csv", **kw))
register("jsonl", "retrieval", _CSV_LAYOUT, splits=(), default_split="all")(
    lambda root, split, transform, **kw: _caption_table(root, split, transform, "jsonl", **kw))
REGISTRY[("retrieval", "csv")].description = "a CSV/TSV of filepath,caption (several rows per image allowed)"
REGISTRY[("retrieval", "jsonl")].description = "a JSONL of {filepath, caption} (several rows per image allowed)"


_I2D_LAYOUT = ("<root>/{00000,00001,...}.tar as img2dataset writes them (--output_format webdataset --caption_col ...): "
               "samples <key>.{jpg|png|webp} + <key>.txt (the caption); its .parquet and _stats.json files are not read")


@register("img2dataset", "retrieval", _I2D_LAYOUT, splits=(), default_split="all")
def _img2dataset(root, split, transform):
    """a folder of img2dataset webdataset shards: each image with its caption"""
    shards = sorted(str(p) for p in Path(root).glob("*.tar")) if Path(root).is_dir() else []
    if not shards:
        raise DatasetNotFoundError(f"dataset 'img2dataset': no .tar shards in {root}; expected layout: {_I2D_LAYOUT}")
    dataset = TarShardDataset(shards, transform, "retrieval")
    # one caption per image, as the trainer reads it (the wds reader takes each line of a .txt as a caption)
    dataset.captions = [[" ".join(lines)] if lines else [] for lines in dataset.captions]
    return dataset
