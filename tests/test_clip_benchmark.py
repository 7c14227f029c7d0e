"""CLIP_benchmark both ways, against the installed clip_benchmark: its own CLI evaluates a diffclip model through
eval/clip_benchmark.py and gets the numbers of eval/zeroshot.py and eval/retrieval.py (fp32, the same tiny model
saved to a file, the same CLIP_benchmark-format webdataset folders of real digit images); ``clip_benchmark build``
turns our result files and its own into one CSV that Python's csv reader reads back, a COCO-sized per-sample list
included (it lives in the sidecar)."""

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from diffclip.eval import clip_benchmark, retrieval, zeroshot
from diffclip.eval.runner import RECORD_KEYS, details_path, read_records, write_record
from eval_helpers import DIGITS, digit
from safetensors.torch import save_file

import diffclip
from diffclip.cli import run as run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "DiffCLIP-Tiny-64"
WORDS = "zero one two three four five six seven eight nine".split()
N = 40


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _wds_folder(root: Path, kind: str) -> Path:
    """CLIP_benchmark's webdataset layout: N digits in two shards of test/, classes and {c} templates, and for
    retrieval dataset_type.txt and two captions per image."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of the number {c}.\n{c} written by hand.\n")
    if kind == "retrieval":
        (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("2\n")
    for shard, keys in enumerate([range(0, N // 2), range(N // 2, N)]):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tf:
            for k in keys:
                png = io.BytesIO()
                digit(k, 32).save(png, format="PNG")
                label = int(DIGITS.target[k])
                _add(tf, f"s{k:04d}.png", png.getvalue())
                _add(tf, f"s{k:04d}.cls", f"{label}\n".encode())
                _add(tf, f"s{k:04d}.txt", f"a handwritten {WORDS[label]}\nthe digit {label}, sample {k}\n".encode())
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A tiny model saved to a file; zero-shot and retrieval by our programs and by CLIP_benchmark's CLI (through
    the module, in this process), all fp32, into one results folder."""
    d = tmp_path_factory.mktemp("cb")
    torch.manual_seed(0)
    weights = d / "tiny.safetensors"
    save_file(diffclip.create_model(MODEL).state_dict(), str(weights))
    data = {kind: _wds_folder(d / kind, kind) for kind in ("classification", "retrieval")}
    res = d / "results"
    common = ["--model", MODEL, "--pretrained", str(weights), "--precision", "fp32", "--batch-size", "16",
              "--workers", "0", "--no-progress"]
    for main, kind, out in ((zeroshot.main, "classification", "ours_zs.json"),
                            (retrieval.main, "retrieval", "ours_ret.json")):
        with pytest.raises(SystemExit) as e:
            run_cli(main, common + ["--dataset", "wds/digits", "--data-root", str(data[kind]), "--output",
                                    str(res / out)])
        assert e.value.code == 0
    theirs = ["eval", "--model", MODEL, "--pretrained", str(weights), "--dataset", "wds/digits", "--no_amp",
              "--batch_size", "16", "--num_workers", "0", "--quiet"]
    assert clip_benchmark.main(theirs + ["--dataset_root", str(data["classification"]), "--task",
                                         "zeroshot_classification", "--output", str(res / "theirs_zs.json")]) == 0
    assert clip_benchmark.main(theirs + ["--dataset_root", str(data["retrieval"]), "--task", "zeroshot_retrieval",
                                         "--recall_k", "1", "5", "10", "--output", str(res / "theirs_ret.json")]) == 0
    return {"dir": res, **{p.stem: json.loads(p.read_text()) for p in res.glob("*.json")}}


def test_zeroshot_same_as_clip_benchmarks_cli(runs):
    ours, theirs = runs["ours_zs"], runs["theirs_zs"]
    assert theirs["model"] == MODEL and theirs["task"] == ours["task"] == "zeroshot_classification"
    assert set(ours["metrics"]) == set(theirs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    for key, value in theirs["metrics"].items():  # counts over 40 images: 1e-6 is far below one image
        assert ours["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert 0 < theirs["metrics"]["acc5"] < 1  # not a degenerate case


def test_retrieval_same_as_clip_benchmarks_cli(runs):
    ours, theirs = runs["ours_ret"], runs["theirs_ret"]
    assert theirs["task"] == ours["task"] == "zeroshot_retrieval"
    assert set(ours["metrics"]) == set(theirs["metrics"]) and len(theirs["metrics"]) == 6
    for key, value in theirs["metrics"].items():
        assert ours["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert theirs["metrics"]["text_retrieval_recall@10"] > theirs["metrics"]["text_retrieval_recall@1"]


def test_clip_benchmark_build_reads_our_records(runs, tmp_path):
    """Our records have CLIP_benchmark's shape exactly; a COCO-sized per-sample list stays out of the CSV (in the
    sidecar, which build's folder listing skips); the installed CLI, run as ``python eval/clip_benchmark.py`` (its
    folder first on sys.path), builds one CSV that csv.DictReader reads with its default field size limit."""
    res = runs["dir"]
    for name in ("ours_zs", "ours_ret"):
        assert tuple(runs[name]) == RECORD_KEYS == tuple(runs[name.replace("ours", "theirs")])
    coco = {"image_retrieval_recall@5": [1, 0] * 12_500, "text_retrieval_recall@5": [0, 1, 1] * 1_667}
    big = {**runs["ours_ret"], "dataset": "mscoco_captions", "root": "/data/coco", "per_sample": coco}
    write_record(str(res / "coco.json"), big)
    assert (res / "coco.json").stat().st_size < 2_000 and details_path(res / "coco.json").is_file()
    assert read_records(res / "coco.json") == [big]  # and the study reads the outcomes back
    csv_path = tmp_path / "benchmark.csv"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "clip_benchmark.py"), "build", str(res), "--output",
                        str(csv_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["dataset"] for row in rows) == ["mscoco_captions"] + ["wds/digits"] * 4
    assert {"per_sample", "root"}.isdisjoint(rows[0]) and {"acc1", "image_retrieval_recall@5"} <= set(rows[0])
    zs = [row for row in rows if row["task"] == "zeroshot_classification"]  # ours and theirs
    assert [float(row["acc1"]) for row in zs] == pytest.approx([runs["ours_zs"]["metrics"]["acc1"]] * 2)


def test_accuracy_replacement_is_clip_benchmarks_metric():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 2, 2, 1])
    assert clip_benchmark.accuracy(logits, target, topk=(1, 2, 3)) == [0.5, 0.75, 1.0]
