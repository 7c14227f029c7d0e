"""The paper's few-shot and linear-probe protocols (eval/protocols.py, after lgssl) against lgssl's own outputs
(tests/golden/lgssl.json, made by tests/golden/make_lgssl_golden.py from lgssl's code at the commit it records), and
linear_probe.py --protocol paper end to end on real digit images."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffclip.eval.protocols import (
    MEAN_PER_CLASS_DATASETS,
    fewshot,
    fit_probe,
    lgssl_accuracy,
    paper_linear_probe,
    prototype_accuracy,
    sample_episodes,
    train_val_split,
)
from diffclip.eval.runner import read_records
from eval_helpers import DIGITS, digit, save

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "lgssl.json").read_text())
INPUTS = np.load(ROOT / "tests" / "golden" / "lgssl_inputs.npz")
SOLVER = {"torch": "lgssl", "sklearn": "sklearn"}


def _case(name):
    c = GOLDEN["cases"][name]
    x_tr, y_tr = INPUTS[f"{name}/x_train"], INPUTS[f"{name}/y_train"]
    val = {"x_val": INPUTS[f"{name}/x_val"], "y_val": INPUTS[f"{name}/y_val"]} if c["n_val"] else {}
    return c, x_tr, y_tr, val, INPUTS[f"{name}/x_test"], INPUTS[f"{name}/y_test"]


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_linear_probe_is_lgssls(name):
    """Every cost lgssl tried, in its order, with its validation metric, the chosen C and the test metric; the
    cases include validation ties (resolved as lgssl's float32 meter does), both solvers, both split rules."""
    c, x_tr, y_tr, val, x_te, y_te = _case(name)
    torch.set_num_threads(1)
    metric, info = paper_linear_probe(x_tr, y_tr, x_te, y_te, mean_per_class=c["mean_per_class"],
                                      solver=SOLVER[c["solver"]], device="cpu", **val)
    assert info["costs_tried"] == [[cost, v / 100] for cost, v in c["fits"]]
    assert info["C"] == c["C"] == c["final_fit_cost"] and info["val_metric"] == c["val_percent"] / 100
    assert metric == c["test_percent"] / 100 and info["val_split"] == c["val_split"]
    assert info["n_train"] + info["n_val"] == c["n_train"] + c["n_val"]


@pytest.mark.parametrize("name", [n for n, c in sorted(GOLDEN["cases"].items()) if "episode_percent" in c])
def test_fewshot_is_lgssls(name):
    """lgssl's episode draws (support from the training part, queries from test) and every episode's accuracy,
    from the RNG state lgssl's evaluate.py leaves after the probe (seed 0)."""
    c, x_tr, y_tr, val, x_te, y_te = _case(name)
    if not val:
        train, _ = train_val_split(len(y_tr))
        x_tr, y_tr = x_tr[train], y_tr[train]
    episodes = sample_episodes(y_tr, y_te, GOLDEN["episodes"], seed=0, dim=x_tr.shape[1])
    for e, (support, query) in enumerate(episodes):
        assert (support == INPUTS[f"{name}/support"][e]).all() and (query == INPUTS[f"{name}/query"][e]).all()
    res = fewshot(x_tr, y_tr, x_te, y_te, episodes=GOLDEN["episodes"], seed=0)
    np.testing.assert_allclose(np.array(res["episode_acc"]) * 100, c["episode_percent"], rtol=0, atol=1e-5)
    assert res["fewshot_acc"] * 100 == pytest.approx(c["fewshot_mean_percent"], abs=1e-4)
    assert res["fewshot_acc_std"] * 100 == pytest.approx(c["fewshot_std_percent"], abs=1e-4)
    other = sample_episodes(y_tr, y_te, 5, seed=1, dim=x_tr.shape[1])
    assert any((s != INPUTS[f"{name}/support"][e]).any() for e, (s, _) in enumerate(other))


def test_lgssl_meter_ties_in_float32():
    """Two classes of 100: 50 + 55 and 57 + 48 right are both 52.5 % in lgssl's float32 meter (so the search takes
    the first), while float64 means differ (0.525 vs 0.52499...)."""
    y = np.repeat([0, 1], 100)

    def proba(right0, right1):
        pred = np.r_[np.zeros(right0), np.ones(100 - right0), np.ones(right1), np.zeros(100 - right1)].astype(int)
        return torch.nn.functional.one_hot(torch.as_tensor(pred), 2).float()

    assert np.mean([0.50, 0.55]) != np.mean([0.57, 0.48])
    assert lgssl_accuracy(proba(50, 55), y, 2, True) == lgssl_accuracy(proba(57, 48), y, 2, True)
    assert lgssl_accuracy(proba(50, 55), y, 2, False) == pytest.approx(52.5, abs=1e-5)
    # a class the probe knows but the split lacks counts 0 in the mean (lgssl divides by num_classes)
    assert lgssl_accuracy(proba(100, 100), y, 3, True) == pytest.approx(200 / 3, abs=1e-4)


def test_train_val_split_is_tfds_percent_slicing():
    for n, cut in ((10, 8), (7, 6), (3, 2), (1, 1), (2443, 1954), (3680, 2944)):
        train, val = train_val_split(n)
        assert list(train) == list(range(cut)) and list(val) == list(range(cut, n))


def test_sklearn_solver_fits_float64():
    """lgssl's use_sklearn path: today's scikit-learn keeps float32 and stops early at small C; the probe fits
    float64 whatever it is given, so float32 and float64 features give the same probe."""
    c, x_tr, y_tr, _, x_te, _ = _case("top1_sklearn")
    p32 = fit_probe(x_tr.astype(np.float32), y_tr, 1e-4, solver="sklearn").predict_proba(torch.as_tensor(x_te))
    p64 = fit_probe(x_tr.astype(np.float64), y_tr, 1e-4, solver="sklearn").predict_proba(torch.as_tensor(x_te))
    assert p32.dtype == torch.float64 and torch.equal(p32, p64)
    with pytest.raises(KeyError, match="unknown linear-probe solver"):
        fit_probe(x_tr, y_tr, 1.0, solver="liblinear")


def test_prototype_classifier_by_hand():
    """2 episodes, 2-way 2-shot, one query per class, 2-D features, worked out on paper:
    support (both episodes) class 0: (1,0), (3,0); class 1: (0,2), (0,4) -> centre (1, 1.5);
    centred and normalised: (0,-1), (.8,-.6) | (-.894,.447), (-.371,.928) -> prototypes (.4,-.8), (-.633,.688).
    Episode 1 queries: (2,0) -> (.555,-.832): prototype 0, right; (3,.5) -> (.894,-.447): prototype 0, wrong.
    Episode 2 queries: (4,0) -> (.894,-.447): prototype 0, right; (0,5) -> (-.275,.962): prototype 1, right."""
    x_tr, y_tr = np.array([[1, 0], [3, 0], [0, 2], [0, 4]], float), np.array([0, 0, 1, 1])
    x_te, y_te = np.array([[2, 0], [3, 0.5], [4, 0], [0, 5]], float), np.array([0, 1, 0, 1])
    episodes = [(np.array([0, 1, 2, 3]), np.array([0, 1])), (np.array([0, 1, 2, 3]), np.array([2, 3]))]
    acc = prototype_accuracy(x_tr, y_tr, x_te, y_te, episodes, n_shot=2)
    np.testing.assert_allclose(acc, [0.5, 1.0])


def test_episode_sampler():
    y_tr = np.repeat(np.arange(7), 8)
    y_te = np.concatenate([np.repeat(np.arange(6), 10), [6, 6]])  # class 6 has only 2 test images
    state = torch.get_rng_state()
    eps = sample_episodes(y_tr, y_te, episodes=300, n_way=5, n_shot=5, n_query=6, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    seen = set()
    for support, query in eps:
        classes = y_tr[support].reshape(5, 5)
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 5 and len(set(support)) == 25
        seen |= set(classes[:, 0])
        assert len(query) == sum(2 if c == 6 else 6 for c in classes[:, 0]) and len(set(query)) == len(query)
        assert (y_te[query] == np.repeat(classes[:, 0], [2 if c == 6 else 6 for c in classes[:, 0]])).all()
    assert seen == set(range(7))
    again = sample_episodes(y_tr, y_te, episodes=300, n_way=5, n_shot=5, n_query=6, seed=1)
    assert all((a == b).all() and (c == d).all() for (a, c), (b, d) in zip(eps, again))  # seeded
    with pytest.raises(ValueError, match="need 5 training classes"):
        sample_episodes(np.repeat(np.arange(3), 8), np.arange(3), n_way=5)


def test_fewshot_on_real_digit_features_beats_chance():
    x = DIGITS.data / 16.0
    y = DIGITS.target
    res = fewshot(x[::2], y[::2], x[1::2], y[1::2], episodes=500, seed=0)
    assert res["episodes"] == 500 and 0.8 < res["fewshot_acc"] <= 1.0 and res["fewshot_acc_std"] > 0


def test_mean_per_class_datasets_report_mean_per_class():
    assert set(MEAN_PER_CLASS_DATASETS) == {"fgvc-aircraft", "pets", "caltech101", "flowers102"}
    c, x_tr, y_tr, val, x_te, y_te = _case("mpc_torch_official_val")
    top1, _ = paper_linear_probe(x_tr, y_tr, x_te, y_te, mean_per_class=False, device="cpu", **val)
    assert top1 != pytest.approx(c["test_percent"] / 100)  # imbalanced classes: the two metrics differ
    with pytest.raises(ValueError, match="0..K-1"):
        paper_linear_probe(x_tr, y_tr + 1, x_te, y_te, device="cpu", **val)


def test_linear_probe_paper_protocol_cli(tmp_path):
    for split, rows in (("train", range(0, 600)), ("test", range(600, 900))):
        for i in rows:
            save(digit(i, 16), tmp_path / "digits" / split / f"d{DIGITS.target[i]}" / f"{i}.png")
    out = tmp_path / "lp.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "linear_probe.py"), "--model", "DiffCLIP-Tiny-64",
                        "--dataset", "folder", "--data-root", str(tmp_path / "digits"), "--protocol", "paper",
                        "--episodes", "500", "--max-iter", "100", "--workers", "0", "--no-cache", "--no-progress", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = read_records(out)  # the record file and its sidecar (root, protocol, ...)
    assert rec["protocol"] == "paper" and rec["paper_metric"] == "acc1" and rec["task"] == "linear_probe"
    m = rec["metrics"]
    assert 0.1 < m["lp_acc1"] <= 1 and 0.2 < m["fewshot_acc"] <= 1 and m["episodes"] == 500 and m["C"] > 0
    assert m["solver"] == "lgssl" and m["features"] == "pooled" and not m["normalized"]
    # lgssl's split: the last 20 % of the class-sorted folder in TFDS-style hash order, every class on both sides
    assert rec["probe"]["n_train"] == 480 and rec["probe"]["n_val"] == 120 and rec["splits"]["val"].startswith("train")
    # a folder without train/ and test/ sub-folders is refused: the probe would be scored on its training images
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "linear_probe.py"), "--model", "DiffCLIP-Tiny-64",
                        "--dataset", "folder", "--data-root", str(tmp_path / "digits" / "train"), "--protocol",
                        "paper", "--workers", "0", "--no-cache", "--output", str(tmp_path / "same.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "same images" in r.stderr and not (tmp_path / "same.json").exists()
