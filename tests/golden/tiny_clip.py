"""The tiny standard-attention CLIP both relevance implementations are run on (tests/golden/make_chefer_golden.py,
tests/test_relevance_chefer.py): OpenAI CLIP's layout (what Chefer's CLIP code loads), its weights drawn from numpy's
``default_rng(SEED)`` in the order of ``chefer.json``'s ``"weights"`` list, so both sides rebuild the same numbers."""

from __future__ import annotations

import numpy as np

SEED = 0
# Chefer's CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
# vocab_size, transformer_width, transformer_heads, transformer_layers); OpenAI's vision heads are width // 64
CHEFER_ARGS = (32, 32, 3, 128, 8, 16, 64, 64, 1, 2)
# the same model as a diffclip.DiffCLIP config
CONFIG = dict(embed_dim=32,
              vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=3, heads=2, mlp_ratio=4.0,
                              attn_type="standard", qkv_bias=True, pre_norm=True, patch_bias=False, act="quick_gelu"),
              text_cfg=dict(context_length=16, vocab_size=64, width=64, heads=1, layers=2, mlp_ratio=4.0,
                            attn_type="standard", act="quick_gelu"))
# two queries as token ids (the end-of-text token is the largest id, where both towers pool)
TOKENS = np.array([[1, 7, 12, 63] + [0] * 12, [1, 20, 33, 41, 62] + [0] * 11], dtype=np.int64)


def weights(names_and_shapes: list[tuple[str, list[int]]]) -> dict[str, np.ndarray]:
    """float32 arrays in OpenAI's layout: layer-norm scales 1 + 0.1·N(0,1), ``logit_scale`` log(1/0.07), the
    (in, out) projections N(0, 1/in), other matrices N(0, 1/fan-in), vectors 0.1·N(0,1)."""
    rng = np.random.default_rng(SEED)
    out = {}
    for name, shape in names_and_shapes:
        z = rng.standard_normal(shape)
        if name == "logit_scale":
            v = np.full(shape, np.log(1 / 0.07))
        elif name.endswith(".weight") and name.split(".")[-2].startswith("ln"):
            v = 1 + 0.1 * z
        elif name in ("visual.proj", "text_projection"):
            v = z / np.sqrt(shape[0])
        elif len(shape) >= 2:
            v = z / np.sqrt(np.prod(shape[1:]))
        else:
            v = 0.1 * z
        out[name] = v.astype(np.float32)
    return out


def image() -> np.ndarray:
    """(1, 3, 32, 32) float32."""
    return np.random.default_rng(SEED + 1).standard_normal((1, 3, 32, 32)).astype(np.float32)
