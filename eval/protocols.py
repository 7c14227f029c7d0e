"""The DiffCLIP paper's linear-probe and few-shot protocols, which it takes from El Banani et al. 2023 ("Learning
Visual Representations via Language-Guided Sampling", github.com/mbanani/lgssl, ``lgssl/evaluation`` and
``configs/evaluation.yaml``), arithmetic included, so that the numbers are lgssl's own. ``tests/golden/`` holds
lgssl's outputs on seeded features (and the upstream commit); ``tests/test_protocols.py`` checks every one.

Splits (:func:`train_val_split`): lgssl always has a validation split: the dataset's official one for
FGVC-Aircraft, DTD and Flowers-102, otherwise the first 80 % of the training split in the dataset's order for
training and the last 20 % for validation (TFDS's ``train[:80%]`` / ``train[80%:]``). Both the probe's cost search
and the few-shot support use the training part only; the probe's final fit uses train + validation.

Linear probe (:func:`paper_linear_probe`): logistic regression on the frozen features (lgssl extracts them
without normalisation). The cost C is chosen on the validation split: a first sweep over 1e-6, 1e-4, ..., 1e6, then
lgssl's binary search over 29 log-spaced costs (``torch.logspace`` in float32, as lgssl) within ±2 decades of the
best; the probe is refit on train + val with the best C and scored on the test split. Solvers
(:data:`SOLVERS`):

* ``"lgssl"`` (the default; lgssl's ``use_sklearn: False``): torch's L-BFGS (strong Wolfe line search,
  ``max_iter`` 1000, one ``step``) from zero weights on the mean cross-entropy plus ``(1/C)·0.5·‖W‖₂`` (the norm
  not squared, the bias not penalised), in float32 as lgssl's ``nn.Linear`` is. C is on this penalty's scale (≈1
  where scikit-learn's is 1e-6…1e-3). On CUDA when available, as lgssl (``device``).
* ``"sklearn"`` (lgssl's ``use_sklearn: True``): scikit-learn's L-BFGS ``LogisticRegression`` (``random_state``
  0) in float64, which is what the scikit-learn of lgssl's time used for L-BFGS whatever it was given (today's
  keeps float32, and then stops early at small C).

Metric (:func:`lgssl_accuracy`): lgssl's ``Accuracy`` meter: the argmax of the predicted probabilities, per-class
counts in float32, the mean per-class accuracy (over all the classes the probe was trained on, a class absent from
the split counting 0) for FGVC-Aircraft, Oxford Pets, Caltech-101 and Flowers-102 and top-1 elsewhere
(:data:`MEAN_PER_CLASS_DATASETS`), in percent as a float32 rounded value, so that equal scores tie as in lgssl
(where the first cost reaching the maximum wins). The functions here return fractions (the percent / 100).

Few-shot (:func:`fewshot`): lgssl's ``FewShotEpisodeSampler`` and ``evaluate_fewshot``: per episode
``torch.randperm`` over the training classes picks ``n_way``, then per class ``torch.multinomial`` draws
``n_shot`` support images from the training part and ``n_query`` queries from the test split (all of them when the
class has fewer); features centred on the support mean, L2-normalised, one prototype per class (the mean of its
shots), a query takes the class of the nearest prototype (Euclidean); float32 throughout. The draws come from
torch's CPU generator in the state lgssl's ``evaluate.py`` leaves it in after the probe: seeded with ``seed`` (0 in
lgssl's solver) and advanced by one ``nn.Linear(dim, n_classes)`` initialisation, so ``seed=0`` gives lgssl's own
episodes. lgssl reports the mean and the standard deviation (n-1) of the episode accuracies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from diffclip.errors import InputError, UnknownNameError

log = logging.getLogger("diffclip.eval")

#: datasets whose paper metric is the mean per-class accuracy (lgssl's evaluate.py)
MEAN_PER_CLASS_DATASETS = ("fgvc-aircraft", "pets", "caltech101", "flowers102")
#: datasets whose validation split is the official one in lgssl (lgssl's catalog.py); the others: train[80%:]
OFFICIAL_VAL_DATASETS = ("fgvc-aircraft", "dtd", "flowers102")
COARSE_COSTS = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)
SOLVERS = ("lgssl", "sklearn")


def train_val_split(n: int, train_percent: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """TFDS's ``train[:80%]`` / ``train[80%:]`` of ``n`` examples in their order: the boundary is
    ``round(n · 80 / 100)`` (TFDS's default ``"closest"`` rounding, Python's round). Returns ``(train, val)`` index
    arrays (int64)."""
    cut = int(round(n * train_percent / 100))
    return np.arange(cut), np.arange(cut, n)


def tfds_order(keys, split: str = "train") -> np.ndarray:
    """TFDS's write order of a split's examples: ascending md5 of the split name (the salt) followed by the
    example's key (TFDS's ``core/hashing.py``; str keys utf-8, others via ``str``). Returns the argsort (int64).
    With TFDS's own keys this is TFDS's order; with other keys (the reader's indices) it is an order of the same
    kind: deterministic and blind to the class."""
    salted = hashlib.md5(split.encode())

    def key_hash(key) -> int:
        h = salted.copy()
        h.update(str(key).replace("\\", "/").encode())
        return int(h.hexdigest(), 16)

    return np.array(sorted(range(len(keys)), key=lambda i: key_hash(keys[i])), dtype=np.int64)


def lgssl_accuracy(proba: torch.Tensor, y, num_classes: int, mean_per_class: bool) -> float:
    """lgssl's ``Accuracy`` meter (module docstring) on ``proba`` (N, K) scores and ``y`` (N,) labels in
    ``[0, num_classes)``. Returns the percent value lgssl computes (a float32 result times 100.0)."""
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    correct = (torch.as_tensor(proba).argmax(dim=-1) == y).to(torch.float32)
    correct_per_class = torch.zeros(num_classes).index_add_(0, y, correct)
    total_per_class = torch.zeros(num_classes).index_add_(0, y, torch.ones(len(y)))
    if mean_per_class:
        result = (correct_per_class / (total_per_class + 1e-12)).mean()
    else:
        result = correct_per_class.sum() / (total_per_class.sum() + 1e-12)
    return result.item() * 100.0


class TorchLogisticRegression:
    """lgssl's torch logistic regression (module docstring): ``fit(x (N, D) float32, y (N,) int64 in [0, K))``,
    then ``predict_proba(x) -> (N, K)`` float32 softmax. ``C`` is the inverse strength of the ``0.5·‖W‖₂``
    penalty."""

    def __init__(self, C: float, max_iter: int = 1000, device: str | torch.device = "cpu"):
        self.C, self.max_iter, self.device = C, max_iter, torch.device(device)
        self.weight = self.bias = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> TorchLogisticRegression:
        x, y = x.to(self.device, torch.float32), y.to(self.device)
        k = len(torch.unique(y))
        self.weight = torch.zeros(k, x.shape[1], device=self.device, requires_grad=True)
        self.bias = torch.zeros(k, device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], line_search_fn="strong_wolfe", max_iter=self.max_iter)

        def closure():
            opt.zero_grad()
            logits = F.linear(x, self.weight, self.bias)
            loss = F.cross_entropy(logits, y).mean() + (1.0 / self.C) * (0.5 * self.weight.norm(p=2))
            loss.backward()
            return loss

        opt.step(closure)
        return self

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.device, torch.float32), self.weight, self.bias).softmax(dim=-1).cpu()


class SklearnLogisticRegression:
    """scikit-learn's L-BFGS ``LogisticRegression`` (``random_state`` 0) fitted in float64; ``predict_proba``
    returns a float64 tensor."""

    def __init__(self, C: float, max_iter: int = 1000, device=None):
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(C=C, max_iter=max_iter, random_state=0)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> SklearnLogisticRegression:
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(x.double().cpu().numpy(), y.cpu().numpy())
        return self

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.clf.predict_proba(x.double().cpu().numpy()))


def fit_probe(x, y, C: float, *, solver: str = "lgssl", max_iter: int = 1000, device=None):
    """One probe fitted with ``solver`` (:data:`SOLVERS`) at cost ``C``: an object with ``predict_proba``.

    Raises:
        UnknownNameError: an unknown solver."""
    classes = {"lgssl": TorchLogisticRegression, "sklearn": SklearnLogisticRegression}
    if solver not in classes:
        raise UnknownNameError(f"unknown linear-probe solver {solver!r}; choose from {', '.join(SOLVERS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return classes[solver](C, max_iter, device).fit(_features(x), _labels(y))


def _features(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


def paper_linear_probe(x_tr, y_tr, x_te, y_te, *, x_val=None, y_val=None, mean_per_class: bool = False,
                       solver: str = "lgssl", max_iter: int = 1000, device=None) -> tuple[float, dict]:
    """The paper's linear probe (module docstring). Features ``(N, D)`` float arrays or tensors (float32 for
    lgssl's solver; the sklearn solver fits float64), labels ``(N,)`` ints in ``[0, K)`` with every class in
    the training part. Without ``x_val``/``y_val`` the validation split is the last 20 % of the training split
    (:func:`train_val_split`).

    Returns:
        ``(test metric as a fraction, info)``; ``info`` holds the chosen ``C``, its validation metric, every cost
        tried in order with its validation metric (fractions), the split sizes, the solver and ``test_correct``
        (0/1 per test sample).

    Raises:
        InputError: fewer than 2 classes, an empty validation split, or training labels that are not 0..K-1.
        UnknownNameError: an unknown solver.
    """
    if solver not in SOLVERS:
        raise UnknownNameError(f"unknown linear-probe solver {solver!r}; choose from {', '.join(SOLVERS)}")
    val_rule = "official"
    if x_val is None:
        tr, val = train_val_split(len(y_tr))
        x_tr, x_val, y_tr, y_val = x_tr[tr], x_tr[val], np.asarray(y_tr)[tr], np.asarray(y_tr)[val]
        val_rule = "train[80%:]"
    x_tr, x_val, x_te = _features(x_tr), _features(x_val), _features(x_te)
    y_tr, y_val, y_te = _labels(y_tr), _labels(y_val), _labels(y_te)
    k = len(torch.unique(y_tr))
    if k < 2 or len(y_val) == 0:
        raise InputError("the linear probe needs at least 2 classes and a non-empty validation split")
    if int(y_tr.min()) != 0 or int(y_tr.max()) != k - 1 or int(y_val.max()) >= k:
        raise InputError(f"the linear probe's training labels must be 0..K-1 with every class present; got {k} "
                         f"classes in [{int(y_tr.min())}, {int(y_tr.max())}]")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    tried: dict[float, float] = {}  # percent, as lgssl compares them

    def score(C: float) -> float:
        if C not in tried:
            clf = fit_probe(x_tr, y_tr, C, solver=solver, max_iter=max_iter, device=device)
            tried[C] = lgssl_accuracy(clf.predict_proba(x_val), y_val, k, mean_per_class)
        return tried[C]

    coarse = [score(C) for C in COARSE_COSTS]
    best = COARSE_COSTS[coarse.index(max(coarse))]
    costs = torch.logspace(math.log10(best) - 2, math.log10(best) + 2, 29, dtype=torch.float32)
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
    clf = fit_probe(torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val]), C, solver=solver, max_iter=max_iter,
                    device=device)
    proba = clf.predict_proba(x_te)
    metric = lgssl_accuracy(proba, y_te, len(torch.unique(y_te)), mean_per_class)
    log.info("paper linear probe (%s): C=%.4g (val %.3f%% over %d fits) -> test %.3f%%", solver, C, val_metric,
             len(tried), metric)
    return metric / 100, {"C": C, "val_metric": val_metric / 100, "solver": solver,
                          "costs_tried": [[c, v / 100] for c, v in tried.items()],
                          "n_train": int(len(y_tr)), "n_val": int(len(y_val)), "n_test": int(len(y_te)),
                          "val_split": val_rule,
                          "test_correct": (proba.argmax(dim=-1) == y_te).int().tolist()}


def sample_episodes(y_tr, y_te, episodes: int = 5000, n_way: int = 5, n_shot: int = 5, n_query: int = 6,
                    seed: int = 0, dim: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """lgssl's few-shot episodes: ``episodes`` pairs ``(support, query)`` of training indices (``n_way·n_shot``,
    class by class) and test indices (up to ``n_way·n_query``, class by class), drawn with torch's CPU generator
    seeded with ``seed`` and, when ``dim`` is given, advanced by an ``nn.Linear(dim, n_classes)`` initialisation
    (the state lgssl's evaluate.py leaves after its probe; module docstring). The global RNG is left as it was.

    Raises:
        InputError: fewer than ``n_way`` training classes, or a drawn class with fewer than ``n_shot`` training
            images."""
    y_tr, y_te = np.asarray(y_tr), np.asarray(y_te)
    classes = np.sort(np.unique(y_tr))
    if len(classes) < n_way:
        raise InputError(f"{n_way}-way episodes need {n_way} training classes; this dataset has {len(classes)}")
    train_of = [np.flatnonzero(y_tr == c) for c in classes]
    test_of = [np.flatnonzero(y_te == c) for c in classes]
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dim is not None:
            torch.nn.Linear(dim, len(classes))
        for _ in range(episodes):
            support, query = [], []
            for c in torch.randperm(len(classes))[:n_way].tolist():
                if len(train_of[c]) < n_shot:
                    raise InputError(f"class {classes[c]} has {len(train_of[c])} training images, fewer than "
                                     f"the {n_shot} shots of an episode")
                support.append(train_of[c][torch.multinomial(torch.ones(len(train_of[c])), n_shot).numpy()])
                test_c = test_of[c]
                query.append(test_c if len(test_c) < n_query
                             else test_c[torch.multinomial(torch.ones(len(test_c)), n_query).numpy()])
            out.append((np.concatenate(support), np.concatenate(query)))
    return out


def prototype_accuracy(x_tr, y_tr, x_te, y_te, episodes, n_shot: int = 5) -> np.ndarray:
    """lgssl's ``evaluate_fewshot`` per episode (module docstring) on float32 features. Returns ``(E,)`` float32
    accuracies (fractions)."""
    x_tr, x_te = _features(x_tr).float(), _features(x_te).float()
    y_tr, y_te = _labels(y_tr), _labels(y_te)
    acc = np.zeros(len(episodes), np.float32)
    for e, (support, query) in enumerate(episodes):
        s, q = x_tr[support], x_te[query]
        mean = s.mean(dim=0, keepdim=True)
        s, q = F.normalize(s - mean, dim=-1, p=2), F.normalize(q - mean, dim=-1, p=2)
        protos = s.view(len(support) // n_shot, n_shot, -1).mean(dim=1)
        proto_labels = y_tr[support].view(-1, n_shot)[:, 0]
        pred = proto_labels[(q[:, None] - protos[None, :]).norm(dim=-1, p=2).min(dim=1).indices]
        acc[e] = (pred == y_te[query]).float().mean().item()
    return acc


def fewshot(x_tr, y_tr, x_te, y_te, *, episodes: int = 5000, n_way: int = 5, n_shot: int = 5, n_query: int = 6,
            seed: int = 0) -> dict:
    """The paper's few-shot protocol (module docstring) with the support drawn from ``x_tr`` (the training part,
    :func:`train_val_split`). Returns ``{"fewshot_acc": mean, "fewshot_acc_std": std (n-1), "episodes", "n_way",
    "n_shot", "n_query", "seed", "episode_acc": every episode's accuracy}``; fractions."""
    tasks = sample_episodes(y_tr, y_te, episodes, n_way, n_shot, n_query, seed, dim=np.shape(x_tr)[1])
    acc = prototype_accuracy(x_tr, y_tr, x_te, y_te, tasks, n_shot).astype(np.float64)
    return {"fewshot_acc": float(acc.mean()), "fewshot_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "episodes": episodes, "n_way": n_way, "n_shot": n_shot, "n_query": n_query, "seed": seed,
            "episode_acc": acc.tolist()}
