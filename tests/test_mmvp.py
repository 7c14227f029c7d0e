"""eval/mmvp.py on a small set in MMVP-VLM's own layout, built from real photographs (scikit-image): the pair
rule, per-pattern accuracy, the records and the radar chart, checked against the models' own similarities."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from diffclip.eval.mmvp import IMAGE_DIR, read_pairs
from PIL import Image

import diffclip

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [  # (pattern, image 1, image 2, statement 1, statement 2)
    ("Color and Appearance", "coffee", "chelsea", "a cup of coffee on a table", "a cat with striped fur"),
    ("Color and Appearance", "astronaut", "rocket", "a person in a space suit", "a rocket on a launch pad"),
    ("Quantity and Count", "coins", "camera", "many coins in rows", "a man with a camera"),
    ("Quantity and Count", "horse", "hubble_deep_field", "a horse silhouette", "stars in deep space"),
    # identical images: both statements pick the same image, so the pair can never count
    ("Texts", "page", "page", "a page of printed text", "a blank page"),
    ("Texts", "text", "text", "text on a wall", "a sign with letters"),
]


@pytest.fixture(scope="module")
def mmvp(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMVP_VLM")
    rows, qid = [["Question ID", "Type", "Statement"]], 1
    for pattern, im1, im2, s1, s2 in PAIRS:
        for q, name, statement in ((qid, im1, s1), (qid + 1, im2, s2)):
            path = root / IMAGE_DIR / pattern / f"{q}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((96, 96)).save(path)
            rows.append([str(q), pattern, statement])
        qid += 2
    with open(root / "Questions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _expected(model, pairs) -> dict:
    """Per-pattern pair accuracy worked out from the model's own embeddings, outside the program."""
    preprocess = diffclip.create_model_and_transforms("DiffCLIP-Tiny-64")[2]  # the eval transform (same config)
    tok = diffclip.get_tokenizer("DiffCLIP-Tiny-64")
    hits: dict[str, list[bool]] = {}
    for pair in pairs:
        imgs = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in pair["images"]])
        with torch.no_grad():
            a = F.normalize(model.encode_image(imgs), dim=-1)
            t = F.normalize(model.encode_text(tok(["a photo of " + s for s in pair["statements"]])), dim=-1)
        s = t @ a.T
        first_ok = bool(s[0, 0] > s[0, 1])  # statement 1 belongs to the odd id = the first image
        second_ok = not bool(s[1, 0] > s[1, 1])
        hits.setdefault(pair["pattern"], []).append(first_ok and second_ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def test_mmvp_two_models_records_and_radar(mmvp, tmp_path):
    torch.manual_seed(0)
    specs = []
    models = {}
    for name in ("CLIP-Tiny-64", "DiffCLIP-Tiny-64"):
        m = diffclip.create_model(name).eval()
        m.save_pretrained(tmp_path / name)
        models[name] = m
        specs.append(f"{name}@{tmp_path / name}")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "mmvp.py"), "--models", *specs, "--labels", "CLIP",
                        "DiffCLIP", "--data-root", str(mmvp), "--output-dir", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "mmvp_radar.png").stat().st_size > 10_000
    pairs = read_pairs(mmvp)
    assert len(pairs) == 6 and pairs[0]["qids"] == [1, 2] and pairs[0]["images"][0].endswith("/1.jpg")
    for label, name in (("CLIP", "CLIP-Tiny-64"), ("DiffCLIP", "DiffCLIP-Tiny-64")):
        rec = json.loads((out / f"mmvp_{label}.json").read_text())
        assert rec["task"] == "mmvp" and rec["dataset"] == "mmvp_vlm" and rec["pairs"] == 6
        m = rec["metrics"]
        assert list(m) == ["Quantity and Count", "Color and Appearance", "Texts", "average"]  # the paper's order
        assert m["Texts"] == 0.0  # identical images: never both right
        expected = _expected(models[name], pairs)
        for pattern, value in expected.items():
            assert m[pattern] == pytest.approx(value), (label, pattern)
        assert m["average"] == pytest.approx(sum(expected.values()) / 3)
    summary = json.loads((out / "mmvp.json").read_text())
    assert set(summary["models"]) == {"CLIP", "DiffCLIP"}
    # one model, one record (the form training/study.py uses): the same numbers
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "mmvp.py"), "--model", "CLIP-Tiny-64", "--pretrained",
                        str(tmp_path / "CLIP-Tiny-64"), "--data-root", str(mmvp), "--output", str(tmp_path / "one.json"),
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["metrics"] == json.loads((out / "mmvp_CLIP.json").read_text())["metrics"]


def test_bad_layout_is_one_line(tmp_path):
    (tmp_path / "Questions.csv").write_text("id,type,statement\n1,Texts,a sign\nx,Texts\n")
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "mmvp.py"), "--models", "CLIP-Tiny-64", "--data-root",
                        str(tmp_path), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Questions.csv:3" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_run_suite_paper_runs_mmvp_and_writes_the_report(mmvp, tmp_path):
    """--suite paper with two models: the sets absent here are reported missing, MMVP-VLM runs, and the report
    files and the radar chart land in one folder."""
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "run_suite.py"), "--model", "CLIP-Tiny-64", "--model",
                        "DiffCLIP-Tiny-64", "--suite", "paper", "--data-root", str(tmp_path / "none"), "--root",
                        f"mmvp-vlm={mmvp}", "--workers", "0", "--no-progress", "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    suite = json.loads((out / "suite_paper.json").read_text())
    assert "imagenet1k" in suite["missing"] and "mmvp-vlm" not in suite["missing"]
    assert [rec["task"] for rec in suite["results"]] == ["mmvp", "mmvp"]
    assert (out / "mmvp_radar.png").stat().st_size > 10_000 and (out / "table1.md").is_file()
    assert (out / "report.json").is_file()
