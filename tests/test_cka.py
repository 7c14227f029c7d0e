"""eval/cka.py: linear CKA properties and the layer-by-layer matrix."""

from __future__ import annotations

import pytest
import timm
import torch
from diffclip.eval.cka import cka_from_grams, cka_matrix, gram, layer_grams, main

import diffclip  # noqa: F401


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices (n, p) and (n, q) of the same n examples."""
    return cka_from_grams(gram(x), gram(y))


def test_linear_cka_properties():
    """gram + cka_from_grams (what cka_matrix computes per pair of layers) on features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert abs(linear_cka(x, x) - 1) < 1e-9
    assert abs(linear_cka(x, 3.0 * x @ q + 1.0) - 1) < 1e-9  # invariant to rotation, scale and offset
    y = torch.randn(50, 30, generator=g)
    v = linear_cka(x, y)
    assert 0 <= v < 0.8 and abs(v - linear_cka(y, x)) < 1e-12


def test_model_with_itself_has_unit_diagonal():
    torch.manual_seed(0)
    a = timm.create_model("diff_vit_nano_patch4_28", num_classes=10, in_chans=1, embed_dim=32, depth=3).eval()
    b = timm.create_model("std_vit_nano_patch4_28", num_classes=10, in_chans=1, embed_dim=32, depth=3).eval()
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 28, 28), torch.zeros(40, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    names, ga = layer_grams(a, loader)
    assert names == ["embed", "block 0", "block 1", "block 2"]
    m = cka_matrix(ga, ga)
    for i in range(4):
        assert abs(m[i][i] - 1) < 1e-9
        assert all(0 <= v <= 1 + 1e-9 for v in m[i])
    _, gb = layer_grams(b, loader, tokens="cls")
    assert len(cka_matrix(ga, gb)) == 4


def test_cli_writes_png_and_json(tmp_path, capsys):
    from PIL import Image

    diffclip.create_model("DiffCLIP-Tiny-64").save_pretrained(tmp_path / "ckpt")
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), (40 * i, 200 if c == "a" else 10, 60)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "cka.png"
    spec = f"DiffCLIP-Tiny-64@{tmp_path / 'ckpt'}"
    assert main(["--model-a", spec, "--model-b", spec, "--dataset", "folder", "--data-root", str(tmp_path / "imgs"),
                 "--num-images", "8", "--output", str(out)]) == 0
    assert out.is_file()
    import json

    rec = json.loads(out.with_suffix(".json").read_text())
    assert len(rec["cka"]) == 7 and all(abs(v - 1) < 1e-6 for v in rec["diagonal"])
    from diffclip.cli import UsageError
    with pytest.raises(UsageError, match="'nope' is neither"):
        main(["--model-a", "nope", "--model-b", spec, "--dataset", "folder", "--data-root", str(tmp_path),
              "--output", str(out)])
