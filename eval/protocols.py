"""The DiffCLIP paper's linear-probe and few-shot protocols, which it takes from El Banani et al. 2023 ("Learning
Visual Representations via Language-Guided Sampling", github.com/mbanani/lgssl, ``lgssl/evaluation``).

Linear probe (:func:`paper_linear_probe`): logistic regression on the frozen features; the cost C is chosen on a
validation split (the dataset's official one when given, else 20 % of each training class, held out with lgssl's
deterministic shuffle ``random.Random(93)``): a first sweep over 1e-6, 1e-4, ..., 1e6, then lgssl's binary search
over 29 log-spaced costs within ±2 decades of the best; the probe is refit on train + val with the best C and
scored on the test split. The metric is the mean per-class accuracy for FGVC-Aircraft, Oxford Pets, Caltech-101
and Flowers-102 and top-1 accuracy elsewhere (:data:`MEAN_PER_CLASS_DATASETS`, as lgssl's ``evaluate.py``).
The solver is scikit-learn's L-BFGS ``LogisticRegression`` (``max_iter`` 1000, ``random_state`` 0): lgssl's
``use_sklearn=True`` path. (Its default is a torch L-BFGS whose penalty is ``0.5·||W||₂ / C`` on the mean
cross-entropy, with the norm not squared; scikit-learn's is ``0.5·||W||₂² `` against ``C`` times the summed loss.)

Few-shot (:func:`fewshot`): ``episodes`` tasks of ``n_way`` classes drawn at random, ``n_shot`` support images per
class from the training split and ``n_query`` queries per class from the test split (all of a class's test images
when it has fewer); features centred on the support mean and L2-normalised, one prototype per class (the mean of
its shots), each query given the class of the nearest prototype (Euclidean); the result is the mean and standard
deviation (n-1) of the episode accuracies. Seeded with numpy's ``default_rng(seed)``, so it is deterministic (not
the same draws as lgssl's torch sampler).
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections import defaultdict

import numpy as np
import torch

from diffclip.errors import InputError

log = logging.getLogger("diffclip.eval")

#: datasets whose paper metric is the mean per-class accuracy (lgssl's evaluate.py)
MEAN_PER_CLASS_DATASETS = ("fgvc-aircraft", "pets", "caltech101", "flowers102")
COARSE_COSTS = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)


def accuracy(pred: np.ndarray, y: np.ndarray, mean_per_class: bool) -> float:
    """Top-1 accuracy (fraction), or the mean over the classes present in ``y`` of their accuracy."""
    correct = pred == y
    if not mean_per_class:
        return float(correct.mean())
    return float(np.mean([correct[y == c].mean() for c in np.unique(y)]))


def split_trainval(y: np.ndarray, val_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """lgssl's ``split_trainval``: per class (in order of first appearance), the indices shuffled with
    ``random.Random(93)`` and the first ``int(n * val_fraction)`` held out. Returns ``(train, val)`` indices."""
    by_class = defaultdict(list)
    for i, label in enumerate(np.asarray(y).tolist()):
        by_class[label].append(i)
    train, val = [], []
    for indices in by_class.values():
        random.Random(93).shuffle(indices)
        cut = int(len(indices) * val_fraction)
        train += indices[cut:]
        val += indices[:cut]
    return train, val


def _fit(x, y, C: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def paper_linear_probe(x_tr, y_tr, x_te, y_te, *, x_val=None, y_val=None, mean_per_class: bool = False,
                       max_iter: int = 1000) -> tuple[float, dict]:
    """The paper's linear probe (module docstring). Features ``(N, D)`` float arrays, labels ``(N,)`` ints.

    Returns:
        ``(test metric as a fraction, info)``; ``info`` holds the chosen ``C``, every cost tried with its validation
        metric, the split sizes, whether the validation split was official or held out, and ``test_correct`` (0/1
        per test sample).
    """
    official = x_val is not None
    if not official:
        tr, val = split_trainval(y_tr, 0.2)
        x_tr, y_tr, x_val, y_val = x_tr[tr], y_tr[tr], x_tr[val], y_tr[val]
    if len(np.unique(y_tr)) < 2 or len(y_val) == 0:
        raise InputError("the linear probe needs at least 2 classes and a non-empty validation split")

    tried: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in tried:
            tried[C] = accuracy(_fit(x_tr, y_tr, C, max_iter).predict(x_val), y_val, mean_per_class)
        return tried[C]

    coarse = [score(C) for C in COARSE_COSTS]
    best = COARSE_COSTS[coarse.index(max(coarse))]
    costs = torch.logspace(math.log10(best) - 2, math.log10(best) + 2, 29, dtype=torch.float64)
    costs = costs[(costs >= 1e-6) & (costs <= 1e6)].tolist()
    visited = {best: tried[best]}  # lgssl keeps the best coarse cost and the fine costs it visits
    while len(costs) > 1:
        c25, c50, c75 = costs[len(costs) // 4], costs[len(costs) // 2], costs[-len(costs) // 4]
        for C in (c25, c50, c75):
            visited[C] = score(C)
        top = max(visited[c25], visited[c50], visited[c75])
        costs = (costs[: len(costs) // 2] if top == visited[c25]
                 else costs[len(costs) // 2:] if top == visited[c75]
                 else costs[len(costs) // 4: -len(costs) // 4])
    C, val_metric = max(visited.items(), key=lambda kv: kv[1])
    clf = _fit(np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val]), C, max_iter)
    pred = clf.predict(x_te)
    metric = accuracy(pred, y_te, mean_per_class)
    log.info("paper linear probe: C=%.4g (val %.4f over %d fits) -> test %.4f", C, val_metric, len(tried), metric)
    return metric, {"C": C, "val_metric": val_metric, "costs_tried": {f"{c:.6g}": v for c, v in tried.items()},
                    "n_train": int(len(y_tr)), "n_val": int(len(y_val)), "n_test": int(len(y_te)),
                    "val_split": "official" if official else "20% of train per class, random.Random(93)",
                    "test_correct": (pred == y_te).astype(int).tolist()}


def sample_episodes(y_tr, y_te, episodes: int = 5000, n_way: int = 5, n_shot: int = 5, n_query: int = 6,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Few-shot tasks: ``support`` (E, W, S) training indices, ``query`` (E, W, Q) test indices with ``mask``
    (E, W, Q) False where a class has fewer than Q test images, and ``classes`` (E, W).

    Raises:
        ValueError: fewer than ``n_way`` classes with ``n_shot`` training and one test image."""
    y_tr, y_te = np.asarray(y_tr), np.asarray(y_te)
    usable = [c for c in np.unique(y_tr) if (y_tr == c).sum() >= n_shot and (y_te == c).sum() >= 1]
    if len(usable) < n_way:
        raise InputError(f"{n_way}-way {n_shot}-shot episodes need {n_way} classes with >= {n_shot} training and "
                         f">= 1 test images; this dataset has {len(usable)}")
    train_of = {c: np.flatnonzero(y_tr == c) for c in usable}
    test_of = {c: np.flatnonzero(y_te == c) for c in usable}
    rng = np.random.default_rng(seed)
    classes = np.stack([rng.choice(usable, n_way, replace=False) for _ in range(episodes)])
    support = np.zeros((episodes, n_way, n_shot), np.int64)
    query = np.zeros((episodes, n_way, n_query), np.int64)
    mask = np.zeros((episodes, n_way, n_query), bool)
    for e in range(episodes):
        for w, c in enumerate(classes[e]):
            support[e, w] = rng.choice(train_of[c], n_shot, replace=False)
            q = rng.choice(test_of[c], min(n_query, len(test_of[c])), replace=False)
            query[e, w, :len(q)], mask[e, w, :len(q)] = q, True
    return {"classes": classes, "support": support, "query": query, "mask": mask}


def prototype_accuracy(x_tr, x_te, episodes: dict[str, np.ndarray], chunk: int = 500) -> np.ndarray:
    """The accuracy (fraction) of each episode: support-mean centring, L2 normalisation, class prototypes (mean of
    the shots), nearest prototype by Euclidean distance. Returns ``(E,)`` float64."""
    x_tr, x_te = torch.as_tensor(np.asarray(x_tr), dtype=torch.float64), torch.as_tensor(np.asarray(x_te),
                                                                                       dtype=torch.float64)
    support, query = torch.as_tensor(episodes["support"]), torch.as_tensor(episodes["query"])
    mask = torch.as_tensor(episodes["mask"])
    out = []
    for s in range(0, len(support), chunk):
        sup, qry, m = x_tr[support[s:s + chunk]], x_te[query[s:s + chunk]], mask[s:s + chunk]  # (e, W, S|Q, D)
        e, w, n_shot, d = sup.shape
        center = sup.reshape(e, -1, d).mean(dim=1)[:, None, None]
        sup = torch.nn.functional.normalize(sup - center, dim=-1)
        qry = torch.nn.functional.normalize(qry - center, dim=-1)
        protos = sup.mean(dim=2)  # (e, W, D)
        dist = torch.cdist(qry.reshape(e, -1, d), protos)  # (e, W*Q, W)
        pred = dist.argmin(dim=-1).reshape(m.shape)
        truth = torch.arange(w)[None, :, None].expand_as(pred)
        out.append(((pred == truth) & m).sum(dim=(1, 2)).double() / m.sum(dim=(1, 2)))
    return torch.cat(out).numpy()


def fewshot(x_tr, y_tr, x_te, y_te, *, episodes: int = 5000, n_way: int = 5, n_shot: int = 5, n_query: int = 6,
            seed: int = 0) -> dict:
    """The paper's few-shot protocol (module docstring): ``{"fewshot_acc": mean, "fewshot_acc_std": std (n-1),
    "episodes", "n_way", "n_shot", "n_query", "seed", "episode_acc": every episode's accuracy}``; fractions."""
    tasks = sample_episodes(y_tr, y_te, episodes, n_way, n_shot, n_query, seed)
    acc = prototype_accuracy(x_tr, x_te, tasks)
    return {"fewshot_acc": float(acc.mean()), "fewshot_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "episodes": episodes, "n_way": n_way, "n_shot": n_shot, "n_query": n_query, "seed": seed,
            "episode_acc": acc.tolist()}
