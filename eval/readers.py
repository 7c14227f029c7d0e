"""Dataset readers for the evaluation programs, behind one interface.

    build_dataset(name, root, split=None, transform=None, download=False, **options) -> torch Dataset
    build_retrieval_dataset(name, root, split=None, transform=None, **options) -> RetrievalDataset
    list_datasets(task=None) -> list[str]

A classification dataset yields ``(image, label)`` (``image`` is ``transform(PIL image)``, or the PIL image when
``transform`` is None) and has ``classnames`` (list[str], index = label), ``templates`` (zero-shot prompts with
``{}``; a dataset-specific list where one is known, else a generic one) and ``class_index`` (None, or for
ImageNet-A/-R the positions of its classes among the 1000 ImageNet classes, to mask a 1000-way classifier).
Most also have ``targets`` (list[int]) so labels can be read without decoding images.

A retrieval dataset yields ``(image, image_index)`` and has ``captions`` (list[list[str]], several per image).

Files are only read from disk. torchvision's readers download only when ``download=True`` is passed (and the
machine has a network); a missing folder raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) with one
line that says which layout was expected.
"""

from __future__ import annotations

import csv
import functools
import gzip
import inspect
import io
import json
import os
import pkgutil
import re
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffclip.images import load_image, to_rgb
from diffclip.zero_shot import format_prompts

__all__ = ["DatasetNotFoundError", "DatasetSpec", "ImageListDataset", "IdxDataset", "TarShardDataset",
           "RetrievalDataset", "LabeledDataset", "list_datasets", "set_transform", "dataset_spec", "canonical_name",
           "resolve_root", "build_dataset", "build_retrieval_dataset", "load_image", "read_lines", "read_idx",
           "imagenet_templates", "imagenet_wnids", "imagenet_classnames", "GENERIC_TEMPLATES", "EMOJI_TEMPLATES",
           "emoji_captions"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message names the expected layout."""


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot prompts. ImageNet's are open_clip's copies of OpenAI's; the others are the per-dataset prompts of
# the CLIP paper (Radford et al. 2021, "prompts.md" of the CLIP repository), written out here.
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``) as ``{}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


GENERIC_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a bad photo of a {}.", "a good photo of a {}.",
                     "a photo of a small {}.", "a photo of a big {}.", "itap of a {}."]
_CIFAR_TEMPLATES = [f"{p} {{}}." for art in ("a", "the") for p in (
    f"a photo of {art}", f"a blurry photo of {art}", f"a black and white photo of {art}",
    f"a low contrast photo of {art}", f"a high contrast photo of {art}", f"a bad photo of {art}",
    f"a good photo of {art}")] + ["a photo of a small {}.", "a photo of a big {}.", "a photo of the small {}.",
                                  "a photo of the big {}."]
_CALTECH_TEMPLATES = [t.format(art=art) for art in ("a", "the") for t in (
    "a photo of {art} {{}}.", "a painting of {art} {{}}.", "a sculpture of {art} {{}}.", "a sketch of {art} {{}}.",
    "a tattoo of {art} {{}}.", "a rendition of {art} {{}}.", "art of {art} {{}}.", "graffiti of {art} {{}}.",
    "a drawing of {art} {{}}.", "a doodle of {art} {{}}.")] + [
    "a plastic {}.", "a toy {}.", "a embroidered {}.", "a cartoon {}.", "a {} in a video game.", "a plushie {}.",
    "a origami {}.", "the plastic {}.", "the toy {}.", "the embroidered {}.", "the cartoon {}.",
    "the {} in a video game.", "the plushie {}.", "the origami {}."]
_DTD_TEMPLATES = [f"a photo of {art} {{}} {kind}." for art in ("a", "the")
                  for kind in ("texture", "pattern", "thing", "object")]
_FASHION_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                      "a photo of a {}, a type of clothing.", "a photo of the {}, a type of clothing."]
EMOJI_TEMPLATES = ["an emoji of {}.", "a {} emoji.", "an emoji from the category {}."]
TEMPLATES: dict[str, list[str]] = {
    "cifar10": _CIFAR_TEMPLATES, "cifar100": _CIFAR_TEMPLATES, "stl10": ["a photo of a {}.", "a photo of the {}."],
    "mnist": ['a photo of the number: "{}".'], "fashion-mnist": _FASHION_TEMPLATES,
    "pets": ["a photo of a {}, a type of pet."], "flowers102": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."], "dtd": _DTD_TEMPLATES, "caltech101": _CALTECH_TEMPLATES,
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "fgvc-aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
}
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------

def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (class names, templates)."""
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def _exists_or_raise(path: Path, name: str, layout: str, is_dir: bool = True) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise DatasetNotFoundError(f"dataset {name!r}: {'folder' if is_dir else 'file'} {path} not found; "
                                   f"expected layout: {layout}")
    return path


def _pretty(name: str) -> str:
    return name.replace("_", " ").strip()


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


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
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but the file holds {arr.size} values")
    return arr.reshape(shape)


class IdxDataset(Dataset):
    """MNIST-format images (N, H, W) uint8 and labels, yielded as grayscale (mode "L") PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], templates: Sequence[str],
                 transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
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
            samples[-1][1][ext.lower()] = _TarMember(path, m.offset_data, m.size)
    return samples


def _read_member(m: _TarMember) -> bytes:
    with open(m.path, "rb") as f:
        f.seek(m.offset)
        return f.read(m.size)


_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class TarShardDataset(Dataset):
    """Random access to webdataset tar shards through an index of member offsets (built once by reading the tar
    headers), so evaluation can use a plain map-style DataLoader with workers and a fixed order.

    Yields ``(image, label)`` from ``cls`` for classification, or ``(image, index)`` with ``captions`` read from
    ``txt`` (one caption per line) for retrieval.
    """

    def __init__(self, shards: Sequence[str], transform: Callable | None = None, task: str = "classification",
                 classnames: Sequence[str] = (), templates: Sequence[str] = ()):
        self.transform, self.task = transform, task
        self.classnames, self.templates, self.class_index = list(classnames), list(templates), None
        self.samples = []
        for shard in shards:
            for key, members in _index_tar(shard):
                image_key = next((k for k in _WDS_IMAGE_KEYS if k in members), None)
                needed = "cls" if task == "classification" else "txt"
                if image_key is None or needed not in members:
                    continue  # not a sample of this task (e.g. a stray json)
                self.samples.append((key, members[image_key], members[needed]))
        if not self.samples:
            raise ValueError(f"no samples with an image and a '{'cls' if task == 'classification' else 'txt'}' "
                             f"entry in {len(shards)} shard(s) starting with {shards[0] if shards else '-'}")
        if task == "classification":
            self.targets = [int(_read_member(m).decode().strip()) for _, _, m in self.samples]
        else:
            self.captions = [[c.strip() for c in _read_member(m).decode("utf-8").splitlines() if c.strip()]
                             for _, _, m in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = to_rgb(Image.open(io.BytesIO(_read_member(self.samples[i][1]))))
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
            raise ValueError(f"{len(paths)} images but {len(captions)} caption lists")
        empty = [p for p, c in zip(paths, captions) if not c]
        if empty:
            raise ValueError(f"{len(empty)} images have no caption (e.g. {empty[0]})")
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


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class DatasetSpec:
    """What the registry knows about a dataset name."""
    name: str
    task: str  # "classification" or "retrieval"
    build: Callable
    layout: str  # the expected on-disk layout (shown in errors and in --help)
    default_split: str = "test"
    subdirs: tuple[str, ...] = ()  # sub-folders of a data root tried before the root itself
    default_root: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    description: str = ""
    options: dict = field(default_factory=dict)


_REGISTRY: dict[tuple[str, str], DatasetSpec] = {}
_ALIASES = {
    "imagenet": "imagenet1k", "imagenet-1k": "imagenet1k", "imagenet-val": "imagenet1k", "imagenetv2": "imagenet-v2",
    "imagenet-sketch": "imagenet-sketch", "imagenetsketch": "imagenet-sketch", "imageneta": "imagenet-a",
    "imagenetr": "imagenet-r", "flowers": "flowers102", "flowers-102": "flowers102", "oxford-pets": "pets",
    "oxford-iiit-pet": "pets", "fgvc-aircraft-2013b": "fgvc-aircraft", "aircraft": "fgvc-aircraft",
    "food-101": "food101", "caltech-101": "caltech101", "sun-397": "sun397", "cifar-10": "cifar10",
    "cifar-100": "cifar100", "fashionmnist": "fashion-mnist", "stl-10": "stl10", "mscoco-captions": "mscoco",
    "coco": "mscoco", "coco-captions": "mscoco", "imagefolder": "folder", "image-folder": "folder",
    "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet", "emoji": "emoji-twitter",
}


#: readers of any data in a generic layout: a result names the data by the argument given (``wds/<x>``, ``folder/<x>``)
GENERIC_READERS = ("wds", "folder", "csv", "jsonl")


def canonical_name(name: str) -> str:
    """Registry name of ``name``: lower case, ``_`` -> ``-``, aliases resolved (``wds/<x>`` -> ``wds``,
    ``folder/<x>`` -> ``folder``...)."""
    n = name.strip().lower().replace("_", "-")
    if n.startswith("wds-"):
        return "wds"
    if "/" in n and n.split("/", 1)[0] in GENERIC_READERS:
        return n.split("/", 1)[0]
    return _ALIASES.get(n, n)


def display_name(name: str, root: str | os.PathLike | None, task: str = "classification") -> str:
    """The dataset name a result record carries: the registry name (``imagenet`` -> ``imagenet1k``); for the
    generic readers the name as given when it has a ``/`` (CLIP_benchmark's ``wds/<x>``), else
    ``<reader>/<folder or file name of the root>``, so two folder datasets never share a name."""
    spec = dataset_spec(name, task)
    if spec.name not in GENERIC_READERS:
        return spec.name
    if "/" in name:
        return name.strip()
    return f"{spec.name}/{Path(resolve_root(name, root, task)).resolve().stem}"


def _register(name: str, task: str, layout: str, **kw):
    def deco(fn):
        _REGISTRY[(task, name)] = DatasetSpec(name=name, task=task, build=fn, layout=layout,
                                              description=(fn.__doc__ or "").strip().split("\n")[0], **kw)
        return fn
    return deco


def list_datasets(task: str | None = None) -> list[str]:
    """Registered dataset names (``task``: "classification", "retrieval" or None for both), sorted."""
    return sorted({n for (t, n) in _REGISTRY if task is None or t == task})


def dataset_spec(name: str, task: str = "classification") -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` for ``task``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = (task, canonical_name(name))
    if key not in _REGISTRY:
        raise ValueError(f"unknown {task} dataset {name!r}; known: {', '.join(list_datasets(task))}")
    return _REGISTRY[key]


def resolve_root(name: str, data_root: str | os.PathLike | None, task: str = "classification") -> Path:
    """The folder (or file) a dataset is read from: the first of the spec's ``subdirs`` that exists under
    ``data_root``, else ``data_root`` itself; without ``data_root``, the spec's default root.

    Raises:
        ValueError: no ``data_root`` and the dataset has no default location.
    """
    spec = dataset_spec(name, task)
    if data_root is None:
        if spec.default_root is None:
            raise ValueError(f"dataset {spec.name!r} needs a data root (--data-root); expected layout: {spec.layout}")
        data_root = spec.default_root
    root = Path(data_root).expanduser()
    for sub in spec.subdirs:
        if (root / sub).exists():
            return root / sub
    return root


def build_dataset(name: str, root: str | os.PathLike | None, split: str | None = None,
                  transform: Callable | None = None, download: bool = False, **options) -> Dataset:
    """Builds the classification dataset ``name`` (see :func:`list_datasets`) from ``root``.

    Args:
        name: a registered name (aliases such as ``imagenet``, ``flowers``, ``wds/imagenet1k`` work).
        root: a data root (``resolve_root`` picks the dataset's usual sub-folder when present), or None for
            datasets with a default location (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``;
            the emoji sets: ``data/sources``).
        split: a split name; None for the dataset's evaluation split (``test``, ``val`` or ``all``).
        transform: applied to each PIL image.
        download: let torchvision download the files (only the torchvision-backed sets; needs a network).
        **options: dataset options: ``classnames`` / ``templates`` (lists or file paths, override the
            defaults), ``label`` ("category" or "subcategory", emoji sets), ``annotations`` (retrieval).

    Returns:
        A Dataset with ``classnames``, ``templates``, ``class_index`` (and usually ``targets``).

    Raises:
        DatasetNotFoundError: the files are missing (the message gives the expected layout).
        ValueError: unknown name or split; an empty class list; a class-name file whose length does not match.
    """
    return _build(name, root, split, transform, "classification", download=download, **options)


def build_retrieval_dataset(name: str, root: str | os.PathLike | None, split: str | None = None,
                            transform: Callable | None = None, **options) -> Dataset:
    """Builds the retrieval dataset ``name`` (``mscoco``, ``flickr30k``, ``flickr8k``, ``wds``, ``csv``,
    ``jsonl``, ``emoji-twitter``, ``emoji-google``); items are ``(image, image_index)``, captions in
    ``.captions``. Arguments and errors as :func:`build_dataset`."""
    return _build(name, root, split, transform, "retrieval", **options)


def _build(name, root, split, transform, task, **options):
    spec = dataset_spec(name, task)
    split = split or spec.default_split
    if spec.splits and split not in spec.splits:
        raise ValueError(f"dataset {spec.name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    path = resolve_root(name, root, task)
    if not path.exists():
        raise DatasetNotFoundError(f"dataset {spec.name!r}: {path} not found; expected layout: {spec.layout}")
    classnames, templates = options.pop("classnames", None), options.pop("templates", None)
    download = options.pop("download", False)
    if "download" in inspect.signature(spec.build).parameters:
        options["download"] = download
    elif download:
        raise ValueError(f"dataset {spec.name!r} cannot be downloaded by this program; expected layout: {spec.layout}")
    ds = spec.build(path, split, transform, **{**spec.options, **options})
    if task == "classification":
        _override_prompts(ds, spec.name, classnames, templates)
        if not ds.classnames:
            raise ValueError(f"dataset {spec.name!r} at {path} has an empty class list")
    ds.name = display_name(name, root, task)
    ds.root = str(path)
    ds.split = split
    return ds


def _override_prompts(ds, name, classnames, templates) -> None:
    if classnames is not None:
        names = read_lines(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
        if not names:
            raise ValueError(f"the class-name list for {name!r} is empty")
        if ds.classnames and len(names) != len(ds.classnames):
            raise ValueError(f"{len(names)} class names given for {name!r}, but the dataset has "
                             f"{len(ds.classnames)} classes")
        ds.classnames = names
    if templates is not None:
        tpl = read_lines(templates) if isinstance(templates, (str, os.PathLike)) else list(templates)
        if not tpl:
            raise ValueError(f"the template list for {name!r} is empty")
        try:
            format_prompts(["x"], tpl)
        except ValueError as e:
            where = f"--templates {templates}" if isinstance(templates, (str, os.PathLike)) else "templates"
            raise ValueError(f"{where}: {e}") from None
        ds.templates = tpl


# ---------------------------------------------------------------------------------------------------------------
# ImageNet family
# ---------------------------------------------------------------------------------------------------------------

def _timm_info(name: str) -> list[str]:
    return pkgutil.get_data("timm.data", f"_info/{name}").decode().split()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted; timm's ``imagenet_synsets.txt``)."""
    return _timm_info("imagenet_synsets.txt")


def imagenet_classnames() -> list[str]:
    """open_clip's 1000 ImageNet class names (OpenAI's cleaned names), in class-index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def _wnid_folder_samples(folder: Path, name: str, layout: str, allowed: Sequence[str]) -> list[tuple[Path, str]]:
    _exists_or_raise(folder, name, layout)
    allowed_set = set(allowed)
    dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    bad = [d.name for d in dirs if d.name not in allowed_set]
    if not dirs or bad:
        detail = f"unexpected folders {bad[:3]}" if bad else "no class folders"
        raise DatasetNotFoundError(f"dataset {name!r}: {folder} is not in the expected layout ({detail}); "
                                   f"expected layout: {layout}")
    samples = [(p, d.name) for d in dirs for p in _list_images(d)]
    if not samples:
        raise DatasetNotFoundError(f"dataset {name!r}: no images under {folder}; expected layout: {layout}")
    return samples


def _split_folder(root: Path, split: str) -> Path:
    return root / split if (root / split).is_dir() else root


_IMAGENET_LAYOUT = ("<root>/[val/]<wnid>/*.JPEG, one folder per class named by its WordNet id (n01440764 ...); "
                    "class index = position of the wnid in the sorted list of the 1000 ImageNet-1k wnids")


@_register("imagenet1k", "classification", _IMAGENET_LAYOUT, default_split="val", splits=("val", "train"),
           subdirs=("imagenet", "imagenet1k", "ILSVRC2012"))
def _imagenet1k(root, split, transform):
    """ImageNet-1k (val) as a folder of wnid folders, open_clip's 1000 class names, the 80 OpenAI templates."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    samples = _wnid_folder_samples(_split_folder(root, split), "imagenet1k", _IMAGENET_LAYOUT, wnids)
    return ImageListDataset([(p, index[w]) for p, w in samples], imagenet_classnames(), imagenet_templates(), transform)


_SKETCH_LAYOUT = "<root>/[sketch/]<wnid>/*.JPEG with the 1000 ImageNet-1k wnid folders"


@_register("imagenet-sketch", "classification", _SKETCH_LAYOUT, subdirs=("imagenet-sketch", "sketch"),
           splits=("test",))
def _imagenet_sketch(root, split, transform):
    """ImageNet-Sketch: 50,889 sketches of the 1000 ImageNet classes (wnid folders)."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    folder = root / "sketch" if (root / "sketch").is_dir() else root
    samples = _wnid_folder_samples(folder, "imagenet-sketch", _SKETCH_LAYOUT, wnids)
    return ImageListDataset([(p, index[w]) for p, w in samples], imagenet_classnames(), imagenet_templates(), transform)


_V2_LAYOUT = ("<root>/<0..999>/*.jpeg (imagenetv2-matched-frequency-format-val: one folder per class named by "
              "its ImageNet class index)")


@_register("imagenet-v2", "classification", _V2_LAYOUT, splits=("test",),
           subdirs=("imagenetv2-matched-frequency-format-val", "imagenet-v2", "imagenetv2"))
def _imagenet_v2(root, split, transform):
    """ImageNet-V2 matched-frequency: 10,000 new test images of the 1000 classes (folders named 0..999)."""
    _exists_or_raise(root, "imagenet-v2", _V2_LAYOUT)
    dirs = [d for d in root.iterdir() if d.is_dir()]
    if not dirs or not all(d.name.isdigit() and int(d.name) < 1000 for d in dirs):
        raise DatasetNotFoundError(f"dataset 'imagenet-v2': {root} is not in the expected layout; "
                                   f"expected layout: {_V2_LAYOUT}")
    samples = [(p, int(d.name)) for d in sorted(dirs, key=lambda d: int(d.name)) for p in _list_images(d)]
    return ImageListDataset(samples, imagenet_classnames(), imagenet_templates(), transform)


def _imagenet_subset(root, transform, name, synset_file, layout):
    wnids = imagenet_wnids()
    subset = _timm_info(synset_file)
    class_index = [wnids.index(w) for w in subset]
    local = {w: i for i, w in enumerate(subset)}
    samples = _wnid_folder_samples(root, name, layout, subset)
    names = imagenet_classnames()
    return ImageListDataset([(p, local[w]) for p, w in samples], [names[i] for i in class_index],
                            imagenet_templates(), transform, class_index=class_index)


_A_LAYOUT = "<root>/<wnid>/*.jpg with the 200 ImageNet-A wnid folders (imagenet-a.tar)"
_R_LAYOUT = "<root>/<wnid>/*.jpg with the 200 ImageNet-R wnid folders (imagenet-r.tar)"


@_register("imagenet-a", "classification", _A_LAYOUT, subdirs=("imagenet-a",), splits=("test",))
def _imagenet_a(root, split, transform):
    """ImageNet-A: 7,500 natural adversarial images of a 200-class ImageNet subset (``class_index`` given)."""
    return _imagenet_subset(root, transform, "imagenet-a", "imagenet_a_synsets.txt", _A_LAYOUT)


@_register("imagenet-r", "classification", _R_LAYOUT, subdirs=("imagenet-r",), splits=("test",))
def _imagenet_r(root, split, transform):
    """ImageNet-R: 30,000 renditions of a 200-class ImageNet subset (``class_index`` given)."""
    return _imagenet_subset(root, transform, "imagenet-r", "imagenet_r_synsets.txt", _R_LAYOUT)


_OBJECTNET_LAYOUT = ("<root>/images/<folder>/*.png and <root>/mappings/{folder_to_objectnet_label.json,"
                     "objectnet_to_imagenet_1k.json} (objectnet-1.0)")


@_register("objectnet", "classification", _OBJECTNET_LAYOUT, subdirs=("objectnet-1.0", "objectnet"),
           splits=("test",))
def _objectnet(root, split, transform):
    """ObjectNet: the 113 classes that overlap ImageNet (their ObjectNet names), 1-pixel border removed."""
    maps = root / "mappings"
    folder_to_label = json.loads(_exists_or_raise(maps / "folder_to_objectnet_label.json", "objectnet",
                                                  _OBJECTNET_LAYOUT, is_dir=False).read_text())
    to_imagenet = json.loads(_exists_or_raise(maps / "objectnet_to_imagenet_1k.json", "objectnet",
                                              _OBJECTNET_LAYOUT, is_dir=False).read_text())
    images = _exists_or_raise(root / "images", "objectnet", _OBJECTNET_LAYOUT)
    labels = sorted({lab for lab in folder_to_label.values() if lab in to_imagenet})
    local = {lab: i for i, lab in enumerate(labels)}
    samples = []
    for folder, lab in sorted(folder_to_label.items()):
        if lab in local and (images / folder).is_dir():
            samples += [(p, local[lab]) for p in _list_images(images / folder)]
    return ImageListDataset(samples, [lab.lower() for lab in labels], imagenet_templates(), transform, crop_border=1)


# ---------------------------------------------------------------------------------------------------------------
# Generic folders, Tiny ImageNet, CLIP_benchmark webdataset
# ---------------------------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = ("<root>/[<split>/]<class>/*.jpg (one folder per class, sorted names = class order); class names "
                  "from --classnames FILE, <root>/classnames.txt (one per line, same order) or the folder names; "
                  "templates from --templates FILE or <root>/templates.txt")


@_register("folder", "classification", _FOLDER_LAYOUT, splits=())
def _folder(root, split, transform):
    """Any image folder with one sub-folder per class (an optional class-name file gives readable names)."""
    folder = _split_folder(root, split)
    _exists_or_raise(folder, "folder", _FOLDER_LAYOUT)
    dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not dirs:
        raise DatasetNotFoundError(f"dataset 'folder': {folder} has no class folders; expected layout: "
                                   f"{_FOLDER_LAYOUT}")
    samples = [(p, i) for i, d in enumerate(dirs) for p in _list_images(d)]
    names = [_pretty(d.name) for d in dirs]
    for cand in (folder / "classnames.txt", root / "classnames.txt"):
        if cand.is_file():
            names = read_lines(cand)
            if len(names) != len(dirs):
                raise ValueError(f"{cand} lists {len(names)} class names but {folder} has {len(dirs)} class folders")
            break
    templates = GENERIC_TEMPLATES
    for cand in (folder / "templates.txt", root / "templates.txt"):
        if cand.is_file():
            templates = read_lines(cand)
            break
    return ImageListDataset(samples, names, templates, transform)


_TINY_LAYOUT = ("<root>/tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*.JPEG,"
                "val/images/*.JPEG,val/val_annotations.txt}")


@_register("tiny-imagenet", "classification", _TINY_LAYOUT, default_split="val", splits=("train", "val"),
           subdirs=("tiny-imagenet-200",))
def _tiny_imagenet(root, split, transform):
    """Tiny ImageNet (200 classes, 64x64): train folders, val images listed in val_annotations.txt."""
    wnids = sorted(read_lines(_exists_or_raise(root / "wnids.txt", "tiny-imagenet", _TINY_LAYOUT, is_dir=False)))
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for ln in read_lines(root / "words.txt"):
            w, _, text = ln.partition("\t")
            words[w] = text.split(",")[0].strip()
    if split == "train":
        folder = _exists_or_raise(root / "train", "tiny-imagenet", _TINY_LAYOUT)
        samples = [(p, index[w]) for w in wnids for p in _list_images(folder / w)]
    else:
        ann = _exists_or_raise(root / "val" / "val_annotations.txt", "tiny-imagenet", _TINY_LAYOUT, is_dir=False)
        samples = []
        for ln in read_lines(ann):
            fname, w = ln.split("\t")[:2]
            samples.append((root / "val" / "images" / fname, index[w]))
    return ImageListDataset(samples, [words.get(w, w) for w in wnids], GENERIC_TEMPLATES, transform)


_WDS_LAYOUT = ("<root>/{classnames.txt,zeroshot_classification_templates.txt,<split>/nshards.txt,"
               "<split>/0.tar..<split>/<n-1>.tar} with samples <key>.{jpg|png|webp} + <key>.cls "
               "(CLIP_benchmark's webdataset layout)")
_WDS_RET_LAYOUT = ("<root>/{<split>/nshards.txt,<split>/0.tar..<split>/<n-1>.tar} with samples <key>.{jpg|png|webp} "
                   "+ <key>.txt (captions, one per line; CLIP_benchmark's webdataset layout)")


def _wds_shards(root: Path, split: str, layout: str) -> list[str]:
    nfile = _exists_or_raise(root / split / "nshards.txt", "wds", layout, is_dir=False)
    n = int(nfile.read_text().strip())
    shards = [root / split / f"{i}.tar" for i in range(n)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DatasetNotFoundError(f"dataset 'wds': {nfile} lists {n} shards but {missing[0]} is missing; "
                                   f"expected layout: {layout}")
    return [str(s) for s in shards]


@_register("wds", "classification", _WDS_LAYOUT, splits=())
def _wds_classification(root, split, transform):
    """CLIP_benchmark's webdataset layout (e.g. the clip-benchmark/wds_* hub datasets, downloaded)."""
    shards = _wds_shards(root, split, _WDS_LAYOUT)
    classnames = read_lines(_exists_or_raise(root / "classnames.txt", "wds", _WDS_LAYOUT, is_dir=False))
    tfile = root / "zeroshot_classification_templates.txt"
    templates = read_lines(tfile) if tfile.is_file() else GENERIC_TEMPLATES
    return TarShardDataset(shards, transform, "classification", classnames, templates)


@_register("wds", "retrieval", _WDS_RET_LAYOUT, splits=())
def _wds_retrieval(root, split, transform):
    """CLIP_benchmark's retrieval webdataset layout (``txt``: captions, one per line)."""
    return TarShardDataset(_wds_shards(root, split, _WDS_RET_LAYOUT), transform, "retrieval")


# ---------------------------------------------------------------------------------------------------------------
# MNIST-format (idx) datasets
# ---------------------------------------------------------------------------------------------------------------

def _find_idx(root: Path, prefix: str, kind: str, name: str, layout: str) -> Path:
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for suffix in ("", ".gz"):
            p = folder / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{suffix}"
            if p.is_file():
                return p
    raise DatasetNotFoundError(f"dataset {name!r}: no {prefix}-{kind} idx file under {root}; expected layout: {layout}")


def _idx_dataset(root, split, transform, name, classnames, layout):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(root, prefix, "images", name, layout))
    labels = read_idx(_find_idx(root, prefix, "labels", name, layout))
    return IdxDataset(images, labels, classnames, TEMPLATES[name], transform)


_FMNIST_LAYOUT = ("<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (Debian's dataset-fashion-mnist in "
                  "/usr/share/datasets/fashion-mnist, or torchvision's <root>/FashionMNIST/raw)")
_MNIST_LAYOUT = "<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (or torchvision's <root>/MNIST/raw)"


@_register("fashion-mnist", "classification", _FMNIST_LAYOUT, default_root="/usr/share/datasets/fashion-mnist",
           subdirs=("fashion-mnist",))
def _fashion_mnist(root, split, transform):
    """Fashion-MNIST from idx files (60k train / 10k test, 28x28 grayscale, 10 classes)."""
    return _idx_dataset(root, split, transform, "fashion-mnist", FASHION_MNIST_CLASSES, _FMNIST_LAYOUT)


@_register("mnist", "classification", _MNIST_LAYOUT, subdirs=("mnist",))
def _mnist(root, split, transform):
    """MNIST from idx files (60k train / 10k test, 28x28 grayscale digits)."""
    return _idx_dataset(root, split, transform, "mnist", [str(i) for i in range(10)], _MNIST_LAYOUT)


@_register("digits", "classification", "installed with scikit-learn (no files)", default_root=".",
           splits=("train", "test"))
def _digits(root, split, transform):
    """scikit-learn's handwritten digits (1,797 images, 8x8 grayscale scaled to 0-255, 10 classes): the first
    1,000 images are ``train``, the other 797 ``test`` (the set has no official split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    sl = slice(0, 1000) if split == "train" else slice(1000, None)
    return IdxDataset(images[sl], d.target[sl], [str(i) for i in range(10)],
                      ["a photo of the number: {}.", "a handwritten digit {}."], transform)


# ---------------------------------------------------------------------------------------------------------------
# torchvision readers on local files
# ---------------------------------------------------------------------------------------------------------------

def _torchvision(name: str, layout: str, make: Callable[[], Dataset]) -> Dataset:
    try:
        return make()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if "not found" in str(e).lower() or "download" in str(e).lower():
            raise DatasetNotFoundError(f"dataset {name!r}: {str(e).splitlines()[0].rstrip('.')}; expected layout: {layout} "
                                       f"(or pass --download with a network)") from None
        raise


def _tv_register(name, layout, splits=("train", "test"), subdirs=(), default_split="test"):
    return _register(name, "classification", layout, splits=splits, subdirs=subdirs, default_split=default_split)


@_tv_register("cifar10", "<root>/cifar-10-batches-py/ (the python version)", subdirs=("cifar10",))
def _cifar10(root, split, transform, download=False):
    """CIFAR-10 (torchvision reader)."""
    from torchvision.datasets import CIFAR10
    ds = _torchvision("cifar10", "<root>/cifar-10-batches-py/",
                      lambda: CIFAR10(str(root), train=split == "train", transform=None, download=download))
    return LabeledDataset(ds, ds.classes, TEMPLATES["cifar10"], ds.targets, transform=transform)


@_tv_register("cifar100", "<root>/cifar-100-python/ (the python version)", subdirs=("cifar100",))
def _cifar100(root, split, transform, download=False):
    """CIFAR-100 (torchvision reader)."""
    from torchvision.datasets import CIFAR100
    ds = _torchvision("cifar100", "<root>/cifar-100-python/",
                      lambda: CIFAR100(str(root), train=split == "train", transform=None, download=download))
    return LabeledDataset(ds, [_pretty(c) for c in ds.classes], TEMPLATES["cifar100"], ds.targets, transform=transform)


@_tv_register("stl10", "<root>/stl10_binary/{train,test}_{X,y}.bin, class_names.txt", subdirs=("stl10",))
def _stl10(root, split, transform, download=False):
    """STL-10 (torchvision reader)."""
    from torchvision.datasets import STL10
    ds = _torchvision("stl10", "<root>/stl10_binary/",
                      lambda: STL10(str(root), split=split, transform=None, download=download))
    return LabeledDataset(ds, ds.classes, TEMPLATES["stl10"], ds.labels, transform=transform)


@_tv_register("pets", "<root>/oxford-iiit-pet/{images,annotations}/", splits=("train", "trainval", "test"),
              subdirs=("pets",))
def _pets(root, split, transform, download=False):
    """Oxford-IIIT Pets, 37 breeds (torchvision reader; ``train`` = the official ``trainval``)."""
    from torchvision.datasets import OxfordIIITPet
    tv_split = "test" if split == "test" else "trainval"
    ds = _torchvision("pets", "<root>/oxford-iiit-pet/{images,annotations}/",
                      lambda: OxfordIIITPet(str(root), split=tv_split, transform=None, download=download))
    return LabeledDataset(ds, [c.lower() for c in ds.classes], TEMPLATES["pets"], ds._labels, transform=transform)


def _concat_splits(make, splits, classnames, templates, get_targets, transform):
    parts = [make(s) for s in splits]
    ds = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return LabeledDataset(ds, classnames(parts[0]), templates, [t for p in parts for t in get_targets(p)],
                          transform=transform)


@_tv_register("flowers102", "<root>/flowers-102/{jpg/,imagelabels.mat,setid.mat}",
              splits=("train", "val", "trainval", "test"), subdirs=("flowers102",))
def _flowers102(root, split, transform, download=False):
    """Oxford Flowers-102 (torchvision reader; ``trainval`` = train + val)."""
    from torchvision.datasets import Flowers102

    def make(s):
        return _torchvision("flowers102", "<root>/flowers-102/",
                            lambda: Flowers102(str(root), split=s, transform=None, download=download))
    splits = ("train", "val") if split == "trainval" else (split,)
    return _concat_splits(make, splits, lambda d: d.classes, TEMPLATES["flowers102"], lambda d: d._labels, transform)


@_tv_register("food101", "<root>/food-101/{images/,meta/{train,test}.json}", subdirs=("food101",))
def _food101(root, split, transform, download=False):
    """Food-101 (torchvision reader)."""
    from torchvision.datasets import Food101
    ds = _torchvision("food101", "<root>/food-101/",
                      lambda: Food101(str(root), split=split, transform=None, download=download))
    return LabeledDataset(ds, [_pretty(c) for c in ds.classes], TEMPLATES["food101"], ds._labels, transform=transform)


@_tv_register("dtd", "<root>/dtd/dtd/{images/,labels/}", splits=("train", "val", "trainval", "test"))
def _dtd(root, split, transform, download=False):
    """Describable Textures, partition 1 (torchvision reader; ``trainval`` = train + val)."""
    from torchvision.datasets import DTD

    def make(s):
        return _torchvision("dtd", "<root>/dtd/dtd/{images,labels}/",
                            lambda: DTD(str(root), split=s, transform=None, download=download))
    splits = ("train", "val") if split == "trainval" else (split,)
    return _concat_splits(make, splits, lambda d: d.classes, TEMPLATES["dtd"], lambda d: d._labels, transform)


@_tv_register("fgvc-aircraft", "<root>/fgvc-aircraft-2013b/data/", splits=("train", "val", "trainval", "test"),
              subdirs=("fgvc-aircraft",))
def _aircraft(root, split, transform, download=False):
    """FGVC Aircraft, 100 variants (torchvision reader)."""
    from torchvision.datasets import FGVCAircraft
    ds = _torchvision("fgvc-aircraft", "<root>/fgvc-aircraft-2013b/data/",
                      lambda: FGVCAircraft(str(root), split=split, transform=None, download=download))
    return LabeledDataset(ds, ds.classes, TEMPLATES["fgvc-aircraft"], ds._labels, transform=transform)


_CALTECH_NAMES = {"Faces": "face", "Faces_easy": "face easy", "Leopards": "leopard", "Motorbikes": "motorbike",
                  "airplanes": "airplane"}


@_tv_register("caltech101", "<root>/caltech101/101_ObjectCategories/<class>/*.jpg")
def _caltech101(root, split, transform, download=False):
    """Caltech-101 (torchvision reader; split: 30 images per class for train, the rest test, fixed seed 0)."""
    from torchvision.datasets import Caltech101
    ds = _torchvision("caltech101", "<root>/caltech101/101_ObjectCategories/",
                      lambda: Caltech101(str(root), target_type="category", download=download))
    indices = _per_class_split(ds.y, 30, split)
    names = [_CALTECH_NAMES.get(c, _pretty(c).lower()) for c in ds.categories]
    return LabeledDataset(ds, names, TEMPLATES["caltech101"], [ds.y[i] for i in indices], indices, transform)


def _per_class_split(labels: Sequence[int], n_train: int, split: str, seed: int = 0) -> list[int]:
    """Deterministic split: per class, ``n_train`` random (seeded) samples for train, the rest for test."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train += idx[:n_train].tolist()
        test += idx[n_train:].tolist()
    return sorted(train if split == "train" else test)


@_tv_register("sun397", "<root>/SUN397/<letter>/<class>/*.jpg, ClassName.txt [, Training_01.txt, Testing_01.txt]",
              subdirs=("sun397",))
def _sun397(root, split, transform, download=False):
    """SUN397 (torchvision reader; split: the official partition 1 when Training_01.txt / Testing_01.txt are
    in ``<root>/SUN397`` or ``<root>``, else 50 images per class for train, the rest test, seed 0)."""
    from torchvision.datasets import SUN397
    ds = _torchvision("sun397", "<root>/SUN397/", lambda: SUN397(str(root), download=download))
    # torchvision lists the files in directory order: sort them so the order (and the split) is the same everywhere
    ds._image_files, ds._labels = map(list, zip(*sorted(zip(ds._image_files, ds._labels), key=lambda p: str(p[0]))))
    part = "Training_01.txt" if split == "train" else "Testing_01.txt"
    part_file = next((p for p in (root / "SUN397" / part, root / part) if p.is_file()), None)
    if part_file is not None:
        wanted = set(read_lines(part_file))
        base = Path(ds._data_dir)
        indices = [i for i, f in enumerate(ds._image_files) if "/" + str(Path(f).relative_to(base)) in wanted]
    else:
        indices = _per_class_split(ds._labels, 50, split)
    names = [_pretty(c.replace("/", " ")) for c in ds.classes]
    return LabeledDataset(ds, names, TEMPLATES["sun397"], [ds._labels[i] for i in indices], indices, transform)


# ---------------------------------------------------------------------------------------------------------------
# Emoji sets (emoji-datasource-{twitter,google}@16, installed by scripts/get_demo_data.sh)
# ---------------------------------------------------------------------------------------------------------------

_EMOJI_LAYOUT = ("<root>/emoji-datasource-{set}/{emoji.json,img/{set}/64/*.png} (npm pack emoji-datasource-{set}"
                 "@16.0.0, unpacked; scripts/get_demo_data.sh puts it in data/sources)")
EMOJI_SKIPPED_CATEGORIES = ("Component",)


def _emoji_dir(root: Path, style: str) -> Path:
    for cand in (root / f"emoji-datasource-{style}", root / "sources" / f"emoji-datasource-{style}", root):
        if (cand / "emoji.json").is_file():
            return cand
    raise DatasetNotFoundError(f"dataset 'emoji-{style}': no emoji.json under {root}; expected layout: "
                               f"{_EMOJI_LAYOUT.replace('{set}', style)}")


def _emoji_entries(root: Path, style: str, split: str) -> tuple[Path, list[dict]]:
    base = _emoji_dir(root, style)
    entries = json.loads((base / "emoji.json").read_text(encoding="utf-8"))
    img_dir = base / "img" / style / "64"
    _exists_or_raise(img_dir, f"emoji-{style}", _EMOJI_LAYOUT.replace("{set}", style))
    entries = sorted((e for e in entries if e.get("category") not in EMOJI_SKIPPED_CATEGORIES
                      and e.get(f"has_img_{style}", True) and (img_dir / e["image"]).is_file()),
                     key=lambda e: e.get("sort_order", 0))
    if split == "train":
        entries = [e for i, e in enumerate(entries) if i % 5 != 0]
    elif split == "test":
        entries = [e for i, e in enumerate(entries) if i % 5 == 0]
    return img_dir, entries


def _emoji_classname(label: str, field_name: str) -> str:
    return label.lower() if field_name == "category" else label.replace("-", " ").lower()


def _emoji_classification(root, split, transform, style, label="category"):
    if label not in ("category", "subcategory"):
        raise ValueError(f"emoji label must be 'category' or 'subcategory', got {label!r}")
    img_dir, entries = _emoji_entries(root, style, split)
    _, all_entries = _emoji_entries(root, style, "all")
    classes = sorted({e[label] for e in all_entries})
    index = {c: i for i, c in enumerate(classes)}
    samples = [(img_dir / e["image"], index[e[label]]) for e in entries]
    return ImageListDataset(samples, [_emoji_classname(c, label) for c in classes], EMOJI_TEMPLATES, transform,
                            background=(255, 255, 255))


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


def emoji_captions(entry: dict) -> list[str]:
    """The captions of one emoji (one image per emoji, the base image without skin-tone variants):

    1. ``"an emoji of <name>"``: the catalogue name, lower case, ``_`` read as a space (the training demo's
       captions on Noto emoji use the same name, e.g. "an emoji of grinning face");
    2. ``"an emoji of <short name>"`` for each short name with ``_`` / ``-`` read as spaces, kept when it has a
       run of 3+ letters, differs from the name and is not a code (``flag-eg``, ``u5272``, ``+1`` are left out).

    Duplicates are dropped, order kept.
    """
    name = _words(entry["name"])
    out = [f"an emoji of {name}"]
    for s in entry.get("short_names") or []:
        alias = _words(s.replace("-", " "))
        if not re.search(r"[a-z]{3}", alias) or alias == name or alias.startswith("flag ") \
                or re.fullmatch(r"u[0-9a-f]{4,5}", alias):
            continue
        cap = f"an emoji of {alias}"
        if cap not in out:
            out.append(cap)
    return out


def _emoji_retrieval(root, split, transform, style):
    img_dir, entries = _emoji_entries(root, style, split)
    return RetrievalDataset([img_dir / e["image"] for e in entries], [emoji_captions(e) for e in entries],
                            transform, background=(255, 255, 255))


for _style in ("twitter", "google"):
    _lay = _EMOJI_LAYOUT.replace("{set}", _style)
    _kw = dict(default_split="all", splits=("all", "train", "test"), default_root="data/sources",
               subdirs=(f"emoji-datasource-{_style}",))
    _register(f"emoji-{_style}", "classification", _lay, options={"style": _style}, **_kw)(_emoji_classification)
    _register(f"emoji-{_style}-subcategory", "classification", _lay, options={"style": _style, "label": "subcategory"},
              **_kw)(_emoji_classification)
    _register(f"emoji-{_style}", "retrieval", _lay, options={"style": _style}, **_kw)(_emoji_retrieval)
_REGISTRY[("classification", "emoji-twitter")].description = (
    "Twitter emoji (1,906 base emoji): zero-shot over the 9 categories (Component left out); split all/train/test")
_REGISTRY[("classification", "emoji-google")].description = (
    "Google Noto emoji (1,906 base emoji): zero-shot over the 9 categories; split all/train/test")
_REGISTRY[("classification", "emoji-twitter-subcategory")].description = "Twitter emoji, subcategories as classes"
_REGISTRY[("classification", "emoji-google-subcategory")].description = "Google emoji, subcategories as classes"
_REGISTRY[("retrieval", "emoji-twitter")].description = "Twitter emoji, captions from name and short names"
_REGISTRY[("retrieval", "emoji-google")].description = "Google emoji, captions from name and short names"


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
    _exists_or_raise(ann, name, layout, is_dir=False)
    images = [im for im in json.loads(ann.read_text(encoding="utf-8"))["images"] if im.get("split") == split]
    if not images:
        raise ValueError(f"dataset {name!r}: {ann} has no images in split {split!r}")

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
    _register(_name, "retrieval", f"<root>/{_json} + images (Karpathy split file)", splits=("train", "val", "test",
              "restval"), subdirs=_subdirs)(_make)


_CSV_LAYOUT = ("a CSV/TSV file with a header row and columns 'filepath' and 'caption' (paths relative to the file's "
               "folder; rows with the same filepath are several captions of one image), or a JSONL file with the "
               "same keys per line")


def _caption_table(root: Path, split, transform, fmt: str, img_key="filepath", caption_key="caption", sep=None):
    _exists_or_raise(root, fmt, _CSV_LAYOUT, is_dir=False)
    rows: list[dict] = []
    if fmt == "jsonl":
        with open(root, encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    else:
        sep = sep or ("\t" if root.suffix.lower() == ".tsv" else ",")
        with open(root, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=sep))
    if rows and (img_key not in rows[0] or caption_key not in rows[0]):
        raise ValueError(f"{root} needs the keys {img_key!r} and {caption_key!r}, found {sorted(rows[0])}")
    grouped: dict[str, list[str]] = {}
    for r in rows:
        grouped.setdefault(r[img_key], []).append(str(r[caption_key]).strip())
    if not grouped:
        raise ValueError(f"{root} holds no rows")
    paths = [p if os.path.isabs(p) else root.parent / p for p in grouped]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} images listed in {root} are missing (e.g. {missing[0]}); "
                                   f"expected layout: {_CSV_LAYOUT}")
    return RetrievalDataset(paths, list(grouped.values()), transform)


_register("csv", "retrieval", _CSV_LAYOUT, splits=(), default_split="all")(
    lambda root, split, transform, **kw: _caption_table(root, split, transform, "csv", **kw))
_register("jsonl", "retrieval", _CSV_LAYOUT, splits=(), default_split="all")(
    lambda root, split, transform, **kw: _caption_table(root, split, transform, "jsonl", **kw))
_REGISTRY[("retrieval", "csv")].description = "a CSV/TSV of filepath,caption (several rows per image allowed)"
_REGISTRY[("retrieval", "jsonl")].description = "a JSONL of {filepath, caption} (several rows per image allowed)"
