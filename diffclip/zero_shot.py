"""Zero-shot classification as CLIP_benchmark does it (Radford et al. 2021, prompt ensembling).

For each class, every template is filled with the class name, the texts are embedded and L2-normalised, the
embeddings are averaged and the mean is L2-normalised again; the columns form the classifier ``W`` (D, C).
Logits are ``100 * normalize(encode_image(x)) @ W``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .metrics import classification_metrics

__all__ = ["fill_template", "format_prompts", "build_zero_shot_classifier", "zero_shot_logits", "zero_shot_predict",
           "zero_shot_evaluate"]

Template = str | Callable[[str], str]


def _check_templates(templates: Sequence[Template]) -> None:
    if isinstance(templates, str):
        raise InputError("templates must be a list of strings or callables, not a single string")
    if len(templates) == 0:
        raise InputError("the template list is empty")
    for t in templates:
        if isinstance(t, str):
            n = t.count("{}") + t.count("{c}")
            if n != 1:
                raise InputError(f"template {t!r} has {n} placeholders; expected exactly one, {{}} or {{c}} "
                                 "(CLIP_benchmark's), for the class name")
        elif not callable(t):
            raise InputError(f"a template must be a string with '{{}}' or a callable, got {type(t).__name__}")


def fill_template(template: str, classname: str) -> str:
    """``template`` with its one placeholder, ``{}`` or CLIP_benchmark's ``{c}``, replaced by ``classname``."""
    return template.replace("{}" if "{}" in template else "{c}", classname, 1)


def format_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[list[str]]:
    """The prompts of each class: ``[[t(c) for t in templates] for c in classnames]``.

    A string template holds exactly one placeholder, ``{}`` (``"a photo of a {}."``, open_clip's) or ``{c}``
    (CLIP_benchmark's template files), replaced by the class name; a callable gets the class name.

    Raises:
        ValueError: an empty class list, an empty template list, or a string template without exactly one
        placeholder.
    """
    if isinstance(classnames, str):
        raise InputError("classnames must be a list of strings, not a single string")
    if len(classnames) == 0:
        raise InputError("the class list is empty: zero-shot classification needs at least one class name")
    _check_templates(templates)
    out = []
    for c in classnames:
        out.append([t(c) if callable(t) else fill_template(t, c) for t in templates])
    return out


def build_zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[Template], device="cpu",
                               batch_size: int = 256, autocast: Callable[[], contextlib.AbstractContextManager]
                               | None = None, progress: bool = False) -> torch.Tensor:
    """Zero-shot classifier weights of ``model`` for ``classnames`` (CLIP_benchmark's construction).

    Args:
        model: anything with ``encode_text(tokens)`` (a :class:`diffclip.DiffCLIP`, an open_clip model).
        tokenizer: callable list[str] -> (n, context_length) int64 tensor (:func:`diffclip.get_tokenizer`).
        classnames: C class names.
        templates: T strings with ``{}`` (or callables class name -> prompt).
        device: where the text tower runs.
        batch_size: prompts embedded per forward pass (prompts of several classes share a batch).
        autocast: optional context-manager factory (e.g. ``lambda: torch.autocast("cuda")``).
        progress: show a tqdm bar over batches.

    Returns:
        (D, C) float32 tensor on ``device``: column c is the re-normalised mean of the L2-normalised
        embeddings of the T prompts of class c.

    Raises:
        ValueError: empty class list, empty template list, a string template without ``{}``.
    """
    prompts = format_prompts(classnames, templates)
    n_cls, n_tpl = len(prompts), len(prompts[0])
    flat = [p for per_class in prompts for p in per_class]
    autocast = autocast or contextlib.nullcontext
    batches = range(0, len(flat), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="zero-shot classifier", unit="batch")
    embs = []
    with torch.no_grad():
        for s in batches:
            tokens = tokenizer(flat[s:s + batch_size]).to(device)
            with autocast():
                e = model.encode_text(tokens)
            embs.append(F.normalize(e.float(), dim=-1))
    emb = torch.cat(embs).reshape(n_cls, n_tpl, -1)
    weights = F.normalize(emb.mean(dim=1), dim=-1)
    return weights.T.contiguous()


def zero_shot_logits(model, classifier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``100 * normalize(model.encode_image(images)) @ classifier`` as float32, (B, C)."""
    feats = F.normalize(model.encode_image(images).float(), dim=-1)
    return 100.0 * feats @ classifier.to(device=feats.device, dtype=feats.dtype)


def zero_shot_predict(model, classifier: torch.Tensor, dataloader: Iterable, device="cpu",
                      autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                      progress: bool = False, desc: str = "zero-shot") -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot logits of every batch ``(images, targets)`` of ``dataloader``.

    Returns:
        ``(logits (N, C) float32 on CPU, targets (N,) int64)``.
    """
    autocast = autocast or contextlib.nullcontext
    if progress:
        from tqdm import tqdm
        dataloader = tqdm(dataloader, desc=desc, unit="batch")
    logits, targets = [], []
    with torch.no_grad():
        for images, target in dataloader:
            with autocast():
                logits.append(zero_shot_logits(model, classifier, images.to(device, non_blocking=True)).cpu())
            targets.append(torch.as_tensor(target).long())
    if not logits:
        raise InputError("the dataset is empty: no images to classify")
    return torch.cat(logits), torch.cat(targets)


def zero_shot_evaluate(model, classifier: torch.Tensor, dataloader: Iterable, device="cpu",
                       autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                       class_index: Sequence[int] | torch.Tensor | None = None,
                       progress: bool = False) -> dict[str, float]:
    """Zero-shot metrics (``acc1``, ``acc5``, ``mean_per_class_recall``) of ``classifier`` on ``dataloader``.

    Args:
        class_index: optional columns of ``classifier`` to keep (e.g. the 200 ImageNet-A/-R classes of a
            1000-class ImageNet classifier); targets then index into the kept columns.
    """
    if class_index is not None:
        classifier = classifier[:, torch.as_tensor(class_index, dtype=torch.long, device=classifier.device)]
    logits, targets = zero_shot_predict(model, classifier, dataloader, device=device, autocast=autocast,
                                        progress=progress)
    return classification_metrics(logits, targets)
