"""Attention of chapter 02: both paths equal torch's in value and gradient; masks; MHA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse.attention import (
    MultiHeadAttention,
    causal_mask,
    fused_attention,
    modality_block_mask,
    padding_mask,
    scaled_dot_product_attention,
)

ATOL = RTOL = 1e-5  # float32
# bf16 keeps 8 bits of mantissa (~2-3 significant digits): compare to 2e-2 on a GPU.
BF16_ATOL = BF16_RTOL = 2e-2


def reference(*args, **kwargs):
    return scaled_dot_product_attention(*args, **kwargs)[0]


PATHS = {"reference": reference, "fused": fused_attention}


def random_bool_mask(shape, *, generator, p=0.4):
    """A random True = attend mask with at least one True per row (no fully masked rows)."""
    mask = torch.rand(shape, generator=generator) > p
    keep = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return mask.scatter(-1, keep[..., None], True)


def qkv(batch, L, S, E, Ev, *, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(*batch, L, E, generator=g),
        torch.randn(*batch, S, E, generator=g),
        torch.randn(*batch, S, Ev, generator=g),
    ]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors], g


def value_and_grads(fn, tensors, *args, **kwargs):
    out = fn(*tensors, *args, **kwargs)
    probe = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad((out * probe.view(out.shape)).sum(), tensors)
    return out, grads


def assert_same(fn_a, fn_b, tensors, *, atol=ATOL, rtol=RTOL, **kwargs):
    out_a, grads_a = value_and_grads(fn_a, tensors, **kwargs)
    out_b, grads_b = value_and_grads(fn_b, tensors, **kwargs)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for name, ga, gb in zip("qkv", grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=f"gradient of {name}")


# --- both paths against F.scaled_dot_product_attention ----------------------------------

SHAPES = [  # (batch dims, L, S, E, Ev)
    ((), 4, 4, 8, 8),
    ((3,), 5, 7, 6, 3),
    ((2, 3), 6, 9, 16, 5),
    ((2, 1), 1, 11, 4, 4),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal", "scale"])
def test_paths_equal_torch_in_value_and_gradient(path, shape, kind):
    batch, L, S, E, Ev = shape
    tensors, g = qkv(batch, L, S, E, Ev, seed=len(batch) * 100 + L)
    kwargs = {}
    if kind == "bool":  # broadcast over the first batch dim
        kwargs["attn_mask"] = random_bool_mask((*batch[1:], L, S), generator=g)
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(*batch, L, S, generator=g)
    elif kind == "causal":
        kwargs["is_causal"] = True
    elif kind == "scale":
        kwargs["scale"] = 0.3
        kwargs["attn_mask"] = random_bool_mask((L, S), generator=g)
    assert_same(PATHS[path], F.scaled_dot_product_attention, tensors, **kwargs)


def test_weights_are_the_softmax_and_give_the_output():
    (q, k, v), g = qkv((2,), 3, 5, 4, 6)
    mask = random_bool_mask((3, 5), generator=g)
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == (2, 3, 6) and weights.shape == (2, 3, 5)
    expected = torch.softmax((q @ k.mT / 2.0).masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert (weights[:, ~mask] == 0).all()
    torch.testing.assert_close(out, weights @ v)


def test_boolean_mask_equals_float_mask_of_minus_infinity():
    (q, k, v), g = qkv((2,), 4, 6, 8, 8)
    mask = random_bool_mask((2, 4, 6), generator=g)
    additive = torch.zeros(2, 4, 6).masked_fill(~mask, float("-inf"))
    for fn in PATHS.values():
        torch.testing.assert_close(fn(q, k, v, attn_mask=mask), fn(q, k, v, attn_mask=additive))


def test_masked_keys_do_not_matter():
    (q, k, v), _ = qkv((2,), 3, 6, 4, 4)
    mask = padding_mask([4, 6], 6)[:, None, :]  # (B, 1, S): the last two keys of sequence 0
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[0, 4:], v2[0, 4:] = 1e4, -1e4  # garbage in the padding
    for fn in PATHS.values():
        torch.testing.assert_close(fn(q, k, v, attn_mask=mask), fn(q, k2, v2, attn_mask=mask))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("as_float", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(path, as_float):
    (q, k, v), g = qkv((2,), 4, 5, 8, 3)
    mask = random_bool_mask((2, 4, 5), generator=g)
    mask[0, 1] = False  # query 1 of sequence 0 may attend to nothing
    mask[1, 3] = False
    if as_float:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, grads = value_and_grads(PATHS[path], [q, k, v], attn_mask=mask)
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert (out[0, 1] == 0).all() and (out[1, 3] == 0).all()
    assert (grads[0][0, 1] == 0).all() and (grads[0][1, 3] == 0).all()
    if path == "reference":
        weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)[1]
        assert (weights[0, 1] == 0).all() and (weights[1, 3] == 0).all()
    # every other row equals torch (which, on some kernels, returns NaN for the full rows)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = torch.ones(2, 4, dtype=torch.bool)
    rows[0, 1] = rows[1, 3] = False
    torch.testing.assert_close(out[rows], torch_out[rows], atol=ATOL, rtol=RTOL)


def test_dropout_is_applied_when_p_is_positive():
    (q, k, v), _ = qkv((2,), 6, 6, 4, 4)
    plain, w0 = scaled_dot_product_attention(q, k, v)
    torch.manual_seed(1)
    dropped, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, plain)
    kept = w != 0
    assert 0.2 < kept.float().mean() < 0.8
    torch.testing.assert_close(w[kept], 2 * w0[kept])  # survivors scaled by 1 / (1 - p)
    torch.testing.assert_close(dropped, w @ v)
    torch.manual_seed(1)
    assert not torch.allclose(fused_attention(q, k, v, dropout_p=0.5), plain)


# --- mask helpers -------------------------------------------------------------------------


def test_padding_mask():
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(padding_mask([2, 4, 0], 4), expected)
    assert torch.equal(padding_mask(torch.tensor([2, 4, 0])), expected)
    assert padding_mask([1, 2], 5).shape == (2, 5)


def test_causal_mask():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3), expected)
    wide = causal_mask(2, 4)
    assert torch.equal(wide, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))
    # the same as torch's is_causal=True
    (q, k, v), _ = qkv((), 3, 5, 4, 4)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(3, 5)),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


def test_modality_block_mask_image_then_text():
    # 2 image patches (modality 0), 3 text tokens (modality 1); text sees image, not vice versa
    mask = modality_block_mask(lengths=[2, 3], allowed=[(0, 0), (1, 0), (1, 1)])
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    causal_text = modality_block_mask(lengths=[2, 3], allowed=[(0, 0), (1, 0), (1, 1)], causal=[1])
    expected[2, 3:] = expected[3, 4] = False
    assert torch.equal(causal_text, expected)
    ids = torch.tensor([0, 0, 1, 1, 1])
    same = modality_block_mask(segment_ids=ids, allowed=[(0, 0), (1, 0), (1, 1)], causal=[1])
    assert torch.equal(same, causal_text)
    as_matrix = torch.tensor([[True, False], [True, True]])
    assert torch.equal(
        modality_block_mask(segment_ids=ids, allowed=as_matrix, causal=[1]), causal_text
    )


def test_modality_block_mask_batched_and_interleaved():
    ids = torch.tensor([[0, 1, 0], [1, 1, 0]])
    mask = modality_block_mask(segment_ids=ids, allowed=[(1, 0)])  # text -> image only
    assert mask.shape == (2, 3, 3)
    assert torch.equal(mask[0].int(), torch.tensor([[0, 0, 0], [1, 0, 1], [0, 0, 0]]))
    assert torch.equal(mask[1].int(), torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0]]))


# --- multi-head attention against nn.MultiheadAttention -----------------------------------


def make_pair(*, dim=16, num_heads=4, kdim=None, vdim=None, use_sdpa=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(dim, num_heads, batch_first=True, kdim=kdim, vdim=vdim, **kwargs)
    with torch.no_grad():  # non-zero biases, so that their copying is tested too
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    return theirs, MultiHeadAttention.from_torch(theirs, use_sdpa=use_sdpa)


def grads_of(module, names):
    return {n: p.grad.clone() for n, p in module.named_parameters() if n in names}


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("setting", ["self", "cross", "masks", "float_mask", "causal"])
def test_mha_equals_torch_in_value_and_gradient(use_sdpa, need_weights, setting):
    B, L, S, D = 3, 5, 7, 16
    kdim, vdim = (6, 10) if setting == "cross" else (None, None)
    theirs, ours = make_pair(kdim=kdim, vdim=vdim, use_sdpa=use_sdpa)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, L, D, generator=g, requires_grad=True)
    key = value = query
    ours_kw, theirs_kw = {}, {}
    if setting != "self" and setting != "causal":
        key = torch.randn(B, S, kdim or D, generator=g, requires_grad=True)
        value = torch.randn(B, S, vdim or D, generator=g, requires_grad=True)
    if setting in ("masks", "cross"):
        pad = ~padding_mask([7, 4, 6], S)  # True = padding, both conventions agree
        allowed = random_bool_mask((L, S), generator=g)  # True = may attend (ours)
        ours_kw = {"key_padding_mask": pad, "attn_mask": allowed}
        theirs_kw = {"key_padding_mask": pad, "attn_mask": ~allowed}  # torch: True = masked
    elif setting == "float_mask":
        pad = torch.zeros(B, S).masked_fill(~padding_mask([7, 4, 6], S), float("-inf"))
        bias = torch.randn(B, L, S, generator=g)
        ours_kw = {"key_padding_mask": pad, "attn_mask": bias}
        theirs_kw = {  # torch takes (B * H, L, S)
            "key_padding_mask": pad,
            "attn_mask": bias.repeat_interleave(ours.num_heads, dim=0),
        }
    elif setting == "causal":
        ours_kw = {"is_causal": True}
        theirs_kw = {"attn_mask": ~causal_mask(L), "is_causal": True}

    inputs = [query] if key is query else [query, key, value]
    out_t, w_t = theirs(query, key, value, need_weights=need_weights, **theirs_kw)
    out_o, w_o = ours(
        query,
        None if key is query else key,
        None if key is query else value,
        need_weights=need_weights,
        **ours_kw,
    )
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=RTOL)
    if need_weights:
        assert w_o.shape == (B, ours.num_heads, L, key.shape[1])
        torch.testing.assert_close(w_o.mean(1), w_t, atol=ATOL, rtol=RTOL)
    else:
        assert w_o is None and w_t is None
    probe = torch.randn(out_t.shape, generator=g)
    grads_t = torch.autograd.grad((out_t * probe).sum(), inputs + list(theirs.parameters()))
    grads_o = torch.autograd.grad((out_o * probe).sum(), inputs + list(ours.parameters()))
    n = len(inputs)
    for gt, go in zip(grads_t[:n], grads_o[:n], strict=True):
        torch.testing.assert_close(go, gt, atol=ATOL, rtol=RTOL)
    # parameters: torch packs W^Q, W^K, W^V (and their biases); compare them one by one
    t_params = dict(zip([name for name, _ in theirs.named_parameters()], grads_t[n:], strict=True))
    o_params = dict(zip([name for name, _ in ours.named_parameters()], grads_o[n:], strict=True))
    if "in_proj_weight" in t_params:
        w_q, w_k, w_v = t_params["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = (t_params[f"{r}_proj_weight"] for r in "qkv")
    b_q, b_k, b_v = t_params["in_proj_bias"].chunk(3)
    pairs = {
        "q_proj.weight": w_q,
        "k_proj.weight": w_k,
        "v_proj.weight": w_v,
        "q_proj.bias": b_q,
        "k_proj.bias": b_k,
        "v_proj.bias": b_v,
        "out_proj.weight": t_params["out_proj.weight"],
        "out_proj.bias": t_params["out_proj.bias"],
    }
    for name, expected in pairs.items():
        torch.testing.assert_close(o_params[name], expected, atol=ATOL, rtol=RTOL, msg=name)


def test_mha_is_a_loop_over_heads_each_with_its_own_projections():
    """Concat(head_1, ..., head_h) W^O with head_i = Attention(X W^Q_i, X W^K_i, X W^V_i)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(dim=12, num_heads=3)
    x = torch.randn(2, 5, 12)
    Dh = mha.head_dim
    heads = []
    for i in range(mha.num_heads):
        rows = slice(i * Dh, (i + 1) * Dh)  # head i's rows of each projection
        q = x @ mha.q_proj.weight[rows].T + mha.q_proj.bias[rows]  # (B, N, Dh)
        k = x @ mha.k_proj.weight[rows].T + mha.k_proj.bias[rows]
        v = x @ mha.v_proj.weight[rows].T + mha.v_proj.bias[rows]
        heads.append(torch.softmax(q @ k.mT / Dh**0.5, dim=-1) @ v)  # (B, N, Dh)
    expected = mha.out_proj(torch.cat(heads, dim=-1))  # (B, N, D)
    torch.testing.assert_close(mha(x, need_weights=False)[0], expected, atol=ATOL, rtol=RTOL)


def test_mha_fully_masked_query_gives_the_output_bias_not_nan():
    theirs, ours = make_pair()
    x = torch.randn(2, 4, 16)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1] = True  # sequence 1 is all padding: its queries may attend to nothing
    for need_weights in (True, False):
        out, weights = ours(x, key_padding_mask=pad, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1], ours.out_proj.bias.expand(4, 16))
        if need_weights:
            assert (weights[1] == 0).all()
        torch.testing.assert_close(out[0], theirs(x, x, x, key_padding_mask=pad)[0][0])


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_dropout_in_train_mode_only(use_sdpa):
    torch.manual_seed(0)
    mha = MultiHeadAttention(dim=16, num_heads=2, dropout=0.5, use_sdpa=use_sdpa)
    x = torch.randn(2, 8, 16)
    no_dropout = MultiHeadAttention(dim=16, num_heads=2, use_sdpa=use_sdpa)
    no_dropout.load_state_dict(mha.state_dict())
    mha.train()
    a = mha(x, need_weights=False)[0]
    b = mha(x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, no_dropout(x)[0])
    mha.eval()
    torch.testing.assert_close(mha(x, need_weights=False)[0], mha(x, need_weights=False)[0])
    torch.testing.assert_close(mha(x)[0], no_dropout(x)[0])


def test_one_batch_overfit_with_multi_head_attention():
    """A tiny attention classifier memorises one batch: which token holds the largest id."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.attn = MultiHeadAttention(dim=16, num_heads=2)
            self.head = nn.Linear(16, 6)

        def forward(self, ids, pad):
            x = self.embed(ids)  # (B, N, D)
            y, _ = self.attn(x, key_padding_mask=pad, need_weights=False)
            return self.head((x + y).mean(1))  # (B, classes)

    ids = torch.randint(0, 10, (16, 6))
    pad = ~padding_mask(torch.randint(3, 7, (16,)), 6)
    labels = torch.randint(0, 6, (16,))
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = F.cross_entropy(model(ids, pad), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


# --- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_of_the_function():
    (q, k, v), _ = qkv((2,), 3, 5, 4, 6)
    q, k, v = q.detach(), k.detach(), v.detach()
    cases = [
        ((q, k[..., :3], v), {}, "same width E"),
        ((q, k, v[:, :4]), {}, "same length S"),
        ((q, k[:1], v[:1]), {}, "same leading"),
        ((q[0, 0], k, v), {}, r"expected query of shape \(\.\.\., N, E\)"),
        ((q.long(), k, v), {}, "floating-point query"),
        ((q.double(), k, v), {}, "share a dtype"),
        ((q, k, v), {"attn_mask": torch.ones(3, 5, dtype=torch.long)}, r"mask\.bool\(\)"),
        ((q, k, v), {"attn_mask": torch.ones(3, 5, dtype=torch.float64)}, "query's dtype"),
        ((q, k, v), {"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, "does not broadcast"),
        ((q, k, v), {"attn_mask": torch.ones(3, 5).bool(), "is_causal": True}, "not both"),
        ((q, k, v), {"dropout_p": 1.0}, r"dropout_p must be a number in \[0, 1\)"),
        ((q, k, v), {"attn_mask": [[True]]}, "must be a torch.Tensor"),
        ((q, k, v), {"attn_mask": torch.ones(3, 5, dtype=torch.bool, device="meta")}, "is on meta"),
    ]
    for fn in PATHS.values():
        for args, kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                fn(*args, **kwargs)


def test_bad_inputs_of_the_helpers():
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        padding_mask([2, -1])
    with pytest.raises(ValueError, match="exceeds max_len=3"):
        padding_mask([2, 4], 3)
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        padding_mask(torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="L must be a positive integer"):
        causal_mask(0)
    with pytest.raises(ValueError, match="exactly one of"):
        modality_block_mask(lengths=[2], segment_ids=torch.zeros(2, dtype=torch.long), allowed=[])
    with pytest.raises(ValueError, match="positive token counts"):
        modality_block_mask(lengths=[2, 0], allowed=[(0, 0)])
    with pytest.raises(ValueError, match="pairs"):
        modality_block_mask(lengths=[2, 3], allowed=[0, 1])
    with pytest.raises(ValueError, match=r"\(M, M\) boolean"):
        modality_block_mask(lengths=[2, 3], allowed=torch.ones(2, 2))
    with pytest.raises(ValueError, match="allowed covers 1 modalities but the sequence has 2"):
        modality_block_mask(lengths=[2, 3], allowed=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="segment_ids must be >= 0"):
        modality_block_mask(segment_ids=torch.tensor([0, -1]), allowed=[(0, 0)])


def test_bad_inputs_of_multi_head_attention():
    with pytest.raises(ValueError, match="num_heads=3 must divide dim=16"):
        MultiHeadAttention(dim=16, num_heads=3)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        MultiHeadAttention(dim=0, num_heads=1)
    with pytest.raises(ValueError, match="dropout must be"):
        MultiHeadAttention(dim=16, num_heads=2, dropout=1.5)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    mha = MultiHeadAttention(dim=16, num_heads=4, kdim=6)
    x, k = torch.randn(2, 5, 16), torch.randn(2, 7, 6)
    cases = [
        ((torch.randn(5, 16),), {}, r"expected query of shape \(B, N, 16\) \(batch first\)"),
        ((x,), {}, r"expected key of shape \(B, N, 6\)"),
        ((x, k[:1], torch.randn(1, 7, 16)), {}, "same batch size"),
        ((x, k, torch.randn(2, 6, 16)), {}, "same length S"),
        (
            (x, k, x[:, :1].expand(2, 7, 16)),
            {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)},
            r"\(B, S\) = \(2, 7\)",
        ),
        (
            (x, k, x[:, :1].expand(2, 7, 16)),
            {"key_padding_mask": torch.zeros(2, 7, dtype=torch.long)},
            "True = padding",
        ),
        (
            (x, k, x[:, :1].expand(2, 7, 16)),
            {"attn_mask": torch.ones(5, 7, 1, 1, 1, dtype=torch.bool)},
            r"\(L, S\)",
        ),
        (
            (x, k, x[:, :1].expand(2, 7, 16)),
            {"attn_mask": torch.ones(8, 5, 7, dtype=torch.bool)},
            r"\(B\*H, L, S\)",
        ),
        (
            (x, k, x[:, :1].expand(2, 7, 16)),
            {"attn_mask": torch.ones(5, 6, dtype=torch.bool)},
            "does not broadcast",
        ),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            mha(*args, **kwargs)


# --- the same checks in bf16 on a GPU -----------------------------------------------------


def _accelerator():
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps")


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["none", "bool", "causal"])
def test_paths_equal_torch_in_bf16_on_gpu(path, kind):
    device = _accelerator()
    tensors, g = qkv((2, 4), 64, 80, 32, 32, dtype=torch.bfloat16, device=device)
    kwargs = {}
    if kind == "bool":
        kwargs["attn_mask"] = random_bool_mask((64, 80), generator=g).to(device)
    elif kind == "causal":
        kwargs["is_causal"] = True
    assert_same(
        PATHS[path],
        F.scaled_dot_product_attention,
        tensors,
        atol=BF16_ATOL,
        rtol=BF16_RTOL,
        **kwargs,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_equals_torch_in_bf16_on_gpu(use_sdpa):
    device = _accelerator()
    theirs, ours = make_pair(dim=64, num_heads=4, kdim=24, vdim=40, use_sdpa=use_sdpa)
    theirs, ours = theirs.to(device, torch.bfloat16), ours.to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 64, generator=g).to(device, torch.bfloat16)
    k = torch.randn(2, 48, 24, generator=g).to(device, torch.bfloat16)
    v = torch.randn(2, 48, 40, generator=g).to(device, torch.bfloat16)
    pad = (~padding_mask([48, 30], 48)).to(device)
    out_t, _ = theirs(x, k, v, key_padding_mask=pad, need_weights=False)
    out_o, _ = ours(x, k, v, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(out_o, out_t, atol=BF16_ATOL, rtol=BF16_RTOL)


# --- the benchmark (python -m mmcourse.bench attention) ------------------------------------


def test_attention_benchmark_prints_its_table(capsys):
    from mmcourse import bench

    argv = ["attention", "--device", "cpu", "--lengths", "8", "16", "--repeats", "1"]
    argv += ["--batch", "1", "--dim", "8", "--heads", "2", "--min-block", "0.0001"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "reference / sdpa" in out and "MHA fused / nn.MHA" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("8 ", "16 "))]
    assert [r[0] for r in rows] == ["8", "16"] and all(len(r) == 8 for r in rows)
    assert bench.main(["attention", "--lengths", "8", "--dim", "6", "--heads", "4"]) == 2
    assert "heads=4 must divide dim=6" in capsys.readouterr().err


def test_peak_memory_counts_the_score_matrix():
    from mmcourse.bench import peak_memory_bytes

    q = k = v = torch.randn(1, 1, 64, 8)
    score_bytes = 64 * 64 * 4
    assert peak_memory_bytes(lambda: scaled_dot_product_attention(q, k, v)) >= 2 * score_bytes
    assert peak_memory_bytes(lambda: fused_attention(q, k, v)) < score_bytes
