"""ViT image classifiers: building one (timm's differential ``diff_vit_*`` / standard ``std_vit_*`` / ``vit_*``
models, or a DiffCLIP/CLIP config's vision tower with a new head), its transforms, and loading one back for
analysis (files written by ``training/finetune.py``, or a diffclip config's vision tower). Used by the fine-tuning
program and by the attention-map and CKA tools.

A classifier file (``best.pt`` of a finetune run folder, or one of its ``checkpoints/*.pt``) holds ``state_dict``
and the recipe to rebuild the model: ``classifier`` (the keyword arguments of :func:`build_model`), ``data_cfg``
(the transforms) and ``classnames``. Files of the older finetune (``model`` + ``args``, the flags) still load.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from diffclip.errors import InputError, UnknownNameError, one_line
from diffclip.hub import load_state_dict, read_state_dict, torch_load
from diffclip.images import ToMode

__all__ = ["build_model", "build_transforms", "count_params", "load_classifier", "eval_transform", "load_vit",
           "random_train_transform", "is_diffclip_name", "SHAPE_KWARGS"]

#: the model-shape keyword arguments of :func:`build_model` (timm's names; None keeps the model's default)
SHAPE_KWARGS = ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                "lambda_init")


def is_diffclip_name(name: str) -> bool:
    """True for a diffclip config name (``DiffCLIP-Tiny-64``...) or an ``hf-hub:`` name."""
    import diffclip

    return name in diffclip.list_models() or name.startswith("hf-hub:")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth, linearly increasing over the blocks (timm's rule), on an already built ViT."""
    from timm.layers import DropPath

    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        r = rate * i / max(n - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """:func:`diffclip.hub.read_state_dict` (the allow-listed reader), its errors as one InputError naming ``path``."""
    try:
        return read_state_dict(path)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise InputError(f"cannot read checkpoint {path}: {one_line(e)}") from None


def _load_backbone(model: nn.Module, path: str) -> None:
    """Loads a timm-layout checkpoint into ``model``, all weights but the classifier head (which keeps its
    fresh initialisation); position embeddings are resampled to the model's grid when the sizes differ."""
    from timm.layers import resample_abs_pos_embed

    sd = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("head.")}
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=prefix)
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise InputError(f"{path}: shapes do not fit the model for {bad[:3]} (e.g. {tuple(sd[bad[0]].shape)} vs "
                         f"{tuple(own[bad[0]].shape)}); build the model with the matching embed_dim/depth/patch_size")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise InputError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _clip_data_cfg(clip: nn.Module) -> dict:
    """A DiffCLIP/CLIP model's image preprocessing as a timm pretrained cfg (its vision tower has none)."""
    pp = clip.preprocess_cfg
    size = clip.visual.patch_embed.img_size[0]
    return dict(input_size=(3, size, size), mean=tuple(pp.get("mean", (0.485, 0.456, 0.406))),
                std=tuple(pp.get("std", (0.229, 0.224, 0.225))), interpolation="bicubic", crop_pct=1.0)


def _data_cfg(model: nn.Module, in_chans: int | None = None, mean=None, std=None, img_size: int | None = None,
              pretrained_cfg: dict | None = None) -> dict:
    """The transforms' data config of ``model``, resolved by timm's ``resolve_data_config`` from the model's
    pretrained cfg (or ``pretrained_cfg``), its input size and channels and ``mean``/``std``.

    Returns:
        {"img_size": int, "in_chans": int, "mean": tuple, "std": tuple}, the form stored in checkpoints.

    Raises:
        InputError: ``mean``/``std`` with neither 1 nor ``in_chans`` values.
    """
    from timm.data import resolve_data_config

    in_chans = in_chans or 3
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"in_chans": in_chans, "img_size": grid[0] if grid else img_size}
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) not in (1, in_chans):
            raise InputError(f"{key} needs {in_chans} values, got {len(value)}")
        # timm's pretrained cfgs give 3-channel statistics, which would broadcast silently over 1 channel
        overrides[key] = value if value is not None else ((0.5,) if in_chans != 3 else None)
    cfg = resolve_data_config(overrides, pretrained_cfg=pretrained_cfg, model=model)
    return dict(img_size=cfg["input_size"][-1], in_chans=cfg["input_size"][0], mean=tuple(cfg["mean"]),
                std=tuple(cfg["std"]))


def build_model(model_name: str, num_classes: int, *, init: str | None = None, drop_path_rate: float = 0.0,
                mean=None, std=None, img_size: int | None = None, in_chans: int | None = None,
                patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
                num_heads: int | None = None, mlp_ratio: float | None = None, qkv_bias: bool | None = None,
                lambda_init: float | str | None = None) -> tuple[nn.Module, dict]:
    """Builds a classifier with a fresh ``num_classes``-way head.

    Args:
        model_name: a timm model (``diff_vit_*``, ``std_vit_*``, ``vit_*``...) or a diffclip config name, whose
            vision tower gets the head.
        init: None (random weights); for a timm model a checkpoint file (timm layout, ``.safetensors``/``.pt``;
            its head is dropped, ``pos_embed`` resampled); for a diffclip name anything
            ``diffclip.create_model(pretrained=...)`` takes.
        drop_path_rate: stochastic depth (linear over the blocks).
        mean, std: normalisation statistics (1 or ``in_chans`` values; default the model's, 0.5 for 1 channel).
        img_size ... lambda_init: the model's shape (:data:`SHAPE_KWARGS`, timm's names; None: the model's
            default); ``num_heads`` is the baseline's head count, ``lambda_init`` (a number or ``"schedule"``)
            for ``diff_vit_*`` only. A diffclip tower takes only ``img_size``.

    Returns:
        ``(model in train mode, data_cfg)`` with ``data_cfg`` = {"img_size", "in_chans", "mean", "std"}
        for :func:`build_transforms`.

    Raises:
        UnknownNameError: ``model_name`` is neither a timm model nor a diffclip config.
        InputError: a keyword the model does not take, an ``init`` file that does not read or fit, bad ``mean``/``std``.
        FileNotFoundError: a diffclip ``init`` that does not resolve.
    """
    import timm

    import diffclip  # (registers diff_vit_* / std_vit_*)

    shape = dict(img_size=img_size, in_chans=in_chans, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                 num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, lambda_init=lambda_init)
    if is_diffclip_name(model_name):
        fixed = [k for k, v in shape.items() if v is not None and k not in ("img_size", "in_chans")]
        if fixed:
            raise InputError(f"{fixed[0]} cannot change the tower of {model_name}")
        if in_chans not in (None, 3):
            raise InputError(f"the tower of {model_name} takes 3-channel images, not in_chans={in_chans}")
        clip = diffclip.create_model(model_name, pretrained=init)
        model = clip.visual
        model.reset_classifier(num_classes)
        model.train()
        if drop_path_rate:
            _set_drop_path(model, drop_path_rate)
        if img_size is not None and img_size != model.patch_embed.img_size[0]:
            model.set_input_size(img_size=img_size)
        return model, _data_cfg(model, 3, mean, std, pretrained_cfg=_clip_data_cfg(clip))
    if not timm.is_model(model_name):
        raise UnknownNameError(f"unknown model {model_name!r}: not a timm model (diff_vit_*, std_vit_*, vit_*...) "
                               f"nor a diffclip config ({', '.join(diffclip.list_models())})")
    if lambda_init is not None and not model_name.startswith("diff_vit"):
        raise InputError(f"lambda_init applies to diff_vit_* models only, not {model_name}")
    kwargs = {k: v for k, v in shape.items() if v is not None}
    try:
        model = timm.create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise InputError(f"cannot build {model_name} with {kwargs}: {one_line(e)}") from None
    if init is not None:
        _load_backbone(model, init)
    return model, _data_cfg(model, in_chans, mean, std, img_size)


def random_train_transform(*, randaug: str | None = None, hflip: float = 0.0, scale=None, reprob: float = 0.0) -> bool:
    """True when these training augmentations draw random numbers (so that the training split cannot be cached)."""
    return bool(randaug or reprob > 0 or hflip > 0 or scale is not None)


def build_transforms(data_cfg: dict, *, randaug: str | None = None, hflip: float = 0.0, scale=None,
                     reprob: float = 0.0):
    """(train, eval) transforms from timm's ``create_transform``: PIL image -> normalised float tensor
    (``in_chans`` x ``img_size`` x ``img_size``).

    Args:
        data_cfg: from :func:`build_model`. randaug: a RandAugment spec (``rand-m9-mstd0.5``) or None.
        hflip: horizontal-flip probability. scale: a (min, max) RandomResizedCrop scale range, or None (no crop).
        reprob: random-erasing probability.

    Raises:
        InputError: ``in_chans`` other than 1 or 3.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    size, mean, std = data_cfg["img_size"], tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    if data_cfg["in_chans"] not in (1, 3):
        raise InputError(f"in_chans must be 1 or 3, got {data_cfg['in_chans']}")
    mode = ToMode("L" if data_cfg["in_chans"] == 1 else "RGB")
    evalt = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    if random_train_transform(randaug=randaug, hflip=hflip, scale=scale, reprob=reprob):
        train = create_transform(size, is_training=True, auto_augment=randaug, hflip=hflip,
                                 scale=tuple(scale) if scale else (1.0, 1.0), ratio=(3 / 4, 4 / 3),
                                 re_prob=reprob, mean=mean, std=std, interpolation="bicubic")
    else:
        train = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    return T.Compose([mode, train]), T.Compose([mode, evalt])


def eval_transform(data_cfg: dict):
    """The evaluation transform (resize, tensor, normalise) for a model's ``data_cfg``."""
    return build_transforms(data_cfg)[1]


def _legacy_recipe(flags: dict, num_classes: int) -> dict:
    """The :func:`build_model` keywords of a file of the older finetune, which stored its flags (``args``)."""
    recipe = {k: flags.get(k) for k in SHAPE_KWARGS}
    if recipe["qkv_bias"] is not None:
        recipe["qkv_bias"] = bool(recipe["qkv_bias"])
    return {"model_name": flags["model"], "num_classes": num_classes, "drop_path_rate": flags.get("drop_path", 0.0),
            **recipe}


def load_classifier(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A classifier trained by ``training/finetune.py`` (``best.pt``, ``checkpoints/*.pt``, or the older
    finetune's ``best.pt``/``last.pt``), rebuilt from its stored recipe.

    Returns:
        ``(model in eval mode, the file's dict without the optimizer)``; its ``classifier`` entry is the recipe,
        ``data_cfg`` gives the transforms, ``classnames`` the classes.

    Raises:
        FileNotFoundError: no such file. InputError: a file that does not read, or not of finetune.
        WeightsMismatchError: weights that do not fit the recipe.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch_load(path)
    except ValueError as e:
        raise InputError(one_line(e)) from None
    if isinstance(ckpt, dict) and "model" in ckpt and "args" in ckpt and "classifier" not in ckpt:  # older finetune
        ckpt["classifier"], ckpt["state_dict"] = _legacy_recipe(ckpt["args"], ckpt["num_classes"]), ckpt.pop("model")
    if not isinstance(ckpt, dict) or "classifier" not in ckpt or "state_dict" not in ckpt:
        raise InputError(f"{path} is not a classifier written by training/finetune.py")
    model, _ = build_model(**ckpt["classifier"])
    load_state_dict(model, ckpt["state_dict"], source=str(path))
    ckpt.pop("optimizer", None)
    return model.to(device).eval(), ckpt


def load_vit(spec: str, device: str = "cpu") -> tuple[nn.Module, dict, str]:
    """A ViT for analysis (attention maps, CKA) from a spec:

    * a classifier file of ``training/finetune.py`` (``runs/x/best.pt``): the trained classifier;
    * a diffclip config name, optionally with weights as ``NAME@PRETRAINED`` (``DiffCLIP-Tiny-64@path/to/dir``):
      its vision tower (no head).

    Returns:
        ``(model in eval mode, data_cfg, label)``.

    Raises:
        InputError: a file that does not load, or weights that do not; UnknownNameError: neither a file nor a name.
    """
    import diffclip

    name, pretrained = diffclip.factory.parse_model_spec(spec)
    if Path(spec).is_file():
        model, ckpt = load_classifier(spec, device)
        return model, ckpt["data_cfg"], \
            f"{ckpt['classifier']['model_name']} ({'/'.join(Path(spec).resolve().parts[-3:-1])})"
    if is_diffclip_name(name):
        try:
            clip = diffclip.create_model(name, pretrained=pretrained)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise InputError(f"{spec}: {one_line(e)}") from None
        data_cfg = _data_cfg(clip.visual, pretrained_cfg=_clip_data_cfg(clip))
        return clip.visual.to(device).eval(), data_cfg, f"{name} vision tower"
    raise UnknownNameError(f"{spec!r} is neither a classifier file of training/finetune.py nor a diffclip model "
                           f"name ({', '.join(diffclip.list_models())}), optionally NAME@PRETRAINED")
