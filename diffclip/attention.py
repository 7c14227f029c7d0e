"""Multi-head differential attention and the standard attention it is compared with.

Differential attention (Ye et al., "Differential Transformer", arXiv 2410.05258, eq. 1-3), in the
form the DiffCLIP release uses (Hammoud and Ghanem, arXiv 2503.06626)::

    [Q1; Q2] = X Wq,   [K1; K2] = X Wk,   V = X Wv
    A1 = softmax(Q1 K1^T / sqrt(d)),   A2 = softmax(Q2 K2^T / sqrt(d))
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init
    head = (1 - lambda_init) * RMSNorm((A1 - lambda A2) V)

``num_heads`` is the head count of the standard-attention baseline (the DiffCLIP convention): the layer
has ``num_heads // 2`` differential heads whose queries and keys have ``d = dim // num_heads``
channels each and whose values have ``2d``. Query/key channel block ``2i`` is Q1/K1 of differential
head ``i`` and block ``2i + 1`` is its Q2/K2, which is the release's weight layout.

Three paths compute the heads, chosen by one switch, ``path`` (equal up to float rounding when there is no
dropout; with ``attn_drop > 0`` in training the SDPA paths drop A1 and A2 independently inside SDPA, the exact
path drops A1 - lambda A2):

* ``"wide"``: ``(A1 - lambda A2) V = A1 V - lambda A2 V``, so two ``scaled_dot_product_attention`` calls
  with a value of width ``2d`` form both products without materialising any N x N map in Python (the
  memory-efficient kernels on CUDA);
* ``"split"``: one SDPA call over ``4h`` heads of equal width ``d`` (each map times each half of V), for
  kernels that need the value as wide as the query;
* ``"exact"``: A1 and A2 materialised in fp32 and combined *before* the product with V, so there is one value
  product per differential head instead of two. PyTorch's CPU SDPA has no fused kernel for a value wider than
  the query and materialises the maps anyway, so on CPU this is the fastest path (``bench/attention.py``); it is
  the only one that can keep the maps: ``keep_maps = True`` records them in ``attn_maps`` (and needs ``"exact"``);
* ``"auto"`` (default): ``"exact"`` on CPU, ``"wide"`` on other devices.

:class:`Attention` has the same switch with ``"auto"``/``"sdpa"`` (PyTorch's SDPA) and ``"exact"``.

Both layers take input ``x`` of shape (B, N, dim) and return (B, N, dim) in ``x.dtype``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffclip.errors import InputError

__all__ = ["DiffAttention", "Attention", "lambda_init_schedule", "ATTENTION_TYPES", "attention_layer", "DIFF_PATHS",
           "STANDARD_PATHS"]


def lambda_init_schedule(layer_index: int) -> float:
    """Depth schedule of lambda_init from the Differential Transformer paper (sec. 2.1).

    Args:
        layer_index: 0-based index of the layer in its tower (int >= 0).

    Returns:
        ``0.8 - 0.6 * exp(-0.3 * layer_index)`` (float, 0.2 at layer 0, tending to 0.8).

    Raises:
        ValueError: if ``layer_index`` is negative.
    """
    if layer_index < 0:
        raise InputError(f"layer_index must be >= 0, got {layer_index}")
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def _additive_mask(attn_mask: torch.Tensor | None, is_causal: bool, n_q: int, n_k: int,
                   device: torch.device) -> torch.Tensor | None:
    """Turns a boolean (True = attend) or additive float mask plus causality into one fp32 additive mask."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, device=device).masked_fill(~attn_mask, float("-inf"))
        else:
            mask = attn_mask.float()
    if is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(n_q, n_k, device=device).masked_fill(~causal, float("-inf"))
        mask = causal if mask is None else mask + causal
    return mask


def _check_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None and is_causal:
        raise InputError("pass either attn_mask or is_causal=True, not both")


DIFF_PATHS = ("auto", "wide", "split", "exact")
STANDARD_PATHS = ("auto", "sdpa", "exact")


def _check_path(path: str, allowed: tuple[str, ...]) -> str:
    if path not in allowed:
        raise InputError(f"path must be one of {', '.join(allowed)}, got {path!r}")
    return path


def _check_timm_options(qk_norm: bool, scale_norm: bool, device, dtype) -> None:
    """timm's ``Block`` passes these to every attention layer; ours support only their defaults."""
    for name, value in (("qk_norm", qk_norm), ("scale_norm", scale_norm)):
        if value:
            raise InputError(f"{name}=True is not supported by diffclip's attention layers")
    if device is not None or dtype is not None:
        raise InputError("diffclip's attention layers are built on the default device and dtype; move or cast the "
                         "model afterwards (device/dtype given)")


def _add_projections(layer: nn.Module, dim: int, qkv_bias: bool, proj_bias: bool, attn_drop: float,
                     proj_drop: float) -> None:
    """The parts both attention layers share: q/k/v/out projections (C x C), dropouts and the map-keeping state."""
    layer.keep_maps = False
    layer.attn_maps = None
    layer.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
    layer.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
    layer.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
    layer.out_proj = nn.Linear(dim, dim, bias=proj_bias)
    layer.attn_drop = nn.Dropout(attn_drop)
    layer.proj_drop = nn.Dropout(proj_drop)


class DiffAttention(nn.Module):
    """Multi-head differential attention (arXiv 2410.05258 eq. 1-3; DiffCLIP layout).

    Args:
        dim: model width C; must be divisible by ``num_heads``.
        num_heads: head count of the standard baseline; must be even (halved internally into
            ``num_heads // 2`` differential heads with query/key width ``dim // num_heads``).
        qkv_bias: bias on the q/k/v projections (True in the DiffCLIP release).
        proj_bias: bias on the output projection.
        attn_drop: dropout on the attention maps before the product with V (probability, train mode only; see
            the module docstring for how the paths differ).
        proj_drop: dropout after the output projection.
        lambda_init: a constant lambda_init (0.8 in the DiffCLIP release), or "schedule" for the paper's
            depth schedule :func:`lambda_init_schedule` evaluated at ``depth``.
        depth: 0-based index of this layer in its tower, for ``lambda_init="schedule"``. timm's ``Block`` does
            not pass it to a non-timm attention class, so the vision tower (:mod:`diffclip.vision`) sets
            ``lambda_init`` per block after timm builds them; the text tower passes it.
        path: "auto" (default: "exact" on CPU, "wide" elsewhere), "wide", "split" or "exact" (module docstring);
            also settable later as the attribute ``path``.
        qk_norm, scale_norm, norm_layer, device, dtype: what timm's ``Block`` passes to its attention layer;
            only the defaults are supported (``norm_layer`` is unused).

    Raises:
        ValueError: if ``num_heads`` is odd, ``dim`` is not divisible by ``num_heads``, ``lambda_init`` is an
            unknown string, ``path`` is not one of the four (checked at construction and at the forward pass),
            ``qk_norm``/``scale_norm`` is True, or ``keep_maps`` is set with a path other than "exact".

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (C x C), ``lambda_q1``, ``lambda_k1``,
    ``lambda_q2``, ``lambda_k2`` (d,), initialised N(0, 0.1), ``diff_norm.weight`` (2d,).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, lambda_init: float | str = 0.8,
                 depth: int = 0, path: str = "auto", qk_norm: bool = False, scale_norm: bool = False,
                 norm_layer=None, device=None, dtype=None):
        super().__init__()
        _check_timm_options(qk_norm, scale_norm, device, dtype)
        if num_heads < 2 or num_heads % 2:
            raise InputError(f"differential attention needs an even num_heads (the baseline's head count, "
                             f"halved internally), got num_heads={num_heads}")
        if dim % num_heads:
            raise InputError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads // 2  # differential heads
        self.head_dim = dim // num_heads  # query/key width d; values have 2d
        if lambda_init == "schedule":
            lambda_init = lambda_init_schedule(depth)
        elif isinstance(lambda_init, str):
            raise InputError(f"lambda_init must be a number or 'schedule', got {lambda_init!r}")
        self.lambda_init = float(lambda_init)
        self.path = _check_path(path, DIFF_PATHS)
        _add_projections(self, dim, qkv_bias, proj_bias, attn_drop, proj_drop)
        self.diff_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5)
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim))
        self.reset_lambda()

    def reset_lambda(self) -> None:
        """Re-draws the four lambda vectors from N(0, 0.1) (the paper's initialisation)."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def lambda_full(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init: a 0-d fp32 tensor (arXiv 2410.05258 eq. 2)."""
        l1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        l2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init

    @staticmethod
    def _fused_wide(q, k, v, lam, attn_mask, is_causal, dropout_p):
        """Two SDPA calls, (Q1, K1, V) and (Q2, K2, V), each with the value of width 2d (paper, sec. 2.1)."""
        B, h2, N, d = q.shape
        q = q.view(B, h2 // 2, 2, N, d)
        k = k.view(B, h2 // 2, 2, N, d)
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.size(1) == h2:
            attn_mask = attn_mask.view(B, h2 // 2, 2, N, -1)
            masks = (attn_mask[:, :, 0], attn_mask[:, :, 1])
        else:
            masks = (attn_mask, attn_mask)
        o1 = F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v, attn_mask=masks[0], is_causal=is_causal,
                                            dropout_p=dropout_p)
        o2 = F.scaled_dot_product_attention(q[:, :, 1], k[:, :, 1], v, attn_mask=masks[1], is_causal=is_causal,
                                            dropout_p=dropout_p)
        return torch.addcmul(o1, o2, -lam.to(o1.dtype))  # o1 - lam * o2 in one pass: (B, h, N, 2d)

    @staticmethod
    def _fused_split(q, k, v, lam, attn_mask, is_causal, dropout_p):
        """One SDPA call over 4h heads of equal width d (each map times each half of V), for flash kernels
        that need the value as wide as the query (the official code's four-call variant, batched)."""
        B, h2, N, d = q.shape
        h = h2 // 2
        q4 = q.view(B, h, 2, 1, N, d).expand(B, h, 2, 2, N, d).reshape(B, 4 * h, N, d)
        k4 = k.view(B, h, 2, 1, N, d).expand(B, h, 2, 2, N, d).reshape(B, 4 * h, N, d)
        v4 = v.view(B, h, N, 2, d).permute(0, 1, 3, 2, 4).unsqueeze(2).expand(B, h, 2, 2, N, d).reshape(B, 4 * h, N, d)
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.size(1) == h2:
            attn_mask = attn_mask.repeat_interleave(2, dim=1)
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
        o = o.view(B, h, 2, 2, N, d)
        o = o[:, :, 0] - lam.to(o.dtype) * o[:, :, 1]  # (B, h, 2 halves, N, d)
        return o.permute(0, 1, 3, 2, 4).reshape(B, h, N, 2 * d)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Applies differential attention.

        Args:
            x: (B, N, C) float tensor.
            attn_mask: optional mask broadcastable to (B, 1, N, N): bool (True = may attend) or additive float.
            is_causal: mask every key after its query (text towers).

        Returns:
            (B, N, C) tensor in ``x.dtype``.
        """
        _check_mask(attn_mask, is_causal)
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, N, 2 * h, d).transpose(1, 2)  # (B, 2h, N, d): 2i -> Q1, 2i+1 -> Q2
        k = self.k_proj(x).view(B, N, 2 * h, d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, h, 2 * d).transpose(1, 2)  # (B, h, N, 2d)
        lam = self.lambda_full()
        mode = _check_path(self.path, DIFF_PATHS)
        if mode == "auto":
            mode = "exact" if x.device.type == "cpu" else "wide"
        if self.keep_maps and mode != "exact":
            raise InputError(f"keep_maps needs path='exact' (the only path that materialises the maps), got {mode!r}")
        if mode != "exact":
            if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.size(1) == h:
                attn_mask = attn_mask.repeat_interleave(2, dim=1)
            dropout_p = self.attn_drop.p if self.training else 0.0
            if mode == "split":
                o = self._fused_split(q, k, v, lam, attn_mask, is_causal, dropout_p)
            else:
                o = self._fused_wide(q, k, v, lam, attn_mask, is_causal, dropout_p)
        else:
            scores = (q.float() * d ** -0.5) @ k.float().transpose(-1, -2)  # (B, 2h, N, N)
            mask = _additive_mask(attn_mask, is_causal, N, N, x.device)
            if mask is not None:
                if mask.dim() == 4 and mask.size(1) == h:
                    mask = mask.repeat_interleave(2, dim=1)
                scores = scores + mask
            a = scores.softmax(dim=-1).view(B, h, 2, N, N)
            a1, a2 = a[:, :, 0], a[:, :, 1]
            diff = torch.addcmul(a1, a2, -lam)  # A1 - lambda A2 in one pass
            if self.keep_maps:
                self.attn_maps = {"a1": a1.detach(), "a2": a2.detach(), "diff": diff.detach(),
                                  "lambda": lam.detach(), "live": diff}  # live: in the graph, for relevance
            o = (self.attn_drop(diff) @ v.float()).to(x.dtype)
        # the head-wise RMSNorm runs in fp32 (as the release does), also under bf16/fp16 autocast; the (1 - lambda_init)
        # factor is folded into its (2d,) gain rather than applied as one more pass over the (B, h, N, 2d) output
        gain = self.diff_norm.weight * (1.0 - self.lambda_init)
        o = F.rms_norm(o.float(), self.diff_norm.normalized_shape, gain.float(), self.diff_norm.eps).to(o.dtype)
        o = o.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.out_proj(o))


class Attention(nn.Module):
    """Standard multi-head softmax attention with the same interface and projection names as
    :class:`DiffAttention` (separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``), so that a model's
    attention type is one config field (Vaswani et al. 2017; the baseline of arXiv 2503.06626).

    Args:
        dim: model width C; must be divisible by ``num_heads``.
        num_heads: number of heads h (width ``dim // num_heads`` each).
        qkv_bias, proj_bias, attn_drop, proj_drop, qk_norm, scale_norm, norm_layer, device, dtype: as in
            :class:`DiffAttention`.
        path: "auto" or "sdpa" (PyTorch's ``scaled_dot_product_attention``) or "exact" (the maps materialised in
            fp32; needed for ``keep_maps``).
        lambda_init, depth: accepted so that both attention types take one signature; unused.

    Raises:
        ValueError: if ``dim`` is not divisible by ``num_heads``, an unknown ``path``, ``qk_norm``/``scale_norm``
            True, or ``keep_maps`` with a path other than "exact".
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, path: str = "auto", lambda_init=None, depth: int = 0,
                 qk_norm: bool = False, scale_norm: bool = False, norm_layer=None, device=None, dtype=None):
        super().__init__()
        _check_timm_options(qk_norm, scale_norm, device, dtype)
        if num_heads < 1 or dim % num_heads:
            raise InputError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.path = _check_path(path, STANDARD_PATHS)
        _add_projections(self, dim, qkv_bias, proj_bias, attn_drop, proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Same contract as :meth:`DiffAttention.forward`: (B, N, C) -> (B, N, C)."""
        _check_mask(attn_mask, is_causal)
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, N, h, d).transpose(1, 2)
        k = self.k_proj(x).view(B, N, h, d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, h, d).transpose(1, 2)
        mode = _check_path(self.path, STANDARD_PATHS)
        if self.keep_maps and mode != "exact":
            raise InputError(f"keep_maps needs path='exact' (the only path that materialises the maps), got {mode!r}")
        if mode != "exact":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
            mask = _additive_mask(attn_mask, is_causal, N, N, x.device)
            if mask is not None:
                scores = scores + mask
            a = scores.softmax(dim=-1)
            if self.keep_maps:
                self.attn_maps = {"a": a.detach(), "live": a}
            o = (self.attn_drop(a) @ v.float()).to(x.dtype)
        o = o.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.out_proj(o))


ATTENTION_TYPES = {"diff": DiffAttention, "standard": Attention}


def attention_layer(attn_type: str) -> type[nn.Module]:
    """Returns the attention class for a config's ``attn_type`` ("diff" or "standard").

    Raises:
        ValueError: for any other name.
    """
    try:
        return ATTENTION_TYPES[attn_type]
    except KeyError:
        raise InputError(f"attn_type must be one of {sorted(ATTENTION_TYPES)}, got {attn_type!r}") from None
