import re

import pytest
import timm
import torch

import diffclip
from diffclip import create_model, create_model_and_transforms, get_tokenizer, list_models

# The layout of the authors' released checkpoint (hammh0a/DiffCLIP_ViTB16_CC3M, checkpoint_best.pt): name -> shape,
# per block patterns expanded below.
TOP = {"positional_embedding": (77, 512), "image_projection": (768, 512), "text_projection": (512, 512),
       "logit_scale": (), "token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,),
       "visual.cls_token": (1, 1, 768), "visual.pos_embed": (1, 197, 768),
       "visual.patch_embed.proj.weight": (768, 3, 16, 16), "visual.patch_embed.proj.bias": (768,),
       "visual.norm.weight": (768,), "visual.norm.bias": (768,)}


def _attn(prefix, w):
    out = {f"{prefix}attn.lambda_{n}": (64,) for n in ("q1", "k1", "q2", "k2")}
    for p in ("q", "k", "v", "out"):
        out[f"{prefix}attn.{p}_proj.weight"] = (w, w)
        out[f"{prefix}attn.{p}_proj.bias"] = (w,)
    out[f"{prefix}attn.diff_norm.weight"] = (128,)
    return out


def release_layout():
    layout = dict(TOP)
    for i in range(12):
        v = f"visual.blocks.{i}."
        layout.update(_attn(v, 768))
        layout.update({v + "norm1.weight": (768,), v + "norm1.bias": (768,), v + "norm2.weight": (768,),
                       v + "norm2.bias": (768,), v + "mlp.fc1.weight": (3072, 768), v + "mlp.fc1.bias": (3072,),
                       v + "mlp.fc2.weight": (768, 3072), v + "mlp.fc2.bias": (768,)})
        t = f"transformer.resblocks.{i}."
        layout.update(_attn(t, 512))
        layout.update({t + "ln_1.weight": (512,), t + "ln_1.bias": (512,), t + "ln_2.weight": (512,),
                       t + "ln_2.bias": (512,), t + "mlp.c_fc.weight": (2048, 512), t + "mlp.c_fc.bias": (2048,),
                       t + "mlp.c_proj.weight": (512, 2048), t + "mlp.c_proj.bias": (512,)})
    return layout


@pytest.fixture(scope="module")
def b16():
    return diffclip.DiffCLIP_VITB16()


def test_release_parameter_count_and_layout(b16):
    assert sum(p.numel() for p in b16.parameters()) == 149_629_185
    sd = b16.state_dict()
    layout = release_layout()
    assert len(sd) == 517 == len(layout)
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout
    assert len(list(b16.buffers())) == 0
    assert all(blk.attn.lambda_init == 0.8 for blk in b16.visual.blocks)
    assert all(blk.attn.lambda_init == 0.8 for blk in b16.transformer.resblocks)
    assert b16.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())


def test_twins_differ_only_in_attention():
    diff, std = diffclip.get_model_config("DiffCLIP-ViT-B-16"), diffclip.get_model_config("CLIP-ViT-B-16")
    for tower in ("vision_cfg", "text_cfg"):
        assert diff[tower].pop("attn_type") == "diff" and std[tower].pop("attn_type") == "standard"
    assert diff == std
    # 12 + 12 layers x (4 lambda vectors of 64 + a 128 RMSNorm gain) more parameters
    n = sum(p.numel() for p in create_model("CLIP-ViT-B-16").parameters())
    assert n == 149_629_185 - 24 * (4 * 64 + 128)
    vonly = diffclip.get_model_config("DiffCLIP-VisionOnly-ViT-B-16")
    assert vonly["vision_cfg"]["attn_type"] == "diff" and vonly["text_cfg"]["attn_type"] == "standard"
    sched = diffclip.get_model_config("DiffCLIP-Sched-ViT-B-16")
    assert sched["vision_cfg"]["lambda_init"] == sched["text_cfg"]["lambda_init"] == "schedule"


@pytest.mark.parametrize("size", ["Tiny-64", "ViT-B-32", "ViT-B-16"])
def test_the_four_paper_variants_at_every_size_differ_by_one_field(size):
    """CLIP, DiffCLIP, DiffCLIP* (depth-scheduled lambda_init) and DiffCLIP† (vision tower only) at each size."""
    def flat(name):
        cfg = diffclip.get_model_config(name)
        return {(t, k): v for t in ("vision_cfg", "text_cfg") for k, v in cfg.pop(t).items()} | cfg

    diff = flat(f"DiffCLIP-{size}")
    for name, changed in ((f"CLIP-{size}", {("vision_cfg", "attn_type"): "standard",
                                             ("text_cfg", "attn_type"): "standard"}),
                          (f"DiffCLIP-Sched-{size}", {("vision_cfg", "lambda_init"): "schedule",
                                                      ("text_cfg", "lambda_init"): "schedule"}),
                          (f"DiffCLIP-VisionOnly-{size}", {("text_cfg", "attn_type"): "standard"})):
        other = flat(name)
        assert {k: v for k, v in other.items() if diff.get(k) != v} == changed, name
    if size == "Tiny-64":  # the tiny variants build; the schedule reaches every layer of both towers
        from diffclip.attention import lambda_init_schedule

        sched = create_model(f"DiffCLIP-Sched-{size}")
        assert [b.attn.lambda_init for b in sched.visual.blocks] == [lambda_init_schedule(i) for i in range(6)]
        assert [b.attn.lambda_init for b in sched.transformer.resblocks] == [lambda_init_schedule(i) for i in range(4)]
        vonly = create_model(f"DiffCLIP-VisionOnly-{size}")
        n = {m: sum(p.numel() for p in create_model(m).parameters()) for m in (f"DiffCLIP-{size}", f"CLIP-{size}")}
        n_vonly = sum(p.numel() for p in vonly.parameters())
        assert n[f"CLIP-{size}"] < n_vonly < n[f"DiffCLIP-{size}"]


def test_forward_returns_release_dict_and_normalize(b16):
    tok = get_tokenizer("DiffCLIP-ViT-B-16")
    text = tok(["a photo of a cat", "a diagram"])
    with torch.no_grad():
        out = b16(torch.randn(2, 3, 224, 224), text)
        assert set(out) == {"image_embed", "text_embed", "logit_scale"}
        assert out["image_embed"].shape == out["text_embed"].shape == (2, 512)
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        torch.testing.assert_close(b16.encode_text(text, normalize=True).norm(dim=-1), torch.ones(2))
        # EOT pooling: tokens after EOT (padding) do not change the text embedding
        padded = text.clone()
        padded[0, 10:] = 7
        torch.testing.assert_close(b16.encode_text(padded)[0], out["text_embed"][0], atol=1e-5, rtol=0)


def test_tiny_models_train_step_and_grad_checkpointing():
    for name in ("DiffCLIP-Tiny-64", "CLIP-Tiny-64"):
        torch.manual_seed(0)
        model = create_model(name)
        tok = get_tokenizer(name)
        images, text = torch.randn(4, 3, 64, 64), tok(["red", "green", "blue", "yellow"])
        assert text.shape == (4, 32)
        out = model(images, text)
        loss = (out["image_embed"] @ out["text_embed"].T).logsumexp(-1).mean()
        loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.set_grad_checkpointing(True)
        out2 = model(images, text)
        (out2["image_embed"] @ out2["text_embed"].T).logsumexp(-1).mean().backward()
        for n, p in model.named_parameters():
            if n in g:
                torch.testing.assert_close(p.grad, g[n], atol=1e-5, rtol=1e-4, msg=n)


def test_timm_registration():
    names = timm.list_models("diff_vit_*")
    for n in ("diff_vit_base_patch16_224", "diff_vit_tiny_patch16_224", "diff_vit_small_patch16_224",
              "diff_vit_tiny_patch4_32", "diff_vit_nano_patch4_28", "diff_vit_tiny_patch8_64"):
        assert n in names
    m = timm.create_model("diff_vit_nano_patch4_28", num_classes=10, in_chans=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert type(m.blocks[0].attn).__name__ == "DiffAttention"
    std = timm.create_model("std_vit_nano_patch4_28", num_classes=10, in_chans=1)
    assert type(std.blocks[0].attn).__name__ == "Attention"
    b = timm.create_model("diff_vit_base_patch16_224", num_classes=0)
    assert sum(p.numel() for p in b.parameters()) == 85_803_264
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("diff_vit_nano_patch4_28", pretrained=True)
    # built through timm's build_model_with_cfg: the pretrained cfg is what timm's data config resolves from
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model("std_vit_tiny_patch8_64"))
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert timm.create_model("diff_vit_tiny_patch8_64").pretrained_cfg["first_conv"] == "patch_embed.proj"


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=re.escape("known models:") + ".*DiffCLIP-ViT-B-16"):
        create_model("DiffCLIP-ViT-X-99")
    assert {"DiffCLIP-ViT-B-16", "DiffCLIP-ViT-B-32", "CLIP-ViT-B-16", "CLIP-ViT-B-32", "DiffCLIP-Tiny-64",
            "CLIP-Tiny-64", "OpenCLIP-ViT-B-16"} <= set(list_models())


def test_name_at_pretrained_specs():
    from diffclip.factory import parse_model_spec

    assert parse_model_spec("DiffCLIP-ViT-B-16@cc12m") == ("DiffCLIP-ViT-B-16", "cc12m")
    assert parse_model_spec("DiffCLIP-Tiny-64@runs/a@b/final_model") == ("DiffCLIP-Tiny-64", "runs/a@b/final_model")
    assert parse_model_spec("CLIP-Tiny-64") == parse_model_spec("CLIP-Tiny-64@") == ("CLIP-Tiny-64", None)


def test_tokenizer_is_clip_bpe():
    tok = get_tokenizer("DiffCLIP-ViT-B-16")
    t = tok(["a photo of a dog", "x " * 200])
    assert t.shape == (2, 77) and t.dtype == torch.long
    assert t[0, 0] == 49406 and (t[0] == 49407).sum() == 1 and t[0, 6] == 49407 and (t[0, 7:] == 0).all()
    assert t[1, -1] == 49407  # an over-long text is cut and still ends with EOT


def test_transforms_on_a_real_photo(photo):
    _, train, val = create_model_and_transforms("DiffCLIP-Tiny-64")
    x_val, x_train = val(photo), train(photo)
    assert x_val.shape == x_train.shape == (3, 64, 64) and x_val.dtype == torch.float32
    # ImageNet normalisation: the mean of a natural photo ends up near 0, far from the [0, 1] range's 0.5
    assert -1.5 < x_val.mean().item() < 1.0
    assert not torch.equal(train(photo), train(photo))  # RandomResizedCrop is random
    torch.testing.assert_close(val(photo), x_val)  # eval is deterministic
    gray = photo.convert("L")
    assert val(gray).shape == (3, 64, 64)
    names = [type(t).__name__ for t in train.transforms]
    assert names[0] == "RandomResizedCrop" and train.transforms[0].scale == (0.5, 1.0)
    assert [type(t).__name__ for t in val.transforms][:2] == ["Resize", "CenterCrop"]


def test_image_transforms_are_clips(photo):
    """Eval: shorter side to the size (bicubic), centre crop, RGB, the config's normalisation; train: a random
    resized crop of scale (0.5, 1) of the same normalisation."""
    import torchvision.transforms as T

    cfg = diffclip.get_model_config("DiffCLIP-Tiny-64")["preprocess_cfg"]
    ref = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                     T.Normalize(cfg["mean"], cfg["std"])])
    torch.testing.assert_close(diffclip.image_transform(cfg, 64, False)(photo.convert("RGBA")), ref(photo))
    train = diffclip.image_transform(cfg, 64, True)
    crop = next(t for t in train.transforms if isinstance(t, T.RandomResizedCrop))
    assert crop.scale == (0.5, 1.0) and train(photo).shape == (3, 64, 64)


def test_activations_are_timms():
    """The towers' activations come from timm's get_act_layer; quick_gelu is OpenAI CLIP's x * sigmoid(1.702 x)."""
    import timm.layers

    from diffclip.text import act_layer

    x = torch.linspace(-6, 6, 1001)
    assert act_layer("quick_gelu") is timm.layers.get_act_layer("quick_gelu")
    assert torch.allclose(act_layer("quick_gelu")()(x), x * torch.sigmoid(1.702 * x), atol=0, rtol=0)
    assert torch.equal(act_layer("gelu")()(x), torch.nn.functional.gelu(x))
    model = create_model("DiffCLIP-Tiny-64")
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with pytest.raises(ValueError, match="act must be one of"):
        act_layer("relu")


def test_vit_l_14_twins_on_the_meta_device():
    """open_clip's ViT-L-14 shape (vision 1024 x 24 layers, 16 heads, patch 14, 224 px; text 768 x 12 layers, 12 heads;
    embed 768) with the B/16 release's conventions; built without memory on the meta device."""
    import open_clip

    with torch.device("meta"):
        n = {name: sum(p.numel() for p in create_model(name).parameters())
             for name in ("DiffCLIP-ViT-L-14", "CLIP-ViT-L-14")}
        model = create_model("DiffCLIP-ViT-L-14")
        theirs = sum(p.numel() for p in open_clip.create_model("ViT-L-14", device="meta").parameters())
    assert n == {"DiffCLIP-ViT-L-14": 427_629_313, "CLIP-ViT-L-14": 427_615_489}
    # open_clip's ViT-L-14 has a pre-norm (2 x 1024) and no patch-conv bias (1024): our twin is 1,024 smaller
    assert theirs == n["CLIP-ViT-L-14"] + 1024
    # (24 + 12) layers x (4 lambda vectors of 64 + a 128 RMSNorm gain)
    assert n["DiffCLIP-ViT-L-14"] - n["CLIP-ViT-L-14"] == 36 * (4 * 64 + 128)
    assert model.visual.pos_embed.shape == (1, 257, 1024) and model.image_projection.shape == (1024, 768)
    assert model.text_projection.shape == (768, 768) and len(model.visual.blocks) == 24
    assert model.visual.blocks[0].attn.num_heads == 8 and model.transformer.resblocks[0].attn.num_heads == 6
    diff, std = diffclip.get_model_config("DiffCLIP-ViT-L-14"), diffclip.get_model_config("CLIP-ViT-L-14")
    b16 = diffclip.get_model_config("DiffCLIP-ViT-B-16")
    for tower in ("vision_cfg", "text_cfg"):
        assert diff[tower].pop("attn_type") == "diff" and std[tower].pop("attn_type") == "standard"
        b16[tower].pop("attn_type")
    assert diff == std
    same = ("mlp_ratio", "lambda_init", "qkv_bias", "pre_norm", "patch_bias", "act", "context_length", "vocab_size")
    for tower in ("vision_cfg", "text_cfg"):
        assert {k: v for k, v in diff[tower].items() if k in same} == {k: v for k, v in b16[tower].items() if k in same}
    assert diff["preprocess_cfg"] == b16["preprocess_cfg"]
