"""A transformers.CLIPModel checkpoint (ViT-B/16 config, random weights, save_pretrained) loads into the matching
OpenCLIP config and gives transformers' own normalised embeddings and logit scale; from a folder and through a
loopback hub server."""

import pytest
import torch
import torch.nn.functional as F
from hf_server import HubServer

import diffclip

transformers = pytest.importorskip("transformers")  # a test dependency ([test] extra): always there in CI

NAME = "OpenCLIP-ViT-B-16-quickgelu"


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                     "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
        projection_dim=512)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random, not the init's constant: every tensor must land in its place
        model.logit_scale.fill_(3.1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("hf") / "acme" / "clip-b16"
    model.save_pretrained(folder)
    return model, folder


def _check(hf, ours):
    tok = diffclip.get_tokenizer(NAME)(["a photo of a cat", "a diagram of a differential transformer"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(input_ids=tok, pixel_values=images)  # CLIPModel's own projected features
        ref_img, ref_txt = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
        img = ours.encode_image(images, normalize=True)
        txt = ours.encode_text(tok, normalize=True)
    torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-4, rtol=0)
    assert ours.logit_scale.item() == pytest.approx(hf.logit_scale.item())


def test_clipmodel_folder_loads_strictly(hf_clip):
    hf, folder = hf_clip
    _check(hf, diffclip.create_model(NAME, pretrained=str(folder)))
    with pytest.raises(ValueError, match="hidden_act is 'quick_gelu' but OpenCLIP-ViT-B-16 uses 'gelu'"):
        diffclip.create_model("OpenCLIP-ViT-B-16", pretrained=str(folder))


def test_clipmodel_through_the_hub(hf_clip, tmp_path, monkeypatch):
    hf, folder = hf_clip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubServer(folder.parents[1]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        _check(hf, diffclip.create_model(NAME, pretrained="hf-hub:acme/clip-b16"))
        assert any("config.json" in r for r in server.requests)
