import copy
import math

import pytest
import torch

from diffclip.attention import Attention, DiffAttention, attention_layer, lambda_init_schedule


def _pair(layer):
    exact = copy.deepcopy(layer)
    exact.path = "exact"
    return layer, exact


def _grads(layer, x, **kw):
    x = x.clone().requires_grad_(True)
    y = layer(x, **kw)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)  # a non-trivial loss, so every output matters
    (y * w).sum().backward()
    g = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, g


@pytest.mark.parametrize("mode", ["wide", "split"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_matches_exact_outputs_and_gradients(mode, causal):
    torch.manual_seed(0)
    fused, exact = _pair(DiffAttention(64, num_heads=8))
    fused.path = mode
    x = torch.randn(3, 11, 64)
    y1, gx1, g1 = _grads(fused, x, is_causal=causal)
    y2, gx2, g2 = _grads(exact, x, is_causal=causal)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=name)
    assert g1["lambda_q1"].abs().sum() > 0  # lambda is trained


@pytest.mark.parametrize("mode", ["wide", "split"])
def test_fused_matches_exact_with_padding_mask(mode):
    torch.manual_seed(1)
    fused, exact = _pair(DiffAttention(32, num_heads=4))
    fused.path = mode
    x = torch.randn(2, 7, 32)
    keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    keep[1, :, :, 5:] = False  # the second sample's last two tokens are padding
    torch.testing.assert_close(fused(x, attn_mask=keep), exact(x, attn_mask=keep), atol=1e-5, rtol=0)
    # masking padding keys makes the output independent of them
    x2 = x.clone()
    x2[1, 5:] = torch.randn(2, 32)
    torch.testing.assert_close(fused(x, attn_mask=keep)[1, :5], fused(x2, attn_mask=keep)[1, :5], atol=1e-6, rtol=0)


def test_auto_mode_takes_the_exact_path_on_cpu_and_modes_are_checked():
    torch.manual_seed(3)
    auto, exact = _pair(DiffAttention(64, num_heads=8))
    wide = copy.deepcopy(auto)
    wide.path = "wide"
    x = torch.randn(2, 9, 64)
    assert auto.path == "auto"
    assert torch.equal(auto(x, is_causal=True), exact(x, is_causal=True))  # bit-identical: the same computation
    assert not torch.equal(wide(x, is_causal=True), exact(x, is_causal=True))  # SDPA rounds differently
    with pytest.raises(ValueError, match="path must be one of"):
        DiffAttention(64, num_heads=8, path="flash")
    auto.path = "flash"
    with pytest.raises(ValueError, match="path must be one of"):
        auto(x)


def test_exact_path_matches_the_paper_formula():
    torch.manual_seed(2)
    layer = DiffAttention(32, num_heads=4, lambda_init=0.5)
    x = torch.randn(1, 5, 32)
    h, d = 2, 8
    q = layer.q_proj(x).view(1, 5, 2 * h, d).transpose(1, 2)
    k = layer.k_proj(x).view(1, 5, 2 * h, d).transpose(1, 2)
    v = layer.v_proj(x).view(1, 5, h, 2 * d).transpose(1, 2)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + 0.5)
    heads = []
    for i in range(h):
        a1 = torch.softmax(q[:, 2 * i] @ k[:, 2 * i].transpose(-1, -2) / math.sqrt(d), -1)
        a2 = torch.softmax(q[:, 2 * i + 1] @ k[:, 2 * i + 1].transpose(-1, -2) / math.sqrt(d), -1)
        o = (a1 - lam * a2) @ v[:, i]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.diff_norm.weight * (1 - 0.5)
        heads.append(o)
    expected = layer.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_causal_mask_later_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(3)
    wide, split, exact = (DiffAttention(32, num_heads=4, path=m) for m in ("wide", "split", "exact"))
    std_fused, std_exact = Attention(32, num_heads=4), Attention(32, num_heads=4, path="exact")
    for layer in (wide, split, exact, std_fused, std_exact):  # every path, SDPA's causal one included
        x = torch.randn(2, 9, 32)
        x2 = x.clone()
        x2[:, 6:] += torch.randn(2, 3, 32)
        y, y2 = layer(x, is_causal=True), layer(x2, is_causal=True)
        torch.testing.assert_close(y[:, :6], y2[:, :6], atol=1e-6, rtol=0)
        assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_lambda_init_schedule_values():
    assert lambda_init_schedule(0) == pytest.approx(0.2)
    assert lambda_init_schedule(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_schedule(11) == pytest.approx(0.8 - 0.6 * math.exp(-3.3))
    assert [DiffAttention(16, 2, lambda_init="schedule", depth=i).lambda_init for i in range(3)] == \
        pytest.approx([lambda_init_schedule(i) for i in range(3)])
    with pytest.raises(ValueError):
        lambda_init_schedule(-1)


def test_lambda_reparameterisation_and_init():
    torch.manual_seed(4)
    layer = DiffAttention(768, num_heads=12)
    assert layer.num_heads == 6 and layer.head_dim == 64
    assert layer.lambda_q1.shape == (64,) and layer.diff_norm.weight.shape == (128,)
    assert 0.05 < layer.lambda_q1.std().item() < 0.15  # N(0, 0.1)
    with torch.no_grad():
        expected = math.exp(float(layer.lambda_q1 @ layer.lambda_k1)) - math.exp(float(layer.lambda_q2 @ layer.lambda_k2)) + 0.8
    assert layer.lambda_full().item() == pytest.approx(expected, rel=1e-5)


def test_exact_path_keeps_maps_for_visualisation():
    torch.manual_seed(5)
    layer = DiffAttention(32, num_heads=4)
    layer.keep_maps, layer.path = True, "exact"
    y = layer(torch.randn(2, 6, 32))
    maps = layer.attn_maps
    assert maps["a1"].shape == (2, 2, 6, 6)
    torch.testing.assert_close(maps["a1"].sum(-1), torch.ones(2, 2, 6))
    torch.testing.assert_close(maps["diff"], maps["a1"] - maps["lambda"] * maps["a2"])
    layer.keep_maps, layer.attn_maps = False, None
    torch.testing.assert_close(layer(torch.randn(2, 6, 32)).shape, y.shape)
    assert layer.attn_maps is None


def test_odd_head_count_rejected_with_clear_error():
    with pytest.raises(ValueError, match="even num_heads"):
        DiffAttention(96, num_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        DiffAttention(100, num_heads=8)
    with pytest.raises(ValueError, match="attn_type"):
        attention_layer("flash")
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        DiffAttention(16, 2)(torch.randn(1, 3, 16), attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)


def test_bf16_autocast_runs_without_dtype_warnings():
    import warnings
    torch.manual_seed(6)
    layer = DiffAttention(64, num_heads=8)
    x = torch.randn(2, 9, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.1)


def test_one_switch_and_clear_errors_for_unsupported_options():
    for cls in (DiffAttention, Attention):
        with pytest.raises(ValueError, match="qk_norm=True is not supported"):
            cls(32, num_heads=4, qk_norm=True)
        with pytest.raises(ValueError, match="scale_norm=True is not supported"):
            cls(32, num_heads=4, scale_norm=True)
        with pytest.raises(TypeError):
            cls(32, num_heads=4, fused=False)  # the old switches are gone, not silently accepted
        layer = cls(32, num_heads=4, path="split" if cls is DiffAttention else "sdpa")
        layer.keep_maps = True
        with pytest.raises(ValueError, match="keep_maps needs path='exact'"):
            layer(torch.randn(1, 5, 32))
        layer.path = "exact"
        layer(torch.randn(1, 5, 32))
        assert layer.attn_maps is not None
    # what timm's Block passes builds the layer (its defaults)
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                          num_heads=4, attn_layer=DiffAttention)
    assert isinstance(vit.blocks[0].attn, DiffAttention)
