"""Writes tests/golden/lgssl.json and lgssl_inputs.npz: what lgssl's own evaluation code (github.com/mbanani/lgssl,
``lgssl/evaluation/linear_probe.py``, ``fewshot.py``, ``logistic_regression.py``, ``lgssl/utils/metrics.py``) gives on
seeded synthetic features, in the order lgssl's ``evaluate.py`` runs it (probe, then few-shot). tests/test_protocols.py
checks that diffclip.eval.protocols reproduces every number.

    git --git-dir=<lgssl mirror> archive <commit> lgssl | tar -x -C /tmp/lgssl    # lgssl at the commit below
    pip install --target /tmp/site loguru                                         # lgssl's logger (tiny)
    PYTHONPATH=/tmp/site python tests/golden/make_lgssl_golden.py --lgssl /tmp/lgssl --commit <commit>

Run on CPU (lgssl's solver uses CUDA when it sees one: hide it). lgssl's code is imported from --lgssl, not copied.
Instrumentation only records: each ``_fit_logreg`` call's cost and the validation meter value that follows it, the
final classifier's C, each episode's draws (by wrapping the sampler's iterator) and its accuracy (``evaluate_fewshot``
with ``n_iter=1``, once per episode, from the RNG state the probe leaves, as evaluate.py; the summary from one
``n_iter=E`` call from the same state).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ["CUDA_VISIBLE_DEVICES"] = ""
HERE = Path(__file__).resolve().parent
EPISODES = 300

# name: seed, classes, dim, n_train, n_val (0: lgssl's train[80%:]), n_test, class separation, imbalance,
#       mean per class, solver ("torch": lgssl's default; "sklearn": use_sklearn=True on float64 features)
CASES = {
    "top1_torch": (0, 8, 6, 300, 0, 150, 0.8, False, False, "torch"),
    "mpc_torch_official_val": (1, 6, 6, 240, 90, 150, 0.7, True, True, "torch"),
    "top1_sklearn": (0, 8, 6, 300, 0, 150, 0.8, False, False, "sklearn"),
    "mpc_sklearn_official_val": (1, 6, 6, 240, 90, 150, 0.7, True, True, "sklearn"),
}


def make_features(seed, k, dim, n_train, n_val, n_test, sep, imbalance):
    """Gaussian classes around random means; imbalanced class frequencies when ``imbalance``; float32."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, sep, (k, dim))
    p = rng.dirichlet(np.full(k, 2.0)) if imbalance else np.full(k, 1 / k)

    def draw(n):
        y = np.concatenate([np.arange(k), rng.choice(k, n - k, p=p)])  # every class at least once
        y = y[rng.permutation(n)]
        return (means[y] + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32), y.astype(np.int64)

    return draw(n_train), draw(n_val) if n_val else None, draw(n_test)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lgssl", required=True, help="a directory holding lgssl's package (lgssl/evaluation/...)")
    ap.add_argument("--commit", required=True, help="the lgssl commit that directory is")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    sys.path.insert(0, args.lgssl)
    import sklearn
    import torch

    torch.set_num_threads(1)
    from lgssl.evaluation import fewshot as lg_fewshot
    from lgssl.evaluation import linear_probe as lg_lp
    from loguru import logger

    logger.remove()
    fits = []
    fit_logreg = lg_lp._fit_logreg

    def recording_fit(feats, labels, cost, *a, **kw):
        fits.append([cost, None])
        return fit_logreg(feats, labels, cost, *a, **kw)

    class RecordingAccuracy(lg_lp.Accuracy):
        def __call__(self, predictions, ground_truth):
            value = super().__call__(predictions, ground_truth)
            if fits and fits[-1][1] is None:
                fits[-1][1] = value
            return value

    lg_lp._fit_logreg, lg_lp.Accuracy = recording_fit, RecordingAccuracy
    draws = []
    sampler_iter = lg_fewshot.FewShotEpisodeSampler.__iter__

    def recording_iter(self):
        for support, query in sampler_iter(self):
            draws.append((support.copy(), query.copy()))
            yield support, query

    lg_fewshot.FewShotEpisodeSampler.__iter__ = recording_iter
    fs_cfg = SimpleNamespace(n_iter=EPISODES, n_way=5, n_shot=5, n_query=6, center_feats=True, normalize_feats=True,
                             average_feats=True)

    out = {"lgssl_commit": args.commit, "generator": "tests/golden/make_lgssl_golden.py", "torch": torch.__version__,
           "sklearn": sklearn.__version__, "episodes": EPISODES, "cases": {}}
    arrays = {}
    for name, (seed, k, dim, n_train, n_val, n_test, sep, imb, mpc, solver) in CASES.items():
        (x_tr, y_tr), val, (x_te, y_te) = make_features(seed, k, dim, n_train, n_val, n_test, sep, imb)
        arrays.update({f"{name}/x_train": x_tr, f"{name}/y_train": y_tr, f"{name}/x_test": x_te,
                       f"{name}/y_test": y_te})
        if val is None:  # lgssl's catalog: train[:80%] / train[80%:] (TFDS's closest rounding)
            cut = int(round(n_train * 80 / 100))
            (x_tr, x_val), (y_tr, y_val) = (x_tr[:cut], x_tr[cut:]), (y_tr[:cut], y_tr[cut:])
        else:
            (x_val, y_val) = val
            arrays.update({f"{name}/x_val": x_val, f"{name}/y_val": y_val})
        dtype = torch.float64 if solver == "sklearn" else torch.float32
        t = {key: torch.as_tensor(v) for key, v in
             (("x_tr", x_tr), ("y_tr", y_tr), ("x_val", x_val), ("y_val", y_val), ("x_te", x_te), ("y_te", y_te))}
        for key in ("x_tr", "x_val", "x_te"):
            t[key] = t[key].to(dtype)
        fits.clear()
        clf = lg_lp.train_linear_probe(t["x_tr"], t["y_tr"], t["x_val"], t["y_val"], mpc, max_iter=1000,
                                       combine_trainval=True, use_sklearn=solver == "sklearn")
        test = lg_lp.test_linear_probe(clf, t["x_te"], t["y_te"], mpc)
        C = clf.C
        case = {"seed": seed, "classes": k, "dim": dim, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                "separation": sep, "imbalance": imb, "mean_per_class": mpc, "solver": solver,
                "val_split": "official" if n_val else "train[80%:]", "fits": fits[:-1], "final_fit_cost": fits[-1][0],
                "C": C, "val_percent": max(v for c, v in fits[:-1] if c == C), "test_percent": test}
        if solver == "torch":  # evaluate.py: the few-shot runs right after the probe, on the training part
            state = torch.get_rng_state()
            mean, std = lg_fewshot.evaluate_fewshot(t["x_tr"], t["y_tr"], t["x_te"], t["y_te"], fs_cfg)
            torch.set_rng_state(state)
            draws.clear()
            one = SimpleNamespace(**{**vars(fs_cfg), "n_iter": 1})
            per_episode = [lg_fewshot.evaluate_fewshot(t["x_tr"], t["y_tr"], t["x_te"], t["y_te"], one)[0].item()
                           for _ in range(EPISODES)]
            case.update(fewshot_mean_percent=mean.item(), fewshot_std_percent=std.item(),
                        episode_percent=per_episode)
            arrays[f"{name}/support"] = np.stack([s for s, _ in draws])
            arrays[f"{name}/query"] = np.stack([q for _, q in draws])
        out["cases"][name] = case
        print(name, "C", C, "val", case["val_percent"], "test", test, "fits", len(fits) - 1, file=sys.stderr)
    Path(args.out, "lgssl.json").write_text(json.dumps(out, indent=1) + "\n")
    np.savez_compressed(Path(args.out, "lgssl_inputs.npz"), **arrays)


if __name__ == "__main__":
    main()
