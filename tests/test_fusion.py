"""Fusion strategies: shapes, gradients, one-batch overfit, and each formula checked by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse import fusion, plotting
from mmcourse.attention import MultiHeadAttention
from mmcourse.data import avdigits
from mmcourse.fusion import (
    CrossAttentionFusion,
    EarlyFusion,
    FiLMFusion,
    FusionClassifier,
    FusionConfig,
    GatedFusion,
    LateFusion,
    TensorFusion,
    TokenEncoder,
    TokenPool,
)
from mmcourse.train import ShuffledBatches, TrainConfig, fit

D, C, B = 8, 5, 6
NUM_TOKENS = {2: (3, 5), 3: (3, 5, 4)}

BUILDERS = {
    "early": lambda n: EarlyFusion(num_tokens=n, dim=D, num_classes=C, hidden_dim=16),
    "early_tokens": lambda n: EarlyFusion(
        num_tokens=n, dim=D, num_classes=C, hidden_dim=16, level="tokens", num_heads=2
    ),
    "late_average": lambda n: LateFusion(num_tokens=n, dim=D, num_classes=C),
    "late_learned": lambda n: LateFusion(num_tokens=n, dim=D, num_classes=C, weighting="learned"),
    "cross_attention": lambda n: CrossAttentionFusion(
        num_tokens=n, dim=D, num_classes=C, num_heads=2, hidden_dim=16
    ),
    "gated": lambda n: GatedFusion(num_tokens=n, dim=D, num_classes=C, hidden_dim=16),
    "film": lambda n: FiLMFusion(num_tokens=n, dim=D, num_classes=C, hidden_dim=16),
    "film_target_last": lambda n: FiLMFusion(
        num_tokens=n, dim=D, num_classes=C, hidden_dim=16, target=len(n) - 1
    ),
    "tensor": lambda n: TensorFusion(num_tokens=n, dim=D, num_classes=C, tensor_dim=3),
}


def _tokens(num_tokens, batch=B, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, n, D, generator=gen).requires_grad_(requires_grad) for n in num_tokens
    ]


# --- every fusion module: shapes, gradients, one-batch overfit ---------------------------


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_shapes_and_gradient_flow_to_every_input(name, M):
    torch.manual_seed(0)
    module = BUILDERS[name](NUM_TOKENS[M]).eval()
    inputs = _tokens(NUM_TOKENS[M], requires_grad=True)
    logits = module(inputs)
    assert logits.shape == (B, C)
    assert torch.isfinite(logits).all()
    logits.pow(2).sum().backward()
    for m, x in enumerate(inputs):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient reaches modality {m}"
    for pname, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} gets no gradient"


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_batch_overfit(name, M):
    torch.manual_seed(1)
    module = BUILDERS[name](NUM_TOKENS[M])
    inputs = _tokens(NUM_TOKENS[M], batch=8, seed=1)
    labels = torch.arange(8) % C
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(module(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"{name} with {M} modalities did not overfit one batch: {loss:.3f}"


def test_vectors_are_sequences_of_one_token():
    module = LateFusion(num_tokens=(1, 1), dim=D, num_classes=C).eval()
    a, b = torch.randn(B, D), torch.randn(B, D)
    torch.testing.assert_close(module([a, b]), module([a[:, None], b[:, None]]))


# --- each formula against a brute-force computation ---------------------------------------


def test_tensor_fusion_equals_the_explicit_outer_product_in_value_and_gradient():
    torch.manual_seed(2)
    h = [torch.randn(B, d, requires_grad=True) for d in (2, 3, 4)]
    ours = fusion.tensor_fusion(h)
    ones = [F.pad(v, (0, 1), value=1.0) for v in h]
    explicit = torch.einsum("bi,bj,bk->bijk", *ones).reshape(B, -1)
    assert ours.shape == (B, 3 * 4 * 5)
    torch.testing.assert_close(ours, explicit, atol=1e-6, rtol=1e-6)
    loop = torch.stack(
        [
            torch.stack(
                [
                    ones[0][b, i] * ones[1][b, j] * ones[2][b, k]
                    for i in range(3)
                    for j in range(4)
                    for k in range(5)
                ]
            )
            for b in range(B)
        ]
    )
    torch.testing.assert_close(ours, loop, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * weights).sum(), h)
    g_explicit = torch.autograd.grad((explicit * weights).sum(), h)
    for a, b in zip(g_ours, g_explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # it holds the unimodal terms and the constant: the appended 1 at work
    outer = ours.reshape(B, 3, 4, 5)
    torch.testing.assert_close(outer[:, :2, 3, 4], h[0])
    torch.testing.assert_close(outer[:, 2, 3, 4], torch.ones(B))


def test_tensor_fusion_of_one_modality_and_errors():
    h = torch.randn(B, 3)
    torch.testing.assert_close(fusion.tensor_fusion([h]), F.pad(h, (0, 1), value=1.0))
    with pytest.raises(ValueError, match=r"expected a non-empty list of \(B, d_m\) vectors"):
        fusion.tensor_fusion([torch.randn(B, 2, 3)])
    with pytest.raises(ValueError, match="use a smaller tensor_dim"):
        TensorFusion(num_tokens=(1,) * 4, dim=D, num_classes=C, tensor_dim=40)


@pytest.mark.parametrize("M", [1, 2, 3])
def test_late_fusion_average_is_the_mean_of_the_per_modality_heads(M):
    torch.manual_seed(3)
    n = (3, 5, 4)[:M]
    module = LateFusion(num_tokens=n, dim=D, num_classes=C).eval()
    inputs = _tokens(n)
    heads = [module.heads[m](module.pools[m](x)) for m, x in enumerate(inputs)]  # l_m
    per = module.per_modality_logits(inputs)
    assert per.shape == (B, M, C)
    torch.testing.assert_close(per, torch.stack(heads, 1))
    torch.testing.assert_close(module(inputs), sum(heads) / M)
    assert not module.weight_logits.requires_grad


def test_late_fusion_learned_weights_are_a_softmax_and_start_equal():
    torch.manual_seed(4)
    module = LateFusion(num_tokens=(3, 5), dim=D, num_classes=C, weighting="learned").eval()
    inputs = _tokens((3, 5))
    per = module.per_modality_logits(inputs)
    torch.testing.assert_close(module(inputs), per.mean(1))  # a = 0: equal weights
    with torch.no_grad():
        module.weight_logits.copy_(torch.tensor([1.0, -0.5]))
    w = torch.softmax(torch.tensor([1.0, -0.5]), 0)
    torch.testing.assert_close(module.modality_weights(), w)
    torch.testing.assert_close(module(inputs), w[0] * per[:, 0] + w[1] * per[:, 1])


def _torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(ours.dim, ours.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    return ref


@pytest.mark.parametrize("M", [2, 3])
def test_cross_attention_equals_torch_multihead_attention_in_value_and_gradient(M):
    torch.manual_seed(5)
    n = NUM_TOKENS[M]
    module = CrossAttentionFusion(num_tokens=n, dim=D, num_classes=C, num_heads=2).eval()
    inputs = _tokens(n, requires_grad=True)
    pooled = []
    for m, x in enumerate(inputs):  # modality m attends to all the others, concatenated
        others = torch.cat([t for j, t in enumerate(inputs) if j != m], 1)
        kv = module.norm_kv[m](others)
        out, _ = _torch_mha(module.attn[m])(module.norm_q[m](x), kv, kv)
        pooled.append(module.pools[m](x + out))
    reference = module.head(torch.cat(pooled, -1))
    ours = module(inputs)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours.sum(), inputs)
    g_ref = torch.autograd.grad(reference.sum(), inputs)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    maps = module.attention_maps(inputs)
    for m, w in enumerate(maps):
        assert w.shape == (B, 2, n[m], sum(n) - n[m])
        torch.testing.assert_close(w.sum(-1), torch.ones(B, 2, n[m]))


def test_early_fusion_formulas():
    torch.manual_seed(6)
    inputs = _tokens((3, 5))
    feats = EarlyFusion(num_tokens=(3, 5), dim=D, num_classes=C).eval()
    z = torch.cat([feats.pools[0](inputs[0]), feats.pools[1](inputs[1])], -1)  # [h1; h2]
    torch.testing.assert_close(feats(inputs), feats.head(z))
    toks = EarlyFusion(num_tokens=(3, 5), dim=D, num_classes=C, level="tokens").eval()
    x = torch.cat([inputs[0] + toks.type_embed[0], inputs[1] + toks.type_embed[1]], 1)  # (B, 8, D)
    h = toks.norm1(x)
    x = x + _torch_mha(toks.attn)(h, h, h)[0]
    torch.testing.assert_close(toks(inputs), toks.head(toks.pool(x)), atol=1e-5, rtol=1e-5)


def test_gated_fusion_is_a_convex_combination_and_a_sigmoid_for_two():
    torch.manual_seed(7)
    module = GatedFusion(num_tokens=(3, 5, 4), dim=D, num_classes=C).eval()
    inputs = _tokens((3, 5, 4))
    z = module.gates(inputs)
    assert z.shape == (B, 3, D) and (z >= 0).all()
    torch.testing.assert_close(z.sum(1), torch.ones(B, D))
    two = GatedFusion(num_tokens=(3, 5), dim=D, num_classes=C).eval()
    inputs = _tokens((3, 5))
    h1, h2 = two.pools[0](inputs[0]), two.pools[1](inputs[1])
    g1, g2 = two.gate(torch.cat([h1, h2], -1)).chunk(2, -1)
    z1 = torch.sigmoid(g1 - g2)
    h = z1 * torch.tanh(two.proj[0](h1)) + (1 - z1) * torch.tanh(two.proj[1](h2))
    torch.testing.assert_close(two(inputs), two.head(h))


def test_film_modulates_the_target_with_the_others():
    torch.manual_seed(8)
    module = FiLMFusion(num_tokens=(3, 5, 4), dim=D, num_classes=C, target=1).eval()
    inputs = _tokens((3, 5, 4))
    c = torch.cat([module.cond_pools["0"](inputs[0]), module.cond_pools["2"](inputs[2])], -1)
    delta_gamma, beta = module.film(c).chunk(2, -1)
    x = F.gelu((1 + delta_gamma[:, None]) * inputs[1] + beta[:, None])
    torch.testing.assert_close(module(inputs), module.head(module.pool(x)))
    with torch.no_grad():  # delta_gamma = beta = 0 (gamma = 1): the others have no say
        module.film.weight.zero_()
        module.film.bias.zero_()
    changed = [torch.randn_like(inputs[0]), inputs[1], torch.randn_like(inputs[2])]
    torch.testing.assert_close(module(inputs), module(changed))


# --- encoders, pooling and bad inputs -------------------------------------------------------


def test_token_encoder_and_pool_shapes():
    enc = TokenEncoder(num_tokens=16, token_dim=4, dim=D)
    tokens = enc(torch.randn(B, 16, 4))
    assert tokens.shape == (B, 16, D)
    assert TokenPool(num_tokens=16, dim=D, out_dim=3)(tokens).shape == (B, 3)
    with pytest.raises(
        ValueError, match=r"expected raw tokens of shape \(B, 16, 4\), got \(6, 4, 16\)"
    ):
        enc(torch.randn(B, 4, 16))


def test_bad_inputs_say_what_was_expected():
    module = LateFusion(num_tokens=(3, 5), dim=D, num_classes=C)
    with pytest.raises(ValueError, match="expected 2 modalities, got 1"):
        module([torch.randn(B, 3, D)])
    with pytest.raises(ValueError, match=r"modality 1: expected tokens of shape \(B, 5, 8\)"):
        module([torch.randn(B, 3, D), torch.randn(B, 4, D)])
    with pytest.raises(ValueError, match="with the batch size of modality 0"):
        module([torch.randn(B, 3, D), torch.randn(B + 1, 5, D)])
    with pytest.raises(ValueError, match="expected a list of 2 per-modality tensors"):
        module(torch.randn(B, 3, D))
    with pytest.raises(ValueError, match="num_tokens must list N_m"):
        LateFusion(num_tokens=3, dim=D, num_classes=C)
    with pytest.raises(ValueError, match=r"num_tokens\[1\] must be a positive integer"):
        LateFusion(num_tokens=(3, 0), dim=D, num_classes=C)
    with pytest.raises(ValueError, match="weighting must be one of"):
        LateFusion(num_tokens=(3, 5), dim=D, num_classes=C, weighting="max")
    with pytest.raises(ValueError, match="level must be one of"):
        EarlyFusion(num_tokens=(3, 5), dim=D, num_classes=C, level="pixels")
    with pytest.raises(ValueError, match="needs at least 2 modalities, got 1"):
        CrossAttentionFusion(num_tokens=(3,), dim=D, num_classes=C)
    with pytest.raises(ValueError, match="dim=8 must be divisible by num_heads=3"):
        CrossAttentionFusion(num_tokens=(3, 5), dim=D, num_classes=C, num_heads=3)
    with pytest.raises(ValueError, match="needs at least 2 modalities, got 1"):
        FiLMFusion(num_tokens=(3,), dim=D, num_classes=C)
    with pytest.raises(ValueError, match=r"target must be a modality index in 0..1, got 2"):
        FiLMFusion(num_tokens=(3, 5), dim=D, num_classes=C, target=2)


# --- the classifier, missing modalities and modality dropout -----------------------------


def _config(strategy, M=2, **kw):
    names = ("image", "audio", "text")[:M]
    return FusionConfig(
        strategy=strategy,
        modalities=names,
        num_tokens=(4, 6, 3)[:M],
        token_dims=(4, 5, 7)[:M],
        dim=D,
        hidden_dim=16,
        tensor_dim=3,
        dropout=0.0,
        **kw,
    )


def _raw(config, batch=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, n, f, generator=gen)
        for n, f in zip(config.num_tokens, config.token_dims, strict=True)
    ]


@pytest.mark.parametrize("M", [2, 3])
def test_every_strategy_of_the_classifier(M):
    config = _config("late_average", M)
    assert set(config.strategies()) == {f"{n}_only" for n in config.modalities} | set(
        fusion.FUSION_STRATEGIES
    )
    for strategy in config.strategies():
        torch.manual_seed(0)
        model = FusionClassifier(_config(strategy, M)).eval()
        raw = [x.requires_grad_() for x in _raw(model.config)]
        logits = model(raw)
        assert logits.shape == (B, 10), strategy
        logits.sum().backward()
        used = set(model.config.used)
        for m, x in enumerate(raw):
            reached = x.grad is not None and x.grad.abs().sum() > 0
            assert reached == (m in used), (strategy, m)
        assert fusion.count_parameters(model) > 0


def test_unimodal_baselines_build_only_their_encoder():
    model = FusionClassifier(_config("audio_only"))
    assert list(model.encoders) == ["audio"]
    assert model.config.used == (1,)
    full = FusionClassifier(_config("late_average"))
    assert fusion.count_parameters(model) < fusion.count_parameters(full)


@pytest.mark.parametrize("strategy", ["early", "cross_attention", "late_learned", "tensor"])
def test_a_missing_modality_reads_zeros(strategy):
    torch.manual_seed(0)
    model = FusionClassifier(_config(strategy)).eval()
    raw = _raw(model.config)
    zeroed = [raw[0], torch.zeros_like(raw[1])]
    torch.testing.assert_close(model(raw, present=[True, False]), model(zeroed))
    per_example = torch.tensor([[True, True], [True, False]] * (B // 2))
    mixed = model(raw, present=per_example)
    torch.testing.assert_close(mixed[0::2], model(raw)[0::2])
    torch.testing.assert_close(mixed[1::2], model(zeroed)[1::2])
    with pytest.raises(ValueError, match=r"present must have shape \(2,\) or \(6, 2\)"):
        model(raw, present=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected a list of 2 tensors, one per modality"):
        model(raw[:1])


def test_modality_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = FusionClassifier(_config("late_average", modality_dropout=0.5))
    raw = _raw(model.config, batch=64)
    model.eval()
    torch.testing.assert_close(model(raw), model(raw))
    model.train()
    a, b = model(raw), model(raw)
    assert not torch.allclose(a, b), "modality dropout should change the output in training"
    plain = FusionClassifier(_config("late_average")).train()
    torch.testing.assert_close(plain(raw), plain(raw))


def test_modality_dropout_mask_never_drops_everything():
    gen = torch.Generator().manual_seed(0)
    mask = fusion.modality_dropout_mask(20000, 2, 0.5, generator=gen)
    assert mask.shape == (20000, 2) and mask.dtype == torch.bool
    assert mask.any(1).all()
    # independent drops with probability p, one modality given back to empty rows
    assert math.isclose(1 - mask.float().mean().item(), 0.5 - 0.5**2 / 2, abs_tol=0.01)
    assert fusion.modality_dropout_mask(100, 3, 0.0, generator=gen).all()
    assert fusion.modality_dropout_mask(100, 1, 0.9, generator=gen).all()


def test_config_errors():
    with pytest.raises(ValueError, match="strategy must be one of"):
        FusionConfig(strategy="middle")
    with pytest.raises(ValueError, match="strategy must be one of"):
        FusionConfig(strategy="text_only")
    with pytest.raises(ValueError, match="modality_dropout must be < 1"):
        FusionConfig(modality_dropout=1.0)
    with pytest.raises(ValueError, match="need one entry per modality"):
        FusionConfig(modalities=("image", "audio", "text"))
    with pytest.raises(ValueError, match="modalities must be distinct names"):
        FusionConfig(modalities=("image", "image"))
    with pytest.raises(ValueError, match="dropout must be a number in"):
        FusionConfig(dropout=1.5)


# --- data helpers and training ------------------------------------------------------------


def test_standardize_uses_training_statistics_only():
    torch.manual_seed(0)
    train, test = torch.randn(50, 4, 3) * 3 + 1, torch.randn(20, 4, 3)
    s_train, s_test = avdigits.standardize(train, test)
    torch.testing.assert_close(s_train.mean((0, 1)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_train.std((0, 1)), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_test, (test - train.mean((0, 1))) / train.std((0, 1)))


def test_av_digits_tokens_shapes():
    image, logmel = torch.rand(2, 1, 8, 8), torch.randn(2, 40, 101)
    img, aud = avdigits.av_digits_tokens(image, logmel)
    assert img.shape == (2, 16, 4) and aud.shape == (2, 26, 20)
    torch.testing.assert_close(aud[:, 0, 0], logmel[:, :2, :4].mean((1, 2)))
    with pytest.raises(ValueError, match=r"expected log-mel spectrograms \(B, J, T\)"):
        avdigits.av_digits_tokens(image, logmel[0])


def test_fit_overfits_one_batch_with_the_classification_loss_and_keeps_the_best_weights():
    torch.manual_seed(0)
    config = _config("cross_attention")
    model = FusionClassifier(config)
    raw = _raw(config, batch=16)
    labels = torch.arange(16) % 10
    result = fit(
        model,
        ShuffledBatches(*raw, labels, batch_size=16, num_batches=120),
        loss_fn=fusion.classification_loss,
        config=TrainConfig(max_steps=120, lr=1e-2, eval_every=20, progress=False, device="cpu"),
        evaluate_fn=lambda m: {"accuracy": fusion.accuracy(m, raw, labels)},
    )
    assert result.history[-1]["loss"] < 0.05
    assert fusion.accuracy(model, raw, labels) == result.best_metric == 1.0
    assert not model.training
    loss = fusion.classification_loss(model, (*raw, labels))
    torch.testing.assert_close(loss, F.cross_entropy(model(list(raw)), labels))


def test_diagrams_draw_every_strategy():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for strategy in ("early", "early_tokens", "late", "cross_attention", "gated", "film", "tensor"):
        fig = plotting.draw_fusion_diagram(strategy)
        assert len(fig.axes[0].texts) >= 7
        plt.close(fig)
    with pytest.raises(ValueError, match="strategy must be one of"):
        plotting.draw_fusion_diagram("nope")
