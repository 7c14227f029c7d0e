"""Zero-shot classification during training (``--zeroshot-data DIR --zeroshot-frequency n``).

``DIR`` is an image folder with one sub-folder per class (torchvision ``ImageFolder``: classes in sorted
folder order). Optional files in ``DIR``: ``classnames.txt`` (one name per line, in the same order; default:
the folder names with ``_`` read as spaces) and ``templates.txt`` (one prompt per line with ``{}`` for the
class name; default :data:`DEFAULT_TEMPLATES`). The classifier and the metrics are
:func:`diffclip.zero_shot.build_zero_shot_classifier` and :func:`diffclip.metrics.classification_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from diffclip.zero_shot import build_zero_shot_classifier, zero_shot_evaluate

__all__ = ["ZeroShotSet", "load_zeroshot_set", "run_zeroshot", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}"]


@dataclass
class ZeroShotSet:
    dataset: ImageFolder
    classnames: list[str]
    templates: list[str]
    name: str


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_zeroshot_set(root: str | Path, preprocess) -> ZeroShotSet:
    """Reads the zero-shot folder ``root`` with the eval transform ``preprocess``.

    Raises:
        FileNotFoundError: ``root`` missing or without class folders of images.
        ValueError: ``classnames.txt`` with a different count than the class folders, or a template without ``{}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--zeroshot-data {root}: no such directory")
    try:
        dataset = ImageFolder(str(root), transform=preprocess)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"--zeroshot-data {root}: {str(e).splitlines()[0]}") from None
    classnames = [c.replace("_", " ") for c in dataset.classes]
    if (root / "classnames.txt").is_file():
        classnames = _lines(root / "classnames.txt")
        if len(classnames) != len(dataset.classes):
            raise ValueError(f"{root / 'classnames.txt'} has {len(classnames)} names for {len(dataset.classes)} "
                             "class folders")
    templates = _lines(root / "templates.txt") if (root / "templates.txt").is_file() else list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot template without '{{}}': {bad[0]!r}")
    return ZeroShotSet(dataset, classnames, templates, root.name)


def run_zeroshot(model, tokenizer, zs: ZeroShotSet, device: torch.device, autocast, batch_size: int = 64,
                 workers: int = 0) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean per-class recall of ``model`` on ``zs`` (one process)."""
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, zs.classnames, zs.templates, device=device,
                                            autocast=autocast)
    loader = torch.utils.data.DataLoader(zs.dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    metrics = zero_shot_evaluate(model, classifier, loader, device=device, autocast=autocast)
    model.train(was_training)
    return metrics
