"""Helpers of the training tests: real shards from scikit-image photos, the training command line, the losses a
run logged, and a run killed with SIGKILL (its whole process tree) and resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import skimage.data
from diffclip.training import make_shards
from PIL import Image

MAIN = Path(__file__).resolve().parents[1] / "training" / "main.py"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]
MODEL = "DiffCLIP-Tiny-64"


def _write_sources(root: Path) -> tuple[Path, Path]:
    """64 crops of real photos with unique captions -> 4 train shards + 1 val shard; a 3-class image folder."""
    img = root / "img"
    img.mkdir(parents=True)
    rows = []
    for i in range(64):
        name = PHOTOS[i % len(PHOTOS)]
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = photo.size
        left, top = (i // len(PHOTOS)) * w // 24, (i % 3) * h // 12
        photo.crop((left, top, left + w // 2, top + h // 2)).resize((48, 48)).save(img / f"{i:03d}.jpg")
        rows.append((f"img/{i:03d}.jpg", f"crop {i} of a photo of a {name}"))
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    shards = root / "shards"
    make_shards.write_shards(make_shards.read_csv_source(root / "captions.csv"), shards, samples_per_shard=14,
                             image_size=64, seed=0, val_fraction=0.125, progress=False)
    zs = root / "zeroshot"
    for name in PHOTOS[:3]:
        (zs / name).mkdir(parents=True)
        for j in range(2):
            photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            photo.resize((64 + 16 * j, 64 + 16 * j)).save(zs / name / f"{j}.png")
    (zs / "templates.txt").write_text("a photo of a {}.\n{}\n")
    return shards, zs


def _cmd(shards: Path, zs: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(MAIN), "--model", MODEL, "--train-data", str(shards), "--val-data",
            str(shards / "val"), "--zeroshot-data", str(zs), "--batch-size", "8", "--train-num-samples", "48",
            "--epochs", "2", "--lr", "1e-3", "--warmup", "3", "--wd", "0.1", "--precision", "fp32", "--workers", "1",
            "--seed", "3", "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
            "--save-every-n-steps", "2", "--report-to", "tensorboard", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before the kill and after the resume) keeps its last record."""
    out = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc): torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def run_killed_and_resumed(cmd, logs: Path, kill_after_step: int, wait: float = 240, timeout: float = 300) -> dict:
    """Runs ``cmd(name, *extra)`` uninterrupted ("full") and, side by side, a run ("killed") that is killed with
    SIGKILL (with every process it started) once ``step_{kill_after_step}.pt`` exists, then continued with
    ``--resume latest``. ``wait``: seconds for the checkpoint to appear; ``timeout``: for each run to finish.
    Returns the run folders, the losses logged before the kill and the resumed run's stderr."""
    full = subprocess.Popen(cmd("full"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(cmd("killed"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = logs / "killed" / "checkpoints" / f"step_{kill_after_step}.pt"
    deadline = time.time() + wait
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = killed.poll() is None
    for pid in _process_tree(killed.pid):  # the run and all its processes, at once
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    assert alive, "the run ended before it could be killed"
    assert target.exists(), "no mid-epoch checkpoint was written"
    before_kill = _losses(logs / "killed")
    _, err = full.communicate(timeout=timeout)
    assert full.returncode == 0, err[-3000:]
    resumed = subprocess.run(cmd("killed", "--resume", "latest"), env=_env(), capture_output=True, text=True,
                             timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"logs": logs, "full": logs / "full", "killed": logs / "killed", "before_kill": before_kill,
            "resumed_stderr": resumed.stderr}


def spoil_samples(shard: Path, captions=(), images=()) -> None:
    """Rewrites one shard in place: the samples at the positions ``captions`` (in key order) get their caption in
    Latin-1 (not UTF-8: ``"café"`` -> ``b"caf\\xe9"``), those at ``images`` an image that does not decode."""
    import tarfile

    import webdataset as wds

    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    keys = sorted(samples)
    for i in captions:
        samples[keys[i]]["txt"] = "café ".encode("latin-1") + samples[keys[i]]["txt"]
    for i in images:
        samples[keys[i]]["jpg"] = b"\xff\xd8\xff\xe0 not a JPEG after all"
    with wds.TarWriter(str(shard), encoder=False) as tw:
        for key in keys:
            tw.write(samples[key])


def main_in_process(*argv: str) -> tuple[int, str]:
    """``training/main.py ARGV`` run in this process as its console script runs it (``cli.run``): the exit status
    and what it wrote on stderr (the one-line error, the log). Saves the interpreter start-up of a subprocess."""
    import contextlib
    import io

    from diffclip.training.main import main

    from diffclip.cli import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run(main, list(argv))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


TORCHRUN = Path(sys.executable).with_name("torchrun")
_REFERENCE: dict = {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_args(shards: Path, zs: Path, logs: Path, name: str, *extra: str) -> list[str]:
    """``training/main.py`` and its flags for the 2-process cluster runs (3 epochs of 3 global batches of 16, no
    step checkpoints: the only mid-epoch checkpoint is a preemption's), without the interpreter or launcher."""
    args = _cmd(shards, zs, logs, name, "--epochs", "3", "--save-every-n-steps", "0", *extra)[1:]
    args[args.index("--logs")] = "--logs-dir"  # torchrun's own parser would read --logs as its --logs-specs
    return args


def ddp_reference(tmp_path_factory) -> dict:
    """Shards, a zero-shot set and one uninterrupted ``torchrun --standalone --nproc_per_node 2`` run ("reference"),
    made once per test session and shared by the preemption and multi-node tests."""
    if not _REFERENCE:
        root = tmp_path_factory.mktemp("cluster")
        shards, zs = _write_sources(root)
        logs = root / "logs"
        out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                              *ddp_args(shards, zs, logs, "reference")], env=_env(), capture_output=True, text=True,
                             timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        _REFERENCE.update(shards=shards, zs=zs, logs=logs, run=logs / "reference")
    return _REFERENCE


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final_model" / "model.safetensors")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same loss at every step and the same final weights as ``reference``, bit for bit."""
    import torch

    got, want = _losses(run_dir), _losses(reference)
    assert sorted(want) == list(range(1, len(want) + 1)) and got == want, (got, want)
    a, b = final_weights(run_dir), final_weights(reference)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
