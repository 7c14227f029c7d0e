"""Pieces shared by the evaluation programs: the model/device/precision flags, model loading, data loaders,
feature extraction and CLIP_benchmark result records. Errors, logging, precision and atomic writes are the shared
layer's (:mod:`diffclip.cli`, :mod:`diffclip.runtime`, :mod:`diffclip.files`)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffclip.eval import readers
from torch.utils.data import DataLoader, Dataset, Subset

from diffclip.cli import UsageError, nonneg_int, positive_int
from diffclip.errors import InputError
from diffclip.runtime import PRECISION_HELP, PRECISIONS, cast_model, get_input_dtype

log = logging.getLogger("diffclip.eval")

def default_workers() -> int:
    """Data-loading worker processes by default: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


def add_model_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """--model, --pretrained and :func:`add_run_args`'s flags (``seed=False``: without --seed)."""
    p.add_argument("--model", required=True, help="model config name (diffclip.list_models()) or hf-hub:org/repo")
    p.add_argument("--pretrained", default=None,
                   help="weights: a release tag (cc3m, cc12m), hf-hub:org/repo[/file], a directory with "
                        "model.safetensors, a checkpoint file (ours, the authors' checkpoint_best.pt, open_clip); "
                        "omit for random init")
    add_run_args(p, seed)


def add_run_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """--device, --precision, --batch-size, --workers, --max-samples, --seed (unless ``seed=False``),
    --no-progress, --verbose."""
    p.add_argument("--device", default="auto", help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=nonneg_int, default=default_workers(),
                   help="data-loading processes (default: %(default)s = CPU cores, at most 8)")
    p.add_argument("--max-samples", type=positive_int, default=None,
                   help="evaluate on at most N samples per split, evenly spaced over the dataset (quick runs)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the run (a random-init model depends on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def dataset_name(task: str = "classification") -> Callable[[str], str]:
    """An argparse type: a registered dataset name of ``task``, returned in its registry form (an unknown name is
    a one-line flag error listing the known ones, before any other check)."""
    def parse(text: str) -> str:
        try:
            readers.dataset_spec(text, task)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return readers.canonical_name(text)
    parse.__name__ = f"{task} dataset name"
    return parse


def parse_roots(items: list[str]) -> dict[str, str]:
    """``--root NAME=PATH`` values as ``{registry name: path}``.

    Raises:
        UsageError: a value without ``=``.
    """
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--root expects NAME=PATH, got {item!r}")
        out[readers.canonical_name(name)] = path
    return out


def load_model(name: str, pretrained: str | None, device: torch.device, precision: str = "fp32"):
    """``(model, preprocess_val, tokenizer)`` in eval mode on ``device``, weights cast for ``precision``
    (:func:`diffclip.runtime.cast_model`). Raises what :func:`diffclip.create_model_and_transforms` raises."""
    import diffclip
    model, _, preprocess = diffclip.create_model_and_transforms(name, pretrained=pretrained)
    model = cast_model(model.to(device).eval(), precision)
    return model, preprocess, diffclip.get_tokenizer(name)


class _CastImages:
    """Wraps a transform so images come out in the model's dtype (for the cast-weight precisions)."""

    def __init__(self, transform, dtype):
        self.transform, self.dtype = transform, dtype

    def __call__(self, img):
        return self.transform(img).to(self.dtype)


def model_transform(preprocess, precision: str):
    """``preprocess``, casting its output to the input dtype of ``precision`` where that is not fp32."""
    dtype = get_input_dtype(precision)
    return preprocess if dtype is None else _CastImages(preprocess, dtype)


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """At most ``max_samples`` evenly spaced samples of ``dataset`` (deterministic); attributes are kept."""
    if not max_samples or max_samples >= len(dataset):
        return dataset
    idx = np.linspace(0, len(dataset) - 1, max_samples).round().astype(int).tolist()
    sub = Subset(dataset, idx)
    for attr in ("classnames", "templates", "class_index", "name", "split", "root"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    if getattr(dataset, "targets", None) is not None:
        sub.targets = [dataset.targets[i] for i in idx]
    if hasattr(dataset, "captions"):
        sub.captions = [dataset.captions[i] for i in idx]
    return sub


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """A deterministic (unshuffled) evaluation DataLoader."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def extract_image_features(model, loader, device, autocast=None, progress: bool = True, desc: str = "features",
                           normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, second items (N,) int64)`` over ``loader`` under no_grad."""
    autocast = autocast or contextlib.nullcontext
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, unit="batch", file=sys.stderr)
    feats, labels = [], []
    with torch.no_grad():
        for images, y in it:
            with autocast():
                f = model.encode_image(images.to(device, non_blocking=True))
            f = f.float()
            feats.append((F.normalize(f, dim=-1) if normalize else f).cpu())
            labels.append(torch.as_tensor(y).long())
    if not feats:
        raise InputError("the dataset is empty")
    return torch.cat(feats), torch.cat(labels)


def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int = 256, autocast=None,
                 progress: bool = True, desc: str = "texts") -> torch.Tensor:
    """L2-normalised text embeddings (N, D) float32 on CPU."""
    autocast = autocast or contextlib.nullcontext
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr)
    out = []
    with torch.no_grad():
        for s in starts:
            with autocast():
                e = model.encode_text(tokenizer(texts[s:s + batch_size]).to(device))
            out.append(F.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out)


def result_record(dataset: str, model: str, pretrained: str | None, task: str, metrics: dict,
                  language: str = "en", **extra) -> dict:
    """A result in CLIP_benchmark's format (extra keys after the standard ones)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained or "", "task": task,
            "metrics": metrics, "language": language, **extra}


def weights_fingerprint(model: torch.nn.Module, pretrained: str | None) -> str:
    """Identifies a model's weights for cache keys. Given ``pretrained``: the argument, plus size and mtime when it
    names a local file or folder. A random-init model (``pretrained`` None): a hash of its parameters and buffers,
    which depend on the seed it was built with."""
    if not pretrained:
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return "random-init:" + h.hexdigest()[:24]
    p = Path(pretrained).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file())
        return pretrained + "|" + ";".join(f"{q.name}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return pretrained


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
