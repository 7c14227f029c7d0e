"""Zero-shot image classification (CLIP_benchmark protocol) of a diffclip model on one dataset.

    python eval/zeroshot.py --model DiffCLIP-ViT-B-16 --pretrained cc12m --dataset imagenet1k \
        --data-root /data/imagenet --output results/zs_imagenet.json

The classifier is built from the dataset's class names and prompt templates (``--classnames`` / ``--templates``
files override them), see :func:`diffclip.zero_shot.build_zero_shot_classifier`; metrics ``acc1``, ``acc5``
(>= 5 classes) and ``mean_per_class_recall``. The result JSON has CLIP_benchmark's keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from diffclip.eval import readers
from diffclip.eval.common import limit, make_loader, model_transform, result_record
from diffclip.eval.runner import program_parser, run_program
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from diffclip.cli import one_line, run
from diffclip.errors import InputError
from diffclip.files import write_bytes
from diffclip.metrics import classification_metrics, rank_of
from diffclip.runtime import get_autocast
from diffclip.zero_shot import build_zero_shot_classifier, zero_shot_predict

log = logging.getLogger("diffclip.eval")
TASK = "zeroshot_classification"


def save_classifier(path: str | Path, classifier: torch.Tensor, classnames: list[str], model: str) -> None:
    """Saves a (D, C) zero-shot classifier as safetensors (tensor ``classifier``, class names in the metadata),
    atomically."""
    write_bytes(path, safetensors_bytes({"classifier": classifier.detach().float().cpu().contiguous()},
                                        metadata={"classnames": json.dumps(classnames), "model": model}))


def load_classifier(path: str | Path, n_classes: int, embed_dim: int) -> torch.Tensor:
    """Loads a classifier written by :func:`save_classifier` and checks it fits the dataset and the model.

    Raises:
        FileNotFoundError: no such file. ValueError: not a safetensors file, no ``classifier`` tensor, or a class count / embedding
        width that does not match.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"classifier file {path} not found")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
        raise InputError(f"classifier {path}: not a safetensors file ({one_line(e)})") from None
    if "classifier" not in tensors or tensors["classifier"].ndim != 2:
        raise InputError(f"{path} holds no 2-D 'classifier' tensor (found {sorted(tensors)})")
    w = tensors["classifier"]
    if w.shape[1] != n_classes:
        raise InputError(f"classifier {path} has {w.shape[1]} classes but the dataset has {n_classes}")
    if w.shape[0] != embed_dim:
        raise InputError(f"classifier {path} has embedding width {w.shape[0]} but the model's is {embed_dim}")
    return w


def cached_classifier(cache: dict, model, tokenizer, dataset, *, device: torch.device, precision: str = "fp32",
                      progress: bool = True) -> torch.Tensor:
    """The zero-shot classifier of ``dataset`` from ``cache`` (built on a miss): keyed by class names and
    templates, and for ImageNet variants with a ``class_index`` built over all 1000 ImageNet classes, so ImageNet,
    -V2, -Sketch, -A and -R share one (:func:`evaluate` takes A's and R's columns)."""
    from diffclip.eval import readers

    names = readers.imagenet_classnames() if getattr(dataset, "class_index", None) is not None else dataset.classnames
    key = (*names, "|", *dataset.templates)
    if key not in cache:
        cache[key] = build_zero_shot_classifier(model, tokenizer, names, dataset.templates, device=device,
                                                autocast=get_autocast(precision, device.type), progress=progress)
    return cache[key]


def evaluate(model, tokenizer, dataset, *, device: torch.device, precision: str = "fp32", batch_size: int = 64,
             workers: int = 0, classifier: torch.Tensor | None = None,
             progress: bool = True, ranks: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Zero-shot metrics of ``model`` on a reader ``dataset`` (its transform set to the model's preprocessing).

    ``classifier`` (D, C) is built from ``dataset.classnames`` / ``dataset.templates`` when not given; a
    1000-class ImageNet classifier is reduced with ``dataset.class_index`` for ImageNet-A/-R.

    Returns:
        ``(metrics, classifier used)``.
    """
    autocast = get_autocast(precision, device.type)
    if classifier is None:
        t0 = time.perf_counter()
        classifier = build_zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates,
                                                device=device, autocast=autocast, progress=progress)
        log.info("classifier: %d classes x %d templates in %.1fs", len(dataset.classnames), len(dataset.templates),
                 time.perf_counter() - t0)
    used = classifier
    class_index = getattr(dataset, "class_index", None)
    if class_index is not None and classifier.shape[1] != len(dataset.classnames):
        used = classifier[:, torch.as_tensor(class_index, device=classifier.device)]
    if used.shape[1] != len(dataset.classnames):
        raise InputError(f"classifier has {used.shape[1]} classes but the dataset has {len(dataset.classnames)}")
    t0 = time.perf_counter()
    logits, targets = zero_shot_predict(model, used, make_loader(dataset, batch_size, workers, device), device=device,
                                        autocast=autocast, progress=progress, desc=getattr(dataset, "name", "zero-shot"))
    log.info("%d images in %.1fs", len(targets), time.perf_counter() - t0)
    if targets.max() >= used.shape[1]:
        raise InputError(f"labels go up to {int(targets.max())} but the classifier has {used.shape[1]} classes")
    if ranks is not None:  # each image's 0-based rank of its true class (top-k hit: rank < k), the module's tie rule
        ranks["target"] = rank_of(logits, targets).cpu()
    return classification_metrics(logits, targets), used


def evaluate_dataset(model, preprocess, tokenizer, dataset, *, model_name: str, pretrained: str | None,
                     device: torch.device, precision: str = "fp32", batch_size: int = 64, workers: int = 0,
                     max_samples: int | None = None, classifier: torch.Tensor | None = None,
                     classifiers: dict | None = None, progress: bool = True) -> tuple[dict, torch.Tensor]:
    """The CLIP_benchmark record of zero-shot classification on a reader ``dataset`` as built (its transform is set
    to ``preprocess`` here; at most ``max_samples`` evenly spaced images), and the classifier used.

    ``classifier`` (D, C): a given one (e.g. loaded with :func:`load_classifier`); else, with ``classifiers``, the
    one of :func:`cached_classifier` (shared by datasets with the same classes); else one built for ``dataset``.
    The record holds ``metrics`` (:func:`evaluate`), ``root`` and ``per_sample`` (each image's top-1 / top-5 hit,
    0/1, for a bootstrap over evaluation samples).

    Raises:
        ValueError: a classifier whose class count does not fit, labels beyond it, an empty dataset.
    """
    dataset = limit(readers.set_transform(dataset, model_transform(preprocess, precision)), max_samples)
    if classifier is None and classifiers is not None:
        classifier = cached_classifier(classifiers, model, tokenizer, dataset, device=device, precision=precision,
                                       progress=progress)
    log.info("zero-shot %s (%s split, %d images, %d classes) with %s", dataset.name, dataset.split, len(dataset),
             len(dataset.classnames), model_name)
    ranks: dict = {}
    metrics, used = evaluate(model, tokenizer, dataset, device=device, precision=precision, batch_size=batch_size,
                             workers=workers, classifier=classifier, progress=progress, ranks=ranks)
    per_sample = {"acc1": (ranks["target"] < 1).int().tolist(), "acc5": (ranks["target"] < 5).int().tolist()}
    return result_record(dataset.name, model_name, pretrained, TASK, metrics, root=dataset.root,
                         per_sample=per_sample), used


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(__doc__, "datasets: " + ", ".join(readers.list_datasets("classification")))
    p.add_argument("--dataset", required=True, help="dataset name (see below), e.g. imagenet1k, fashion-mnist, "
                                                    "emoji-twitter, wds, folder")
    p.add_argument("--data-root", default=None, help="dataset folder (or a root holding it); the default for "
                                                     "fashion-mnist / emoji-* is their install location")
    p.add_argument("--split", default=None, help="split (default: the dataset's evaluation split)")
    p.add_argument("--classnames", default=None, help="file with one class name per line (label order)")
    p.add_argument("--templates", default=None, help="file with one prompt template per line, each with {}")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (network)")
    p.add_argument("--classifier", default=None, help="use a saved classifier (safetensors) instead of building it")
    p.add_argument("--save-classifier", default=None, help="save the classifier (safetensors) for reuse")
    p.add_argument("--output", default=None, help="result JSON (CLIP_benchmark format), written atomically")
    return p


def _inputs(args: argparse.Namespace):
    if args.classifier and not Path(args.classifier).is_file():
        raise FileNotFoundError(f"--classifier {args.classifier}: no such file")
    return readers.build_dataset(args.dataset, args.data_root, args.split, None, download=args.download,
                                 classnames=args.classnames, templates=args.templates)


def _evaluate(model, preprocess, tokenizer, dataset, args: argparse.Namespace, device: torch.device):
    classifier = None
    if args.classifier:
        classifier = load_classifier(args.classifier, len(dataset.classnames), model.embed_dim)
    record, used = evaluate_dataset(model, preprocess, tokenizer, dataset, model_name=args.model,
                                    pretrained=args.pretrained, device=device, precision=args.precision,
                                    batch_size=args.batch_size, workers=args.workers, max_samples=args.max_samples,
                                    classifier=classifier, progress=not args.no_progress)
    if args.save_classifier:
        save_classifier(args.save_classifier, used, dataset.classnames, args.model)
    return record


def main(argv: list[str] | None = None) -> int:
    return run_program(build_parser(), argv, inputs=_inputs, evaluate=_evaluate,
                       outputs=lambda args: [("--output", args.output), ("--save-classifier", args.save_classifier)])


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
