"""ViT image classifiers: building one (timm's differential ``diff_vit_*`` / standard ``std_vit_*`` / ``vit_*``
models, or a DiffCLIP/CLIP config's vision tower with a new head), its transforms, and loading one back for
analysis (checkpoints written by ``eval/finetune.py``, or a diffclip config's vision tower). Used by the
fine-tuning program and by the attention-map and CKA tools."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import nn

from diffclip.cli import UsageError, one_line
from diffclip.hub import read_state_dict, torch_load
from diffclip.images import ToMode

__all__ = ["build_model", "build_transforms", "count_params", "load_classifier", "eval_transform", "load_vit",
           "random_train_transform"]


def is_diffclip_name(name: str) -> bool:
    import diffclip

    return name in diffclip.list_models() or name.startswith("hf-hub:")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_kwargs(args: argparse.Namespace, num_classes: int) -> dict:
    kw = dict(num_classes=num_classes, drop_path_rate=args.drop_path)
    for key in ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.qkv_bias is not None:
        kw["qkv_bias"] = bool(args.qkv_bias)
    if args.lambda_init is not None:
        if not args.model.startswith("diff_vit"):
            raise UsageError("--lambda-init applies to diff_vit_* models only")
        kw["lambda_init"] = args.lambda_init
    return kw


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
    """Weights of a checkpoint file: safetensors, a plain state dict, or a dict holding one under
    ``model``/``state_dict``/``module`` (``module.`` prefixes removed), through :func:`diffclip.hub.read_state_dict`
    (the allow-listed reader)."""
    try:
        sd = read_state_dict(path)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise UsageError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


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
        raise UsageError(f"{path}: shapes do not fit the model for {bad[:3]} (e.g. {tuple(sd[bad[0]].shape)} vs "
                         f"{tuple(own[bad[0]].shape)}); pass the matching --embed-dim/--depth/--patch-size")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UsageError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _clip_data_cfg(clip: nn.Module) -> dict:
    """A DiffCLIP/CLIP model's image preprocessing as a timm pretrained cfg (its vision tower has none)."""
    pp = clip.preprocess_cfg
    size = clip.visual.patch_embed.img_size[0]
    return dict(input_size=(3, size, size), mean=tuple(pp.get("mean", (0.485, 0.456, 0.406))),
                std=tuple(pp.get("std", (0.229, 0.224, 0.225))), interpolation="bicubic", crop_pct=1.0)


def _data_cfg(model: nn.Module, args: argparse.Namespace | None = None, pretrained_cfg: dict | None = None) -> dict:
    """The transforms' data config of ``model``, resolved by timm's ``resolve_data_config`` from the model's
    pretrained cfg (or ``pretrained_cfg``), its input size and channels and ``--mean``/``--std``.

    Returns:
        {"img_size": int, "in_chans": int, "mean": tuple, "std": tuple}, the form stored in checkpoints.

    Raises:
        UsageError: ``--mean``/``--std`` with neither 1 nor ``in_chans`` values.
    """
    from timm.data import resolve_data_config

    in_chans = getattr(args, "in_chans", None) or 3
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"in_chans": in_chans, "img_size": grid[0] if grid else getattr(args, "img_size", None)}
    for key in ("mean", "std"):
        value = getattr(args, key, None)
        if value is not None and len(value) not in (1, in_chans):
            raise UsageError(f"--{key} needs {in_chans} values, got {len(value)}")
        # timm's pretrained cfgs give 3-channel statistics, which would broadcast silently over 1 channel
        overrides[key] = value if value is not None else ((0.5,) if in_chans != 3 else None)
    cfg = resolve_data_config(overrides, pretrained_cfg=pretrained_cfg, model=model)
    return dict(img_size=cfg["input_size"][-1], in_chans=cfg["input_size"][0], mean=tuple(cfg["mean"]),
                std=tuple(cfg["std"]))


def build_model(args: argparse.Namespace, num_classes: int, load_init: bool = True) -> tuple[nn.Module, dict]:
    """Builds the classifier of ``args`` with a fresh ``num_classes``-way head.

    Returns:
        ``(model, data_cfg)`` with ``data_cfg`` = {"img_size", "in_chans", "mean", "std"} for the transforms.
    """
    import timm

    import diffclip  # noqa: F401  (registers diff_vit_* / std_vit_*)

    if is_diffclip_name(args.model):
        for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "lambda_init"):
            if getattr(args, key) is not None:
                raise UsageError(f"--{key.replace('_', '-')} cannot change the tower of {args.model}")
        if args.in_chans not in (None, 3):
            raise UsageError(f"the tower of {args.model} takes 3-channel images; drop --in-chans")
        pretrained = args.init if load_init and args.init != "scratch" else None
        try:
            clip = diffclip.create_model(args.model, pretrained=pretrained)
        except FileNotFoundError as e:
            raise UsageError(f"--init {args.init}: {e}") from None
        model = clip.visual
        model.reset_classifier(num_classes)
        model.train()
        if args.drop_path:
            _set_drop_path(model, args.drop_path)
        if args.img_size is not None and args.img_size != model.patch_embed.img_size[0]:
            model.set_input_size(img_size=args.img_size)
        data_cfg = _data_cfg(model, args, pretrained_cfg=_clip_data_cfg(clip))
    else:
        if not timm.is_model(args.model):
            raise UsageError(f"unknown model {args.model!r}: not a timm model (diff_vit_*, std_vit_*, vit_*...) "
                             f"nor a diffclip config ({', '.join(diffclip.list_models())})")
        try:
            model = timm.create_model(args.model, **_model_kwargs(args, num_classes))
        except (ValueError, TypeError, AssertionError) as e:
            raise UsageError(f"cannot build {args.model}: {e}") from None
        if load_init and args.init != "scratch":
            _load_backbone(model, args.init)
        data_cfg = _data_cfg(model, args)
    return model, data_cfg


def random_train_transform(args: argparse.Namespace) -> bool:
    return bool(args.randaug or args.reprob > 0 or args.hflip > 0 or args.scale is not None)


def build_transforms(args: argparse.Namespace, data_cfg: dict):
    """(train, eval) transforms from timm's ``create_transform``: PIL image -> normalised float tensor."""
    from timm.data import create_transform
    from torchvision import transforms as T

    size, mean, std = data_cfg["img_size"], data_cfg["mean"], data_cfg["std"]
    mode = ToMode("L" if data_cfg["in_chans"] == 1 else "RGB")
    if data_cfg["in_chans"] not in (1, 3):
        raise UsageError(f"--in-chans must be 1 or 3, got {data_cfg['in_chans']}")
    if random_train_transform(args):
        train = create_transform(size, is_training=True, auto_augment=args.randaug, hflip=args.hflip,
                                 scale=tuple(args.scale) if args.scale else (1.0, 1.0), ratio=(3 / 4, 4 / 3),
                                 re_prob=args.reprob, mean=mean, std=std, interpolation="bicubic")
    else:
        train = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    evalt = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    return T.Compose([mode, train]), T.Compose([mode, evalt])


def load_classifier(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A model trained by this script (``best.pt`` / ``last.pt``), rebuilt from its stored arguments.

    Returns:
        ``(model in eval mode, checkpoint dict without the optimizer)``; ``ckpt["data_cfg"]`` gives the transforms.
    """
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch_load(path)
    except (OSError, ValueError) as e:
        raise UsageError(one_line(e)) from None
    if not isinstance(ckpt, dict) or "args" not in ckpt or "model" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by eval/finetune.py")
    args = argparse.Namespace(**ckpt["args"])
    model, _ = build_model(args, ckpt["num_classes"], load_init=False)
    model.load_state_dict(ckpt["model"])
    ckpt.pop("optimizer", None)
    return model.to(device).eval(), ckpt


def eval_transform(data_cfg: dict):
    """The evaluation transform (resize, tensor, normalise) for a model's ``data_cfg``."""
    args = argparse.Namespace(randaug=None, reprob=0.0, hflip=0.0, scale=None)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}
    return build_transforms(args, cfg)[1]


def load_vit(spec: str, device: str = "cpu") -> tuple[nn.Module, dict, str]:
    """A ViT for analysis (attention maps, CKA) from a spec:

    * a checkpoint written by this script (``runs/x/best.pt``): the trained classifier;
    * a diffclip config name, optionally with weights as ``NAME@PRETRAINED`` (``DiffCLIP-Tiny-64@path/to/dir``):
      its vision tower (no head).

    Returns:
        ``(model in eval mode, data_cfg, label)``.
    """
    import diffclip

    name, _, pretrained = spec.partition("@")
    if Path(spec).is_file():
        model, ckpt = load_classifier(spec, device)
        return model, ckpt["data_cfg"], f"{ckpt['args']['model']} ({'/'.join(Path(spec).resolve().parts[-3:-1])})"
    if name in diffclip.list_models() or name.startswith("hf-hub:"):
        try:
            clip = diffclip.create_model(name, pretrained=pretrained or None)
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"{spec}: {one_line(e)}") from None
        data_cfg = _data_cfg(clip.visual, pretrained_cfg=_clip_data_cfg(clip))
        return clip.visual.to(device).eval(), data_cfg, f"{name} vision tower"
    raise UsageError(f"{spec!r} is neither a checkpoint file of eval/finetune.py nor a diffclip model name "
                     f"({', '.join(diffclip.list_models())}), optionally NAME@PRETRAINED")
