"""diffclip: CLIP-style models with differential attention (DiffCLIP, arXiv 2503.06626)."""

from . import vision  # noqa: F401  (registers the diff_vit_* / std_vit_* models with timm)
from .attention import Attention, DiffAttention, lambda_init_schedule
from .factory import (
    create_model,
    create_model_and_transforms,
    get_model_config,
    get_tokenizer,
    image_transform,
    list_models,
)
from .model import DiffCLIP
from .open_clip_format import save_open_clip

__version__ = "0.1.0"


def DiffCLIP_VITB16(pretrained: str | None = None, device=None) -> DiffCLIP:
    """The released DiffCLIP ViT-B/16 (149,629,185 parameters), as in the authors' ``diff_clip.DiffCLIP_VITB16``.

    Args:
        pretrained: None, ``"cc3m"`` or ``"cc12m"`` (the authors' hub checkpoints), or any ``pretrained``
            value of :func:`create_model`.
    """
    return create_model("DiffCLIP-ViT-B-16", pretrained=pretrained, device=device)


__all__ = ["Attention", "DiffAttention", "DiffCLIP", "DiffCLIP_VITB16", "create_model", "create_model_and_transforms",
           "get_model_config", "get_tokenizer", "image_transform", "lambda_init_schedule", "list_models", "save_open_clip"]
