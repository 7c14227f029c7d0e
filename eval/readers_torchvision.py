"""torchvision's classification datasets read from local files: readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffclip.eval.readers_base import TEMPLATES, DatasetNotFoundError, LabeledDataset, pretty_name, read_lines
from diffclip.eval.readers_registry import register
from torch.utils.data import Dataset

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
    return register(name, "classification", layout, splits=splits, subdirs=subdirs, default_split=default_split)


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
    return LabeledDataset(ds, [pretty_name(c) for c in ds.classes], TEMPLATES["cifar100"], ds.targets, transform=transform)


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
    return LabeledDataset(ds, [pretty_name(c) for c in ds.classes], TEMPLATES["food101"], ds._labels, transform=transform)


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
    names = [_CALTECH_NAMES.get(c, pretty_name(c).lower()) for c in ds.categories]
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
    names = [pretty_name(c.replace("/", " ")) for c in ds.classes]
    return LabeledDataset(ds, names, TEMPLATES["sun397"], [ds._labels[i] for i in indices], indices, transform)
