"""training/main.py under the failures a long run meets: two runs started on one run folder, a newest checkpoint that
is empty or truncated, a validation set with nothing usable, corrupt images in the zero-shot folder, a resume
with another --model. Real processes on real shards (scikit-image photos)."""

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import _env, _write_sources

MAIN = Path(__file__).resolve().parents[1] / "training" / "main.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    shards, zs = _write_sources(root)
    # the zero-shot folder gets an undecodable image; a validation shard holds only undecodable images
    (zs / "coffee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_val = root / "bad_val"
    bad_val.mkdir()
    with tarfile.open(bad_val / "00000.tar", "w") as tar:
        for i in range(4):
            for ext, payload in (("jpg", b"\xff\xd8 broken jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (bad_val / "sizes.json").write_text('{"00000.tar": 4}')
    return {"root": root, "shards": shards, "zs": zs, "bad_val": bad_val}


def _cmd(data, logs, name, *extra, model="DiffCLIP-Tiny-64"):
    return [sys.executable, str(MAIN), "--model", model, "--train-data", str(data["shards"]), "--batch-size", "8",
            "--train-num-samples", "16", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
            "--workers", "0", "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_two_runs_on_one_run_folder(data, tmp_path):
    """Started together with the same --name: one trains, the other stops at once with one line; a --resume
    latest during the run is refused naming the holder's PID; results.jsonl holds one run's records."""
    runs = [subprocess.Popen(_cmd(data, tmp_path, "same", "--epochs", "15"), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    lock = tmp_path / "same" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    holder = int(lock.read_text())
    third = _run(_cmd(data, tmp_path, "same", "--resume", "latest"))
    outs = [p.communicate(timeout=300) + (p.returncode,) for p in runs]
    assert sorted(code for _, _, code in outs) == [0, 1], [err[-2000:] for _, err, _ in outs]
    winner = next(p for p, (_, _, code) in zip(runs, outs) if code == 0)
    loser_err = next(err for _, err, code in outs if code == 1)
    assert "same" in _one_line(loser_err)
    assert third.returncode == 1 and f"in use by the run of PID {holder}" in _one_line(third.stderr)
    assert holder == winner.pid
    steps = [json.loads(x)["step"] for x in (tmp_path / "same" / "results.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == list(range(1, 31))  # one run's steps, once each


def test_resume_passes_over_a_bad_newest_checkpoint(data, tmp_path):
    assert _run(_cmd(data, tmp_path, "r")).returncode == 0
    ckpts = tmp_path / "r" / "checkpoints"
    good = ckpts / "epoch_1.pt"
    assert good.is_file()
    (ckpts / "step_999.pt").write_bytes(b"")
    (ckpts / "step_998.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    resumed = _run(_cmd(data, tmp_path, "r", "--resume", "latest", "--epochs", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "r" / "out.log").read_text() + resumed.stderr
    assert "passing over step_999.pt" in log and "passing over step_998.pt" in log
    records = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r["type"] == "resume"]
    assert resume["checkpoint"].endswith("epoch_1.pt")
    assert max(r["step"] for r in records if r["type"] == "train") == 4
    # another --model cannot continue this run: the names that differ are listed
    other = _run(_cmd(data, tmp_path, "r", "--resume", "latest", "--epochs", "3", model="CLIP-Tiny-64"))
    line = _one_line(other.stderr)
    assert other.returncode == 1 and "written for --model DiffCLIP-Tiny-64" in line and "lambda_q1" in line


def test_an_unusable_validation_set_is_refused_before_training_and_bad_zero_shot_images_are_skipped(data, tmp_path):
    """A --val-data set of which no image decodes is found before training, not after the first epoch: one line
    naming --val-data, no run folder left; the zero-shot folder, read before it, skips its undecodable image."""
    r = _run(_cmd(data, tmp_path, "e", "--zeroshot-data", str(data["zs"]), "--val-data", str(data["bad_val"])))
    assert r.returncode == 1 and "--val-data: no usable sample" in _one_line(r.stderr)
    assert "skipped 1 undecodable image(s)" in r.stderr and "broken.png" in r.stderr  # checked before training
    assert "epoch 0" not in r.stderr and not (tmp_path / "e").exists()
    Image.open(data["zs"] / "chelsea" / "0.png").verify()  # the good images are untouched


def test_siglip_run_keeps_its_bias_in_checkpoints_and_export(data, tmp_path):
    """--siglip: the learnable logit_bias is a model parameter (open_clip's layout): initialised to -10 with the
    scale at log 10, trained, logged, saved in the checkpoint, exported, and a --resume restores it."""
    import diffclip
    from diffclip.hub import torch_load

    r = _run(_cmd(data, tmp_path, "s", "--siglip", "--val-data", str(data["shards"] / "val"),
                  "--save-every-n-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    train = [x for x in records if x["type"] == "train"]
    assert len(train) == 2 and all(-10.1 < x["logit_bias"] < -9.9 for x in train)
    assert train[0]["logit_scale"] == pytest.approx(10.0, rel=0.01)
    assert train[0]["logit_bias"] != -10.0  # the optimizer moved it
    assert any(x["type"] == "val" and x["val_loss"] > 0 for x in records)
    final = torch_load(tmp_path / "s" / "checkpoints" / "epoch_1.pt")["state_dict"]["logit_bias"]
    assert final.item() == train[-1]["logit_bias"]
    exported = diffclip.create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "s" / "final_model"))
    assert exported.logit_bias.item() == final.item()
    # resuming from the first step's checkpoint gives the same second step as the uninterrupted run
    step1 = tmp_path / "s" / "checkpoints" / "step_1.pt"
    r = _run(_cmd(data, tmp_path, "s2", "--siglip", "--resume", str(step1)))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [json.loads(x) for x in (tmp_path / "s2" / "results.jsonl").read_text().splitlines()]
    assert [x["logit_bias"] for x in resumed if x["type"] == "train"] == [train[-1]["logit_bias"]]


def test_shards_whose_captions_are_never_utf8_stop_the_run_in_one_line(data, tmp_path):
    """Every caption in Latin-1: the run stops with one line naming a sample and its shard (no loop), and the
    skipped samples are logged a few times, not once each."""
    from train_helpers import spoil_samples

    shards = tmp_path / "latin1"
    shutil.copytree(data["shards"], shards, ignore=shutil.ignore_patterns("val"))
    for shard in shards.glob("*.tar"):
        spoil_samples(shard, captions=range(14))
    r = _run(_cmd({"shards": shards}, tmp_path, "l", "--workers", "1", "--dataset-resampled"), timeout=200)
    line = _one_line(r.stderr)
    assert r.returncode == 1 and re.search(r"no usable sample in .* \(e\.g\. \d+ in .*/0000\d\.tar: caption is not "
                                           r"UTF-8", line), line
    assert r.stderr.count("skipping") <= 10 and len(r.stderr) < 10_000, r.stderr[-3000:]
