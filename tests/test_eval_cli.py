"""End to end: the tiny model (random init) through the eval programs on real images, and their bad-input errors.

Images: Fashion-MNIST from Debian's idx files when installed, else scikit-learn's digits written as idx files;
a CSV of digit images for retrieval; a small emoji package in the real layout for the local suite.
"""

import csv
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffclip.eval import linear_probe, robustness, run_suite, zeroshot
from diffclip.eval.common import limit
from diffclip.eval.readers import _timm_info, build_dataset, imagenet_wnids
from diffclip.eval.runner import RECORD_KEYS, read_records
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from diffclip.cli import run as run_cli

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MODEL = "DiffCLIP-Tiny-64"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, arr: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    """Fashion-MNIST's idx files, or scikit-learn digits (28x28) in the same layout."""
    if (DEBIAN_FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        return DEBIAN_FMNIST
    root = tmp_path_factory.mktemp("fmnist")
    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((28, 28))) for x in d.images])
    for prefix, sl in (("train", slice(0, 1000)), ("t10k", slice(1000, None))):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs[sl])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", d.target[sl])
    return root


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits_csv")
    d = load_digits()
    words = "zero one two three four five six seven eight nine".split()
    (root / "img").mkdir()
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for i in range(8):
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(root / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", f"a photo of the number: {words[d.target[i]]}"])
            w.writerow([f"img/{i}.png", f"handwritten digit {d.target[i]}"])
    return root / "captions.csv"


def _start(script: str, *args: str) -> subprocess.Popen:
    # one thread each: the three programs run at once on a small machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PY, str(REPO / "eval" / script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def cli_runs(idx_root, digits_csv, tmp_path_factory) -> dict:
    """The three programs as subprocesses, started together (they overlap their start-up), on real images."""
    out = tmp_path_factory.mktemp("cli")
    runs = {
        "zeroshot": _start("zeroshot.py", "--model", MODEL, "--dataset", "fashion-mnist", "--data-root",
                           str(idx_root), "--max-samples", "20", "--batch-size", "8", "--workers", "1",
                           "--device", "auto", "--output", str(out / "zs.json"),
                           "--save-classifier", str(out / "clf.safetensors")),
        "retrieval": _start("retrieval.py", "--model", MODEL, "--dataset", "csv", "--data-root", str(digits_csv),
                            "--batch-size", "8", "--workers", "0", "--output", str(out / "ret.json")),
        "linear_probe": _start("linear_probe.py", "--model", MODEL, "--dataset", "fashion-mnist", "--data-root",
                               str(idx_root), "--max-samples", "40", "--workers", "0", "--feature-cache",
                               str(out / "cache"), "--output", str(out / "lp.json")),
    }
    yield {"dir": out, **runs}
    for p in runs.values():
        if p.poll() is None:
            p.kill()


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = p.communicate(timeout=300)
    return p.returncode, stdout, stderr


def _check_record(rec: dict, task: str, metric_keys: set):
    assert set(rec) >= set(RECORD_KEYS) and rec["task"] == task and rec["model"] == MODEL and rec["language"] == "en"
    assert set(rec["metrics"]) == metric_keys
    assert all(0.0 <= v <= 1.0 for k, v in rec["metrics"].items() if k.startswith(("lp_", "acc", "mean", "image",
                                                                                     "text"))), rec["metrics"]


def test_zeroshot_cli(idx_root, cli_runs, tmp_path):
    code, stdout, stderr = _finish(cli_runs["zeroshot"])
    assert code == 0, stderr
    out, clf = cli_runs["dir"] / "zs.json", cli_runs["dir"] / "clf.safetensors"
    rec = json.loads(out.read_text())
    assert tuple(rec) == RECORD_KEYS  # CLIP_benchmark's record exactly; the rest is in the sidecar
    _check_record(rec, "zeroshot_classification", {"acc1", "acc5", "mean_per_class_recall"})
    assert rec["dataset"] == "fashion-mnist" and rec["pretrained"] == ""
    assert json.loads(stdout.strip().splitlines()[-1]) == rec  # stdout: the record, no per-sample lists
    (full,) = read_records(out)
    assert full["root"] == str(idx_root) and [len(v) for v in full["per_sample"].values()] == [20, 20]
    w = load_file(str(clf))["classifier"]
    assert w.shape == (128, 10)
    # deterministic: the same run in-process with the saved classifier gives the same metrics
    with pytest.raises(SystemExit) as e:
        run_cli(zeroshot.main, ["--model", MODEL, "--dataset", "fashion-mnist", "--data-root", str(idx_root),
                                "--max-samples", "20", "--batch-size", "8", "--workers", "0", "--classifier", str(clf),
                                "--no-progress", "--output", str(tmp_path / "zs2.json")])
    assert e.value.code == 0
    assert json.loads((tmp_path / "zs2.json").read_text())["metrics"] == rec["metrics"]


def test_retrieval_cli(cli_runs):
    code, _, stderr = _finish(cli_runs["retrieval"])
    assert code == 0, stderr
    rec = json.loads((cli_runs["dir"] / "ret.json").read_text())
    _check_record(rec, "zeroshot_retrieval", {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                              for k in (1, 5, 10)})
    assert rec["metrics"]["image_retrieval_recall@10"] >= rec["metrics"]["image_retrieval_recall@1"]


def test_linear_probe_cli_and_fewshot(idx_root, cli_runs, tmp_path):
    code, _, stderr = _finish(cli_runs["linear_probe"])
    assert code == 0, stderr
    cache = cli_runs["dir"] / "cache"
    (rec,) = read_records(cli_runs["dir"] / "lp.json")
    hyper = {"C", "weight_decay", "seed", "max_iter", "normalized"}  # inside metrics, as CLIP_benchmark puts them
    _check_record(rec, "linear_probe", {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} | hyper)
    assert rec["probe"]["n_train"] == 40 and rec["probe"]["C"] > 0
    assert len(list(cache.glob("*.npz"))) == 2
    # k-shot over two seeds, in-process, from the cached features
    with pytest.raises(SystemExit) as e:
        run_cli(linear_probe.main, ["--model", MODEL, "--dataset", "fashion-mnist", "--data-root", str(idx_root),
                                    "--max-samples", "40", "--workers", "0", "--feature-cache", str(cache),
                                    "--fewshot-k", "2", "--seeds", "0", "1", "--no-progress",
                                    "--output", str(tmp_path / "fs.json")])
    assert e.value.code == 0
    (fs,) = read_records(tmp_path / "fs.json")
    assert fs["fewshot_k"] == 2 and [s["seed"] for s in fs["per_seed"]] == [0, 1]
    train = limit(build_dataset("fashion-mnist", idx_root, "train"), 40)
    assert all(s["n_train"] == sum(min(2, c) for c in np.bincount(train.targets)) for s in fs["per_seed"])
    accs = {"lp_acc1", "lp_acc1_std", "lp_acc5", "lp_acc5_std", "lp_mean_per_class_recall",
            "lp_mean_per_class_recall_std"}
    assert set(fs["metrics"]) == accs | {"fewshot_k", "seed", "max_iter", "normalized"}
    assert all(0 <= fs["metrics"][k] <= 1 for k in accs) and fs["metrics"]["fewshot_k"] == 2
    assert fs["metrics"]["lp_acc1"] == pytest.approx(np.mean([s["lp_acc1"] for s in fs["per_seed"]]))


def _cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]
    return err[0]


def test_bad_inputs(idx_root, tmp_path, capsys):
    base = ["--model", MODEL, "--dataset", "fashion-mnist", "--data-root", str(idx_root), "--max-samples", "8",
            "--workers", "0", "--no-progress"]
    empty, bad_tpl = tmp_path / "empty.txt", tmp_path / "bad.txt"
    empty.write_text("")
    bad_tpl.write_text("a photo of a thing\n")
    assert "empty" in _cli_error(zeroshot.main, base + ["--classnames", str(empty)], capsys)
    assert "placeholder" in _cli_error(zeroshot.main, base + ["--templates", str(bad_tpl)], capsys)
    wrong = tmp_path / "wrong.safetensors"
    zeroshot.save_classifier(wrong, torch.randn(128, 7), [str(i) for i in range(7)], MODEL)
    assert "has 7 classes but the dataset has 10" in _cli_error(zeroshot.main, base + ["--classifier", str(wrong)],
                                                                 capsys)
    ckpt = tmp_path / "other_arch.safetensors"
    from safetensors.torch import save_file
    save_file({"logit_scale": torch.tensor(1.0)}, str(ckpt))
    assert "does not match the model" in _cli_error(zeroshot.main, base + ["--pretrained", str(ckpt)], capsys)
    assert "expected layout" in _cli_error(linear_probe.main, ["--model", MODEL, "--dataset", "dtd", "--data-root",
                                                               str(tmp_path)], capsys)
    err = _cli_error(zeroshot.main, ["--model", MODEL, "--dataset", "imagenet1k", "--data-root", str(tmp_path / "no")],
                     capsys)
    assert "not found; expected layout: <root>/[val/]<wnid>/*.JPEG" in err


def test_robustness_summary(tmp_path, capsys):
    """ImageNet val + ImageNet-A/-V2 folders: one shared 1000-class classifier, masks for A, summary with gaps."""
    wnids, a_wnids = imagenet_wnids(), _timm_info("imagenet_a_synsets.txt")
    d = load_digits()

    def img(i, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB").save(path)
    for k, w in enumerate([wnids[1], wnids[6]]):
        img(k, tmp_path / "imagenet" / "val" / w / "a.JPEG")
        img(k + 2, tmp_path / "imagenet-a" / a_wnids[k] / "b.jpg")
        img(k + 4, tmp_path / "imagenetv2-matched-frequency-format-val" / str(wnids.index(w)) / "c.jpeg")
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("a photo of a {}.\n")
    out, md = tmp_path / "rob.json", tmp_path / "rob.md"
    with pytest.raises(SystemExit) as e:
        run_cli(robustness.main, ["--model", MODEL, "--data-root", str(tmp_path), "--datasets", "imagenet-v2",
                                  "imagenet-a", "imagenet-sketch", "--skip-missing", "--templates", str(tpl),
                                  "--workers", "0", "--no-progress", "--output", str(out), "--markdown", str(md)])
    assert e.value.code == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert set(s["shifts"]) == {"imagenet-v2", "imagenet-a"}  # sketch is missing and skipped
    assert [r["dataset"] for r in res["results"]] == ["imagenet1k", "imagenet-v2", "imagenet-a"]
    for name, v in s["shifts"].items():
        assert v["gap"] == pytest.approx(s["in_distribution"] - v["acc1"]), name
    assert s["average"] == pytest.approx((s["shifts"]["imagenet-v2"]["acc1"] + s["shifts"]["imagenet-a"]["acc1"]) / 2)
    assert "| imagenet-a |" in md.read_text()


def test_run_suite_local_two_models(idx_root, tmp_path, capsys):
    from eval_helpers import write_emoji_set
    write_emoji_set(tmp_path / "sources", "twitter")
    write_emoji_set(tmp_path / "sources", "google")
    with pytest.raises(SystemExit) as e:
        run_cli(run_suite.main, ["--model", MODEL, "--pretrained", "none", "--model", "CLIP-Tiny-64",
                                 "--pretrained", "none", "--suite", "local", "--root", f"fashion-mnist={idx_root}",
                                 "--data-root", str(tmp_path / "sources"), "--max-samples", "6", "--workers", "0",
                                 "--no-progress", "--no-cache", "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 0
    table = json.loads((tmp_path / "out" / "suite_local.json").read_text())
    assert [m["label"] for m in table["models"]] == [MODEL, "CLIP-Tiny-64"]
    assert table["missing"] == [] and len(table["results"]) == 2 * len(run_suite.SUITES["local"])
    for row in table["rows"]:
        assert all(v is not None and 0 <= v <= 1 for v in row["values"].values()), row
    md = (tmp_path / "out" / "suite_local.md").read_text()
    assert f"Δ ({MODEL} − CLIP-Tiny-64)" in md and "| zero-shot | emoji-google | top-1 |" in md
