"""What every reader family of :mod:`diffclip.eval.readers` shares: the zero-shot prompts and class names, the
error for a missing dataset, small file helpers, and the dataset classes (images from a list of files, idx
(MNIST-format) arrays, a torchvision dataset wrapped with reader attributes, CLIP_benchmark's tar shards,
retrieval sets)."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffclip.errors import InputError
from diffclip.files import text_lines
from diffclip.images import IMAGE_EXTENSIONS, decode_image, load_image


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message names the expected layout."""


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot prompts. ImageNet's are open_clip's copies of OpenAI's; the others are the per-dataset prompts of
# the CLIP paper (Radford et al. 2021, "prompts.md" of the CLIP repository) as CLIP_benchmark's data files hold them.
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``) as ``{}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def _prompt_file(name: str) -> dict[str, list[str]]:
    with open(PROMPTS_DIR / name, encoding="utf-8") as f:
        return json.load(f)


#: dataset -> prompt templates with CLIP_benchmark's ``{c}`` placeholder, from ``eval/prompts/`` (CLIP_benchmark's
#: ``en_zeroshot_classification_templates.json`` format and, for the datasets it has, its lists in its order);
#: ``generic`` for folders without templates, ``emoji`` for the emoji sets.
TEMPLATES: dict[str, list[str]] = _prompt_file("en_zeroshot_classification_templates.json")
GENERIC_TEMPLATES = TEMPLATES["generic"]
EMOJI_TEMPLATES = TEMPLATES["emoji"]
#: dataset -> class names where the files of the dataset have none (CLIP_benchmark's ``en_classnames.json`` format)
CLASSNAMES: dict[str, list[str]] = _prompt_file("en_classnames.json")
FASHION_MNIST_CLASSES = CLASSNAMES["fashion-mnist"]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------

def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (class names, templates). Raises ValueError naming the file
    when it is not UTF-8 text."""
    return [ln.strip() for ln in text_lines(path) if ln.strip()]


def exists_or_raise(path: Path, name: str, layout: str, is_dir: bool = True) -> Path:
    """``path`` when it is a folder (``is_dir``) or a file; else :class:`DatasetNotFoundError` naming dataset
    ``name`` and its expected ``layout``."""
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise DatasetNotFoundError(f"dataset {name!r}: {'folder' if is_dir else 'file'} {path} not found; "
                                   f"expected layout: {layout}")
    return path


def pretty_name(name: str) -> str:
    """A folder or file name as a class name: ``_`` read as a space."""
    return name.replace("_", " ").strip()


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively; extensions :data:`diffclip.images.IMAGE_EXTENSIONS`), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS and p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# Dataset classes
# ---------------------------------------------------------------------------------------------------------------

class ImageListDataset(Dataset):
    """Images from a list of ``(path, label)`` pairs.

    Attributes:
        samples, targets, classnames, templates, class_index (see the module docstring).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classnames: Sequence[str], templates: Sequence[str],
                 transform: Callable | None = None, class_index: Sequence[int] | None = None,
                 background: tuple[int, int, int] | None = None, crop_border: int = 0):
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.targets = [t for _, t in self.samples]
        self.classnames, self.templates = list(classnames), list(templates)
        self.class_index = list(class_index) if class_index is not None else None
        self.transform, self.background, self.crop_border = transform, background, crop_border

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = load_image(path, self.background)
        if self.crop_border:
            b = self.crop_border
            img = img.crop((b, b, img.width - b, img.height - b))
        return (self.transform(img) if self.transform else img), target


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (the MNIST format; ``.gz`` or not) into a read-only numpy array (the last few files
    read are kept in memory, keyed by path, size and modification time)."""
    st = os.stat(path)
    return _read_idx_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise InputError(f"{path} is not an idx file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{path}: header says {shape} but the file holds {arr.size} values")
    return arr.reshape(shape)


class IdxDataset(Dataset):
    """MNIST-format images (N, H, W) uint8 and labels, yielded as grayscale (mode "L") PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], templates: Sequence[str],
                 transform: Callable | None = None):
        if len(images) != len(labels):
            raise InputError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets = images, [int(x) for x in labels]
        self.classnames, self.templates, self.class_index = list(classnames), list(templates), None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(np.ascontiguousarray(self.images[i]), mode="L")
        return (self.transform(img) if self.transform else img), self.targets[i]


class LabeledDataset(Dataset):
    """Wraps a dataset yielding ``(PIL image, label)`` (e.g. a torchvision one, built without a transform), applies
    ``transform`` and adds the reader attributes (optionally over a subset ``indices``)."""

    def __init__(self, dataset: Dataset, classnames: Sequence[str], templates: Sequence[str],
                 targets: Sequence[int] | None = None, indices: Sequence[int] | None = None,
                 transform: Callable | None = None):
        self.dataset, self.indices = dataset, (list(indices) if indices is not None else None)
        self.classnames, self.templates, self.class_index = list(classnames), list(templates), None
        self.targets = [int(t) for t in targets] if targets is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[self.indices[i] if self.indices is not None else i]
        return (self.transform(img) if self.transform else img), int(target)


@dataclass
class _TarMember:
    path: str
    offset: int
    size: int
    name: str = ""  # the member's name in the tar


def _index_tar(path: str) -> list[tuple[str, dict[str, _TarMember]]]:
    """Groups the members of one tar into webdataset samples: consecutive files sharing the key (the path up
    to the first dot of the file name) form one sample, keyed by their extension."""
    samples: list[tuple[str, dict[str, _TarMember]]] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            folder, base = os.path.split(m.name)
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext.lower()] = _TarMember(path, m.offset_data, m.size, m.name)
    return samples


def _read_member(m: _TarMember) -> bytes:
    with open(m.path, "rb") as f:
        f.seek(m.offset)
        return f.read(m.size)


def _member_text(m: _TarMember) -> str:
    try:
        return _read_member(m).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{m.path}: {m.name} is not UTF-8 text") from None


def _class_label(m: _TarMember) -> int:
    text = _member_text(m).strip()
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{m.path}: {m.name} is not an integer class label ({text[:20]!r})") from None


class TarShardDataset(Dataset):
    """Random access to webdataset tar shards through an index of member offsets (built once by reading the tar
    headers), so evaluation can use a plain map-style DataLoader with workers and a fixed order.

    Yields ``(image, label)`` from ``cls`` for classification, or ``(image, index)`` with ``captions`` read from
    ``txt`` (one caption per line) for retrieval.

    Why not webdataset's random-access reader ``wids.ShardListDataset`` (a separate package since webdataset 1.0):
    it needs every shard's sample count up front (CLIP_benchmark's layout gives only ``nshards.txt``, so a pass over
    the headers is needed anyway), copies each shard into a cache directory (``/tmp/_wids_cache``: the whole test
    set a second time on disk) and prints to stderr on every construction. ``python bench/tar_reader.py`` (2,000
    64 px PNGs in 4 shards, same images and labels from both): one pass 0.134 s here vs 0.179 s with wids (1.34x),
    our index 0.08 s, and 28.7 MB of copies for wids. webdataset's sequential ``WebDataset`` would lose the fixed
    sample order across DataLoader workers that per-sample results (``per_sample``) and the paired bootstrap need.
    """

    def __init__(self, shards: Sequence[str], transform: Callable | None = None, task: str = "classification",
                 classnames: Sequence[str] = (), templates: Sequence[str] = ()):
        self.transform, self.task = transform, task
        self.classnames, self.templates, self.class_index = list(classnames), list(templates), None
        self.samples = []
        for shard in shards:
            for key, members in _index_tar(shard):
                image_key = next((k for k in IMAGE_EXTENSIONS if k in members), None)
                needed = "cls" if task == "classification" else "txt"
                if image_key is None or needed not in members:
                    continue  # not a sample of this task (e.g. a stray json)
                self.samples.append((key, members[image_key], members[needed]))
        if not self.samples:
            raise InputError(f"no samples with an image and a '{'cls' if task == 'classification' else 'txt'}' "
                             f"entry in {len(shards)} shard(s) starting with {shards[0] if shards else '-'}")
        if task == "classification":
            self.targets = [_class_label(m) for _, _, m in self.samples]
        else:
            self.captions = [[c.strip() for c in _member_text(m).splitlines() if c.strip()] for _, _, m in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        member = self.samples[i][1]
        img = decode_image(io.BytesIO(_read_member(member)), f"{member.name} in {member.path}")
        img = self.transform(img) if self.transform else img
        return img, (self.targets[i] if self.task == "classification" else i)


class RetrievalDataset(Dataset):
    """Images with several captions each; yields ``(image, image_index)``.

    Attributes:
        paths: image files; captions: list of caption lists (same order).
    """

    def __init__(self, paths: Sequence[str], captions: Sequence[Sequence[str]], transform: Callable | None = None,
                 background: tuple[int, int, int] | None = None):
        if len(paths) != len(captions):
            raise InputError(f"{len(paths)} images but {len(captions)} caption lists")
        empty = [p for p, c in zip(paths, captions) if not c]
        if empty:
            raise InputError(f"{len(empty)} images have no caption (e.g. {empty[0]})")
        self.paths, self.captions = [str(p) for p in paths], [list(c) for c in captions]
        self.transform, self.background = transform, background

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = load_image(self.paths[i], self.background)
        return (self.transform(img) if self.transform else img), i


def set_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """Sets the image transform of a reader dataset (also through ``limit``'s Subset); returns the dataset."""
    target = dataset
    while isinstance(target, torch.utils.data.Subset):
        target = target.dataset
    target.transform = transform
    return dataset
