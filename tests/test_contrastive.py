"""clip_loss against a brute-force loop and transformers' CLIP loss, in value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss as hf_clip_loss

from mmcourse.contrastive import LogitScale, clip_loss


def brute_force_clip_loss(u, v, s):
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    B = u.shape[0]
    total = 0.0
    for i in range(B):  # image i must pick text i among all texts, and text i image i
        row = torch.stack([s * u[i] @ v[j] for j in range(B)])
        col = torch.stack([s * u[j] @ v[i] for j in range(B)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * B)


@pytest.mark.parametrize("B,D", [(1, 4), (5, 8), (16, 32)])
def test_clip_loss_value_and_gradient(B, D):
    torch.manual_seed(B)
    u = torch.randn(B, D, requires_grad=True)
    v = torch.randn(B, D, requires_grad=True)
    s = torch.tensor(7.5, requires_grad=True)
    ours = clip_loss(u, v, s)
    loop = brute_force_clip_loss(u, v, s)
    # transformers takes the text-by-image logits matrix
    hf = hf_clip_loss(s * F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T)
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours, (u, v, s))
    g_loop = torch.autograd.grad(loop, (u, v, s))
    for a, b in zip(g_ours, g_loop, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_loss_perfect_alignment_and_chance():
    v = torch.eye(8)
    assert clip_loss(v, v, 100.0) < 1e-3
    assert math.isclose(clip_loss(v, v, 0.0).item(), math.log(8), rel_tol=1e-6)


def test_clip_loss_shape_errors():
    with pytest.raises(ValueError, match=r"got \(4, 8\) and \(4, 7\)"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 7), 1.0)


def test_logit_scale_init_and_clamp():
    scale = LogitScale()
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == 100.0
    with pytest.raises(ValueError, match="init must be in"):
        LogitScale(init=0.0)
