"""eval/visualize.py: the maps come from the exact attention path and the PNG is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffclip.eval.visualize import attention_maps, class_token_maps, lambdas, main
from PIL import Image

import diffclip  # noqa: F401  (registers the models)


def _model(attn: str):
    torch.manual_seed(0)
    m = timm.create_model(f"{attn}_vit_nano_patch4_28", num_classes=10, in_chans=1, embed_dim=32, depth=3,
                          lambda_init="schedule" if attn == "diff" else None) if attn == "diff" else \
        timm.create_model(f"{attn}_vit_nano_patch4_28", num_classes=10, in_chans=1, embed_dim=32, depth=3)
    return m.eval()


def test_maps_are_exact_and_differential():
    model = _model("diff")
    x = torch.randn(2, 1, 28, 28)
    for b in model.blocks:  # the reference goes through SDPA (on CPU "auto" would take the exact path itself)
        b.attn.path = "wide"
    with torch.no_grad():
        fused = model(x)
    out, maps = attention_maps(model, x)
    torch.testing.assert_close(out, fused, rtol=1e-4, atol=1e-5)  # exact path == fused path
    assert all(not b.attn.keep_maps and b.attn.attn_maps is None for b in model.blocks)  # flags restored
    lams = lambdas(model)
    assert len(maps) == 3
    for layer, m in enumerate(maps):
        a1, a2, diff = m["a1"], m["a2"], m["diff"]
        assert a1.shape == a2.shape == diff.shape == (2, 2, 50, 50)  # h = num_heads // 2 differential heads
        torch.testing.assert_close(a1.sum(-1), torch.ones(2, 2, 50))
        torch.testing.assert_close(a2.sum(-1), torch.ones(2, 2, 50))
        assert (a1 >= 0).all() and (a2 >= 0).all()
        lam = float(m["lambda"])
        torch.testing.assert_close(diff, a1 - lam * a2)
        assert lam == pytest.approx(lams[layer])
        assert lam == pytest.approx(float(model.blocks[layer].attn.lambda_full().detach()))
        grid = class_token_maps(diff, (7, 7))
        torch.testing.assert_close(grid[1, 0].flatten(), diff[1, 0, 0, 1:])
    # the schedule gives a different lambda_init per layer, so lambda differs across layers
    assert len({round(v, 6) for v in lams}) == 3


def test_standard_attention_maps():
    model = _model("std")
    out, maps = attention_maps(model, torch.randn(1, 1, 28, 28))
    assert set(maps[0]) == {"a"} and maps[0]["a"].shape == (1, 4, 50, 50)
    torch.testing.assert_close(maps[0]["a"].sum(-1), torch.ones(1, 4, 50))
    assert lambdas(model) == [None, None, None]


def test_cli_png_for_diffclip_tower(tmp_path):
    from PIL import Image

    diffclip.create_model("DiffCLIP-Tiny-64").save_pretrained(tmp_path / "ckpt")
    img = Image.fromarray((np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8))
    img.save(tmp_path / "x.png")
    out = tmp_path / "maps.png"
    assert main(["--checkpoint", f"DiffCLIP-Tiny-64@{tmp_path / 'ckpt'}", "--image", str(tmp_path / "x.png"),
                 "--layers", "0", "-1", "--heads", "0", "1", "--contrast", "CLIP-Tiny-64", "--output", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 10_000
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["layers"] == [0, 5] and len(rec["lambda_per_layer"]) == 6
    assert all(v == pytest.approx(0.8, abs=0.5) for v in rec["lambda_per_layer"])


@pytest.mark.parametrize("program,args,named", [
    ("visualize.py", ["--checkpoint", "no-such-model", "--image", "{d}/x.png"], "no-such-model"),
    ("visualize.py", ["--checkpoint", "DiffCLIP-Tiny-64", "--image", "{d}/missing.png"], "missing.png"),
    ("visualize.py", ["--checkpoint", "DiffCLIP-Tiny-64", "--image", "{d}/truncated.png"], "truncated.png"),
    ("visualize.py", ["--checkpoint", "{d}/garbage.pt", "--image", "{d}/x.png"], "garbage.pt"),
    ("visualize.py", ["--checkpoint", "DiffCLIP-Tiny-64@{d}/garbage.pt", "--image", "{d}/x.png"], "garbage.pt"),
    ("visualize.py", ["--checkpoint", "DiffCLIP-Tiny-64", "--image", "{d}/x.png", "--output", "/proc/x/o.png"],
     "--output"),
    ("cka.py", ["--model-a", "{d}/garbage.pt", "--model-b", "DiffCLIP-Tiny-64", "--dataset", "folder",
                "--data-root", "{d}"], "garbage.pt"),
    ("cka.py", ["--model-a", "nope", "--model-b", "DiffCLIP-Tiny-64", "--dataset", "folder", "--data-root", "{d}"],
     "nope"),
    ("cka.py", ["--model-a", "DiffCLIP-Tiny-64", "--model-b", "DiffCLIP-Tiny-64", "--dataset", "folder",
                "--data-root", "{d}", "--num-images", "0"], "--num-images"),
])
def test_cli_bad_input_is_one_line(tmp_path, program, args, named):
    import subprocess
    import sys

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "t.png").read_bytes()[:2000])  # decodes only partly
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    argv = [a.format(d=tmp_path) for a in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out" / "o.png")]
    script = Path(__file__).resolve().parents[1] / "eval" / program
    r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error:") and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_text_query_relevance_properties(photo):
    """Chefer et al. relevance of a query on both attention types: non-negative, summing to 1 over the patch
    grid, and a different map for a different query."""
    from diffclip.eval.relevance import text_query_relevance

    torch.manual_seed(0)
    for name in ("DiffCLIP-Tiny-64", "CLIP-Tiny-64"):
        model, _, preprocess = diffclip.create_model_and_transforms(name)
        model.eval()
        tok = diffclip.get_tokenizer(name)
        x = preprocess(photo)[None]
        a = text_query_relevance(model, x, tok(["a photo of an astronaut"]))
        b = text_query_relevance(model, x, tok(["a red fire truck"]))
        assert a.shape == (8, 8) and (a >= 0).all() and a.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert not torch.allclose(a, b), name
        assert all(not b.attn.keep_maps and b.attn.attn_maps is None for b in model.visual.blocks)  # put back


def test_visualize_query_cli(photo, tmp_path):
    import subprocess
    import sys

    photo.save(tmp_path / "astronaut.png")
    out = tmp_path / "q.png"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "eval" / "visualize.py"),
                        "--checkpoint", "DiffCLIP-Tiny-64", "--contrast", "CLIP-Tiny-64", "--image",
                        str(tmp_path / "astronaut.png"), "--query", "a person", "--query", "a flag",
                        "--output", str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert set(rec["models"]) == {"DiffCLIP-Tiny-64", "CLIP-Tiny-64"} and rec["queries"] == ["a person", "a flag"]
    assert out.stat().st_size > 10_000


def test_relevance_pairs_script(tmp_path):
    """scripts/relevance_pairs.py over a study's runs folder: every run, both orders, both queries counted; a
    folder without runs is one line."""
    import subprocess
    import sys

    from eval_helpers import write_emoji_set

    emoji = write_emoji_set(tmp_path)
    diffclip.create_model("CLIP-Tiny-64").save_pretrained(tmp_path / "runs" / "CLIP-Tiny-64-seed0" / "final_model")
    script = Path(__file__).resolve().parents[1] / "scripts" / "relevance_pairs.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), str(emoji), "--pairs", "dog:cat",
                        "golf:coffee", "--output", str(tmp_path / "rel.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "rel.json").read_text())
    m = out["models"]["CLIP-Tiny-64"]
    assert out["runs"] == ["CLIP-Tiny-64-seed0"] and m["cases"] == 8 and 0 <= m["wins"] <= 8
    assert out["pairs"] == [["dog", "cat"], ["golf", "coffee"]]
    assert m["mean_mass_query"] + m["mean_mass_other"] == pytest.approx(1.0, abs=1e-5)
    r = subprocess.run([sys.executable, str(script), str(tmp_path), str(emoji)], capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "no <model>-seed<k>/final_model" in lines[0], r.stderr
