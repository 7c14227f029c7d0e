"""ImageNet-1k and its distribution shifts (V2, Sketch, A, R, ObjectNet): readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

import json
import pkgutil
from collections.abc import Sequence
from pathlib import Path

from diffclip.eval.readers_base import (
    DatasetNotFoundError,
    ImageListDataset,
    exists_or_raise,
    imagenet_templates,
    list_images,
)
from diffclip.eval.readers_registry import register

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
    exists_or_raise(folder, name, layout)
    allowed_set = set(allowed)
    dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    bad = [d.name for d in dirs if d.name not in allowed_set]
    if not dirs or bad:
        detail = f"unexpected folders {bad[:3]}" if bad else "no class folders"
        raise DatasetNotFoundError(f"dataset {name!r}: {folder} is not in the expected layout ({detail}); "
                                   f"expected layout: {layout}")
    samples = [(p, d.name) for d in dirs for p in list_images(d)]
    if not samples:
        raise DatasetNotFoundError(f"dataset {name!r}: no images under {folder}; expected layout: {layout}")
    return samples


def _split_folder(root: Path, split: str) -> Path:
    return root / split if (root / split).is_dir() else root


_IMAGENET_LAYOUT = ("<root>/[val/]<wnid>/*.JPEG, one folder per class named by its WordNet id (n01440764 ...); "
                    "class index = position of the wnid in the sorted list of the 1000 ImageNet-1k wnids")


@register("imagenet1k", "classification", _IMAGENET_LAYOUT, default_split="val", splits=("val", "train"),
           subdirs=("imagenet", "imagenet1k", "ILSVRC2012"))
def _imagenet1k(root, split, transform):
    """ImageNet-1k (val) as a folder of wnid folders, open_clip's 1000 class names, the 80 OpenAI templates."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    samples = _wnid_folder_samples(_split_folder(root, split), "imagenet1k", _IMAGENET_LAYOUT, wnids)
    return ImageListDataset([(p, index[w]) for p, w in samples], imagenet_classnames(), imagenet_templates(), transform)


_SKETCH_LAYOUT = "<root>/[sketch/]<wnid>/*.JPEG with the 1000 ImageNet-1k wnid folders"


@register("imagenet-sketch", "classification", _SKETCH_LAYOUT, subdirs=("imagenet-sketch", "sketch"),
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


@register("imagenet-v2", "classification", _V2_LAYOUT, splits=("test",),
           subdirs=("imagenetv2-matched-frequency-format-val", "imagenet-v2", "imagenetv2"))
def _imagenet_v2(root, split, transform):
    """ImageNet-V2 matched-frequency: 10,000 new test images of the 1000 classes (folders named 0..999)."""
    exists_or_raise(root, "imagenet-v2", _V2_LAYOUT)
    dirs = [d for d in root.iterdir() if d.is_dir()]
    if not dirs or not all(d.name.isdigit() and int(d.name) < 1000 for d in dirs):
        raise DatasetNotFoundError(f"dataset 'imagenet-v2': {root} is not in the expected layout; "
                                   f"expected layout: {_V2_LAYOUT}")
    samples = [(p, int(d.name)) for d in sorted(dirs, key=lambda d: int(d.name)) for p in list_images(d)]
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


@register("imagenet-a", "classification", _A_LAYOUT, subdirs=("imagenet-a",), splits=("test",))
def _imagenet_a(root, split, transform):
    """ImageNet-A: 7,500 natural adversarial images of a 200-class ImageNet subset (``class_index`` given)."""
    return _imagenet_subset(root, transform, "imagenet-a", "imagenet_a_synsets.txt", _A_LAYOUT)


@register("imagenet-r", "classification", _R_LAYOUT, subdirs=("imagenet-r",), splits=("test",))
def _imagenet_r(root, split, transform):
    """ImageNet-R: 30,000 renditions of a 200-class ImageNet subset (``class_index`` given)."""
    return _imagenet_subset(root, transform, "imagenet-r", "imagenet_r_synsets.txt", _R_LAYOUT)


_OBJECTNET_LAYOUT = ("<root>/images/<folder>/*.png and <root>/mappings/{folder_to_objectnet_label.json,"
                     "objectnet_to_imagenet_1k.json} (objectnet-1.0)")


@register("objectnet", "classification", _OBJECTNET_LAYOUT, subdirs=("objectnet-1.0", "objectnet"),
           splits=("test",))
def _objectnet(root, split, transform):
    """ObjectNet: the 113 classes that overlap ImageNet (their ObjectNet names), 1-pixel border removed."""
    maps = root / "mappings"
    folder_to_label = json.loads(exists_or_raise(maps / "folder_to_objectnet_label.json", "objectnet",
                                                  _OBJECTNET_LAYOUT, is_dir=False).read_text())
    to_imagenet = json.loads(exists_or_raise(maps / "objectnet_to_imagenet_1k.json", "objectnet",
                                              _OBJECTNET_LAYOUT, is_dir=False).read_text())
    images = exists_or_raise(root / "images", "objectnet", _OBJECTNET_LAYOUT)
    labels = sorted({lab for lab in folder_to_label.values() if lab in to_imagenet})
    local = {lab: i for i, lab in enumerate(labels)}
    samples = []
    for folder, lab in sorted(folder_to_label.items()):
        if lab in local and (images / folder).is_dir():
            samples += [(p, local[lab]) for p in list_images(images / folder)]
    return ImageListDataset(samples, [lab.lower() for lab in labels], imagenet_templates(), transform, crop_border=1)
