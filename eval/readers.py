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

This module holds the interface. Imports go one way: the prompts, the dataset classes and the file helpers are
in ``readers_base``, the registry in ``readers_registry``, and each family registers its readers there from its
own module: ``readers_imagenet`` (ImageNet and its shifts), ``readers_folders`` (folders, Tiny ImageNet,
CLIP_benchmark's webdataset, idx files, digits), ``readers_torchvision``, ``readers_emoji``, ``readers_retrieval``
(Karpathy splits, CSV/JSONL); this module imports them all, none of them imports it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from diffclip.eval import readers_folders, readers_retrieval, readers_torchvision  # noqa: F401 - they register
from diffclip.eval.readers_base import (  # noqa: F401 - re-exported
    CLASSNAMES,
    EMOJI_TEMPLATES,
    FASHION_MNIST_CLASSES,
    GENERIC_TEMPLATES,
    TEMPLATES,
    DatasetNotFoundError,
    IdxDataset,
    ImageListDataset,
    LabeledDataset,
    RetrievalDataset,
    TarShardDataset,
    imagenet_templates,
    read_idx,
    read_lines,
    set_transform,
)
from diffclip.eval.readers_emoji import emoji_captions  # noqa: F401 - re-exported
from diffclip.eval.readers_imagenet import _timm_info, imagenet_classnames, imagenet_wnids  # noqa: F401
from diffclip.eval.readers_registry import (  # noqa: F401 - re-exported
    GENERIC_READERS,
    REGISTRY,
    DatasetSpec,
    canonical_name,
    dataset_spec,
    list_datasets,
)
from torch.utils.data import Dataset

from diffclip.errors import InputError
from diffclip.images import load_image
from diffclip.zero_shot import format_prompts

__all__ = ["DatasetNotFoundError", "DatasetSpec", "ImageListDataset", "IdxDataset", "TarShardDataset",
           "RetrievalDataset", "LabeledDataset", "list_datasets", "set_transform", "dataset_spec", "canonical_name",
           "display_name", "resolve_root", "build_dataset", "build_retrieval_dataset", "load_image", "read_lines",
           "read_idx", "imagenet_templates", "imagenet_wnids", "imagenet_classnames", "GENERIC_TEMPLATES",
           "EMOJI_TEMPLATES", "emoji_captions"]


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

