"""diffclip.eval.relevance against Chefer et al.'s own CLIP relevance code (tests/golden/chefer.json, made by
tests/golden/make_chefer_golden.py from the notebook's ``interpret`` at the commit it records) on a tiny seeded
standard-attention CLIP loaded into both implementations: the notebook's default (the last block only) and every
block, to 1e-6."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffclip.eval.relevance import text_query_relevance

from diffclip import DiffCLIP
from diffclip.errors import InputError
from diffclip.hub import convert_open_clip_state_dict, load_state_dict

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
import tiny_clip  # noqa: E402

GOLDEN = json.loads((GOLDEN_DIR / "chefer.json").read_text())


@pytest.fixture(scope="module")
def model():
    m = DiffCLIP(**tiny_clip.CONFIG).eval()
    sd = {k: torch.from_numpy(v) for k, v in tiny_clip.weights(GOLDEN["weights"]).items()}
    load_state_dict(m, convert_open_clip_state_dict(sd), "tiny CLIP")
    return m


@pytest.mark.parametrize("start_layer", [-1, 0])
def test_relevance_is_chefers(model, start_layer):
    image = torch.from_numpy(tiny_clip.image())
    for q, tokens in enumerate(tiny_clip.TOKENS):
        raw = text_query_relevance(model, image, torch.from_numpy(tokens[None]), start_layer=start_layer,
                                   normalize=False)
        expected = np.array(GOLDEN["image_relevance"][str(start_layer)][q])
        assert raw.shape == (4, 4)
        np.testing.assert_allclose(raw.flatten().numpy(), expected, rtol=0, atol=1e-6)
        normalized = text_query_relevance(model, image, torch.from_numpy(tokens[None]), start_layer=start_layer)
        np.testing.assert_allclose(normalized.flatten().numpy(), expected / expected.sum(), rtol=0, atol=1e-6)
    assert GOLDEN["notebook_start_layer"] == -1  # the notebook's default is ours


def test_start_layer_options_differ_and_are_checked(model):
    image, tokens = torch.from_numpy(tiny_clip.image()), torch.from_numpy(tiny_clip.TOKENS[:1])
    last = text_query_relevance(model, image, tokens)
    assert torch.equal(last, text_query_relevance(model, image, tokens, start_layer=2))  # -1 is the last block
    assert not torch.allclose(last, text_query_relevance(model, image, tokens, start_layer=0), atol=1e-3)
    with pytest.raises(InputError, match="start_layer"):
        text_query_relevance(model, image, tokens, start_layer=3)


def test_visualize_start_layer_flag(tmp_path):
    """eval/visualize.py --query draws the notebook's map by default and every block's with --start-layer 0: the
    JSON beside the figure holds exactly what text_query_relevance gives in either setting."""
    import subprocess

    from PIL import Image

    import diffclip

    torch.manual_seed(0)
    model, _, preprocess = diffclip.create_model_and_transforms("DiffCLIP-Tiny-64")
    model.save_pretrained(tmp_path / "w")
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "i.png")
    x = preprocess(Image.open(tmp_path / "i.png").convert("RGB"))[None]
    tokens = diffclip.get_tokenizer("DiffCLIP-Tiny-64")(["a flag"])
    for flag, start_layer in (([], -1), (["--start-layer", "0"], 0)):
        out = tmp_path / f"q{start_layer}.png"
        r = subprocess.run([sys.executable, str(GOLDEN_DIR.parents[1] / "eval" / "visualize.py"), "--checkpoint",
                            f"DiffCLIP-Tiny-64@{tmp_path / 'w'}", "--image", str(tmp_path / "i.png"), "--query",
                            "a flag", "--output", str(out), *flag], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        rec = json.loads(out.with_suffix(".json").read_text())
        expected = text_query_relevance(model.eval(), x, tokens, start_layer=start_layer)
        assert rec["start_layer"] == start_layer
        np.testing.assert_allclose(rec["models"][f"DiffCLIP-Tiny-64@{tmp_path / 'w'}"]["a flag"], expected.numpy(),
                                   atol=1e-6)
