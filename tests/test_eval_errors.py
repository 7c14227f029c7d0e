"""Bad input to the zero-shot and retrieval programs: each a subprocess (through the ``diffclip-eval`` dispatcher)
that must exit non-zero with exactly one stderr line naming the input, no traceback, and no output file."""

import json
import os
import subprocess
import sys

import pytest

PY = sys.executable
MODEL = "DiffCLIP-Tiny-64"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.safetensors").write_bytes(os.urandom(100))
    (d / "empty.pt").write_bytes(b"")
    (d / "two.txt").write_text("a {} of a {}\n")
    (d / "plain.txt").write_text("not a csv of captions\n")
    (d / "a_folder").mkdir()
    from PIL import Image  # an image folder with one undecodable file among real ones
    for cls in ("a", "b"):
        (d / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10) if cls == "a" else (10, 10, 200)).save(d / "imgs" / cls / "ok.png")
    (d / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


def _digits_csv(root):
    """A retrieval CSV of two real images (scikit-learn's digits)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    lines = ["filepath,caption"]
    for i in range(2):
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,the digit {digits.target[i]}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root / "captions.csv"


ZS = ["zeroshot", "--model", MODEL, "--dataset", "fashion-mnist", "--max-samples", "4", "--workers", "0",
      "--no-progress"]
LP = ["linear_probe", "--model", MODEL, "--dataset", "digits", "--workers", "0", "--no-progress", "--no-cache"]
RET = ["retrieval", "--model", MODEL, "--dataset", "csv", "--workers", "0", "--no-progress"]

CASES = {
    # name: (argv after the program's base, the text the one line must contain)
    "zs-classifier-garbage": (ZS + ["--classifier", "{d}/garbage.safetensors"], "garbage.safetensors"),
    "zs-classifier-missing": (ZS + ["--classifier", "{d}/none.safetensors"], "none.safetensors"),
    "zs-output-folder": (ZS + ["--output", "{d}/a_folder"], "--output"),
    "zs-output-unwritable": (ZS + ["--output", "/proc/no/r.json"], "--output"),
    "zs-save-classifier-unwritable": (ZS + ["--save-classifier", "/proc/no/c.safetensors"], "--save-classifier"),
    "zs-device-cuda": (ZS + ["--device", "cuda:7"], "--device"),
    "zs-batch-size": (ZS + ["--batch-size", "0"], "--batch-size"),
    "zs-max-samples": (ZS + ["--max-samples", "0"], "--max-samples"),
    "zs-precision": (ZS + ["--precision", "fp8"], "--precision"),
    "zs-templates-two-placeholders": (ZS + ["--templates", "{d}/two.txt"], "two.txt"),
    "zs-pretrained-garbage": (ZS + ["--pretrained", "{d}/garbage.safetensors"], "garbage.safetensors"),
    "zs-pretrained-empty": (ZS + ["--pretrained", "{d}/empty.pt"], "empty.pt"),
    "zs-pretrained-not-a-checkpoint": (ZS + ["--pretrained", "/etc/passwd"], "/etc/passwd"),
    "zs-unknown-dataset": (["zeroshot", "--model", MODEL, "--dataset", "no-such-set"], "no-such-set"),
    "ret-missing-file": (RET + ["--data-root", "{d}/none.csv"], "none.csv"),
    "ret-recall-k": (RET + ["--data-root", "{csv}", "--recall-k", "0"], "--recall-k"),
    "ret-output-folder": (RET + ["--data-root", "{csv}", "--output", "{d}/a_folder"], "--output"),
    "lp-fewshot-k": (LP + ["--fewshot-k", "-1"], "--fewshot-k"),
    "lp-max-samples": (LP + ["--max-samples", "0"], "--max-samples"),
    "lp-several-datasets-one-output": (["linear_probe", "--model", MODEL, "--dataset", "fashion-mnist", "digits",
                                        "--output", "{d}/lp.json"], "--output"),
    "lp-output-folder": (LP + ["--output", "{d}/a_folder"], "--output"),
    "zs-corrupt-image-in-folder": (["zeroshot", "--model", MODEL, "--dataset", "folder", "--data-root", "{d}/imgs",
                                    "--workers", "1", "--no-progress"], "broken.png"),
    "unknown-program": (["zero-shot"], "zero-shot"),
}


FOUND_DURING_WORK = {"zs-corrupt-image-in-folder"}  # an undecodable image is found when it is read: named, one line


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, inputs):
    csv = inputs / "csv" / "captions.csv"
    if not csv.exists():
        (inputs / "csv").mkdir(exist_ok=True)
        _digits_csv(inputs / "csv")
    argv, named = CASES[case]
    argv = [a.format(d=inputs, csv=csv) for a in argv]
    before = sorted(p.name for p in inputs.rglob("*"))
    r = subprocess.run([PY, "-m", "diffclip.eval", *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if case in FOUND_DURING_WORK:  # the progress log before the image is met is expected; the error is one line
        lines = [ln for ln in lines if " INFO " not in ln]
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    assert named in lines[0], lines[0]
    assert sorted(p.name for p in inputs.rglob("*")) == before  # nothing written, no temporary left


def test_several_datasets_write_one_record_per_line(tmp_path):
    out = tmp_path / "lp.jsonl"
    r = subprocess.run([PY, "-m", "diffclip.eval", "linear_probe", "--model", MODEL, "--dataset", "digits", "digits",
                        "--C", "1", "--workers", "0", "--no-progress", "--no-cache", "--output", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["dataset"] for rec in records] == ["digits", "digits"]  # CLIP_benchmark: one record per line
    assert all(rec["metrics"]["C"] == 1.0 for rec in records)
