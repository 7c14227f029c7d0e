"""training/study.py on a 2-model x 2-seed micro-study (real shards of scikit-learn digit images, real torchrun
training runs of a few steps, real evaluations): killed mid-way and rerun, it finishes without redoing what was
done, and the summary is rebuilt from the result files alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from diffclip.training.study import load_study, plan
from diffclip.training.study_report import paired_bootstrap, paired_test
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
WORDS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    digits = load_digits()
    (d / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(48):
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((32, 32)).save(d / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a handwritten digit {WORDS[digits.target[i]]}")
    (d / "captions.csv").write_text("\n".join(rows) + "\n")
    study = {
        "name": "micro", "output": str(d / "out"), "models": ["CLIP-Tiny-64", "DiffCLIP-Tiny-64"],
        "baseline": "CLIP-Tiny-64", "seeds": [0, 1], "nproc": 1,
        "shards": [{"name": "digits", "args": {"source": "csv", "input": str(d / "captions.csv"),
                                                "image-size": 32, "samples-per-shard": 16}}],
        "train": {"train-data": "{out}/shards/digits", "epochs": 1, "batch-size": 16, "lr": 1e-3, "warmup": 1,
                  "workers": 0, "precision": "fp32", "val-frequency": 0, "log-every-n-steps": 1},
        "eval": [{"name": "ret_digits", "program": "retrieval", "metrics": ["image_retrieval_recall@5"],
                  "args": {"dataset": "csv", "data-root": str(d / "captions.csv"), "workers": 0}}],
    }
    path = d / "micro.json"
    path.write_text(json.dumps(study))
    return path


def _driver(study_file, *extra, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "training" / "study.py"), str(study_file), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, **kw)


def test_paired_test_by_hand():
    t = paired_test([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])
    assert t["delta"] == pytest.approx(0.1) and t["delta_std"] == pytest.approx(0.1)
    # t = mean / (sd / sqrt(n)) = 0.1 / (0.1 / sqrt 3) = 1.732 with 2 degrees of freedom -> p = 0.2254
    assert t["p_value"] == pytest.approx(0.2254, abs=1e-4)
    assert paired_test([0.5], [0.4])["p_value"] is None


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    same = [rng.integers(0, 2, 400) for _ in range(3)]
    assert paired_bootstrap(same, same) == {"ci_low": 0.0, "ci_high": 0.0, "n_samples": 400, "n_boot": 1000}
    better = [np.minimum(1, x + (rng.random(400) < 0.3)) for x in same]  # ~15 points more hits
    ci = paired_bootstrap(better, same)
    delta = np.mean([b.mean() - a.mean() for a, b in zip(same, better)])
    assert 0 < ci["ci_low"] < delta < ci["ci_high"]
    assert paired_bootstrap([np.ones(3)], [np.ones(4)]) is None  # not the same samples


def test_study_killed_and_rerun_finishes_without_redoing(study_file):
    study = load_study(study_file)
    out = Path(study["output"])
    assert [j["status"] for j in plan(study)] == ["new"] * 9  # 1 shard job, 4 trainings, 4 evaluations
    first_final = out / "runs" / "CLIP-Tiny-64-seed0" / "final_model" / "model.safetensors"

    p = _driver(study_file)  # kill the whole process tree once the first run has finished
    deadline = time.time() + 240
    while not first_final.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first_final.exists(), p.communicate()[1][-2000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    mtime = first_final.stat().st_mtime_ns
    status = {j["name"]: j["status"] for j in plan(study)}
    assert status["shards/digits"] == "done" and status["CLIP-Tiny-64-seed0"] == "done"
    assert status["DiffCLIP-Tiny-64-seed1"] == "new"

    p = _driver(study_file, "--jobs", "2")  # the rest, two at a time
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert first_final.stat().st_mtime_ns == mtime  # not retrained
    assert all(j["status"] == "done" for j in plan(study))
    summary = json.loads((out / "study.json").read_text())
    (row,) = summary["rows"]
    assert row["metric"] == "image_retrieval_recall@5"
    assert set(row["models"]) == {"CLIP-Tiny-64", "DiffCLIP-Tiny-64"}
    diff = row["models"]["DiffCLIP-Tiny-64"]
    assert diff["seeds"] == [0, 1] and diff["vs_baseline"]["n"] == 2
    boot = diff["vs_baseline"]["bootstrap"]  # retrieval writes per-caption outcomes: a bootstrap over captions
    assert boot["n_samples"] == 48 and boot["ci_low"] <= diff["vs_baseline"]["delta"] <= boot["ci_high"]
    for model, cell in row["models"].items():  # every number comes from the result files
        vals = [json.loads((out / "results" / model / f"seed{s}" / "ret_digits.json").read_text())["metrics"]
                ["image_retrieval_recall@5"] for s in (0, 1)]
        assert cell["values"] == vals and cell["mean"] == pytest.approx(np.mean(vals))
    assert "| ret_digits | image_retrieval_recall@5 |" in stdout

    # a third call has nothing to do, and --report-only rebuilds the same table from the files alone
    logs = sorted((out / "logs").iterdir())
    sizes = [f.stat().st_size for f in logs]
    p = _driver(study_file, "--report-only")
    stdout2, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and [f.stat().st_size for f in logs] == sizes
    assert json.loads((out / "study.json").read_text())["rows"] == summary["rows"]


def test_bad_study_file_is_one_line(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"name": "x", "models": ["A"], "seeds": [0], "train": {}, "eval": [],
                               "baseline": "B"}))
    r = subprocess.run([sys.executable, str(ROOT / "training" / "study.py"), str(bad)], capture_output=True,
                       text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "baseline 'B'" in lines[0] and "Traceback" not in r.stderr
