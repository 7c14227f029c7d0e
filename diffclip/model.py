"""DiffCLIP: a CLIP dual encoder (Radford et al. 2021) whose towers use differential attention
(Hammoud and Ghanem, arXiv 2503.06626).

Parameter names follow the DiffCLIP release state dict exactly (reference layout, 517 tensors for
``DiffCLIP-ViT-B-16``): ``visual.*`` (timm ViT), ``transformer.resblocks.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``image_projection``, ``text_projection``, ``logit_scale`` (and
``logit_bias`` only in a model built for SigLIP training). The same class with ``attn_type="standard"`` in a tower
is the CLIP baseline.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from .errors import InputError, WeightsMismatchError
from .files import _umask_mode, full_disk_error
from .text import Transformer
from .vision import vision_tower

__all__ = ["DiffCLIP", "config_differences"]


class DiffCLIP(nn.Module, PyTorchModelHubMixin, library_name="diffclip", tags=["diffclip", "clip"]):
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
        model_name: the config's name (``DiffCLIP-ViT-B-16``), kept in ``config.json`` and the model card;
            :func:`diffclip.create_model` sets it.

    ``save_pretrained(dir)`` / ``from_pretrained(repo_id_or_dir)`` / ``push_to_hub(repo_id)`` come from
    huggingface_hub's ``PyTorchModelHubMixin`` and write ``config.json`` (every argument above, the name
    included: ``diffclip.create_model(dir)`` rebuilds the model from it) + ``model.safetensors`` + a model card
    ``README.md`` (:mod:`diffclip.card`).
    """

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, preprocess_cfg: dict | None = None,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float | None = None,
                 model_name: str | None = None):
        super().__init__()
        self.model_name = model_name
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

    @property
    def model_config(self) -> dict:
        """The config the model was built from (the keyword arguments of ``DiffCLIP``, as saved in
        ``config.json``), without ``model_name``; a copy."""
        return {k: v for k, v in copy.deepcopy(self._hub_mixin_config or {}).items() if k != "model_name"}

    def check_saved_config(self, saved: dict, source: str) -> None:
        """Checks the config that weights were saved with (``config.json`` of ``save_pretrained``, or a training
        checkpoint's ``model_config``) against this model's: the architecture fields and the preprocessing must be
        equal (``init_logit_scale``/``init_logit_bias`` are initial values, not compared). Equal shapes are not
        enough: ``DiffCLIP-Tiny-64`` and ``DiffCLIP-Sched-Tiny-64`` differ only in ``lambda_init``.

        Raises:
            WeightsMismatchError: one line naming ``source``, both model names and every field that differs.
        """
        differ = config_differences(saved, self.model_config)
        if differ:
            theirs = f" (saved from {saved['model_name']})" if saved.get("model_name") else ""
            raise WeightsMismatchError(
                f"{source}{theirs} has another config than {self.model_name or 'this model'} (saved vs model): "
                f"{'; '.join(differ)}")

    def generate_model_card(self, location: str | None = None, repo_id: str | None = None,
                            training: dict | None = None, license: str = "mit") -> ModelCard:
        """The ``README.md`` that ``save_pretrained``/``push_to_hub`` write: :func:`diffclip.card.model_card`
        for this model (``model_card_kwargs`` of those methods are this method's arguments)."""
        from .card import model_card

        return model_card(self.model_name, self.model_config, n_params=sum(p.numel() for p in self.parameters()),
                          location=location, repo_id=repo_id, training=training, license=license)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs):
        """huggingface_hub's ``push_to_hub``, with a model card whose usage snippet names ``hf-hub:<repo_id>``."""
        return super().push_to_hub(repo_id, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """Writes ``config.json`` + ``model.safetensors`` + a model card ``README.md``
        (:meth:`generate_model_card`) like huggingface_hub's mixin, but atomically: into a temporary sibling
        directory first, then each file is moved into place with ``os.replace``, so an interrupted save never
        leaves a half-written file. ``kwargs`` are the mixin's (``push_to_hub=True, repo_id=...`` also uploads;
        ``model_card_kwargs=dict(training=...)`` adds a training section to the card)."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        card = {"location": str(target), **(kwargs.pop("model_card_kwargs", None) or {})}
        if kwargs.get("repo_id"):
            card.setdefault("repo_id", kwargs["repo_id"])
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            result = super().save_pretrained(tmp, model_card_kwargs=card, **kwargs)
            target.mkdir(exist_ok=True)
            for f in sorted(tmp.iterdir()):
                os.chmod(f, _umask_mode())  # safetensors writes 0600; as every other new file (0644)
                os.replace(f, target / f.name)
        except Exception as e:  # a full disk: one OSError naming the folder, not safetensors' own error type
            full = full_disk_error(e, target)
            if full is None:
                raise
            raise full from None
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

    def set_patch_dropout(self, prob: float) -> None:
        """FLIP's patch dropout (Li et al. 2023, arXiv 2212.00794; open_clip's ``force_patch_dropout``): in train
        mode the image tower keeps a random ``1 - prob`` of the patch tokens of each image (at least one; the class
        token always), in eval mode all of them. It is timm's ``PatchDropout``, put where timm's
        ``VisionTransformer(patch_drop_rate=prob)`` puts it (after the position embedding, before the blocks). It
        has no parameters and is not part of the config: weights trained with it load into a model without it.
        ``prob = 0`` removes it.

        Raises:
            ValueError (``InputError``): ``prob`` outside [0, 1).
        """
        from timm.layers import PatchDropout

        if not 0.0 <= prob < 1.0:
            raise InputError(f"patch dropout must be in [0, 1) (the fraction of patch tokens dropped), got {prob}")
        v = self.visual
        v.patch_drop = PatchDropout(prob, num_prefix_tokens=v.num_prefix_tokens) if prob > 0 else nn.Identity()

    @property
    def patch_dropout(self) -> float:
        """The patch dropout probability set by :meth:`set_patch_dropout` (0.0: none)."""
        return float(getattr(self.visual.patch_drop, "prob", 0.0))

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT (Zhai et al. 2022): freezes the image tower and ``image_projection`` (``requires_grad = False``),
        leaving the last ``unlocked_groups`` groups trainable, with open_clip's groups of ``VisionTransformer.lock``:
        [patch embedding, class token, position embedding, pre-norm], each block but the last, [last block, final
        norm], ``image_projection``. ``logit_scale`` stays trainable. ``freeze_bn_stats`` is accepted for open_clip's
        signature; a ViT has no BatchNorm, so it changes nothing (as in open_clip's ViT).

        Raises:
            ValueError (``InputError``): a negative ``unlocked_groups``.
        """
        v = self.visual
        head = ("blocks.", "norm.", "fc_norm.", "head.")
        stem = [p for n, p in v.named_parameters() if not n.startswith(head)]
        groups = [stem, *v.blocks[:-1], [v.blocks[-1], v.norm, v.fc_norm, v.head], self.image_projection]
        _lock(groups, unlocked_groups, "unlocked_groups")

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """LiT's frozen text tower, as open_clip's ``lock_text_tower``: ``token_embedding``,
        ``positional_embedding``, the blocks, ``ln_final`` and ``text_projection`` get ``requires_grad = False``,
        except the last ``unlocked_layers`` of open_clip's groups: [embeddings], each block but the last, [last
        block, ``ln_final``], ``text_projection``. ``logit_scale`` stays trainable.

        Raises:
            ValueError (``InputError``): a negative ``unlocked_layers``, or ``freeze_layer_norm=False`` (open_clip
            does not support it either: LayerNorms are locked like every other weight).
        """
        if not freeze_layer_norm:
            raise InputError("lock_text_tower(freeze_layer_norm=False) is not supported (nor by open_clip): "
                             "LayerNorms are locked like the other weights")
        blocks = self.transformer.resblocks
        groups = [[self.token_embedding, self.positional_embedding], *blocks[:-1], [blocks[-1], self.ln_final],
                  self.text_projection]
        _lock(groups, unlocked_layers, "unlocked_layers")

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


def _parameters(group) -> list[nn.Parameter]:
    """The parameters of a lock group: a parameter, a module, or a list of either."""
    if isinstance(group, nn.Parameter):
        return [group]
    if isinstance(group, nn.Module):
        return list(group.parameters())
    return [p for g in group for p in _parameters(g)]


def _lock(groups: list, unlocked: int, name: str) -> None:
    """Sets ``requires_grad = False`` on every parameter of ``groups``, then True on the last ``unlocked`` groups."""
    if unlocked < 0:
        raise InputError(f"{name} must be >= 0 (the number of trailing groups left trainable), got {unlocked}")
    for p in _parameters(groups):
        p.requires_grad_(False)
    for p in _parameters(groups[len(groups) - min(unlocked, len(groups)):]):
        p.requires_grad_(True)


#: config fields that are initial values only: not compared by :meth:`DiffCLIP.check_saved_config`
_INITIAL_VALUES = ("model_name", "init_logit_scale", "init_logit_bias")


def config_differences(saved: dict, own: dict) -> list[str]:
    """The fields in which two model configs differ, as ``"vision_cfg.lambda_init 0.8 vs 'schedule'"`` (saved vs own),
    nested dicts compared field by field, lists and tuples alike, a missing field shown as ``absent``; the
    initial values ``init_logit_scale``/``init_logit_bias`` and ``model_name`` are left out."""
    out = []
    for key in sorted(set(saved) | set(own)):
        if key in _INITIAL_VALUES:
            continue
        a, b = saved.get(key, "absent"), own.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in config_differences(a, b)]
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            out.append(f"{key} {a!r} vs {b!r}")
    return out
