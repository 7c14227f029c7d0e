"""diffclip.zero_shot against a hand-computed classifier on the tiny model (random init)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import diffclip
from diffclip.zero_shot import (
    build_zero_shot_classifier,
    format_prompts,
    zero_shot_evaluate,
    zero_shot_logits,
    zero_shot_predict,
)

CLASSES = ["cat", "dog", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = diffclip.create_model("DiffCLIP-Tiny-64").eval()
    return model, diffclip.get_tokenizer("DiffCLIP-Tiny-64")


def test_classifier_equals_hand_computed(tiny):
    model, tok = tiny
    w = build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=4)  # batches span classes
    assert w.shape == (model.embed_dim, len(CLASSES)) and w.dtype == torch.float32
    with torch.no_grad():
        cols = []
        for c in CLASSES:
            e = model.encode_text(tok([t.format(c) for t in TEMPLATES]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(dim=0)
            cols.append(m / m.norm())
    torch.testing.assert_close(w, torch.stack(cols, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(len(CLASSES)))


def test_callable_templates_match_strings(tiny):
    model, tok = tiny
    w1 = build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES)
    w2 = build_zero_shot_classifier(model, tok, CLASSES, [lambda c: f"a photo of a {c}.", "a drawing of the {}."])
    torch.testing.assert_close(w1, w2)


def test_logits_and_evaluate(tiny):
    model, tok = tiny
    w = build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 64, 64, generator=g)
    with torch.no_grad():
        expected = 100 * F.normalize(model.encode_image(images), dim=-1) @ w
        logits = zero_shot_logits(model, w, images)
    torch.testing.assert_close(logits, expected)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(images, targets), batch_size=4)
    out, t = zero_shot_predict(model, w, loader)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert t.tolist() == targets.tolist()
    m = zero_shot_evaluate(model, w, loader)
    assert set(m) == {"acc1", "mean_per_class_recall"}
    assert m["acc1"] == pytest.approx((expected.argmax(1) == targets).float().mean().item())
    # class_index keeps columns (as for ImageNet-A/-R over a 1000-class classifier)
    m2 = zero_shot_evaluate(model, w, DataLoader(TensorDataset(images, torch.tensor([1, 0, 1, 0, 1, 0])),
                                                 batch_size=6), class_index=[2, 0])
    sub = expected[:, [2, 0]]
    assert m2["acc1"] == pytest.approx((sub.argmax(1) == torch.tensor([1, 0, 1, 0, 1, 0])).float().mean().item())


def test_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="class list is empty"):
        build_zero_shot_classifier(model, tok, [], TEMPLATES)
    with pytest.raises(ValueError, match="has 0 placeholders; expected exactly one"):
        build_zero_shot_classifier(model, tok, CLASSES, ["a photo of a cat."])
    with pytest.raises(ValueError, match="has 2 placeholders; expected exactly one"):
        build_zero_shot_classifier(model, tok, CLASSES, ["a {} of a {}."])
    with pytest.raises(ValueError, match="template list is empty"):
        format_prompts(CLASSES, [])
    with pytest.raises(ValueError, match="not a single string"):
        format_prompts(CLASSES, "a photo of a {}.")
    assert format_prompts(["x"], ["{} y", lambda c: c + "!"]) == [["x y", "x!"]]
    # CLIP_benchmark's template files use {c}; other braces are left alone
    assert format_prompts(["x"], ["a {c} {{y}}"]) == [["a x {{y}}"]]
