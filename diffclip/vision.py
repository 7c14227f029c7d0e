"""Vision towers: timm's ``VisionTransformer`` with differential (or standard) attention.

The backbone is timm's (Dosovitskiy et al. 2021, timm ``vision_transformer.py``); only the attention
layer is ours, passed as timm's ``attn_layer``. Module names therefore are timm's (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1/attn/norm2/mlp.fc1/mlp.fc2``, ``norm``), which is
the layout of the DiffCLIP release's ``visual`` tower.

Importing this module registers with timm (``timm.create_model(name)``):

* ``diff_vit_{tiny,small,base}_patch16_224`` and ``diff_vit_base_patch32_224``,
* small-image variants ``diff_vit_{nano,tiny}_patch4_28`` (MNIST-sized) and
  ``diff_vit_{nano,tiny,small}_patch4_32`` (CIFAR-sized), ``diff_vit_tiny_patch8_64``,
* the same names with ``std_vit_`` for the standard-attention twin built from the same code
  (``std_vit_tiny_patch4_32``...), so a DiffViT and its ViT differ only in the attention layer.

Sizes follow timm: tiny = width 192, 3 heads -> here 4 heads (differential attention needs an even
count), small = 384/6, base = 768/12; nano = width 64, 4 heads, 6 layers.
"""

from __future__ import annotations

from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .attention import DiffAttention, attention_layer, lambda_init_schedule
from .errors import InputError
from .text import act_layer

__all__ = ["vision_transformer", "vision_tower"]


def vision_transformer(attn_type: str = "diff", lambda_init: float | str = 0.8, patch_bias: bool = True,
                       act: str = "gelu", norm_eps: float = 1e-5, **kwargs) -> VisionTransformer:
    """Builds a timm ``VisionTransformer`` whose blocks use :mod:`diffclip.attention`.

    Args:
        attn_type: "diff" (differential attention) or "standard".
        lambda_init: constant lambda_init, or "schedule" for the paper's depth schedule.
        patch_bias: bias on the patch-embedding conv (True in the DiffCLIP release, False in OpenAI CLIP).
        act: MLP activation, "gelu" (exact) or "quick_gelu".
        norm_eps: LayerNorm epsilon (1e-5 in the release and in CLIP).
        **kwargs: any timm ``VisionTransformer`` argument (``img_size``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``num_classes``, ``pre_norm``, ``drop_path_rate``...).

    Returns:
        The model; ``forward`` maps (B, 3, H, W) float images to (B, num_classes) logits, or to
        (B, embed_dim) pooled features when ``num_classes=0``.

    Raises:
        ValueError: for an unknown ``attn_type`` or ``act``, or an odd head count with ``attn_type="diff"``.
    """
    model = VisionTransformer(attn_layer=attention_layer(attn_type), act_layer=act_layer(act),
                              norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                              embed_layer=partial(PatchEmbed, bias=patch_bias), **kwargs)
    # timm builds every block's attention with the same arguments; lambda_init is set per layer here.
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.attn, DiffAttention):
            blk.attn.lambda_init = lambda_init_schedule(i) if lambda_init == "schedule" else float(lambda_init)
    return model


def vision_tower(image_size: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, attn_type: str = "diff", lambda_init: float | str = 0.8,
                 qkv_bias: bool = True, pre_norm: bool = False, patch_bias: bool = True, act: str = "gelu",
                 drop_path_rate: float = 0.0) -> VisionTransformer:
    """The image tower of a CLIP config (``vision_cfg`` in ``diffclip/configs/*.json``): class-token
    pooling after the final LayerNorm and no classifier head, so it returns (B, width) features."""
    return vision_transformer(attn_type=attn_type, lambda_init=lambda_init, patch_bias=patch_bias, act=act,
                              img_size=image_size, patch_size=patch_size, embed_dim=width, depth=layers,
                              num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, pre_norm=pre_norm,
                              num_classes=0, global_pool="token", drop_path_rate=drop_path_rate)


_SIZES = {
    "nano": dict(embed_dim=64, depth=6, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_VARIANTS = [("nano", 4, 28), ("tiny", 4, 28), ("nano", 4, 32), ("tiny", 4, 32), ("small", 4, 32),
             ("tiny", 8, 64), ("tiny", 16, 224), ("small", 16, 224), ("base", 16, 224), ("base", 32, 224)]


def _name(prefix: str, size: str, patch: int, img: int) -> str:
    return f"{prefix}_{size}_patch{patch}_{img}"


# timm's pretrained cfgs (no weights): what ``timm.data.resolve_data_config(model=...)`` reads for the transforms.
default_cfgs = generate_default_cfgs({
    _name(prefix, size, patch, img): dict(
        url="", num_classes=1000, input_size=(3, img, img), pool_size=None, crop_pct=1.0, interpolation="bicubic",
        fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj",
        classifier="head")
    for prefix in ("diff_vit", "std_vit") for size, patch, img in _VARIANTS})


def _register(prefix: str, attn_type: str, size: str, patch: int, img: int) -> None:
    name = _name(prefix, size, patch, img)

    def create(pretrained: bool = False, **kwargs) -> VisionTransformer:
        if pretrained:
            raise InputError(f"{name}: no pretrained weights are registered; load a checkpoint with "
                             "training/finetune.py --init instead")
        args = dict(_SIZES[size], patch_size=patch, attn_type=attn_type)
        args.update(kwargs)
        return build_model_with_cfg(vision_transformer, name, pretrained=False, **args)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"{'Differential' if attn_type == 'diff' else 'Standard'}-attention ViT-{size}, "
                      f"patch {patch}, {img} px (timm VisionTransformer + diffclip attention).")
    register_model(create)


for _size, _patch, _img in _VARIANTS:
    _register("diff_vit", "diff", _size, _patch, _img)
    _register("std_vit", "standard", _size, _patch, _img)
