"""Generic image folders, Tiny ImageNet, CLIP_benchmark's webdataset layout, idx (MNIST-format) files and scikit-learn's digits: readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from diffclip.eval.readers_base import (
    FASHION_MNIST_CLASSES,
    GENERIC_TEMPLATES,
    TEMPLATES,
    DatasetNotFoundError,
    IdxDataset,
    ImageListDataset,
    TarShardDataset,
    exists_or_raise,
    list_images,
    pretty_name,
    read_idx,
    read_lines,
    text_lines,
)
from diffclip.eval.readers_imagenet import (
    _split_folder,
)
from diffclip.eval.readers_registry import register

from diffclip.errors import InputError
from diffclip.images import IMAGE_EXTENSIONS

# ---------------------------------------------------------------------------------------------------------------
# Generic folders, Tiny ImageNet, CLIP_benchmark webdataset
# ---------------------------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = ("<root>/[<split>/]<class>/*.jpg (one folder per class, sorted names = class order, none empty); "
                  "class names "
                  "from --classnames FILE, <root>/classnames.txt (one per line, same order) or the folder names; "
                  "templates from --templates FILE or <root>/templates.txt")


@register("folder", "classification", _FOLDER_LAYOUT, splits=())
def _folder(root, split, transform):
    """Any image folder with one sub-folder per class (an optional class-name file gives readable names)."""
    folder = _split_folder(root, split)
    exists_or_raise(folder, "folder", _FOLDER_LAYOUT)
    dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not dirs:
        raise DatasetNotFoundError(f"dataset 'folder': {folder} has no class folders; expected layout: "
                                   f"{_FOLDER_LAYOUT}")
    samples = []
    for i, d in enumerate(dirs):  # an empty class would still be a class: a free top-5 hit, a wrong class count
        images = list_images(d)
        if not images:
            raise InputError(f"dataset 'folder': class folder {d} holds no image (extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder")
        samples += [(p, i) for p in images]
    names = [pretty_name(d.name) for d in dirs]
    for cand in (folder / "classnames.txt", root / "classnames.txt"):
        if cand.is_file():
            names = read_lines(cand)
            if len(names) != len(dirs):
                raise InputError(f"{cand} lists {len(names)} class names but {folder} has {len(dirs)} class folders")
            break
    templates = GENERIC_TEMPLATES
    for cand in (folder / "templates.txt", root / "templates.txt"):
        if cand.is_file():
            templates = read_lines(cand)
            break
    return ImageListDataset(samples, names, templates, transform)


_TINY_LAYOUT = ("<root>/tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*.JPEG,"
                "val/images/*.JPEG,val/val_annotations.txt}")


@register("tiny-imagenet", "classification", _TINY_LAYOUT, default_split="val", splits=("train", "val"),
           subdirs=("tiny-imagenet-200",))
def _tiny_imagenet(root, split, transform):
    """Tiny ImageNet (200 classes, 64x64): train folders, val images listed in val_annotations.txt."""
    wnids = sorted(read_lines(exists_or_raise(root / "wnids.txt", "tiny-imagenet", _TINY_LAYOUT, is_dir=False)))
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for ln in read_lines(root / "words.txt"):
            w, _, text = ln.partition("\t")
            words[w] = text.split(",")[0].strip()
    if split == "train":
        folder = exists_or_raise(root / "train", "tiny-imagenet", _TINY_LAYOUT)
        samples = [(p, index[w]) for w in wnids for p in list_images(folder / w)]
    else:
        ann = exists_or_raise(root / "val" / "val_annotations.txt", "tiny-imagenet", _TINY_LAYOUT, is_dir=False)
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
    nfile = exists_or_raise(root / split / "nshards.txt", "wds", layout, is_dir=False)
    text = "".join(text_lines(nfile)).strip()
    if not text.isdigit():
        raise InputError(f"{nfile}: expected a number of shards, got {text[:20]!r}")
    n = int(text)
    shards = [root / split / f"{i}.tar" for i in range(n)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DatasetNotFoundError(f"dataset 'wds': {nfile} lists {n} shards but {missing[0]} is missing; "
                                   f"expected layout: {layout}")
    return [str(s) for s in shards]


@register("wds", "classification", _WDS_LAYOUT, splits=())
def _wds_classification(root, split, transform):
    """CLIP_benchmark's webdataset layout (e.g. the clip-benchmark/wds_* hub datasets, downloaded)."""
    shards = _wds_shards(root, split, _WDS_LAYOUT)
    classnames = read_lines(exists_or_raise(root / "classnames.txt", "wds", _WDS_LAYOUT, is_dir=False))
    tfile = root / "zeroshot_classification_templates.txt"
    templates = read_lines(tfile) if tfile.is_file() else GENERIC_TEMPLATES
    return TarShardDataset(shards, transform, "classification", classnames, templates)


@register("wds", "retrieval", _WDS_RET_LAYOUT, splits=())
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


@register("fashion-mnist", "classification", _FMNIST_LAYOUT, default_root="/usr/share/datasets/fashion-mnist",
           subdirs=("fashion-mnist",))
def _fashion_mnist(root, split, transform):
    """Fashion-MNIST from idx files (60k train / 10k test, 28x28 grayscale, 10 classes)."""
    return _idx_dataset(root, split, transform, "fashion-mnist", FASHION_MNIST_CLASSES, _FMNIST_LAYOUT)


@register("mnist", "classification", _MNIST_LAYOUT, subdirs=("mnist",))
def _mnist(root, split, transform):
    """MNIST from idx files (60k train / 10k test, 28x28 grayscale digits)."""
    return _idx_dataset(root, split, transform, "mnist", [str(i) for i in range(10)], _MNIST_LAYOUT)


@register("digits", "classification", "installed with scikit-learn (no files)", default_root=".",
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
