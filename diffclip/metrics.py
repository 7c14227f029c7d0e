"""Evaluation metrics shared by training and the eval programs, named as in CLIP_benchmark.

Ties are broken deterministically everywhere: candidates are ranked by score, highest first, and among equal
scores by index, lowest first (a stable descending sort). The rank of a candidate ``j`` in a row ``s`` is
therefore ``#{i: s[i] > s[j]} + #{i < j: s[i] == s[j]}``, and it is among the top ``k`` when its rank is
below ``k``. The same rule gives ``argmax`` (first maximum), so top-1 and top-k agree.
"""

from __future__ import annotations

import torch

from diffclip.errors import InputError

__all__ = ["rank_of", "classification_metrics", "retrieval_metrics"]


def rank_of(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``scores[i, index[i]]`` in each row of ``scores`` (ties: lower index first).

    Args:
        scores: (N, M) float scores.
        index: (N,) int64 column of the candidate in each row.

    Returns:
        (N,) int64 ranks in ``[0, M)``.
    """
    target = scores.gather(1, index[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > target) | ((scores == target) & (cols < index[:, None]))
    return ahead.sum(dim=1)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of class scores.

    Args:
        logits: (N, C) scores (any monotone scale: logits, probabilities, similarities).
        targets: (N,) int64 labels in ``[0, C)``.

    Returns:
        ``acc1``; ``acc5`` only when there are at least 5 classes (top-5 of fewer classes is always 1);
        ``mean_per_class_recall``: top-1 recall averaged over the classes present in ``targets`` (classes with
        no sample are left out, as scikit-learn's ``balanced_accuracy_score`` does). All in [0, 1].

    Raises:
        ValueError: on empty input, mismatched lengths, or labels outside ``[0, C)``.
    """
    logits, targets = torch.as_tensor(logits).float().cpu(), torch.as_tensor(targets).long().cpu()
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise InputError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise InputError("classification_metrics needs at least one sample and one class")
    if targets.min() < 0 or targets.max() >= c:
        raise InputError(f"targets must lie in [0, {c}), got values in [{int(targets.min())}, {int(targets.max())}]")
    ranks = rank_of(logits, targets)
    out = {"acc1": (ranks < 1).double().mean().item()}
    if c >= 5:
        out["acc5"] = (ranks < 5).double().mean().item()
    correct = (ranks == 0).double()
    counts = torch.bincount(targets, minlength=c).double()
    hits = torch.bincount(targets, weights=correct, minlength=c)
    present = counts > 0
    out["mean_per_class_recall"] = (hits[present] / counts[present]).mean().item()
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 1024,
                      ranks: dict | None = None) -> dict[str, float]:
    """Recall@k of text->image and image->text retrieval with several captions per image (CLIP_benchmark).

    Scores are dot products ``text_emb @ image_emb.T`` (pass L2-normalised embeddings for cosine similarity).

    * ``image_retrieval_recall@k``: each caption queries the images; a hit when its own image is in the top k.
    * ``text_retrieval_recall@k``: each image queries the captions; a hit when any of its captions is in the
      top k, i.e. when its best-ranked caption is.

    Ties follow the module rule (equal scores: lower index first), so results do not depend on the hardware.

    Args:
        image_emb: (N_img, D).
        text_emb: (N_txt, D).
        text_to_image: (N_txt,) int64, the image index of each caption.
        ks: the k values.
        chunk_size: queries scored at a time (bounds memory to chunk_size x max(N_img, N_txt)).
        ranks: a dict that, when given, receives ``"image"`` (N_txt,) and ``"text"`` (N_img,) int64: the 0-based
            rank of each caption's image and of each image's best caption (a hit at k: rank < k).

    Returns:
        ``{"image_retrieval_recall@k": ..., "text_retrieval_recall@k": ...}`` for each k, floats in [0, 1].

    Raises:
        ValueError: on shape mismatches, image indices out of range, or an image without any caption.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    text_to_image = torch.as_tensor(text_to_image).long().to(text_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(f"expected (N_img, D) and (N_txt, D) embeddings, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if text_to_image.shape != (n_txt,):
        raise InputError(f"text_to_image must have one entry per caption ({n_txt}), got {tuple(text_to_image.shape)}")
    if n_img == 0 or n_txt == 0:
        raise InputError("retrieval_metrics needs at least one image and one caption")
    if text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise InputError(f"text_to_image values must lie in [0, {n_img})")
    n_captions = torch.bincount(text_to_image, minlength=n_img)
    if (n_captions == 0).any():
        missing = (n_captions == 0).nonzero().flatten()[:5].tolist()
        raise InputError(f"{int((n_captions == 0).sum())} images have no caption (e.g. indices {missing})")

    # text -> image: one positive per query.
    img_ranks = []
    for s in range(0, n_txt, chunk_size):
        scores = text_emb[s:s + chunk_size] @ image_emb.T
        img_ranks.append(rank_of(scores, text_to_image[s:s + chunk_size]))
    img_ranks = torch.cat(img_ranks)

    # image -> text: the best positive is the first one in the (score desc, index asc) order.
    txt_ranks = []
    caption_cols = torch.arange(n_txt, device=text_emb.device)
    for s in range(0, n_img, chunk_size):
        scores = image_emb[s:s + chunk_size] @ text_emb.T
        rows = torch.arange(s, s + scores.shape[0], device=text_emb.device)
        positive = text_to_image[None, :] == rows[:, None]
        masked = scores.masked_fill(~positive, float("-inf"))
        best_score = masked.max(dim=1, keepdim=True).values
        # first positive column reaching the best score (argmax on ties is not guaranteed to be the first)
        first = torch.where(positive & (masked == best_score), caption_cols[None, :], n_txt).min(dim=1).values
        txt_ranks.append(rank_of(scores, first))
    txt_ranks = torch.cat(txt_ranks)

    if ranks is not None:  # the per-query ranks, for per-sample statistics (bootstrap)
        ranks.update(image=img_ranks.cpu(), text=txt_ranks.cpu())
    out = {f"image_retrieval_recall@{k}": (img_ranks < k).double().mean().item() for k in ks}
    out.update({f"text_retrieval_recall@{k}": (txt_ranks < k).double().mean().item() for k in ks})
    return out
