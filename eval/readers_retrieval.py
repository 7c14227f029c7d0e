"""Retrieval datasets: Karpathy splits (COCO, Flickr30k, Flickr8k), CSV / JSONL: readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from diffclip.eval.readers_base import (
    DatasetNotFoundError,
    RetrievalDataset,
    TarShardDataset,
    exists_or_raise,
    text_lines,
)
from diffclip.eval.readers_registry import REGISTRY, register

from diffclip.errors import InputError, one_line
from diffclip.files import json_lines

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
    try:
        images = [im for im in json.loads("".join(text_lines(ann)))["images"] if im.get("split") == split]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"dataset {name!r}: {ann} is not a Karpathy split file ({one_line(e)}); expected "
                         f"{{\"images\": [{{\"filename\", \"split\", \"sentences\"}}, ...]}}") from None
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


def _caption_rows(path: Path, fmt: str, keys: tuple[str, str], sep: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a caption CSV/TSV (rows of as many fields as the header) or JSONL file (one
    object per non-blank line); ValueError naming the file and line for any other row."""
    rows: list[tuple[int, dict]] = []
    if fmt == "jsonl":
        for lineno, obj in json_lines(path):
            if not isinstance(obj, dict) or not all(k in obj for k in keys):
                raise InputError(f"{path}:{lineno}: expected an object with the keys {keys[0]!r} and {keys[1]!r}, "
                                 f"got {json.dumps(obj)[:60]}")
            rows.append((lineno, obj))
        return rows
    reader = csv.reader(text_lines(path, newline=""), delimiter=sep)
    try:
        header = next(reader, [])
        if header and not all(k in header for k in keys):
            raise InputError(f"{path} needs the keys {keys[0]!r} and {keys[1]!r}, found {sorted(header)}")
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise InputError(f"{path}:{reader.line_num}: {len(fields)} field(s), expected {len(header)} fields "
                                 f"({sep.join(header)}); quote a caption that holds the separator")
            rows.append((reader.line_num, dict(zip(header, fields))))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not a CSV row ({e})") from None
    return rows


def _caption_table(root: Path, split, transform, fmt: str, img_key="filepath", caption_key="caption", sep=None):
    exists_or_raise(root, fmt, _CSV_LAYOUT, is_dir=False)
    sep = sep or ("\t" if root.suffix.lower() == ".tsv" else ",")
    grouped: dict[str, list[str]] = {}
    for lineno, r in _caption_rows(root, fmt, (img_key, caption_key), sep):
        path, caption = r[img_key], r[caption_key]
        if not isinstance(path, str) or not path.strip():
            raise InputError(f"{root}:{lineno}: empty {img_key} (expected an image path)")
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{root}:{lineno}: empty caption ({caption_key} is {json.dumps(caption)}; expected text)")
        grouped.setdefault(path, []).append(caption.strip())
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
