"""Zero-shot classification during training (``--zeroshot-data DIR --zeroshot-frequency n``).

``DIR`` is read by the evaluation suite's ``folder`` reader (:mod:`diffclip.eval.readers`): one sub-folder of
images per class, in sorted order; optional ``classnames.txt`` (one readable name per line, same order) and
``templates.txt`` (one prompt per line with ``{}`` or ``{c}`` for the class name). The same reader and rule as
``eval/zeroshot.py --dataset folder``: a class folder without an image is refused, naming it. Every image is decoded
once when the set is loaded, before training starts: undecodable files are left out and counted in the log, so an
evaluation can never end a run; a class left without a decodable image is refused too (it would still be a class).
The classifier and the metrics are :mod:`diffclip.zero_shot`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffclip.errors import InputError
from diffclip.images import undecodable
from diffclip.zero_shot import build_zero_shot_classifier, zero_shot_evaluate

__all__ = ["load_zeroshot_set", "run_zeroshot"]

log = logging.getLogger("diffclip.train")


def load_zeroshot_set(root: str | Path, preprocess):
    """The zero-shot folder ``root`` with the eval transform ``preprocess`` (a ``folder`` dataset with
    ``classnames``, ``templates`` and ``name``), undecodable images left out.

    Raises:
        FileNotFoundError: ``root`` missing or without class folders of images.
        ValueError: a ``classnames.txt`` with another count than the class folders, a template without exactly one
        placeholder, a class folder without an image or without a decodable one.
    """
    from diffclip.eval import readers

    from diffclip.zero_shot import format_prompts

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--zeroshot-data {root}: no such directory")
    try:
        dataset = readers.build_dataset("folder", root, None, preprocess)
        format_prompts(dataset.classnames[:1], dataset.templates)  # checks the templates
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--zeroshot-data {root}: {str(e).splitlines()[0]}") from None
    bad = undecodable(p for p, _ in dataset.samples)
    if bad:
        target_of = dict(dataset.samples)
        skip = {p for p, _ in bad}
        dataset.samples = [s for s in dataset.samples if s[0] not in skip]
        dataset.targets = [t for _, t in dataset.samples]
        log.warning("--zeroshot-data %s: skipped %d undecodable image(s), e.g. %s", root, len(bad), bad[0][1])
        emptied = sorted({target_of[p] for p in skip} - set(dataset.targets))
        if emptied:
            example = next(p for p, _ in bad if target_of[p] == emptied[0])
            raise InputError(f"--zeroshot-data {root}: class {dataset.classnames[emptied[0]]!r} has no decodable "
                             f"image (e.g. {example})")
    dataset.name = root.name
    return dataset


def run_zeroshot(model, tokenizer, zs, device: torch.device, autocast, batch_size: int = 64,
                 workers: int = 0) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean per-class recall of ``model`` on ``zs`` (one process)."""
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, zs.classnames, zs.templates, device=device,
                                            autocast=autocast)
    loader = torch.utils.data.DataLoader(zs, batch_size=batch_size, shuffle=False, num_workers=workers)
    metrics = zero_shot_evaluate(model, classifier, loader, device=device, autocast=autocast)
    model.train(was_training)
    return metrics
