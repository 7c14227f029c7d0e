"""The dataset registry of the evaluation readers, one way (as timm's ``_registry.py``): each family module
(``readers_imagenet``, ``readers_folders``, ``readers_torchvision``, ``readers_emoji``, ``readers_retrieval``)
registers its readers here with :func:`register`; :mod:`diffclip.eval.readers` imports the families and builds
datasets from :data:`REGISTRY`. This module imports none of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from diffclip.errors import InputError

__all__ = ["DatasetSpec", "REGISTRY", "GENERIC_READERS", "register", "canonical_name", "list_datasets",
           "dataset_spec"]


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


#: ``(task, name)`` -> :class:`DatasetSpec`, filled by :func:`register`
REGISTRY: dict[tuple[str, str], DatasetSpec] = {}
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
GENERIC_READERS = ("wds", "folder", "csv", "jsonl", "img2dataset")


def register(name: str, task: str, layout: str, **kw):
    """Decorator: registers ``fn(root, split, transform, **options)`` as the reader of ``name`` for ``task``;
    ``kw`` are :class:`DatasetSpec` fields (the description defaults to the first line of the docstring)."""
    def deco(fn):
        REGISTRY[(task, name)] = DatasetSpec(name=name, task=task, build=fn, layout=layout,
                                             description=(fn.__doc__ or "").strip().split("\n")[0], **kw)
        return fn
    return deco


def canonical_name(name: str) -> str:
    """Registry name of ``name``: lower case, ``_`` -> ``-``, aliases resolved (``wds/<x>`` -> ``wds``,
    ``folder/<x>`` -> ``folder``...)."""
    n = name.strip().lower().replace("_", "-")
    if n.startswith("wds-"):
        return "wds"
    if "/" in n and n.split("/", 1)[0] in GENERIC_READERS:
        return n.split("/", 1)[0]
    return _ALIASES.get(n, n)


def list_datasets(task: str | None = None) -> list[str]:
    """Registered dataset names (``task``: "classification", "retrieval" or None for both), sorted."""
    return sorted({n for (t, n) in REGISTRY if task is None or t == task})


def dataset_spec(name: str, task: str = "classification") -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` for ``task``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = (task, canonical_name(name))
    if key not in REGISTRY:
        raise InputError(f"unknown {task} dataset {name!r}; known: {', '.join(list_datasets(task))}")
    return REGISTRY[key]
