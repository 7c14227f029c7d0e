"""``--accum-freq 2`` with batch b gives the gradient of batch 2b (one process, the real tiny model)."""

import pytest
import torch
from diffclip.training.train import forward_backward

import diffclip
from diffclip.loss import ClipLoss, SigLipLoss


def _batch(n, seed=0, ctx=32, image_size=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, 49406, (n, ctx), generator=g)
    lengths = torch.randint(3, ctx, (n,), generator=g)
    for i, length in enumerate(lengths):
        texts[i, 0], texts[i, length], texts[i, length + 1:] = 49406, 49407, 0
    return images, texts


def _grads(model, loss_fn):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_accum_freq_matches_large_batch(siglip):
    torch.manual_seed(0)
    model = diffclip.create_model("DiffCLIP-Tiny-64", init_logit_bias=SigLipLoss.INIT_LOGIT_BIAS if siglip else None)
    loss_fn = SigLipLoss() if siglip else ClipLoss()
    images, texts = _batch(8)

    loss_big = forward_backward(model, loss_fn, [(images, texts)])
    big = _grads(model, loss_fn)
    model.zero_grad(set_to_none=True)

    loss_acc = forward_backward(model, loss_fn, [(images[:4], texts[:4]), (images[4:], texts[4:])])
    acc = _grads(model, loss_fn)

    assert loss_acc.item() == pytest.approx(loss_big.item(), abs=1e-5)
    assert big.keys() == acc.keys() and "logit_scale" in big
    assert siglip == ("logit_bias" in big)
    for name in big:
        assert torch.allclose(acc[name], big[name], atol=1e-5, rtol=1e-4), \
            (name, (acc[name] - big[name]).abs().max().item())
    # the gradients are not trivially zero
    assert big["visual.blocks.0.attn.q_proj.weight"].abs().max() > 1e-6
