"""Positional encodings against the formula (a brute-force loop), transformers' Llama RoPE
and MAE's 2-D sin-cos layout; the experiment model overfits one batch for every option."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

from mmcourse.attention import MultiHeadAttention
from mmcourse.positional import (
    POSITIONS,
    LearnedPositionalEmbedding,
    ModalityEmbedding,
    OrderProbe,
    OrderProbeConfig,
    Rotary,
    SinusoidalPositionalEncoding,
    accuracy,
    apply_rotary,
    concat_modalities,
    rope_cos_sin,
    rotate_half,
    sincos_2d_encoding,
    sinusoidal_encoding,
    sinusoidal_frequencies,
    sinusoidal_shift_matrix,
    which_comes_first,
)

# Tiny models: one CPU thread is fastest (and does not fight other processes for cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- sinusoidal ----------------------------------------------------------------------------


def brute_force_sinusoidal(num_positions, d, base=10000.0):
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d))."""
    pe = np.zeros((num_positions, d))
    for pos in range(num_positions):
        for i in range(d // 2):
            angle = pos / base ** (2 * i / d)
            pe[pos, 2 * i] = math.sin(angle)
            pe[pos, 2 * i + 1] = math.cos(angle)
    return torch.tensor(pe, dtype=torch.float32)


@pytest.mark.parametrize("N,d,base", [(1, 2, 10000.0), (50, 16, 10000.0), (37, 64, 100.0)])
def test_sinusoidal_equals_the_formula(N, d, base):
    pe = sinusoidal_encoding(N, d, base=base)
    assert pe.shape == (N, d) and pe.dtype == torch.float32
    torch.testing.assert_close(pe, brute_force_sinusoidal(N, d, base), atol=1e-6, rtol=0)
    # row 0 is (sin 0, cos 0, ...) = (0, 1, 0, 1, ...)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * (d // 2)))


def test_frequencies_and_wavelengths():
    omega = sinusoidal_frequencies(8)
    torch.testing.assert_close(omega, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64))
    assert math.isclose(2 * math.pi / omega[-1].item(), 2 * math.pi * 10000 ** (6 / 8))


@pytest.mark.parametrize("k", [1, 3, -2, 11])
def test_shift_is_a_rotation_independent_of_position(k):
    d, N = 32, 60
    pe = sinusoidal_encoding(N, d).double()
    M = sinusoidal_shift_matrix(k, d).double()  # (d, d)
    ps = range(max(0, -k), min(N, N - k))
    for p in ps:  # one M_k for every p
        torch.testing.assert_close(M @ pe[p], pe[p + k], atol=1e-5, rtol=0)
    torch.testing.assert_close(M @ M.T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    off_block = M.clone()
    for i in range(0, d, 2):
        off_block[i : i + 2, i : i + 2] = 0
    assert off_block.abs().max() == 0  # block-diagonal, 2 x 2 blocks
    # M_a M_b = M_(a+b)
    torch.testing.assert_close(
        sinusoidal_shift_matrix(k, d) @ sinusoidal_shift_matrix(5, d),
        sinusoidal_shift_matrix(k + 5, d),
        atol=1e-5,
        rtol=0,
    )


def test_sinusoidal_bad_inputs_and_module():
    with pytest.raises(ValueError, match="dim must be even .* got 7"):
        sinusoidal_encoding(4, 7)
    with pytest.raises(ValueError, match="num_positions must be a positive integer, got 0"):
        sinusoidal_encoding(0, 8)
    with pytest.raises(ValueError, match="base must be a positive number"):
        sinusoidal_encoding(4, 8, base=-1.0)
    module = SinusoidalPositionalEncoding(dim=8)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(module(x), x + sinusoidal_encoding(5, 8))
    assert not list(module.parameters())
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, N, 8\), got \(5, 8\)"):
        module(x[0])


# --- learned ---------------------------------------------------------------------------------


def test_learned_table_shapes_gradient_and_length_error():
    torch.manual_seed(0)
    table = LearnedPositionalEmbedding(num_positions=10, dim=6)
    x = torch.randn(3, 7, 6)
    out = table(x)
    assert out.shape == (3, 7, 6)
    torch.testing.assert_close(out - x, table.weight[:7].expand(3, 7, 6))
    out.sum().backward()
    assert table.weight.grad[:7].abs().min() > 0 and table.weight.grad[7:].abs().max() == 0
    assert table(torch.randn(1, 10, 6)).shape == (1, 10, 6)
    with pytest.raises(ValueError, match="11 tokens is longer than num_positions=10"):
        table(torch.randn(1, 11, 6))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, N, 6\)"):
        table(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="num_positions must be a positive integer"):
        LearnedPositionalEmbedding(num_positions=0, dim=6)


# --- RoPE against transformers' Llama ---------------------------------------------------------


def _llama_rope(head_dim, base, B, N):
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=8,
        num_hidden_layers=1,
        vocab_size=11,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )
    assert config.head_dim == head_dim
    rotary = LlamaRotaryEmbedding(config)
    position_ids = torch.arange(N)[None].expand(B, N)
    return rotary(torch.zeros(1, dtype=torch.float32), position_ids)  # each (B, N, Dh)


@pytest.mark.parametrize("Dh,base", [(8, 10000.0), (16, 500.0)])
def test_rope_equals_llama_in_value_and_gradient(Dh, base):
    torch.manual_seed(0)
    B, H, N = 2, 3, 9
    cos_hf, sin_hf = _llama_rope(Dh, base, B, N)
    cos, sin = rope_cos_sin(N, Dh, base)
    assert cos.shape == sin.shape == (N, Dh)
    torch.testing.assert_close(cos, cos_hf[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0], atol=1e-6, rtol=0)

    q = torch.randn(B, H, N, Dh, requires_grad=True)
    k = torch.randn(B, H, N, Dh, requires_grad=True)
    torch.testing.assert_close(rotate_half(q), hf_rotate_half(q))
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)  # unsqueeze_dim=1: (B, 1, N, Dh)
    q_ours, k_ours = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    torch.testing.assert_close(q_ours, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_hf, atol=1e-5, rtol=1e-5)
    weights = torch.randn(B, H, N, N)
    loss_hf = ((q_hf @ k_hf.transpose(-1, -2)) * weights).sum()
    loss_ours = ((q_ours @ k_ours.transpose(-1, -2)) * weights).sum()
    for a, b in zip(
        torch.autograd.grad(loss_ours, (q, k)), torch.autograd.grad(loss_hf, (q, k)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_preserves_norms_and_scores_depend_only_on_the_offset():
    torch.manual_seed(1)
    Dh, N = 16, 40
    cos, sin = rope_cos_sin(N, Dh, 100.0)
    q, k = torch.randn(Dh), torch.randn(Dh)
    q_all = apply_rotary(q.expand(N, Dh), cos, sin)  # q placed at every position (N, Dh)
    k_all = apply_rotary(k.expand(N, Dh), cos, sin)
    torch.testing.assert_close(q_all.norm(dim=-1), q.norm().expand(N))
    scores = q_all @ k_all.T  # (N, N): q at m, k at n
    for m, n, s in [(0, 5, 7), (10, 3, 20), (4, 4, 30), (30, 1, 5)]:
        torch.testing.assert_close(scores[m, n], scores[m + s, n + s], atol=1e-5, rtol=1e-5)
    # ... and it is not a constant: different offsets give different scores
    assert (scores[0, 1] - scores[0, 7]).abs() > 1e-3


def test_rope_bad_inputs():
    cos, sin = rope_cos_sin(5, 8)
    with pytest.raises(ValueError, match=r"expected cos and sin of shape \(N, Dh\) = \(6, 8\)"):
        apply_rotary(torch.randn(2, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="dim must be even"):
        rope_cos_sin(5, 7)


# --- 2-D sin-cos: MAE's layout ---------------------------------------------------------------


def mae_1d(embed_dim, pos):
    """facebookresearch/mae util/pos_embed.py, get_1d_sincos_pos_embed_from_grid."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def mae_2d(embed_dim, grid_h_size, grid_w_size):
    """get_2d_sincos_pos_embed, with the square grid_size generalised to (h, w)."""
    grid_h = np.arange(grid_h_size, dtype=np.float32)
    grid_w = np.arange(grid_w_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h_size, grid_w_size])
    emb_h = mae_1d(embed_dim // 2, grid[0])  # (H*W, D/2): from grid[0], i.e. the w coordinate
    emb_w = mae_1d(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


@pytest.mark.parametrize("h,w,D", [(4, 4, 16), (14, 14, 64), (3, 5, 8)])
def test_2d_matches_mae_layout(h, w, D):
    ours = sincos_2d_encoding(h, w, D)
    assert ours.shape == (h * w, D)
    torch.testing.assert_close(ours, torch.tensor(mae_2d(D, h, w)), atol=1e-5, rtol=0)
    grid = ours.reshape(h, w, D)
    # the first half only changes along columns, the second only along rows
    torch.testing.assert_close(grid[:, :, : D // 2], grid[:1, :, : D // 2].expand(h, w, D // 2))
    torch.testing.assert_close(grid[:, :, D // 2 :], grid[:, :1, D // 2 :].expand(h, w, D // 2))


def test_2d_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_encoding(4, 4, 10)


# --- modality embeddings and mixed sequences --------------------------------------------------


def test_modality_embedding_and_mixed_sequence():
    torch.manual_seed(0)
    B, D = 2, 8
    image, text = torch.randn(B, 4, D), torch.randn(B, 3, D)
    x, ids = concat_modalities([image, text])
    assert x.shape == (B, 7, D) and ids.tolist() == [0] * 4 + [1] * 3
    markers = torch.randn(2, D)
    xm, idm = concat_modalities([image, text], markers=markers)
    assert xm.shape == (B, 9, D) and idm.tolist() == [0] * 5 + [1] * 4
    torch.testing.assert_close(xm[:, 0], markers[0].expand(B, D))
    torch.testing.assert_close(xm[:, 5], markers[1].expand(B, D))
    torch.testing.assert_close(xm[:, 1:5], image)
    # segments may repeat a modality: image, text, image
    _, ids3 = concat_modalities([image, text, image], modality_ids=[0, 1, 0])
    assert ids3.tolist() == [0] * 4 + [1] * 3 + [0] * 4

    types = ModalityEmbedding(num_modalities=2, dim=D)
    out = types(x, ids)
    assert out.shape == (B, 7, D)
    torch.testing.assert_close(out[:, :4] - x[:, :4], types.embedding.weight[0].expand(B, 4, D))
    torch.testing.assert_close(out, types(x, ids.expand(B, 7)))  # (B, N) ids work too
    out.sum().backward()
    assert types.embedding.weight.grad.abs().min() > 0


def test_modality_bad_inputs():
    types = ModalityEmbedding(num_modalities=2, dim=4)
    x = torch.randn(1, 3, 4)
    with pytest.raises(
        ValueError, match=r"modality ids must lie in \[0, 2\), got values from 0 to 2"
    ):
        types(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"expected modality_ids of shape \(N,\) = \(3,\)"):
        types(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must be integers"):
        types(x, torch.zeros(3))
    with pytest.raises(ValueError, match="at least one segment"):
        concat_modalities([])
    with pytest.raises(
        ValueError, match=r"expected every segment of shape \(B, L_m, D\) = \(1, L_m, 4\)"
    ):
        concat_modalities([x, torch.randn(1, 2, 5)])
    with pytest.raises(ValueError, match="one modality id per segment"):
        concat_modalities([x, x], modality_ids=[0])
    with pytest.raises(ValueError, match="expected markers of shape"):
        concat_modalities([x, x], markers=torch.randn(1, 4))


# --- attention, the experiment model and its task ---------------------------------------------


def test_attention_with_the_rotary_hook_equals_the_textbook_formula():
    """MultiHeadAttention(rotary=Rotary(...)): softmax(R_i q_i . R_j k_j / sqrt(Dh)) v, in value
    and gradient, on the fused and the reference path; without the hook it is permutation
    equivariant, with it it is not, and the scores depend on i - j only."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=8, num_heads=2, rotary=Rotary(base=100.0))
    x = torch.randn(2, 5, 8, requires_grad=True)
    split = lambda t: t.reshape(2, 5, 2, 4).transpose(1, 2)  # noqa: E731  (B, H, N, Dh)
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    cos, sin = rope_cos_sin(5, 4, 100.0)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    reference = attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    for need_weights in (False, True):
        out = attn(x, need_weights=need_weights)[0]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        g1 = torch.autograd.grad(out.square().sum(), x)[0]
        g2 = torch.autograd.grad(reference.square().sum(), x, retain_graph=True)[0]
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    plain = MultiHeadAttention(dim=8, num_heads=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(x[:, perm])[0], plain(x)[0][:, perm], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(attn(x[:, perm])[0], attn(x)[0][:, perm], atol=1e-3)
        # relative positions: one query and one key vector at every position, every pair
        qv, kv = (
            torch.randn(1, 1, 1, 4).expand(1, 1, 6, 4),
            torch.randn(1, 1, 1, 4).expand(1, 1, 6, 4),
        )
        rq, rk = Rotary(base=100.0)(qv, kv)
        scores = (rq @ rk.transpose(-1, -2))[0, 0]  # (6, 6)
        for offset in range(-5, 6):
            diagonal = torch.diagonal(scores, offset)
            torch.testing.assert_close(
                diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5
            )
    with pytest.raises(ValueError, match="base"):
        Rotary(base=0.0)


def test_which_comes_first_task():
    tokens, labels = which_comes_first(
        500, 12, vocab_size=6, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == (500, 12) and labels.shape == (500,)
    assert ((tokens == 0).sum(1) == 1).all() and ((tokens == 1).sum(1) == 1).all()
    assert tokens.max() < 6
    first_a = (tokens == 0).long().argmax(1) < (tokens == 1).long().argmax(1)
    assert torch.equal(labels, first_a.long())
    assert 0.4 < labels.float().mean() < 0.6
    with pytest.raises(ValueError, match="need length >= 2"):
        which_comes_first(3, 1)


def test_no_position_model_is_blind_to_order():
    torch.manual_seed(0)
    model = OrderProbe(OrderProbeConfig(position="none", dim=16, num_heads=2))
    tokens = torch.randint(0, 16, (4, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), model(tokens[:, torch.randperm(10)]), atol=1e-5, rtol=1e-5
        )
        for position in POSITIONS[1:]:
            torch.manual_seed(0)
            other = OrderProbe(OrderProbeConfig(position=position, dim=16, num_heads=2))
            assert not torch.allclose(other(tokens), other(tokens.flip(1)), atol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_one_batch_overfit(position):
    torch.manual_seed(0)
    config = OrderProbeConfig(
        position=position, dim=16, num_heads=2, num_layers=1, max_positions=12
    )
    model = OrderProbe(config)
    tokens = torch.randint(0, config.vocab_size, (16, 12))
    labels = torch.randint(0, 2, (16,))
    assert model(tokens).shape == (16, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = F.cross_entropy(model(tokens), labels).item()
    for _ in range(150):
        loss = F.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first
    assert accuracy(model, tokens, labels) == 1.0


def test_model_bad_inputs():
    with pytest.raises(
        ValueError,
        match=r"position must be one of \['none', 'sinusoidal', 'learned', 'rope'\], got 'alibi'",
    ):
        OrderProbeConfig(position="alibi")
    with pytest.raises(ValueError, match="dim must be divisible by num_heads"):
        OrderProbeConfig(dim=30, num_heads=4)
    with pytest.raises(
        ValueError, match="needs an even head width dim / num_heads, got 12 / 4 = 3"
    ):
        OrderProbeConfig(dim=12, num_heads=4, position="rope")
    OrderProbeConfig(dim=12, num_heads=4, position="sinusoidal")  # only RoPE needs even heads
    with pytest.raises(ValueError, match="position='sinusoidal' needs an even dim, got 9"):
        OrderProbeConfig(dim=9, num_heads=3, position="sinusoidal")
    model = OrderProbe(OrderProbeConfig(position="learned", max_positions=8))
    with pytest.raises(ValueError, match="longer than num_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        model(torch.full((1, 4), 16))
    with pytest.raises(ValueError, match=r"expected token ids of shape \(B, N\) and dtype int64"):
        model(torch.zeros(1, 4))
