"""The causal text tower of CLIP (Radford et al. 2021), with differential or standard attention.

Module names follow the DiffCLIP release and OpenAI CLIP: ``transformer.resblocks.{i}.ln_1``, ``.attn``,
``.ln_2``, ``.mlp.c_fc``, ``.mlp.c_proj``. The embeddings, ``ln_final`` and ``text_projection`` live on
:class:`diffclip.model.DiffCLIP` itself, as in the release's state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention_layer
from .errors import InputError

__all__ = ["ResidualAttentionBlock", "Transformer", "act_layer"]

_ACTS = ("gelu", "quick_gelu")


def act_layer(name: str) -> type[nn.Module]:
    """A config's activation name to timm's module class (``timm.layers.get_act_layer``): "gelu" (exact GELU) or
    "quick_gelu" (``x * sigmoid(1.702 x)``, OpenAI CLIP's towers and the DiffCLIP text tower). No parameters, so
    the state dict is the same whichever class computes it.

    Raises:
        ValueError: for any other name.
    """
    from timm.layers import get_act_layer

    if name not in _ACTS:
        raise InputError(f"act must be one of {list(_ACTS)}, got {name!r}")
    return get_act_layer(name)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` on (B, N, C) tensors."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, attn_type: str = "diff",
                 lambda_init: float | str = 0.8, act: str = "quick_gelu", depth: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = attention_layer(attn_type)(width, num_heads=heads, qkv_bias=True, lambda_init=lambda_init,
                                                 depth=depth)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act_layer(act)())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = True) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock`, causal by default.

    Args:
        width, layers, heads: tower width C, depth and baseline head count.
        mlp_ratio: hidden width of the MLP over C.
        attn_type: "diff" or "standard".
        lambda_init: a float used in every layer, or "schedule" for ``0.8 - 0.6 exp(-0.3 l)``.
        act: "quick_gelu" (the release) or "gelu".
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, attn_type: str = "diff",
                 lambda_init: float | str = 0.8, act: str = "quick_gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, mlp_ratio, attn_type, lambda_init, act, depth=i)
            for i in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = True) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        for blk in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        return x
