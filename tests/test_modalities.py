"""Image patches and the shared-space model of chapter 01."""

import pytest
import torch
from einops import rearrange
from torch import nn

from mmcourse.contrastive import clip_loss
from mmcourse.modalities import (
    SharedSpace,
    SharedSpaceConfig,
    patchify,
    retrieval_accuracy,
    unpatchify,
)


@pytest.mark.parametrize("shape,P", [((2, 3, 8, 12), 4), ((1, 1, 6, 6), 3), ((3, 3, 32, 32), 16)])
def test_patchify_equals_einops_and_inverts(shape, P):
    x = torch.randn(shape)
    patches = patchify(x, P)
    torch.testing.assert_close(
        patches, rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=P, p2=P)
    )
    torch.testing.assert_close(
        unpatchify(patches, patch_size=P, height=shape[2], width=shape[3]), x
    )


def test_linear_on_patches_equals_strided_conv():
    """ViT's patch embedding: a Linear on flattened patches is a Conv2d with stride P."""
    torch.manual_seed(0)
    P, C, D = 4, 3, 10
    conv = nn.Conv2d(C, D, kernel_size=P, stride=P)
    linear = nn.Linear(P * P * C, D)
    with torch.no_grad():  # conv weight (D, C, P, P) -> linear weight (D, P*P*C) in (p1 p2 c)
        linear.weight.copy_(rearrange(conv.weight, "d c p1 p2 -> d (p1 p2 c)"))
        linear.bias.copy_(conv.bias)
    x = torch.randn(2, C, 8, 12, requires_grad=True)
    out_conv = rearrange(conv(x), "b d h w -> b (h w) d")
    out_lin = linear(patchify(x, P))
    torch.testing.assert_close(out_lin, out_conv, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out_lin.square().sum(), x)[0]
    g2 = torch.autograd.grad(out_conv.square().sum(), x)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_patchify_bad_inputs():
    with pytest.raises(
        ValueError, match=r"expected image batch of shape \(B, C, H, W\), got \(32, 32, 3\)"
    ):
        patchify(torch.zeros(32, 32, 3), 4)
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        patchify(torch.zeros(1, 3, 32, 32), 5)
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        patchify(torch.zeros(1, 3, 32, 32), 0)
    with pytest.raises(ValueError, match="expected patches"):
        unpatchify(torch.zeros(1, 5, 48), patch_size=4, height=8, width=8)


def test_shared_space_shapes_and_one_batch_overfit():
    torch.manual_seed(0)
    config = SharedSpaceConfig(
        image_dim=64, audio_dim=40 * 11, hidden_dim=64, embed_dim=16, dropout=0.0
    )
    model = SharedSpace(config)
    image, audio = torch.randn(16, 1, 8, 8), torch.randn(16, 40, 11)
    u, v, scale = model(image, audio)
    assert u.shape == v.shape == (16, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = clip_loss(*model(image, audio))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    labels = torch.arange(16)
    u, v, _ = model(image, audio)
    assert retrieval_accuracy(u, v, labels, labels) == 1.0
    with pytest.raises(ValueError, match="same batch size"):
        model(image, audio[:3])
