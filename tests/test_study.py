"""training/study.py, the sweep driver: a 2-model x 2-seed micro-study of CLIP trainings (real shards of
scikit-learn digit images, real torchrun training runs of a few steps, real evaluations) killed mid-way and rerun
finishes without redoing what was done, and the summary is rebuilt from the result files alone; a finetune study
of two tiny ViTs gives the table over seeds and resumes an interrupted run; the study file and every job's flags
are checked before any job runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from diffclip.eval.runner import RECORD_KEYS, details_path
from diffclip.training.study import check_flags, load_study, plan, to_flags
from diffclip.training.study_report import paired_bootstrap, paired_test
from PIL import Image
from sklearn.datasets import load_digits

from diffclip.cli import UsageError

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


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """400 scikit-learn digits (8 x 8) as <root>/{train,test}/<digit>/*.png (300 / 100)."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(400):
        folder = root / ("test" if i < 100 else "train") / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype(np.uint8), "L").save(folder / f"{i}.png")
    return root


def _finetune_study(path: Path, data: Path, **extra) -> Path:
    """Two tiny ViTs (differential and standard, one 8 x 8 digit = 4 patches of 4 px) for 1 epoch, 2 seeds."""
    tiny = {"embed-dim": 16, "depth": 1, "mlp-ratio": 1}
    study = {"name": "tiny_vits", "program": "finetune", "output": str(path.parent / "out"), "seeds": [0, 1],
             "train": {"dataset": "folder", "data-root": str(data), "img-size": 8, "in-chans": 1, "patch-size": 4,
                       "num-heads": 2, "epochs": 1, "batch-size": 32, "lr": 3e-3, "warmup-epochs": 0,
                       "workers": 0, "threads": 1},
             "models": [{"label": "DiffViT", "reference": 50.0, "args": {"model": "diff_vit_nano_patch4_28", **tiny}},
                        {"label": "ViT twin", "twin": "equal width", "args": {"model": "std_vit_nano_patch4_28",
                                                                              **tiny}}], **extra}
    path.write_text(json.dumps(study))
    return path

TORCH = version("torch")  # the installed distribution's version, as the study's environment.json records it


def _driver(study_file, *extra, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "training" / "study.py"), str(study_file), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, **kw)


def test_paired_test_by_hand():
    t = paired_test([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])
    assert t["delta"] == pytest.approx(0.1) and t["delta_std"] == pytest.approx(0.1)
    # t = mean / (sd / sqrt(n)) = 0.1 / (0.1 / sqrt 3) = 1.732 with 2 degrees of freedom -> p = 0.2254
    assert t["p_value"] == pytest.approx(0.2254, abs=1e-4)
    # 95 % interval: 0.1 ± t(0.975, 2) * 0.1 / sqrt 3 = 0.1 ± 4.3027 * 0.05774 = [-0.1484, 0.3484]
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((-0.1484, 0.3484), abs=1e-4)
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
    record = out / "results" / "DiffCLIP-Tiny-64" / "seed0" / "ret_digits.json"  # the outcomes: in the sidecar
    assert tuple(json.loads(record.read_text())) == RECORD_KEYS and details_path(record).is_file()
    for model, cell in row["models"].items():  # every number comes from the result files
        vals = [json.loads((out / "results" / model / f"seed{s}" / "ret_digits.json").read_text())["metrics"]
                ["image_retrieval_recall@5"] for s in (0, 1)]
        assert cell["values"] == vals and cell["mean"] == pytest.approx(np.mean(vals))
    assert "| ret_digits | image_retrieval_recall@5 |" in stdout
    t = diff["vs_baseline"]  # the headline: the 95 % t-interval over the 2 seeds, printed beside the Δ
    assert t["ci_low"] <= t["delta"] <= t["ci_high"] and f"[{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}]" in stdout
    (call,) = json.loads((out / "environment.json").read_text())  # the killed call recorded nothing; this one did
    assert call["jobs_run"] == sum(v != "done" for v in status.values()) and call["environment"]["packages"]["torch"] == TORCH
    assert f"torch {TORCH}" in stdout and "Made by `python training/study.py" in stdout

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


def test_to_flags():
    assert to_flags({"batch_size": 64, "no-progress": True, "cache": False, "init": None, "scale": [0.8, 1],
                     "mean": (0.5,)}) == ["--batch-size", "64", "--no-progress", "--scale", "0.8", "1", "--mean", "0.5"]


def test_finetune_study_table_and_resume(digits_folder, tmp_path):
    path = _finetune_study(tmp_path / "tiny.json", digits_folder)
    p = _driver(path, "--jobs", "2")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    out = tmp_path / "out"
    table = json.loads((out / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["DiffViT", "ViT twin"]
    assert table["runs_trained"] == 4 and table["runs_reused"] == 0 and table["failures"] == []
    for row, folder in zip(table["rows"], ("DiffViT", "ViT_twin")):  # every number comes from the runs' results
        res = [json.loads((out / "runs" / f"{folder}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        assert row["acc1"] == [r["acc1"] for r in res] and row["params"] == res[0]["params"]
        assert row["acc1_std"] == pytest.approx(np.std(row["acc1"], ddof=1))
        assert row["attn"] == ("diff" if folder == "DiffViT" else "standard")
        assert (out / "runs" / f"{folder}-seed0" / "checkpoints").is_dir()  # the trainer's run-folder layout
    diff = table["rows"][0]
    cell = f"{100 * diff['acc1_mean']:.2f} ± {100 * diff['acc1_std']:.2f} | 50.00 |"
    assert cell in stdout and cell in (out / "table.md").read_text()

    # a finished study has nothing left to do; a run with checkpoints and no results.json was interrupted: it is
    # continued with --resume (finetune's own tests show that a resumed run ends with the same weights)
    assert all(j["status"] == "done" for j in plan(load_study(path)))
    (out / "runs" / "ViT_twin-seed1" / "results.json").unlink()
    jobs = {j["name"]: j for j in plan(load_study(path))}
    assert [n for n, j in jobs.items() if j["status"] != "done"] == ["ViT_twin-seed1"]
    assert jobs["ViT_twin-seed1"]["status"] == "resume" and jobs["ViT_twin-seed1"]["argv"][-1] == "--resume"


def test_dry_run_prints_the_plan_and_runs_nothing(digits_folder, tmp_path, capsys):
    from diffclip.training.study import main

    path = _finetune_study(tmp_path / "tiny.json", digits_folder)
    assert main([str(path), "--dry-run", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(ln.startswith("[   new] finetune") for ln in lines)
    assert "DiffViT-seed1: " in lines[0] and "training/finetune.py --dataset folder" in lines[0]
    assert "--seed 1 --output" in lines[0] and "--no-progress" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, "unknown key(s) epochs"),
    ({"seeds": "0"}, "'seeds' must be a list"),
    ({"models": [{"label": "A", "args": {"model": "diff_vit_nano_patch4_28"}, "colour": "red"}]},
     "models[0]: unknown key(s) colour"),
    ({"models": [{"label": "A", "args": {"model": {"name": "x"}}}]}, "flag 'model' must be a string"),
    ({"program": "pretrain"}, "'program' must be one of main, finetune"),
    ({"eval": [{"name": "zs", "program": "zeroshot"}]}, "a finetune study reports"),
    ({"train": {"dataset": "folder", "epochs": "ten"}}, "job DiffViT-seed0: argument --epochs: invalid int value"),
    ({"train": {"dataset": "folder", "epohcs": 3}}, "job DiffViT-seed0: unrecognized arguments: --epohcs 3"),
])
def test_bad_study_is_refused_before_any_job(digits_folder, tmp_path, change, message):
    from diffclip.training.study import main

    path = _finetune_study(tmp_path / "bad.json", digits_folder, **change)
    with pytest.raises(UsageError, match=re.escape(message)):
        main([str(path), "--no-progress"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"models": ["CLIP-Tiny-64", "CLIP-Tiny-46"]}, "models[1] (CLIP-Tiny-46): unknown model 'CLIP-Tiny-46'"),
    ({"eval": [{"name": "zs", "program": "zeroshott"}]}, "eval[0] (zs): unknown program 'zeroshott'"),
    ({"eval": [{"name": "zs", "program": "readers"}]}, "eval[0] (zs): unknown program 'readers'"),
    ({"eval": [{"name": "zs", "program": "zeroshot", "args": {"dataset": "fashion-mnsit"}}]},
     "eval[0] (zs): unknown classification dataset 'fashion-mnsit'"),
    ({"eval": [{"name": "r", "program": "retrieval", "metrics": [5]}]}, "eval[0]: 'metrics' must be a list"),
    ({"nproc": "2"}, "'nproc' must be an integer"),
])
def test_bad_names_are_refused_before_shards_and_dry_run(study_file, tmp_path, change, message):
    """A trainer study: the model names, evaluation programs and datasets are checked before the shards are built,
    and by --dry-run."""
    from diffclip.training.study import main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**json.loads(study_file.read_text()), "output": str(tmp_path / "out"), **change}))
    for extra in (["--dry-run"], ["--no-progress"]):
        with pytest.raises(UsageError, match=re.escape(message)):
            main([str(path), *extra])
    assert not (tmp_path / "out").exists()


def test_failed_job_reports_its_own_error_line(tmp_path):
    """A trainer job that stops at once (its shards are not there): the driver names the trainer's error line from
    the job's log, not torchrun's summary that ends the log."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "fail", "output": str(tmp_path / "out"), "models": ["CLIP-Tiny-64"],
                                "seeds": [0], "train": {"train-data": str(tmp_path / "none-{0..1}.tar"),
                                                        "workers": 0, "precision": "fp32"}}))
    p = _driver(path)
    _, stderr = p.communicate(timeout=300)
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert p.returncode == 1 and lines, stderr[-2000:]
    assert "CLIP-Tiny-64-seed0 failed (exit 1): main.py: error: --train-data: 2 of 2 shards not found" in lines[-1]
    assert "====" not in lines[-1]
    log_text = (tmp_path / "out" / "logs" / "CLIP-Tiny-64-seed0.log").read_text()
    assert log_text.rstrip().endswith("=" * 20)  # the cause is not the log's last line


def test_error_line():
    from diffclip.training.study import error_line

    torchrun = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + "=" * 60 +
                "\nmain.py FAILED\n" + "-" * 60 + "\n  traceback : To enable traceback see: https://x\n" + "=" * 60)
    assert error_line("retrieval.py: error: --data-root x: no such file\n" + torchrun) == \
        "retrieval.py: error: --data-root x: no such file"
    assert error_line("Traceback (most recent call last):\n  File 'a.py'\nKeyError: 'x'\n" + torchrun) == "KeyError: 'x'"
    assert error_line("killed at step 3\n" + "=" * 60) == "killed at step 3"
    assert error_line("") == "(no output)"


def test_study_files_of_the_repository():
    """Every study file in studies/ follows the schema and plans its jobs; the flags of those whose data is on
    this machine pass their programs' parsers."""
    paths = sorted((ROOT / "studies").glob("*.json"))
    assert {p.stem for p in paths} >= {"emoji_clipart", "fashion_mnist_40k"}
    for path in paths:
        study = load_study(path, output="/nonexistent/study")
        jobs = plan(study)
        assert len(jobs) == len(study["shards"]) + len(study["models"]) * len(study["seeds"]) * (1 + len(study["eval"]))
        if path.stem in ("emoji_clipart", "fashion_mnist_40k") and Path("/usr/share/datasets/fashion-mnist").is_dir():
            check_flags(jobs)
