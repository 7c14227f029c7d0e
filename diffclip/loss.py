"""Contrastive losses of CLIP training, with features gathered across data-parallel ranks.

* :class:`ClipLoss`: the symmetric InfoNCE loss of CLIP (Radford et al. 2021, "Learning Transferable Visual
  Models From Natural Language Supervision", fig. 3): cross-entropy over the rows and over the columns of
  ``logit_scale * img @ txt.T``, the matching pairs on the diagonal. Distributed conventions follow open_clip
  (``--local-loss``, ``--gather-with-grad``).
* :class:`SigLipLoss`: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
  Pre-Training", eq. 1), with the model's learnable ``logit_bias`` (initialised to -10, the logit scale to log 10).

Both take L2-normalised features ``(n, D)`` of the ``n`` local samples and the exponentiated logit scale (0-d),
and return the loss of the *global* batch of ``N = n * world_size`` pairs (with ``local_loss``, and for SigLIP,
this rank's share of it: the mean over ranks is the global loss). Under DDP (which averages the
gradients of the ranks) every variant marked exact below yields, after that averaging, exactly the gradient
that one process computing the loss over the whole global batch would get:

* ``local_loss=False, gather_with_grad=False`` (default), exact: each rank's backward reaches only its own
  slice of the gathered features, so the gradient of the local features is scaled by ``world_size``
  (:class:`_ScaleGrad`) to turn DDP's mean over ranks into the sum the global batch needs;
* ``local_loss=False, gather_with_grad=True``, exact: the backward of the autograd all-gather sums the ranks'
  gradients;
* ``local_loss=True, gather_with_grad=True``, exact: each rank computes its ``n`` rows against all ``N`` columns;
* ``local_loss=True, gather_with_grad=False``, not exact: the column terms of the other ranks' rows are lost
  (open_clip behaves the same); pass ``--gather-with-grad`` with ``--local-loss``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "SigLipLoss", "gather_features", "clamp_logit_scale", "MAX_LOGIT_SCALE"]

#: upper bound of the (log) logit scale, as in CLIP: the exponentiated scale stays <= 100
MAX_LOGIT_SCALE = math.log(100)


def clamp_logit_scale(logit_scale: torch.Tensor) -> None:
    """Clamps the log logit scale parameter in place to [0, ln 100] (CLIP, sec. 2.5); call after each step."""
    with torch.no_grad():
        logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks and returns this rank's slice
    (the adjoint of the gather); all-reduce based, so it works with gloo as well as NCCL."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None


def _all_gather_no_grad(x: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.detach().contiguous())
    return out


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates the features of all ranks in rank order.

    Args:
        image_features, text_features: (n, D) local features; every rank must have the same ``n``.
        local_loss: only used to decide whether gradients need rescaling (see the module table).
        gather_with_grad: use an autograd all-gather (:class:`_AllGatherWithGrad`: its backward sums the
            gradients of all ranks into each rank's slice); otherwise a plain all-gather whose local slice is
            replaced by the local tensors, so that gradients reach them.
        rank, world_size: this process's rank and the number of processes.

    Returns:
        ``(all_image_features, all_text_features)``, each (n * world_size, D); the inputs themselves when
        ``world_size == 1``.
    """
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return (_AllGatherWithGrad.apply(image_features, rank, world_size),
                _AllGatherWithGrad.apply(text_features, rank, world_size))
    if not local_loss:
        # Each rank backpropagates only through its own slice; DDP then averages over ranks, but the batch
        # gradient is the sum of the slices' contributions: scale by world_size to make DDP's mean that sum.
        image_features = _ScaleGrad.apply(image_features, float(world_size))
        text_features = _ScaleGrad.apply(text_features, float(world_size))
    all_image = _all_gather_no_grad(image_features, world_size)
    all_text = _all_gather_no_grad(text_features, world_size)
    all_image[rank], all_text[rank] = image_features, text_features
    return torch.cat(all_image, dim=0), torch.cat(all_text, dim=0)


class ClipLoss(nn.Module):
    """Symmetric contrastive (InfoNCE) loss of CLIP over the global batch.

    ``loss = (CE(s * I @ T.T, arange(N)) + CE(s * T @ I.T, arange(N))) / 2`` with ``I``, ``T`` the (N, D)
    L2-normalised image and text features of all ranks and ``s`` the exponentiated logit scale. With
    ``local_loss`` each rank computes only its ``n`` rows (against all ``N`` columns) of both terms, which
    saves the (N, N) logits; DDP's gradient averaging then makes the mean of the ranks' losses the objective,
    which equals the global loss.

    Args:
        local_loss: compute only the local rows (open_clip ``--local-loss``); use with ``gather_with_grad``.
        gather_with_grad: gather features with an autograd all-gather (open_clip ``--gather-with-grad``).
        rank, world_size: position of this process in the data-parallel group.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size
        self._labels: dict = {}

    @property
    def exact(self) -> bool:
        """Whether DDP's averaged gradient equals the single-process gradient of the global batch."""
        return self.world_size == 1 or not self.local_loss or self.gather_with_grad

    def _get_labels(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._labels:
            offset = n * self.rank if self.local_loss else 0
            self._labels = {key: torch.arange(n, device=device) + offset}
        return self._labels[key]

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
               logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: (n, N) each with ``local_loss``, else (N, N) each."""
        all_image, all_text = gather_features(image_features, text_features, local_loss=self.local_loss,
                                              gather_with_grad=self.gather_with_grad, rank=self.rank,
                                              world_size=self.world_size)
        if self.local_loss:
            return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T
        logits_per_image = logit_scale * all_image @ all_text.T
        return logits_per_image, logits_per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image_features, text_features: (n, D) L2-normalised local features (pair i is image i, text i).
            logit_scale: 0-d, the exponentiated scale (``model(...)["logit_scale"]``).

        Returns:
            0-d loss: the global loss, or with ``local_loss`` this rank's share (the mean over ranks is the
            global loss).
        """
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = self._get_labels(logits_per_image.shape[0], logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1), ``--siglip``.

    ``loss = -1/N * sum_ij log sigmoid(z_ij * (s * I_i . T_j + b))`` with ``z_ij = 1`` for matching pairs and
    ``-1`` otherwise, over the global batch. Each rank computes its ``n`` images against the texts of all
    ranks (gathered with an autograd all-gather, so the gradient is exact after DDP's averaging) and divides
    by ``n``; the mean over ranks is the global loss.

    The bias ``b`` is the model's learnable ``logit_bias`` (a :class:`diffclip.DiffCLIP` built with
    ``init_logit_bias``, as in open_clip), passed in like the scale: DDP averages its gradient with the model's,
    checkpoints and exports hold it. SigLIP initialises it to :data:`INIT_LOGIT_BIAS` (-10) and the log logit scale
    to :data:`INIT_LOGIT_SCALE` (log 10); the trainer builds the model so with ``--siglip``.

    Args:
        rank, world_size: position of this process in the data-parallel group.
    """

    #: SigLIP's initial log logit scale (scale 10)
    INIT_LOGIT_SCALE = math.log(10)
    #: SigLIP's initial logit bias
    INIT_LOGIT_BIAS = -10.0

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    exact = True

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: torch.Tensor) -> torch.Tensor:
        """(n, N) logits of the local images against the texts of all ranks."""
        if self.world_size > 1:
            text_features = _AllGatherWithGrad.apply(text_features, self.rank, self.world_size)
        return logit_scale * image_features @ text_features.T + logit_bias

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image_features, text_features: (n, D) L2-normalised local features.
            logit_scale: 0-d exponentiated scale (``model(...)["logit_scale"]``).
            logit_bias: 0-d bias (``model(...)["logit_bias"]``).

        Returns:
            0-d loss: this rank's share (equal to the global loss in one process).
        """
        logits = self.logits(image_features, text_features, logit_scale, logit_bias)
        n = logits.shape[0]
        signs = -torch.ones_like(logits)
        idx = torch.arange(n, device=logits.device)
        signs[idx, idx + n * self.rank] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n
