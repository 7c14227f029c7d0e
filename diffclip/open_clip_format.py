"""open_clip's folder format, both ways: export an ``OpenCLIP-*`` model to it, check its config on the way in.

The format (open_clip 3.x ``push_to_hf_hub.save_for_hf``, read by ``open_clip.create_model_and_transforms(
"local-dir:<folder>")`` and by ``"hf-hub:org/repo"``)::

    open_clip_config.json        {"model_cfg": {embed_dim, quick_gelu, vision_cfg, text_cfg[, init_logit_bias]},
                                  "preprocess_cfg": {mean, std, interpolation, resize_mode}}
    open_clip_model.safetensors  open_clip's state dict (fused ``attn.in_proj_*``, ``visual.conv1``...)

Only configs that open_clip's ``CLIP`` class can build export: standard attention in both towers, pre-norm ViT
(``ln_pre``), no bias on the patch embedding, biased q/k/v, one activation for both towers: the ``OpenCLIP-*``
configs. Weights map by name (the inverse of :func:`diffclip.hub.convert_open_clip_state_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from .errors import InputError
from .files import write_bytes, write_json

__all__ = ["OPEN_CLIP_CONFIG", "OPEN_CLIP_WEIGHTS", "open_clip_model_cfg", "to_open_clip_state_dict",
           "save_open_clip", "check_open_clip_config"]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
#: our vision-block parameter names -> open_clip's (hub.convert_open_clip_state_dict reads it backwards)
VISION_BLOCK_NAMES = {"norm1": "ln_1", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_model_cfg(config: dict, name: str = "this model") -> dict:
    """open_clip's ``model_cfg`` for one of our configs (:func:`diffclip.get_model_config`).

    Raises:
        InputError: one line naming the field when open_clip's ``CLIP`` cannot build the config (differential
            attention, no ``ln_pre``, a biased patch embedding, unbiased q/k/v, two activations, odd head widths).
    """
    v, t = config["vision_cfg"], config["text_cfg"]
    needs = {"vision_cfg.attn_type": (v.get("attn_type"), "standard"), "text_cfg.attn_type": (t.get("attn_type"), "standard"),
             "vision_cfg.pre_norm": (v.get("pre_norm", False), True),
             "vision_cfg.patch_bias": (v.get("patch_bias", True), False),
             "vision_cfg.qkv_bias": (v.get("qkv_bias", True), True),
             "text_cfg.act": (t.get("act", "quick_gelu"), v.get("act", "gelu"))}
    for field, (got, want) in needs.items():
        if got != want:
            raise InputError(f"{name} does not export to open_clip: {field} is {got!r}, open_clip's CLIP needs "
                             f"{want!r} (export the OpenCLIP-* configs)")
    if v["width"] % v["heads"]:
        raise InputError(f"{name} does not export to open_clip: vision width {v['width']} is not a multiple of "
                         f"{v['heads']} heads")
    cfg = {"embed_dim": config["embed_dim"], "quick_gelu": v.get("act") == "quick_gelu",
           "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                          "layers": v["layers"], "head_width": v["width"] // v["heads"],
                          "mlp_ratio": v.get("mlp_ratio", 4.0)},
           "text_cfg": {"context_length": t.get("context_length", 77), "vocab_size": t.get("vocab_size", 49408),
                        "width": t["width"], "heads": t["heads"], "layers": t["layers"],
                        "mlp_ratio": t.get("mlp_ratio", 4.0)}}
    return cfg


def to_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict of an ``OpenCLIP-*`` model under open_clip's names: ``{q,k,v}_proj`` -> fused
    ``attn.in_proj_{weight,bias}`` (q, k, v stacked on dim 0); ``visual.cls_token`` (1, 1, C) ->
    ``visual.class_embedding`` (C,); ``visual.pos_embed`` (1, N, C) -> ``visual.positional_embedding`` (N, C);
    ``visual.patch_embed.proj`` -> ``visual.conv1``; ``visual.norm_pre/norm`` -> ``visual.ln_pre/ln_post``;
    ``image_projection`` -> ``visual.proj``; timm's block names -> ``visual.transformer.resblocks.{i}.*``.
    Tensors are made contiguous (safetensors needs it)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "visual.cls_token":
            k, v = "visual.class_embedding", v.reshape(-1)
        elif k == "visual.pos_embed":
            k, v = "visual.positional_embedding", v.squeeze(0)
        elif k == "image_projection":
            k = "visual.proj"
        elif k.startswith("visual.patch_embed.proj."):
            k = "visual.conv1." + k[len("visual.patch_embed.proj."):]
        elif k.startswith("visual.norm_pre."):
            k = "visual.ln_pre." + k[len("visual.norm_pre."):]
        elif k.startswith("visual.norm."):
            k = "visual.ln_post." + k[len("visual.norm."):]
        elif k.startswith("visual.blocks."):
            idx, name = k[len("visual.blocks."):].split(".", 1)
            for ours, theirs in VISION_BLOCK_NAMES.items():
                if name.startswith(ours + "."):
                    name = theirs + name[len(ours):]
                    break
            k = f"visual.transformer.resblocks.{idx}.{name}"
        out[k] = v
    fused: dict[str, torch.Tensor] = {}
    for k in [k for k in out if ".attn.q_proj." in k]:
        prefix, kind = k.split(".attn.q_proj.")
        parts = [out.pop(f"{prefix}.attn.{p}_proj.{kind}") for p in "qkv"]
        fused[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return {k: v.contiguous() for k, v in {**out, **fused}.items()}


def save_open_clip(model, save_directory: str | Path) -> Path:
    """Writes ``model`` (a :class:`diffclip.DiffCLIP` of an ``OpenCLIP-*`` config) as an open_clip folder:
    ``open_clip_config.json`` + ``open_clip_model.safetensors``, each written atomically. open_clip then loads it
    with ``open_clip.create_model_and_transforms("local-dir:<folder>")`` (or ``hf-hub:`` once uploaded) and gives
    the same embeddings and the same eval transform.

    Returns:
        The folder.

    Raises:
        InputError: the model's config does not export (:func:`open_clip_model_cfg`).
    """
    config = model.model_config
    model_cfg = open_clip_model_cfg(config, getattr(model, "model_name", None) or "this model")
    if getattr(model, "logit_bias", None) is not None:  # SigLIP-trained: open_clip makes the parameter from this
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    p = config.get("preprocess_cfg") or {}
    preprocess = {"mean": list(p.get("mean", (0.485, 0.456, 0.406))), "std": list(p.get("std", (0.229, 0.224, 0.225))),
                  "interpolation": p.get("interpolation", "bicubic"), "resize_mode": "shortest"}
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_open_clip_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    write_bytes(folder / OPEN_CLIP_WEIGHTS, safetensors_bytes(sd))
    write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    return folder


def check_open_clip_config(config_path: str | Path, model_config: dict, model_name: str) -> None:
    """Checks an ``open_clip_config.json`` against the config its weights go into: the activation (``quick_gelu``
    needs an ``OpenCLIP-*-quickgelu`` config) and the head counts, which the state dict does not show.

    Raises:
        InputError: one line naming the file, the field and both values."""
    try:
        cfg = json.loads(Path(config_path).read_text()).get("model_cfg") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"{config_path}: not an open_clip config ({e})") from None
    v, t = model_config["vision_cfg"], model_config["text_cfg"]
    quick = bool(cfg.get("quick_gelu", False))
    ours = "quick_gelu" if quick else "gelu"
    for tower, c in (("vision_cfg", v), ("text_cfg", t)):
        if c.get("act") != ours:
            raise InputError(f"{config_path}: quick_gelu is {str(quick).lower()} but {model_name} uses "
                             f"{c.get('act')!r} in {tower}; pick the OpenCLIP config with that activation"
                             f"{' (-quickgelu)' if quick else ' (without -quickgelu)'}")
    oc_v, oc_t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    heads = {"vision_cfg": (oc_v["width"] // oc_v.get("head_width", 64) if "width" in oc_v else None, v.get("heads")),
             "text_cfg": (oc_t.get("heads", 8) if "width" in oc_t else None, t.get("heads"))}
    for tower, (theirs, own) in heads.items():
        if theirs is not None and theirs != own:
            raise InputError(f"{config_path}: {tower} has {theirs} attention heads but {model_name} has {own}")
