"""The paper's few-shot and linear-probe protocols (eval/protocols.py, after lgssl) and linear_probe.py --protocol
paper end to end on real digit images."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffclip.eval.protocols import (
    MEAN_PER_CLASS_DATASETS,
    _fit,
    accuracy,
    fewshot,
    paper_linear_probe,
    prototype_accuracy,
    sample_episodes,
    split_trainval,
)
from eval_helpers import DIGITS, digit, save

ROOT = Path(__file__).resolve().parents[1]


def test_prototype_classifier_by_hand():
    """2 episodes, 2-way 2-shot, one query per class, 2-D features, worked out on paper:
    support (both episodes) class 0: (1,0), (3,0); class 1: (0,2), (0,4) -> centre (1, 1.5);
    centred and normalised: (0,-1), (.8,-.6) | (-.894,.447), (-.371,.928) -> prototypes (.4,-.8), (-.633,.688).
    Episode 1 queries: (2,0) -> (.555,-.832): prototype 0, right; (3,.5) -> (.894,-.447): prototype 0, wrong.
    Episode 2 queries: (4,0) -> (.894,-.447): prototype 0, right; (0,5) -> (-.275,.962): prototype 1, right."""
    x_tr = np.array([[1, 0], [3, 0], [0, 2], [0, 4]], float)
    x_te = np.array([[2, 0], [3, 0.5], [4, 0], [0, 5]], float)
    episodes = {"support": np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]]]),
                "query": np.array([[[0], [1]], [[2], [3]]]), "mask": np.ones((2, 2, 1), bool)}
    acc = prototype_accuracy(x_tr, x_te, episodes)
    np.testing.assert_allclose(acc, [0.5, 1.0])
    assert acc.mean() == 0.75 and acc.std(ddof=1) == pytest.approx(0.353553, abs=1e-6)


def test_episode_sampler():
    y_tr = np.repeat(np.arange(7), 8)
    y_te = np.concatenate([np.repeat(np.arange(6), 10), [6, 6]])  # class 6 has only 2 test images
    ep = sample_episodes(y_tr, y_te, episodes=300, n_way=5, n_shot=5, n_query=6, seed=1)
    assert ep["support"].shape == (300, 5, 5) and ep["query"].shape == ep["mask"].shape == (300, 5, 6)
    for e in range(300):
        assert len(set(ep["classes"][e])) == 5
        for w, c in enumerate(ep["classes"][e]):
            assert (y_tr[ep["support"][e, w]] == c).all() and len(set(ep["support"][e, w])) == 5
            q = ep["query"][e, w][ep["mask"][e, w]]
            assert (y_te[q] == c).all() and len(set(q)) == len(q) == (2 if c == 6 else 6)
    assert 6 in ep["classes"]  # every usable class is drawn
    again = sample_episodes(y_tr, y_te, episodes=300, n_way=5, n_shot=5, n_query=6, seed=1)
    assert all((again[k] == ep[k]).all() for k in ep)  # seeded
    with pytest.raises(ValueError, match="need 5 classes"):
        sample_episodes(np.repeat(np.arange(3), 8), np.arange(3), n_way=5)


def test_fewshot_on_real_digit_features_beats_chance():
    x = DIGITS.data / 16.0
    y = DIGITS.target
    res = fewshot(x[::2], y[::2], x[1::2], y[1::2], episodes=2000, seed=0)
    assert res["episodes"] == 2000 and 0.8 < res["fewshot_acc"] <= 1.0 and res["fewshot_acc_std"] > 0


def test_split_trainval_is_lgssls():
    y = np.array([0] * 10 + [1] * 5 + [2] * 3)
    train, val = split_trainval(y, 0.2)
    assert sorted(train + val) == list(range(18)) and len(val) == 2 + 1 + 0
    assert split_trainval(y, 0.2) == (train, val)  # deterministic (random.Random(93) per class)


def test_mean_per_class_datasets_report_mean_per_class():
    assert set(MEAN_PER_CLASS_DATASETS) == {"fgvc-aircraft", "pets", "caltech101", "flowers102"}
    pred, y = np.array([0, 0, 0, 0, 1, 0]), np.array([0, 0, 0, 0, 1, 1])
    assert accuracy(pred, y, False) == pytest.approx(5 / 6) and accuracy(pred, y, True) == pytest.approx(0.75)
    rng = np.random.default_rng(0)  # an imbalanced, overlapping problem: the two metrics differ
    x_tr = np.concatenate([rng.normal(0, 1, (200, 4)), rng.normal(0.7, 1, (40, 4))])
    y_tr = np.array([0] * 200 + [1] * 40)
    x_te = np.concatenate([rng.normal(0, 1, (100, 4)), rng.normal(0.7, 1, (20, 4))])
    y_te = np.array([0] * 100 + [1] * 20)
    mpc, info = paper_linear_probe(x_tr, y_tr, x_te, y_te, mean_per_class=True)
    top1, _ = paper_linear_probe(x_tr, y_tr, x_te, y_te, mean_per_class=False)
    tr, val = split_trainval(y_tr)
    refit = _fit(np.concatenate([x_tr[tr], x_tr[val]]), np.concatenate([y_tr[tr], y_tr[val]]), info["C"], 1000)
    assert mpc == pytest.approx(accuracy(refit.predict(x_te), y_te, True)) and mpc != pytest.approx(top1)
    assert info["n_val"] == 48 and len(info["costs_tried"]) >= 7 + 3


def test_linear_probe_paper_protocol_cli(tmp_path):
    for split, rows in (("train", range(0, 600)), ("test", range(600, 900))):
        for i in rows:
            save(digit(i, 16), tmp_path / "digits" / split / f"d{DIGITS.target[i]}" / f"{i}.png")
    out = tmp_path / "lp.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "linear_probe.py"), "--model", "DiffCLIP-Tiny-64",
                        "--dataset", "folder", "--data-root", str(tmp_path / "digits"), "--protocol", "paper",
                        "--episodes", "500", "--workers", "0", "--no-cache", "--no-progress", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["protocol"] == "paper" and rec["paper_metric"] == "acc1" and rec["task"] == "linear_probe"
    m = rec["metrics"]
    assert 0.1 < m["lp_acc1"] <= 1 and 0.2 < m["fewshot_acc"] <= 1 and m["episodes"] == 500 and m["C"] > 0
    # a folder without train/ and test/ sub-folders is refused: the probe would be scored on its training images
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "linear_probe.py"), "--model", "DiffCLIP-Tiny-64",
                        "--dataset", "folder", "--data-root", str(tmp_path / "digits" / "train"), "--protocol",
                        "paper", "--workers", "0", "--no-cache", "--output", str(tmp_path / "same.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "same images" in r.stderr and not (tmp_path / "same.json").exists()
