"""Hugging Face ``transformers.CLIPModel`` checkpoints (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``: the format of ``openai/clip-vit-base-patch16`` and most CLIP weights on the hub) mapped by
name onto open_clip's layout, which :func:`diffclip.hub.convert_open_clip_state_dict` maps onto the ``OpenCLIP-*``
configs; loading is strict (every tensor placed, every shape checked).

Name map (``i`` a layer; ``t`` = ``text_model.``, ``v`` = ``vision_model.``)::

    v.embeddings.class_embedding          -> visual.class_embedding
    v.embeddings.patch_embedding.weight   -> visual.conv1.weight
    v.embeddings.position_embedding.weight-> visual.positional_embedding
    v.pre_layrnorm / v.post_layernorm     -> visual.ln_pre / visual.ln_post
    visual_projection.weight (E, D)       -> visual.proj (D, E)
    t.embeddings.token_embedding.weight   -> token_embedding.weight
    t.embeddings.position_embedding.weight-> positional_embedding
    t.final_layer_norm                    -> ln_final
    text_projection.weight (E, D)         -> text_projection (D, E)
    {v,t}.encoder.layers.i.self_attn.{q,k,v}_proj -> {visual.,}transformer.resblocks.i.attn.in_proj_{weight,bias}
    ... .self_attn.out_proj / layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2
                                          -> ... .attn.out_proj / ln_1 / ln_2 / mlp.c_fc / mlp.c_proj
    logit_scale                           -> logit_scale
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffclip.errors import InputError

__all__ = ["is_hf_clip_state_dict", "hf_clip_to_open_clip", "check_hf_config"]

_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_FIXED = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
}
_NORMS = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post",
          "text_model.final_layer_norm": "ln_final"}


def is_hf_clip_state_dict(sd: dict) -> bool:
    """True for a ``transformers.CLIPModel`` state dict."""
    return "vision_model.embeddings.patch_embedding.weight" in sd and "text_model.embeddings.token_embedding.weight" in sd


def hf_clip_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip names of a ``CLIPModel`` state dict (module docstring); ``position_ids`` buffers are dropped.

    Raises:
        ValueError: a tensor that has no place (named), e.g. another architecture's.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in _FIXED:
            out[_FIXED[k]] = v
            continue
        if k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.t().contiguous()
            continue
        norm = next((n for n in _NORMS if k.startswith(n + ".")), None)
        if norm:
            out[_NORMS[norm] + k[len(norm):]] = v
            continue
        for tower, prefix in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                              ("text_model.encoder.layers.", "transformer.resblocks.")):
            if k.startswith(tower):
                idx, name = k[len(tower):].split(".", 1)
                part = name.rsplit(".", 1)  # (module, weight|bias)
                if part[0] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    qkv.setdefault(f"{prefix}{idx}.attn.in_proj_{part[1]}", {})[part[0][-6]] = v
                elif part[0] in _LAYER:
                    out[f"{prefix}{idx}.{_LAYER[part[0]]}.{part[1]}"] = v
                else:
                    raise InputError(f"CLIPModel tensor {k!r} has no place in the open_clip layout")
                break
        else:
            raise InputError(f"CLIPModel tensor {k!r} has no place in the open_clip layout")
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise InputError(f"CLIPModel attention {name}: q, k and v projections expected, found {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def check_hf_config(config_path: str | Path, model_config: dict, model_name: str) -> None:
    """Checks a ``CLIPModel`` ``config.json`` against the config the weights go into: the activation (OpenAI's
    ``quick_gelu`` needs an ``OpenCLIP-*-quickgelu`` config) and the sizes the state dict does not show.

    Raises:
        ValueError: one line naming the file, the field and both values."""
    cfg = json.loads(Path(config_path).read_text())
    for tower, ours in (("vision_config", model_config["vision_cfg"]), ("text_config", model_config["text_cfg"])):
        theirs = cfg.get(tower) or {}
        act = theirs.get("hidden_act", "quick_gelu")
        if act != ours.get("act"):
            raise InputError(f"{config_path}: {tower}.hidden_act is {act!r} but {model_name} uses {ours.get('act')!r}"
                             f"; pick the OpenCLIP config with that activation (e.g. -quickgelu)")
        heads = theirs.get("num_attention_heads")
        if heads is not None and heads != ours.get("heads"):
            raise InputError(f"{config_path}: {tower}.num_attention_heads is {heads} but {model_name} has "
                             f"{ours.get('heads')}")
