"""Where a CLIP model looks when an image is matched against a text query (the DiffCLIP paper's Figure 2): the
relevance of Chefer et al. 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV), as its CLIP notebook computes it (github.com/hila-chefer/
Transformer-MM-Explainability, ``CLIP_explainability.ipynb``, ``interpret``), on the image tower.

The score is CLIP's logit ``s = exp(logit_scale) · <normalize(encode_image(x)), normalize(encode_text(query))>``.
For every block ``b`` from ``start_layer`` on (the notebook's default ``-1``: the last block only; ``0``: every
block, the paper's rule) with attention map ``A`` (B, h, N, N), the relevance, started at the identity ``R = I``
(N, N), is updated as ``R ← R + mean_h((∂s/∂A ⊙ A)⁺) · R``. The query's map is the class token's row of ``R`` over
the patch tokens (``R[0, 1:]``, Chefer's ``image_relevance``), normalised to sum to 1 by default (non-negative; all
zeros when no gradient-weighted attention is positive). ``tests/golden/chefer.json`` holds what Chefer's own code
gives on a tiny standard-attention CLIP; ``tests/test_relevance_chefer.py`` checks both settings to 1e-6.

Differential attention (our adaptation; Chefer has no equivalent): a differential block mixes the values with
``A1 − λ·A2`` (per head, before its sub-layer norm), so that is the map ``A`` the rule reads, with its gradient;
its entries can be negative, and the rule's ``(·)⁺`` keeps only the positive gradient-weighted part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffclip.errors import InputError

__all__ = ["attention_layers", "text_query_relevance", "plot_queries"]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules (DiffAttention or Attention) of the model's blocks, in depth order."""
    from diffclip.attention import Attention, DiffAttention

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise InputError("the model has no .blocks (not a timm VisionTransformer)")
    layers = [b.attn for b in blocks]
    if not all(isinstance(a, (DiffAttention, Attention)) for a in layers):
        raise InputError("the model's attention is not diffclip's (DiffAttention / Attention): no maps to read")
    return layers


def text_query_relevance(model, image: torch.Tensor, tokens: torch.Tensor, *, start_layer: int = -1,
                         normalize: bool = True) -> torch.Tensor:
    """The relevance map of a query (module docstring).

    Args:
        model: a :class:`diffclip.DiffCLIP` (either attention type in the image tower).
        image: (1, 3, H, W) float32, already transformed.
        tokens: (1, L) int64 tokens of one query.
        start_layer: the first block propagated (Chefer's ``start_layer``): -1 the last block only (the notebook's
            default), 0 every block; blocks before it are left out.
        normalize: divide by the sum (default); False gives Chefer's ``image_relevance`` as it is.

    Returns:
        (gh, gw) float32, non-negative, summing to 1 (or all zeros) when ``normalize``.

    Raises:
        InputError: the image tower is not a diffclip ViT, or ``start_layer`` is not -1 or a block index.
    """
    visual = model.visual
    layers = attention_layers(visual)
    if not -1 <= start_layer < len(layers):
        raise InputError(f"start_layer must be -1 (the last block) or a block index 0..{len(layers) - 1}, "
                         f"got {start_layer}")
    start = len(layers) - 1 if start_layer == -1 else start_layer
    saved = [(a.keep_maps, a.path) for a in layers]
    try:
        for a in layers:
            a.keep_maps, a.path = True, "exact"
        with torch.enable_grad():
            img = F.normalize(model.encode_image(image).float(), dim=-1)
            with torch.no_grad():
                txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
            score = model.logit_scale.exp().float() * (img * txt).sum()
            maps = [a.attn_maps["live"] for a in layers]
            grads = torch.autograd.grad(score, maps)
    finally:
        for a, (k, path) in zip(layers, saved):
            a.keep_maps, a.path = k, path
            a.attn_maps = None
    n = maps[0].size(-1)
    rel = torch.eye(n, dtype=torch.float64)
    for a, g in list(zip(maps, grads))[start:]:
        cam = (g.detach().double() * a.detach().double()).clamp(min=0).mean(dim=1)[0]  # (N, N)
        rel = rel + cam @ rel
    prefix = getattr(visual, "num_prefix_tokens", 1)
    row = rel[0, prefix:].float()
    total = row.sum()
    row = row / total if normalize and total > 0 else row
    return row.reshape(*visual.patch_embed.grid_size)


def plot_queries(image, results: list[tuple[str, list[torch.Tensor]]], queries: list[str], title: str,
                 path: str) -> None:
    """One row per model (``results``: (label, one map per query)), the input then one heat map per query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from diffclip.files import save_figure

    img = np.asarray(image.convert("RGB"))
    rows, cols = len(results), len(queries) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for r, (label, maps) in enumerate(results):
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(label, fontsize=9)
        for c, (query, m) in enumerate(zip(queries, maps), start=1):
            up = F.interpolate(m[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            axes[r, c].imshow(img)
            axes[r, c].imshow(up.numpy(), cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, c].set_title(f'"{query}"', fontsize=9)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
