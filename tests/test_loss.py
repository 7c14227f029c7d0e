"""Loss math (one process): ClipLoss and SigLipLoss against direct formulas, the logit-scale clamp, the
weight-decay groups and the learning-rate schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffclip.training.train import cosine_lr, param_groups

import diffclip
from diffclip.loss import MAX_LOGIT_SCALE, ClipLoss, SigLipLoss, _ScaleGrad, clamp_logit_scale


def _features(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_clip_loss_is_symmetric_cross_entropy():
    img, txt = _features()
    scale = torch.tensor(14.3)
    logits = (scale * img @ txt.T).double()
    # -log softmax of the diagonal, rows (image -> text) and columns (text -> image)
    rows = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    cols = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    expected = (rows + cols) / 2
    assert torch.allclose(ClipLoss()(img, txt, scale).double(), expected, atol=1e-6)
    # local_loss in one process is the same loss
    assert torch.allclose(ClipLoss(local_loss=True)(img, txt, scale).double(), expected, atol=1e-6)


def test_clip_loss_perfect_alignment_is_small():
    img, _ = _features()
    eye_like = ClipLoss()(img, img.clone(), torch.tensor(100.0))
    shuffled = ClipLoss()(img, img.roll(1, dims=0), torch.tensor(100.0))
    assert eye_like < 0.1 < shuffled


def test_siglip_loss_formula():
    img, txt = _features(n=5)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    z = 2 * torch.eye(5) - 1
    logits = scale * img @ txt.T - 3.0
    expected = -F.logsigmoid(z * logits).sum() / 5
    assert torch.allclose(SigLipLoss()(img, txt, scale, bias), expected, atol=1e-6)
    assert math.isclose(SigLipLoss.INIT_LOGIT_SCALE, math.log(10)) and SigLipLoss.INIT_LOGIT_BIAS == -10.0


def test_siglip_bias_lives_on_the_model(tmp_path):
    """open_clip's layout: the bias is a model parameter, created only for SigLIP; the release layout (no bias)
    still loads strictly, CLIP weights load into a SigLIP model (bias kept at its initial value), and a
    SigLIP-trained model's weights bring their bias along."""
    clip = diffclip.create_model("DiffCLIP-Tiny-64")
    assert clip.logit_bias is None and "logit_bias" not in clip.state_dict() and "logit_bias" not in clip()
    clip.save_pretrained(tmp_path / "clip")
    sig = diffclip.create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "clip"),
                                init_logit_scale=SigLipLoss.INIT_LOGIT_SCALE, init_logit_bias=-10.0)
    assert sig.logit_bias.item() == -10.0 and sig()["logit_bias"] is sig.logit_bias
    assert torch.equal(sig.logit_scale, clip.logit_scale)  # the weights' scale, not the init
    with torch.no_grad():
        sig.logit_bias.fill_(-4.5)
    sig.save_pretrained(tmp_path / "sig")
    back = diffclip.create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "sig"))
    assert back.logit_bias.item() == -4.5


def test_scale_grad():
    x = torch.randn(3, requires_grad=True)
    y = _ScaleGrad.apply(x, 2.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(p)
    assert p.item() == pytest.approx(MAX_LOGIT_SCALE) and math.isclose(math.exp(MAX_LOGIT_SCALE), 100, rel_tol=1e-9)
    p.data.fill_(-1.0)
    clamp_logit_scale(p)
    assert p.item() == 0.0


def test_no_weight_decay_groups():
    model = diffclip.create_model("DiffCLIP-Tiny-64", init_logit_bias=-10.0)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert len(nd) + len(d) == len(names)
    for name in ("logit_scale", "logit_bias", "positional_embedding", "visual.pos_embed", "visual.cls_token",
                 "visual.blocks.0.attn.lambda_q1", "transformer.resblocks.3.attn.lambda_k2",
                 "visual.blocks.0.attn.diff_norm.weight", "visual.blocks.0.norm1.weight", "ln_final.bias",
                 "visual.blocks.0.attn.q_proj.bias", "visual.patch_embed.proj.bias"):
        assert name in nd, name
    for name in ("visual.blocks.0.attn.q_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                 "image_projection", "text_projection", "token_embedding.weight", "visual.patch_embed.proj.weight"):
        assert name in d, name


def test_cosine_schedule_with_warmup():
    lrs = [cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
