"""open_clip both ways, with the installed open_clip: an OpenCLIP-* model saved by diffclip as an open_clip folder loads
with ``open_clip.create_model_and_transforms("local-dir:...")`` and gives the same embeddings, logit scale (and bias)
and eval transform; the folder loads back into diffclip; an ``open_clip_config.json`` that does not fit the config
(quick_gelu, heads) and configs open_clip cannot build are refused in one line."""

import json

import open_clip
import pytest
import torch

import diffclip
from diffclip.open_clip_format import save_open_clip

NAME = "OpenCLIP-Tiny-64"
TEXTS = ["a photo of a cat", "a drawing of a tree on a hill"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = diffclip.create_model(NAME, init_logit_bias=-3.0).eval()
    with torch.no_grad():  # non-trivial values where the init puts constants (norms, biases, the logit scale)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "norm_pre.weight", "ln_final.weight", "logit_scale")):
                p.add_(torch.randn_like(p) * 0.1)
    folder = save_open_clip(model, tmp_path_factory.mktemp("oc") / "tiny")
    return model, folder


def _embed(model, tokens, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_open_clip_loads_the_export_with_the_same_embeddings_and_transform(exported, photo):
    model, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)
    assert torch.equal(tokens, diffclip.get_tokenizer(NAME)(TEXTS))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for ours, theirs in zip(_embed(model, tokens, images), _embed(ref, tokens, images)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ref.logit_scale.item() == model.logit_scale.item() and ref.logit_bias.item() == model.logit_bias.item()
    _, _, ours_preprocess = diffclip.create_model_and_transforms(NAME)
    assert torch.equal(preprocess(photo), ours_preprocess(photo))


def test_the_export_loads_back_into_diffclip(exported):
    model, folder = exported
    back = diffclip.create_model(NAME, pretrained=str(folder))
    tokens = diffclip.get_tokenizer(NAME)(TEXTS)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_embed(model, tokens, images), _embed(back, tokens, images)):
        assert torch.equal(a, b)
    assert back.logit_bias.item() == model.logit_bias.item()


def test_an_open_clip_config_that_does_not_fit_is_refused_in_one_line(exported, tmp_path):
    _, folder = exported
    (tmp_path / "open_clip_model.safetensors").symlink_to(folder / "open_clip_model.safetensors")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["quick_gelu"] = True
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"open_clip_config.json: quick_gelu is true but OpenCLIP-Tiny-64 uses 'gelu' "
                                         r"in vision_cfg; pick the OpenCLIP config with that activation \(-quickgelu\)$"):
        diffclip.create_model(NAME, pretrained=str(tmp_path))
    cfg["model_cfg"]["quick_gelu"] = False
    cfg["model_cfg"]["vision_cfg"]["head_width"] = 64  # 3 heads of 64: the same tensors, another attention
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vision_cfg has 3 attention heads but OpenCLIP-Tiny-64 has 4$"):
        diffclip.create_model(NAME, pretrained=str(tmp_path))


def test_configs_open_clip_cannot_build_are_refused():
    with pytest.raises(ValueError, match=r"DiffCLIP-Tiny-64 does not export to open_clip: vision_cfg.attn_type is "
                                         r"'diff', open_clip's CLIP needs 'standard'"):
        save_open_clip(diffclip.create_model("DiffCLIP-Tiny-64"), "unused")
    with pytest.raises(ValueError, match="CLIP-Tiny-64 does not export to open_clip: vision_cfg.pre_norm is False"):
        save_open_clip(diffclip.create_model("CLIP-Tiny-64"), "unused")
