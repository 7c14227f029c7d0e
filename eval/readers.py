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

This module holds the interface, the prompts and the registry; the dataset classes are in ``readers_base`` and
each family registers its readers from its own module: ``readers_imagenet`` (ImageNet and its shifts),
``readers_folders`` (folders, Tiny ImageNet, CLIP_benchmark's webdataset, idx files, digits),
``readers_torchvision``, ``readers_emoji``, ``readers_retrieval`` (Karpathy splits, CSV/JSONL).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffclip.eval.readers_base import (  # noqa: F401 - re-exported
    IdxDataset,
    ImageListDataset,
    LabeledDataset,
    RetrievalDataset,
    TarShardDataset,
    read_idx,
    set_transform,
)
from torch.utils.data import Dataset

from diffclip.errors import InputError
from diffclip.images import load_image
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
        raise InputError(f"unknown {task} dataset {name!r}; known: {', '.join(list_datasets(task))}")
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
            raise InputError(f"dataset {spec.name!r} needs a data root (--data-root); expected layout: {spec.layout}")
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
        raise InputError(f"dataset {spec.name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    path = resolve_root(name, root, task)
    if not path.exists():
        raise DatasetNotFoundError(f"dataset {spec.name!r}: {path} not found; expected layout: {spec.layout}")
    classnames, templates = options.pop("classnames", None), options.pop("templates", None)
    download = options.pop("download", False)
    if "download" in inspect.signature(spec.build).parameters:
        options["download"] = download
    elif download:
        raise InputError(f"dataset {spec.name!r} cannot be downloaded by this program; expected layout: {spec.layout}")
    ds = spec.build(path, split, transform, **{**spec.options, **options})
    if task == "classification":
        _override_prompts(ds, spec.name, classnames, templates)
        if not ds.classnames:
            raise InputError(f"dataset {spec.name!r} at {path} has an empty class list")
    ds.name = display_name(name, root, task)
    ds.root = str(path)
    ds.split = split
    return ds


def _override_prompts(ds, name, classnames, templates) -> None:
    if classnames is not None:
        names = read_lines(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
        if not names:
            raise InputError(f"the class-name list for {name!r} is empty")
        if ds.classnames and len(names) != len(ds.classnames):
            raise InputError(f"{len(names)} class names given for {name!r}, but the dataset has "
                             f"{len(ds.classnames)} classes")
        ds.classnames = names
    if templates is not None:
        tpl = read_lines(templates) if isinstance(templates, (str, os.PathLike)) else list(templates)
        if not tpl:
            raise InputError(f"the template list for {name!r} is empty")
        try:
            format_prompts(["x"], tpl)
        except ValueError as e:
            where = f"--templates {templates}" if isinstance(templates, (str, os.PathLike)) else "templates"
            raise InputError(f"{where}: {e}") from None
        ds.templates = tpl


# the dataset families register themselves on import (their modules use the registry above)
from diffclip.eval import readers_folders, readers_retrieval, readers_torchvision  # noqa: E402, F401, I001
from diffclip.eval.readers_emoji import emoji_captions  # noqa: E402, F401
from diffclip.eval.readers_imagenet import _timm_info, imagenet_classnames, imagenet_wnids  # noqa: E402, F401
