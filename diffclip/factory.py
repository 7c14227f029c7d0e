"""Model factory in open_clip's style: named JSON configs, ``create_model_and_transforms``, ``get_tokenizer``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from torchvision import transforms as T

from . import hub
from .errors import InputError
from .model import DiffCLIP

__all__ = ["list_models", "get_model_config", "parse_model_spec", "create_model", "create_model_and_transforms",
           "get_tokenizer", "image_transform"]

_CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS = {p.stem: json.loads(p.read_text()) for p in sorted(_CONFIG_DIR.glob("*.json"))}


def list_models() -> list[str]:
    """Names of the bundled model configs (``diffclip/configs/*.json``), sorted."""
    return sorted(_CONFIGS)


def _saved_config(path: Path, where: str) -> dict:
    """The ``config.json`` of ``save_pretrained`` at ``path`` (read from ``where``), checked to be ours."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: config.json is not JSON ({e})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InputError(f"{where}: config.json is not a diffclip config (no embed_dim/vision_cfg/text_cfg); for a "
                         "transformers CLIPModel or open_clip folder give an OpenCLIP-* name and pretrained=" + where)
    return cfg


def get_model_config(name: str) -> dict:
    """A copy of the config of ``name``: a bundled name, ``hf-hub:org/repo`` or a local folder written by
    ``save_pretrained`` (its ``config.json``, which also holds the ``model_name`` it was saved from).

    Raises:
        ValueError: for an unknown name (the message lists the known ones), or a ``config.json`` that is not a
        diffclip config; FileNotFoundError, ConnectionError: see :func:`diffclip.hub.download`.
    """
    if name in _CONFIGS:
        return copy.deepcopy(_CONFIGS[name])
    if name.startswith(hub.HF_HUB_PREFIX):
        return _saved_config(Path(hub.download(name[len(hub.HF_HUB_PREFIX):], "config.json")), name)
    if (Path(name).expanduser() / "config.json").is_file():
        return _saved_config(Path(name).expanduser() / "config.json", name)
    raise InputError(f"unknown model {name!r}; known models: {', '.join(list_models())} (or hf-hub:org/repo, or a "
                     "folder written by save_pretrained)")


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[@PRETRAINED]`` -> ``(name, pretrained or None)``, the one way programs name a model with its weights
    in one argument (``DiffCLIP-Tiny-64@runs/x/final_model``, ``DiffCLIP-ViT-B-16@cc12m``); split at the first
    ``@``, nothing checked (:func:`create_model` checks both parts).

    >>> parse_model_spec("DiffCLIP-ViT-B-16@cc12m"), parse_model_spec("CLIP-Tiny-64")
    (('DiffCLIP-ViT-B-16', 'cc12m'), ('CLIP-Tiny-64', None))
    """
    name, _, pretrained = spec.partition("@")
    return name, pretrained or None


def create_model(name: str, pretrained: str | None = None, device: str | torch.device | None = None,
                 init_logit_scale: float | None = None, init_logit_bias: float | None = None) -> DiffCLIP:
    """Builds a named model and optionally loads weights.

    Args:
        name: a name from :func:`list_models`, or ``hf-hub:org/repo`` or a local folder of a model saved by
            ``save_pretrained`` (config and weights both come from there; ``pretrained`` defaults to it).
        pretrained: None (random init), a release tag of the model (``cc3m``/``cc12m`` for
            ``DiffCLIP-ViT-B-16``), ``hf-hub:org/repo[/file]``, a local directory or a checkpoint file
            (safetensors, our checkpoints, the authors' ``checkpoint_best.pt``, open_clip/OpenAI weights).
        device: where to put the model (default: CPU).
        init_logit_scale, init_logit_bias: override the config's initial log logit scale; give the model
            SigLIP's learnable ``logit_bias`` with this initial value (open_clip's model arguments of the same
            names). Weights that carry a ``logit_bias`` (a SigLIP-trained model) give the model one; weights
            without one (CLIP weights fine-tuned with SigLIP) leave it at ``init_logit_bias``.

    Returns:
        A :class:`DiffCLIP` in eval mode when weights were loaded, train mode otherwise.

    Raises:
        ValueError: unknown name, an empty ``pretrained`` string, a weights file that is empty, truncated or not a
        checkpoint; FileNotFoundError: missing weights; RuntimeError (``WeightsMismatchError``): weights that do not
        fit, or weights saved with a config that differs from ``name``'s (``config.json`` beside them: the fields
        that differ are named);
        pickle.UnpicklingError: a pickle that needs types outside the allow-list. Each a one-line message naming
        the file.
    """
    if pretrained is not None and not str(pretrained).strip():
        raise InputError("pretrained='' names no weights: give a release tag, hf-hub:org/repo, a directory or a "
                         "file, or None for random initialisation")
    cfg = get_model_config(name)
    if pretrained is None and name not in _CONFIGS:  # hf-hub:org/repo or a saved folder: its weights
        pretrained = name
    cfg["model_name"] = cfg.get("model_name") or name
    if init_logit_scale is not None:
        cfg["init_logit_scale"] = init_logit_scale
    if init_logit_bias is not None:
        cfg["init_logit_bias"] = init_logit_bias
    model = DiffCLIP(**cfg)
    if pretrained is not None:
        hub.load_pretrained(model, pretrained, model_name=cfg["model_name"])
        model.eval()
    return model.to(device) if device is not None else model


def _channels(values, what: str) -> tuple[float, float, float]:
    """3 per-channel values from 3 floats or 1 (for all channels); InputError naming ``what`` otherwise."""
    values = tuple(float(v) for v in ((values,) if isinstance(values, (int, float)) else values))
    if len(values) not in (1, 3):
        raise InputError(f"{what}: expected 3 values (R, G, B) or 1 for all channels, got {len(values)}: {values}")
    if what == "image_std" and min(values) <= 0:
        raise InputError(f"image_std: expected positive values, got {values}")
    return values * 3 if len(values) == 1 else values


def _augmentation_cfg(preprocess_cfg: dict, aug_cfg=None):
    """open_clip's ``AugmentationCfg`` of the train transform: the config's ``train_scale`` (DiffCLIP: (0.5, 1))
    with the fields of ``aug_cfg`` (a dict of ``AugmentationCfg`` fields, e.g. ``{"scale": (0.8, 1.0),
    "color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8, "use_timm": True}``, or an ``AugmentationCfg``
    taken as it is) over it.

    Raises:
        InputError (ValueError): a key that is not an ``AugmentationCfg`` field (the message names it and the
        fields)."""
    from dataclasses import fields

    from open_clip.transform import AugmentationCfg

    if isinstance(aug_cfg, AugmentationCfg):
        return aug_cfg
    known = [f.name for f in fields(AugmentationCfg)]
    unknown = [k for k in (aug_cfg or {}) if k not in known]
    if unknown:
        raise InputError(f"aug_cfg: unknown key {unknown[0]!r}; open_clip's AugmentationCfg has {', '.join(known)}")
    return AugmentationCfg(**{"scale": tuple(preprocess_cfg.get("train_scale", (0.5, 1.0))), **(aug_cfg or {})})


def image_transform(preprocess_cfg: dict, image_size: int, is_train: bool, image_mean=None, image_std=None,
                    aug_cfg=None) -> T.Compose:
    """The CLIP image transforms, PIL image -> (3, image_size, image_size) float32 tensor: open_clip's
    ``image_transform`` with the config's settings.

    Train: ``RandomResizedCrop(image_size, scale=train_scale)`` (DiffCLIP: scale (0.5, 1); open_clip's
    ``AugmentationCfg(scale=...)``); eval: ``Resize(image_size)`` + ``CenterCrop(image_size)`` (``resize_mode``
    "shortest"). Both convert to RGB and normalise with the config's ``mean`` and ``std`` (ImageNet statistics for
    the DiffCLIP release, OpenAI's for open_clip weights); bicubic unless the config says otherwise.

    Overrides, as open_clip's ``create_model_and_transforms`` takes them: ``image_mean``, ``image_std`` (3 floats,
    or 1 for all channels) replace the config's normalisation in both transforms; ``aug_cfg`` (train only;
    a dict of open_clip's ``AugmentationCfg`` fields, or an ``AugmentationCfg``) is merged over the
    config's ``train_scale``; ``use_timm=True`` builds timm's ``create_transform``, as in open_clip.

    Raises:
        InputError (ValueError): ``image_mean``/``image_std`` of another length than 3 or 1, a ``image_std`` that
        is not positive, an unknown ``aug_cfg`` key, or ``aug_cfg`` values that open_clip/timm refuse.
    """
    from open_clip.transform import image_transform as open_clip_image_transform

    mean = _channels(preprocess_cfg.get("mean", (0.485, 0.456, 0.406)) if image_mean is None else image_mean,
                     "image_mean")
    std = _channels(preprocess_cfg.get("std", (0.229, 0.224, 0.225)) if image_std is None else image_std,
                    "image_std")
    aug = _augmentation_cfg(preprocess_cfg, aug_cfg) if is_train else None
    try:
        return open_clip_image_transform(image_size, is_train=is_train, mean=mean, std=std,
                                         interpolation=preprocess_cfg.get("interpolation", "bicubic"),
                                         resize_mode="shortest", aug_cfg=aug)
    except (TypeError, ValueError, AssertionError) as e:  # values of the right keys that torchvision/timm refuse
        raise InputError(f"aug_cfg {aug_cfg}: {' '.join(str(e).split()) or type(e).__name__}") from None


def create_model_and_transforms(name: str, pretrained: str | None = None, device: str | torch.device | None = None,
                                image_mean=None, image_std=None, aug_cfg=None, **model_kwargs):
    """``(model, preprocess_train, preprocess_val)`` as in open_clip; see :func:`create_model` (which takes
    ``model_kwargs``) and :func:`image_transform` (``image_mean``, ``image_std``: both transforms; ``aug_cfg``: the
    train transform)."""
    model = create_model(name, pretrained=pretrained, device=device, **model_kwargs)
    return (model, image_transform(model.preprocess_cfg, model.image_size, True, image_mean, image_std, aug_cfg),
            image_transform(model.preprocess_cfg, model.image_size, False, image_mean, image_std))


def get_tokenizer(name: str) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer with the model's context length.

    Calling it on a string or a list of n strings gives an (n, context_length) int64 tensor:
    SOT 49406, the tokens, EOT 49407, zero padding; longer texts are cut and end with EOT (open_clip's rule).
    """
    return SimpleTokenizer(context_length=get_model_config(name)["text_cfg"].get("context_length", 77))
