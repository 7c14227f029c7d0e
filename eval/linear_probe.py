"""Linear probe (and k-shot probe) on frozen image features with scikit-learn's logistic regression.

    python eval/linear_probe.py --model DiffCLIP-ViT-B-16 --pretrained cc12m --dataset cifar10 --data-root /data
    python eval/linear_probe.py ... --dataset pets --fewshot-k 10 --seeds 0 1 2

Protocol (CLIP_benchmark / CLIP paper): L2-normalised image embeddings; the inverse regularisation strength C
(weight decay 1 / (C n)) is chosen on a validation split carved from the training split (``--val-proportion``,
stratified, fixed seed) by a coarse log-grid sweep refined by bisection in log space; the probe is then refit on
the whole training split with that C and scored on the test split: ``lp_acc1``, ``lp_acc5`` (>= 5 classes),
``lp_mean_per_class_recall``.

k-shot (``--fewshot-k k``): per seed, k training images per class are drawn; C is chosen on up to k other
training images per class (when there are any), the probe is fit on the k-shot set only; the metrics are the
mean over seeds, with ``*_std`` (population std) beside them and every seed's values under ``per_seed``.

Features are cached on disk (``--feature-cache``, keyed by model, weights, dataset, split, root, preprocessing,
precision and sample limit; a random-init model's weights by a hash of them, so each ``--seed`` has its own), so
sweeps and k-shot seeds reuse one extraction.

The DiffCLIP paper's protocol (``--protocol paper``, :mod:`diffclip.eval.protocols`, from El Banani et al. 2023):
the linear probe with lgssl's cost search and metric (mean per-class accuracy for FGVC-Aircraft, Pets, Caltech-101,
Flowers-102; top-1 elsewhere) and the few-shot episodes (5-way 5-shot, 6 queries, 5,000 episodes, nearest centred
prototype), both from one feature extraction; the record says ``"protocol": "paper"``.

Several datasets: ``--output`` ending in ``.jsonl`` gets one record per line, or an ``--output`` holding
``{dataset}`` gets one file per dataset (CLIP_benchmark's form); one record per file either way.

The paper's 9 linear-probe sets: caltech101, dtd, pets, flowers102, sun397, fgvc-aircraft, cifar10, cifar100,
food101 (``--dataset paper`` runs all of them from one ``--data-root``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffclip.eval import readers
from diffclip.eval.common import (
    cache_key,
    extract_image_features,
    limit,
    make_loader,
    model_transform,
    result_record,
    weights_fingerprint,
)
from diffclip.eval.protocols import (
    MEAN_PER_CLASS_DATASETS,
    OFFICIAL_VAL_DATASETS,
    SOLVERS,
    fewshot,
    paper_linear_probe,
    tfds_order,
    train_val_split,
)
from diffclip.eval.runner import program_parser, run_program, write_record, write_records

from diffclip.cli import UsageError, positive_float, positive_int, run, unit_interval
from diffclip.errors import InputError
from diffclip.files import write_bytes
from diffclip.metrics import classification_metrics
from diffclip.runtime import get_autocast

log = logging.getLogger("diffclip.eval")
TASK = "linear_probe"
PAPER_LINEAR_PROBE_DATASETS = ("caltech101", "dtd", "pets", "flowers102", "sun397", "fgvc-aircraft", "cifar10",
                               "cifar100", "food101")
#: the training split of the probe where it is not "train"
TRAIN_SPLITS = {"pets": "trainval", "flowers102": "trainval", "dtd": "trainval", "fgvc-aircraft": "trainval",
                "imagenet1k": "train", "tiny-imagenet": "train"}
C_GRID = tuple(10.0 ** e for e in range(-2, 5))


def default_splits(name: str) -> tuple[str, str]:
    """(train split, test split) of the probe for a dataset name."""
    spec = readers.dataset_spec(name)
    test = spec.default_split if spec.default_split not in ("all",) else "test"
    return TRAIN_SPLITS.get(spec.name, "train"), test


# ---------------------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------------------

def _save_npz_atomic(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def _read_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, y)`` of a feature-cache entry, or None (with a warning) when it does not load: a truncated or damaged
    file is recomputed and replaced atomically, never an error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"shapes {x.shape} and {y.shape}")
        return x, y
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and OS errors alike: the entry is only a cache
        log.warning("feature cache %s does not load (%s: %s); recomputing it", path, type(e).__name__, e)
        return None


def features(model, preprocess, dataset_name: str, root, split: str, *, model_name: str, pretrained: str | None,
             device, precision: str = "fp32", batch_size: int = 64, workers: int = 0, max_samples: int | None = None,
             cache_dir: str | os.PathLike | None = None, progress: bool = True,
             download: bool = False, pooled: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(features (N, D) float32, labels (N,) int64, classnames)`` of one split, from the cache when present:
    L2-normalised image embeddings, or with ``pooled`` the image tower's pooled output before the projection, not
    normalised (what lgssl's ``extract_features`` takes from a CLIP model: its visual backbone)."""
    dataset = readers.build_dataset(dataset_name, root, split, None, download=download)
    path = None
    if cache_dir is not None:
        key = cache_key(model=model_name, weights=weights_fingerprint(model, pretrained), dataset=dataset.name,
                        split=split, root=str(readers.resolve_root(dataset_name, root).resolve()),
                        n=len(dataset), max_samples=max_samples, precision=precision, preprocess=repr(preprocess),
                        **({"features": "pooled"} if pooled else {}))
        path = Path(cache_dir).expanduser() / f"{dataset.name.replace('/', '_')}_{split}_{key}.npz"
        if path.is_file():
            cached = _read_cached(path)
            if cached is not None:
                log.info("features of %s/%s from cache %s", dataset.name, split, path)
                return (*cached, dataset.classnames)
    dataset = limit(readers.set_transform(dataset, model_transform(preprocess, precision)), max_samples)
    t0 = time.perf_counter()
    encoder = argparse.Namespace(encode_image=model.visual) if pooled else model
    x, y = extract_image_features(encoder, make_loader(dataset, batch_size, workers, device), device,
                                  get_autocast(precision, device.type), progress, desc=f"{dataset.name}/{split}",
                                  normalize=not pooled)
    log.info("%s/%s: %d features in %.1fs", dataset.name, split, len(y), time.perf_counter() - t0)
    x, y = x.numpy().astype(np.float32), y.numpy().astype(np.int64)
    if path is not None:
        _save_npz_atomic(path, x=x, y=y)
    return x, y, dataset.classnames


# ---------------------------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------------------------

def _fit(x, y, C: float, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _scores(clf, x: np.ndarray, n_classes: int) -> torch.Tensor:
    """(N, n_classes) decision scores; classes absent from the probe's training set get -inf."""
    out = torch.full((len(x), n_classes), float("-inf"), dtype=torch.float64)
    dec = clf.decision_function(x)
    if dec.ndim == 1:  # binary problem: one score for classes_[1]
        dec = np.stack([-dec, dec], axis=1)
    out[:, torch.as_tensor(clf.classes_)] = torch.as_tensor(dec, dtype=torch.float64)
    return out


def _val_acc(x_tr, y_tr, x_val, y_val, C, max_iter, seed) -> float:
    if len(np.unique(y_tr)) < 2:
        return 0.0
    clf = _fit(x_tr, y_tr, C, max_iter, seed)
    return float((clf.predict(x_val) == y_val).mean())


def choose_C(x_tr, y_tr, x_val, y_val, grid=C_GRID, refine: int = 3, max_iter: int = 1000, seed: int = 0) -> float:
    """C with the best validation accuracy: the best of a log grid, refined ``refine`` times by trying the points
    half a step (in log10) on either side. Ties keep the smaller C (stronger regularisation)."""
    scores = {C: _val_acc(x_tr, y_tr, x_val, y_val, C, max_iter, seed) for C in grid}
    best = max(scores, key=lambda c: (scores[c], -c))
    step = math.log10(grid[1] / grid[0]) if len(grid) > 1 else 1.0
    for _ in range(refine):
        step /= 2
        for C in (best * 10 ** -step, best * 10 ** step):
            if C not in scores:
                scores[C] = _val_acc(x_tr, y_tr, x_val, y_val, C, max_iter, seed)
        best = max(scores, key=lambda c: (scores[c], -c))
    log.info("C sweep: best C=%.4g (val acc %.4f) over %d fits", best, scores[best], len(scores))
    return best


def _split_val(y: np.ndarray, proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (when every class has >= 2 samples) train/val index split."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and int(len(y) * proportion) >= len(np.unique(y)) else None
    return train_test_split(idx, test_size=proportion, random_state=seed, stratify=stratify)


def _prefixed(metrics: dict) -> dict:
    return {f"lp_{k}": v for k, v in metrics.items()}


def linear_probe(x_tr, y_tr, x_te, y_te, n_classes: int, *, val_proportion: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, C: float | None = None) -> tuple[dict, dict]:
    """Full-data probe. Returns ``(metrics, info)`` with ``info`` = chosen C, weight decay, sample counts."""
    if C is None:
        tr, val = _split_val(y_tr, val_proportion, seed)
        C = choose_C(x_tr[tr], y_tr[tr], x_tr[val], y_tr[val], max_iter=max_iter, seed=seed)
    clf = _fit(x_tr, y_tr, C, max_iter, seed)
    metrics = _prefixed(classification_metrics(_scores(clf, x_te, n_classes), torch.as_tensor(y_te)))
    return metrics, {"C": C, "weight_decay": 1.0 / (C * len(y_tr)), "n_train": int(len(y_tr)),
                     "n_test": int(len(y_te))}


def fewshot_probe(x_tr, y_tr, x_te, y_te, n_classes: int, k: int, seeds=(0, 1, 2), max_iter: int = 1000,
                  C: float | None = None) -> tuple[dict, list[dict]]:
    """k-shot probes over ``seeds``. Returns ``(mean metrics with *_std, per-seed records)``."""
    per_seed = []
    classes = np.unique(y_tr)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        shot, val = [], []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y_tr == c))
            shot += idx[:k].tolist()
            val += idx[k:2 * k].tolist()
        shot, val = np.sort(shot), np.sort(val)
        c_seed = C
        if c_seed is None:
            c_seed = (choose_C(x_tr[shot], y_tr[shot], x_tr[val], y_tr[val], max_iter=max_iter, seed=seed)
                      if len(val) and len(np.unique(y_tr[shot])) > 1 else 1.0)
        if len(np.unique(y_tr[shot])) < 2:
            raise InputError(f"{k}-shot training set of seed {seed} has fewer than 2 classes")
        clf = _fit(x_tr[shot], y_tr[shot], c_seed, max_iter, seed)
        m = _prefixed(classification_metrics(_scores(clf, x_te, n_classes), torch.as_tensor(y_te)))
        per_seed.append({"seed": seed, "C": c_seed, "n_train": len(shot), **m})
    keys = [k_ for k_ in per_seed[0] if k_.startswith("lp_")]
    mean = {}
    for key in keys:
        vals = np.array([r[key] for r in per_seed])
        mean[key], mean[f"{key}_std"] = float(vals.mean()), float(vals.std())
    return mean, per_seed


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def evaluate_dataset(model, preprocess, dataset_name: str, root, *, model_name: str, pretrained: str | None,
                     device, precision: str = "fp32", batch_size: int = 64, workers: int = 0,
                     max_samples: int | None = None, max_train_samples: int | None = None,
                     train_split: str | None = None, test_split: str | None = None, fewshot_k: int | None = None,
                     seeds=None, val_proportion: float = 0.2, C: float | None = None, max_iter: int = 1000,
                     cache_dir=None, progress: bool = True, download: bool = False, protocol: str = "clip_benchmark",
                     episodes: int = 5000, solver: str = "lgssl") -> dict:
    """One CLIP_benchmark record: features of the train and test splits (cached), then the full or k-shot probe."""
    default_train, default_test = default_splits(dataset_name)
    name = readers.dataset_spec(dataset_name).name
    official_val = protocol == "paper" and name in OFFICIAL_VAL_DATASETS
    default_train = "train" if official_val else default_train  # lgssl: the official train / val splits
    train_split, test_split = train_split or default_train, test_split or default_test
    seeds = list(seeds or ([0, 1, 2] if fewshot_k else [0]))
    common = dict(model_name=model_name, pretrained=pretrained, device=device, precision=precision,
                  batch_size=batch_size, workers=workers, cache_dir=cache_dir, progress=progress, download=download,
                  pooled=protocol == "paper")
    x_tr, y_tr, classnames = features(model, preprocess, dataset_name, root, train_split,
                                      max_samples=max_train_samples or max_samples, **common)
    x_te, y_te, _ = features(model, preprocess, dataset_name, root, test_split, max_samples=max_samples, **common)
    n_classes = max(len(classnames), int(y_tr.max()) + 1, int(y_te.max()) + 1)
    display, data_root = readers.display_name(dataset_name, root), str(readers.resolve_root(dataset_name, root))
    t0 = time.perf_counter()
    if protocol == "paper":
        mpc = name in MEAN_PER_CLASS_DATASETS
        if official_val:
            x_val, y_val, _ = features(model, preprocess, dataset_name, root, "val",
                                       max_samples=max_train_samples or max_samples, **common)
        else:  # lgssl: train[:80%] / train[80%:] in TFDS's hash order (here of the reader's indices)
            order = tfds_order(range(len(y_tr)))
            tr, va = (order[i] for i in train_val_split(len(y_tr)))
            x_tr, y_tr, x_val, y_val = x_tr[tr], y_tr[tr], x_tr[va], y_tr[va]
        value, info = paper_linear_probe(x_tr, y_tr, x_te, y_te, x_val=x_val, y_val=y_val, mean_per_class=mpc,
                                         solver=solver, max_iter=max_iter)
        info["val_split"] = "val" if official_val else f"{train_split}[80%:] in tfds_order of the indices"
        fs = fewshot(x_tr, y_tr, x_te, y_te, episodes=episodes, seed=seeds[0])  # support from the training part
        metrics = {"lp_mean_per_class_recall" if mpc else "lp_acc1": value, "fewshot_acc": fs["fewshot_acc"],
                   "fewshot_acc_std": fs["fewshot_acc_std"], "C": info["C"], "max_iter": max_iter,
                   "episodes": episodes, "n_way": fs["n_way"], "n_shot": fs["n_shot"], "n_query": fs["n_query"],
                   "seed": seeds[0], "normalized": False, "features": "pooled", "solver": solver}
        log.info("%s: %s (paper protocol, %.1fs)", name, json.dumps(metrics), time.perf_counter() - t0)
        correct = info.pop("test_correct")
        per_sample = {"fewshot_acc": fs["episode_acc"], **({} if mpc else {"lp_acc1": correct})}
        return result_record(display, model_name, pretrained, TASK, metrics, root=data_root, protocol="paper",
                             paper_metric="mean_per_class" if mpc else "acc1",
                             splits={"train": train_split, "val": info["val_split"], "test": test_split}, probe=info,
                             per_sample=per_sample)  # per-sample / per-episode outcomes, for a bootstrap
    if fewshot_k:
        metrics, per_seed = fewshot_probe(x_tr, y_tr, x_te, y_te, n_classes, fewshot_k, tuple(seeds), max_iter, C)
        metrics.update(fewshot_k=fewshot_k, seed=seeds[0], max_iter=max_iter, normalized=True)
        extra = {"fewshot_k": fewshot_k, "seeds": seeds, "per_seed": per_seed}
    else:
        metrics, info = linear_probe(x_tr, y_tr, x_te, y_te, n_classes, val_proportion=val_proportion,
                                     seed=seeds[0], max_iter=max_iter, C=C)
        metrics.update(C=info["C"], weight_decay=info["weight_decay"], seed=seeds[0], max_iter=max_iter,
                       normalized=True)  # where CLIP_benchmark puts the probe's hyper-parameters
        extra = {"probe": info}
    log.info("%s: %s (probe %.1fs)", name, json.dumps(metrics), time.perf_counter() - t0)
    return result_record(display, model_name, pretrained, TASK, metrics, root=data_root, protocol="clip_benchmark",
                         splits={"train": train_split, "test": test_split}, **extra)


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=("clip_benchmark", "paper"), default="clip_benchmark",
                   help="clip_benchmark: CLIP_benchmark's probe (and k-shot with --fewshot-k); paper: the DiffCLIP "
                        "paper's linear probe and few-shot episodes (El Banani et al. 2023)")
    p.add_argument("--episodes", type=positive_int, default=5000, help="few-shot episodes (--protocol paper)")
    p.add_argument("--solver", choices=SOLVERS, default="lgssl",
                   help="--protocol paper's probe: lgssl (its torch L-BFGS, the default) or sklearn (scikit-learn's "
                        "L-BFGS in float64, lgssl's use_sklearn path)")
    p.add_argument("--train-split", default=None, help="default: train (trainval for pets, flowers102, dtd, "
                                                       "fgvc-aircraft)")
    p.add_argument("--test-split", default=None, help="default: the dataset's evaluation split")
    p.add_argument("--fewshot-k", type=positive_int, default=None, help="k training images per class (k-shot probe)")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="the seeds: the first builds a random-init model and draws the validation split (default "
                        "0); with --fewshot-k, one k-shot draw each (default 0 1 2)")
    p.add_argument("--val-proportion", type=unit_interval, default=0.2, help="validation share of the training split")
    p.add_argument("--C", type=positive_float, default=None, help="fixed inverse regularisation (skips the sweep)")
    p.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations of the logistic regression")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="limit the training split only")
    p.add_argument("--feature-cache", default=os.path.join("~", ".cache", "diffclip", "features"),
                   help="folder of cached features (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (network)")


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(__doc__, "datasets: paper (the 9 sets), " + ", ".join(readers.list_datasets("classification")),
                       seed=False)  # one seed flag: --seed/--seeds (add_probe_args)
    p.add_argument("--dataset", required=True, nargs="+", help="dataset name(s); 'paper' = the paper's 9 sets")
    p.add_argument("--data-root", default=None, help="dataset folder, or a root holding one folder per dataset")
    add_probe_args(p)
    p.add_argument("--output", default=None, help="result JSON; several datasets: a .jsonl file, or a name with "
                   "{dataset} (one file each)")
    return p


def _names(args: argparse.Namespace) -> list[str]:
    return [n for d in args.dataset for n in (PAPER_LINEAR_PROBE_DATASETS if d == "paper" else [d])]


def _outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    names = _names(args)
    if not args.output:
        return []
    if len(names) > 1 and not (args.output.endswith(".jsonl") or "{dataset}" in args.output):
        raise UsageError(f"--output {args.output}: {len(names)} datasets need a .jsonl file or a name with "
                         "{dataset} (one record per file)")
    return [("--output", args.output.replace("{dataset}", n.replace("/", "_"))) for n in names]


def _inputs(args: argparse.Namespace) -> list[str]:
    if args.protocol == "paper" and args.fewshot_k:
        raise UsageError("--fewshot-k is the clip_benchmark protocol's k-shot probe; --protocol paper runs the "
                         "paper's few-shot episodes (--episodes)")
    names = _names(args)
    for n in names:  # fail on a missing folder, or a folder without splits, before loading the model
        train_split, test_split = default_splits(n)
        train = readers.build_dataset(n, args.data_root, args.train_split or train_split, None,
                                      download=args.download)
        test = readers.build_dataset(n, args.data_root, args.test_split or test_split, None, download=args.download)
        if getattr(train, "samples", None) and getattr(train, "samples", None) == getattr(test, "samples", None):
            raise UsageError(f"dataset {n!r} in {args.data_root}: the train and test splits are the same images (no "
                             f"{args.train_split or train_split}/ and {args.test_split or test_split}/ sub-folders); "
                             "a probe must not be scored on its training images")
    return names


def _evaluate(model, preprocess, tokenizer, names: list[str], args: argparse.Namespace, device) -> list[dict]:
    return [evaluate_dataset(model, preprocess, n, args.data_root, model_name=args.model, pretrained=args.pretrained,
                             device=device, precision=args.precision, batch_size=args.batch_size,
                             workers=args.workers, max_samples=args.max_samples,
                             max_train_samples=args.max_train_samples, train_split=args.train_split,
                             test_split=args.test_split, fewshot_k=args.fewshot_k, seeds=args.seeds,
                             val_proportion=args.val_proportion, C=args.C, max_iter=args.max_iter,
                             cache_dir=None if args.no_cache else args.feature_cache,
                             progress=not args.no_progress, download=args.download, protocol=args.protocol,
                             episodes=args.episodes, solver=args.solver) for n in names]


def _write(args: argparse.Namespace, records: list[dict]) -> None:
    if args.output and args.output.endswith(".jsonl"):
        write_records(args.output, records)
        return
    for n, r in zip(_names(args), records):
        write_record(args.output and args.output.replace("{dataset}", n.replace("/", "_")), r)


def main(argv: list[str] | None = None) -> int:
    return run_program(build_parser(), argv, inputs=_inputs, evaluate=_evaluate, write=_write, outputs=_outputs,
                       seed=lambda args: (args.seeds or [0])[0])


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
