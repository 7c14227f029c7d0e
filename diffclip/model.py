"""DiffCLIP: a CLIP dual encoder (Radford et al. 2021) whose towers use differential attention
(Hammoud and Ghanem, arXiv 2503.06626).

Parameter names follow the DiffCLIP release state dict exactly (reference layout, 517 tensors for
``DiffCLIP-ViT-B-16``): ``visual.*`` (timm ViT), ``transformer.resblocks.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``image_projection``, ``text_projection``, ``logit_scale`` (and
``logit_bias`` only in a model built for SigLIP training). The same class with ``attn_type="standard"`` in a tower
is the CLIP baseline.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .errors import InputError
from .text import Transformer
from .vision import vision_tower

__all__ = ["DiffCLIP"]


class DiffCLIP(nn.Module, PyTorchModelHubMixin, library_name="diffclip", tags=["diffclip", "clip"],
               repo_url="https://github.com/diffclip/diffclip"):
    """Dual encoder with an image tower (timm ViT) and a causal text tower.

    Args:
        embed_dim: width of the joint embedding space.
        vision_cfg: keyword arguments of :func:`diffclip.vision.vision_tower` (``image_size``, ``patch_size``,
            ``width``, ``layers``, ``heads``, ``attn_type``, ``lambda_init``, ``pre_norm``, ``patch_bias``, ``act``).
        text_cfg: ``context_length``, ``vocab_size``, ``width``, ``heads``, ``layers``, ``mlp_ratio``,
            ``attn_type``, ``lambda_init``, ``act``.
        preprocess_cfg: ``mean``, ``std``, ``interpolation``, ``train_scale`` for the image transforms.
        init_logit_scale: initial log of the logit scale (log(1/0.07) as in CLIP).
        init_logit_bias: None (CLIP and the release: no bias), or the initial value of SigLIP's learnable 0-d
            ``logit_bias`` (SigLIP: -10), as open_clip's ``init_logit_bias``.

    ``save_pretrained(dir)`` / ``from_pretrained(repo_id_or_dir)`` / ``push_to_hub(repo_id)`` come from
    huggingface_hub's ``PyTorchModelHubMixin`` and write ``config.json`` + ``model.safetensors``.
    """

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, preprocess_cfg: dict | None = None,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.vision_cfg, self.text_cfg = dict(vision_cfg), dict(text_cfg)
        self.preprocess_cfg = dict(preprocess_cfg or {})
        self.visual = vision_tower(**vision_cfg)
        t = dict(text_cfg)
        self.context_length = t.pop("context_length", 77)
        self.vocab_size = t.pop("vocab_size", 49408)
        width = t["width"]
        self.transformer = Transformer(**t)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.image_projection = nn.Parameter(torch.empty(self.visual.embed_dim, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.init_parameters()

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """Writes ``config.json`` + ``model.safetensors`` (+ a model card) like huggingface_hub's mixin, but
        atomically: into a temporary sibling directory first, then each file is moved into place with
        ``os.replace``, so an interrupted save never leaves a half-written file. ``kwargs`` are the mixin's
        (``push_to_hub=True, repo_id=...`` also uploads)."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            result = super().save_pretrained(tmp, **kwargs)
            target.mkdir(exist_ok=True)
            for f in sorted(tmp.iterdir()):
                os.replace(f, target / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    @property
    def image_size(self) -> int:
        """Input resolution of the image tower in pixels (square)."""
        return self.vision_cfg.get("image_size", 224)

    def init_parameters(self) -> None:
        """CLIP's initialisation for the text tower and projections (the ViT keeps timm's)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        w, n = self.transformer.width, self.transformer.layers
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * n) ** -0.5, (2 * w) ** -0.5
        for blk in self.transformer.resblocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                nn.init.normal_(lin.weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.visual.embed_dim ** -0.5)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass of both towers (saves memory)."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) float images, normalised with the config's mean/std -> (B, embed_dim) embeddings,
        L2-normalised along the last dimension when ``normalize``."""
        x = self.visual(image) @ self.image_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, context_length) int64 token ids (CLIP BPE, EOT = the largest id in each row) -> (B, embed_dim),
        pooled at the EOT token after ``ln_final``.

        Raises:
            ValueError: if the sequence is longer than ``context_length``.
        """
        if text.shape[-1] > self.context_length:
            raise InputError(f"text has {text.shape[-1]} tokens, the model's context_length is {self.context_length}")
        n = text.shape[-1]
        x = self.token_embedding(text) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, is_causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict:
        """Returns ``{"image_embed": (B, D), "text_embed": (B, D), "logit_scale": 0-d}`` as the DiffCLIP
        release does: embeddings not normalised, ``logit_scale`` already exponentiated; a model with a
        ``logit_bias`` (SigLIP) adds ``"logit_bias"`` (0-d, as it is). A missing input gives ``None`` for its
        embedding."""
        out = {"image_embed": None if image is None else self.encode_image(image),
               "text_embed": None if text is None else self.encode_text(text),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
