"""open_clip's speed levers on the model: FLIP patch dropout and LiT tower locking (issue 20 item 5)."""

import re

import pytest
import torch
from diffclip.training.train import param_groups
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from diffclip import create_model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("DiffCLIP-Tiny-64")


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 1000, (n, 32), generator=g)
    text[:, 8] = 49407
    return torch.randn(n, 3, 64, 64, generator=g), text


def _block_lengths(model, images):
    """The sequence length every image-tower block sees in one forward pass."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1])) for b in model.visual.blocks]
    try:
        model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_patch_dropout_shortens_the_sequence_in_training_only(tiny):
    images, _ = _batch()
    n_patches = (64 // 8) ** 2
    assert _block_lengths(tiny.train(), images) == [1 + n_patches] * 6
    config, keys = tiny.model_config, list(tiny.state_dict())
    tiny.set_patch_dropout(0.5)
    assert tiny.model_config == config and list(tiny.state_dict()) == keys  # weights load with or without it
    assert tiny.patch_dropout == 0.5
    assert _block_lengths(tiny.train(), images) == [1 + n_patches // 2] * 6  # class token + half the patches
    a, b = tiny.encode_image(images), tiny.encode_image(images)
    assert not torch.allclose(a, b)  # a new random subset each call
    tiny.eval()
    assert _block_lengths(tiny, images) == [1 + n_patches] * 6
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_image(images), tiny.encode_image(images))
    tiny.set_patch_dropout(0.0)
    assert _block_lengths(tiny.train(), images) == [1 + n_patches] * 6 and tiny.patch_dropout == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"patch dropout must be in \[0, 1\)"):
            tiny.set_patch_dropout(bad)


def _step(model):
    """One AdamW step of the trainer's parameter groups on a CLIP-like loss; returns the weights before it."""
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, text = _batch()
    out = model(images, text)
    logits = out["logit_scale"] * out["image_embed"] @ out["text_embed"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(len(logits))).backward()
    opt.step()
    return before


def _moved(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_locked_image_tower_does_not_move(tiny):
    tiny.lock_image_tower(unlocked_groups=2)  # the last two groups: [last block, final norm] and image_projection
    visual = {n for n, _ in tiny.named_parameters() if n.startswith("visual.") or n == "image_projection"}
    unlocked = {n for n in visual if n.startswith(("visual.blocks.5.", "visual.norm.")) or n == "image_projection"}
    assert {n for n, p in tiny.named_parameters() if p.requires_grad and n in visual} == unlocked
    moved = _moved(tiny, _step(tiny))
    assert moved & visual == unlocked
    assert {n for n, p in tiny.named_parameters() if n not in visual} <= moved  # the text tower and logit_scale train
    assert all(p.grad is None for n, p in tiny.named_parameters() if n in visual - unlocked)


def test_locked_text_tower_does_not_move(tiny):
    tiny.lock_text_tower()
    text = {n for n, _ in tiny.named_parameters() if not n.startswith("visual.") and n not in ("image_projection",
                                                                                              "logit_scale")}
    assert text and not any(p.requires_grad for n, p in tiny.named_parameters() if n in text)
    moved = _moved(tiny, _step(tiny))
    assert not moved & text and "logit_scale" in moved and "visual.pos_embed" in moved
    with pytest.raises(ValueError, match="freeze_layer_norm=False"):
        tiny.lock_text_tower(freeze_layer_norm=False)
    with pytest.raises(ValueError, match="unlocked_layers must be >= 0"):
        tiny.lock_text_tower(unlocked_layers=-1)


_GROUPS = [(r"visual\.(?:blocks|transformer\.resblocks)\.(\d+)\.", "image block {}"),
           (r"visual\.(?:norm|ln_post)\.", "image final norm"), (r"(?:image_projection|visual\.proj)$", "image proj"),
           (r"visual\.", "image stem"), (r"transformer\.resblocks\.(\d+)\.", "text block {}"),
           (r"ln_final\.", "text final norm"), (r"text_projection$", "text proj"),
           (r"(?:token|positional)_embedding", "text stem"), (r"logit_scale$", "logit_scale")]


def _trainable(model) -> dict[str, bool]:
    """requires_grad per part (the same part in open_clip's names and ours); every parameter of a part agrees."""
    parts: dict[str, set] = {}
    for n, p in model.named_parameters():
        pattern, part = next((pat, part) for pat, part in _GROUPS if re.match(pat, n))
        parts.setdefault(part.format(*re.match(pattern, n).groups()), set()).add(p.requires_grad)
    assert all(len(v) == 1 for v in parts.values()), parts
    return {k: v.pop() for k, v in parts.items()}


def test_lock_groups_are_open_clips():
    """For every count of unlocked groups, the same parts train as in open_clip's CLIP of the same depths."""
    theirs = CLIP(embed_dim=128, vision_cfg=CLIPVisionCfg(layers=6, width=64, head_width=32, patch_size=8,
                                                          image_size=64),
                  text_cfg=CLIPTextCfg(context_length=32, width=64, heads=2, layers=4))
    ours = create_model("DiffCLIP-Tiny-64")
    for n in range(10):  # 8 image groups: stem, 5 blocks, [last block, norm], projection
        for m in (ours, theirs):
            m.requires_grad_(True)
            m.lock_image_tower(unlocked_groups=n)
        assert _trainable(ours) == _trainable(theirs), n
    for n in range(8):  # 7 text groups: embeddings, 3 blocks, [last block, ln_final], projection
        for m in (ours, theirs):
            m.requires_grad_(True)
            m.lock_text_tower(unlocked_layers=n)
        assert _trainable(ours) == _trainable(theirs), n


def test_trainer_flags_lock_and_drop(tmp_path):
    """training/main.py --lock-image --force-patch-dropout 0.5 from saved weights: the image tower and its
    projection come out as they went in, the text tower trained."""
    from safetensors.torch import load_file
    from train_helpers import MODEL, _write_sources, main_in_process

    shards, _ = _write_sources(tmp_path)
    torch.manual_seed(1)
    create_model(MODEL).save_pretrained(tmp_path / "init")
    code, err = main_in_process("--model", MODEL, "--pretrained", str(tmp_path / "init"), "--train-data", str(shards),
                                "--batch-size", "8", "--train-num-samples", "16", "--epochs", "1", "--warmup", "1",
                                "--lr", "1e-3", "--precision", "fp32", "--workers", "0", "--logs", str(tmp_path),
                                "--name", "lit", "--save-frequency", "0", "--lock-image", "--force-patch-dropout", "0.5")
    assert code == 0, err
    assert "parameters (" in err and " trained)" in err
    before = load_file(tmp_path / "init" / "model.safetensors")
    after = load_file(tmp_path / "lit" / "final_model" / "model.safetensors")
    image = [k for k in before if k.startswith("visual.") or k == "image_projection"]
    assert image and all(torch.equal(before[k], after[k]) for k in image)
    assert not torch.equal(before["text_projection"], after["text_projection"])
