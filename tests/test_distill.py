"""Knowledge distillation: each loss against a hand computation, torch, and a brute-force loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse import distill
from mmcourse.encoders import TextEncoder, TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, C = 5, 7


def _logits(seed=0, scale=3.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(B, C, generator=gen).requires_grad_(requires_grad)
    z_t = torch.randn(B, C, generator=gen) * scale
    y = torch.randint(0, C, (B,), generator=gen)
    return z_s, z_t, y


def _attention(b, h, n, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, n, n, generator=gen) * 2
    return scores.softmax(-1).requires_grad_(requires_grad)


# --- soft labels -------------------------------------------------------------------------------


def test_softmax_with_temperature():
    z = torch.tensor([[2.0, 1.0, 0.0]])
    p = distill.softmax_with_temperature(z, 2.0)
    expected = torch.exp(z / 2) / torch.exp(z / 2).sum()
    torch.testing.assert_close(p, expected)
    assert distill.softmax_with_temperature(z, 1000.0).std() < 1e-3  # T -> inf: uniform


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_equals_explicit_sums_in_value_and_gradient(T, alpha):
    z_s, z_t, y = _logits(requires_grad=True)
    loss = distill.kd_loss(z_s, z_t, temperature=T, alpha=alpha, labels=y)
    # By hand: probabilities, then sums over classes and a mean over the batch.
    p_t = torch.exp(z_t / T) / torch.exp(z_t / T).sum(1, keepdim=True)
    p_s = torch.exp(z_s / T) / torch.exp(z_s / T).sum(1, keepdim=True)
    kl = torch.stack(
        [sum(p_t[b, i] * torch.log(p_t[b, i] / p_s[b, i]) for i in range(C)) for b in range(B)]
    )
    p1 = torch.exp(z_s) / torch.exp(z_s).sum(1, keepdim=True)
    ce = torch.stack([-torch.log(p1[b, y[b]]) for b in range(B)])
    by_hand = (alpha * T**2 * kl + (1 - alpha) * ce).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, z_s)
    (g_hand,) = torch.autograd.grad(by_hand, z_s)
    torch.testing.assert_close(g, g_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0, 8.0])
def test_soft_term_equals_kldivloss_batchmean_times_t_squared(T):
    z_s, z_t, _ = _logits(requires_grad=True)
    ours = distill.kd_loss(z_s, z_t, temperature=T)  # no labels: the soft term alone
    theirs = (
        nn.KLDivLoss(reduction="batchmean")(F.log_softmax(z_s / T, -1), F.softmax(z_t / T, -1))
        * T**2
    )
    torch.testing.assert_close(ours, theirs)
    (g1,) = torch.autograd.grad(ours, z_s)
    (g2,) = torch.autograd.grad(theirs, z_s)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_mean_reduction_is_smaller_by_the_number_of_classes():
    z_s, z_t, _ = _logits()
    log_q, p = F.log_softmax(z_s / 2, -1), F.softmax(z_t / 2, -1)
    with pytest.warns(UserWarning):
        mean = F.kl_div(log_q, p, reduction="mean")
    batchmean = F.kl_div(log_q, p, reduction="batchmean")
    torch.testing.assert_close(batchmean, mean * C)
    torch.testing.assert_close(
        distill.soft_label_loss(z_s, z_t, temperature=2.0, t_squared=False), batchmean
    )


def test_t_squared_keeps_the_gradient_size_independent_of_temperature():
    gen = torch.Generator().manual_seed(3)
    z_t = torch.randn(64, 10, generator=gen) * 2
    z_s = torch.randn(64, 10, generator=gen)
    norms = {}
    for scaled in (True, False):
        for T in (2.0, 4.0, 8.0, 16.0):
            zs = z_s.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(
                distill.soft_label_loss(zs, z_t, temperature=T, t_squared=scaled), zs
            )
            norms[(scaled, T)] = g.norm().item()
    with_t2 = [norms[(True, T)] for T in (2.0, 4.0, 8.0, 16.0)]
    assert max(with_t2) / min(with_t2) < 1.5  # about constant
    for T in (4.0, 8.0, 16.0):  # without T^2: each doubling of T divides it by about 4
        ratio = norms[(False, T / 2)] / norms[(False, T)]
        assert 3.0 < ratio < 4.5, (T, ratio)


def test_kd_loss_ignores_unlabelled_examples_in_the_hard_term():
    z_s, z_t, y = _logits()
    labels = y.clone()
    labels[2:] = -100
    got = distill.kd_loss(z_s, z_t, temperature=2.0, alpha=0.4, labels=labels)
    soft = distill.soft_label_loss(z_s, z_t, temperature=2.0)  # over all B examples
    hard = F.cross_entropy(z_s[:2], y[:2])  # over the labelled ones only
    torch.testing.assert_close(got, 0.4 * soft + 0.6 * hard)
    no_labels = torch.full((B,), -100)
    torch.testing.assert_close(
        distill.kd_loss(z_s, z_t, temperature=2.0, alpha=0.4, labels=no_labels), 0.4 * soft
    )


def test_teacher_gets_no_gradient():
    z_s, z_t, _ = _logits(requires_grad=True)
    z_t.requires_grad_(True)
    distill.kd_loss(z_s, z_t, temperature=2.0).backward()
    assert z_t.grad is None and z_s.grad is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=2.0, alpha=1.5), "alpha"),
        (dict(temperature=2.0, labels=torch.zeros(B + 1, dtype=torch.long)), "labels"),
        (dict(temperature=2.0, labels=torch.zeros(B)), "labels"),
        (dict(temperature=2.0, labels=torch.full((B,), C)), "labels"),
    ],
)
def test_kd_loss_bad_inputs(kwargs, message):
    z_s, z_t, _ = _logits()
    with pytest.raises(ValueError, match=message):
        distill.kd_loss(z_s, z_t, **kwargs)


def test_kd_loss_bad_shapes():
    z_s, z_t, _ = _logits()
    with pytest.raises(ValueError, match="teacher_logits"):
        distill.kd_loss(z_s, z_t[:, :-1], temperature=2.0)
    with pytest.raises(ValueError, match=r"student_logits of shape \(B, C\)"):
        distill.kd_loss(z_s[None], z_t[None], temperature=2.0)


# --- attention maps ------------------------------------------------------------------------


def _attention_brute_force(a_s, a_t, *, loss, heads, mask):
    """Loops over examples, heads and real query rows (and keys, for the MSE)."""
    if heads == "mean":
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    total, count = 0.0, 0
    b_, h_, n_, _ = a_s.shape
    for b in range(b_):
        real = [i for i in range(n_) if mask[b, i]]
        for h in range(h_):
            for i in real:
                if loss == "kl":
                    total = total + sum(
                        a_t[b, h, i, k] * torch.log(a_t[b, h, i, k] / a_s[b, h, i, k]) for k in real
                    )
                    count += 1
                else:
                    for k in real:
                        total = total + (a_s[b, h, i, k] - a_t[b, h, i, k]) ** 2
                        count += 1
    return total / count


def _masked_attention(b, h, n, mask, seed, requires_grad=False):
    """Attention probabilities that give zero weight to padded keys, like a real encoder."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, n, n, generator=gen) * 2
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(-1).detach().requires_grad_(requires_grad)


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("heads", ["mean", "match"])
def test_attention_map_loss_matches_a_loop_in_value_and_gradient(loss, heads):
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    a_s = _masked_attention(2, 3, 5, mask, seed=1, requires_grad=True)
    a_t = _masked_attention(2, 3, 5, mask, seed=2)
    got = distill.attention_map_loss(a_s, a_t, loss=loss, heads=heads, attention_mask=mask)
    expected = _attention_brute_force(a_s, a_t, loss=loss, heads=heads, mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got, a_s)
    (g_loop,) = torch.autograd.grad(expected, a_s)
    torch.testing.assert_close(g, g_loop, atol=1e-5, rtol=1e-5)


def test_attention_losses_are_zero_when_student_equals_teacher():
    a = _attention(2, 4, 6)
    maps = [a, a.flip(0)]
    for loss in ("kl", "mse"):
        for heads in ("mean", "match"):
            value = distill.attention_distill_loss(maps, maps, {0: 0, 1: 1}, loss=loss, heads=heads)
            assert abs(value.item()) < 1e-6


def test_attention_distill_loss_averages_the_mapped_layers():
    s = [_attention(2, 2, 4, seed=i) for i in range(2)]
    t = [_attention(2, 4, 4, seed=10 + i) for i in range(3)]
    got = distill.attention_distill_loss(s, t, {0: 1, 1: 2})
    expected = (distill.attention_map_loss(s[0], t[1]) + distill.attention_map_loss(s[1], t[2])) / 2
    torch.testing.assert_close(got, expected)


def test_uniform_layer_map():
    assert distill.uniform_layer_map(2, 6) == {1: 3, 2: 6}
    assert distill.uniform_layer_map(4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}  # TinyBERT's g(m) = 3m
    assert distill.uniform_layer_map(4, 6) == {1: 2, 2: 3, 3: 5, 4: 6}
    assert distill.uniform_layer_map(1, 6) == {1: 6}
    for ls, lt in [(3, 6), (5, 7), (8, 6)]:
        g = distill.uniform_layer_map(ls, lt)
        assert list(g) == list(range(1, ls + 1)) and g[ls] == lt
        assert all(1 <= t <= lt for t in g.values()) and list(g.values()) == sorted(g.values())
    with pytest.raises(ValueError, match="num_student"):
        distill.uniform_layer_map(0, 6)


def test_attention_bad_inputs():
    a, b = _attention(2, 4, 5), _attention(2, 2, 5)
    with pytest.raises(ValueError, match='heads="match"'):
        distill.attention_map_loss(b, a, heads="match")
    with pytest.raises(ValueError, match="share B and N"):
        distill.attention_map_loss(a, _attention(2, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        distill.attention_map_loss(a[0], a)
    with pytest.raises(ValueError, match="loss"):
        distill.attention_map_loss(a, a, loss="l1")
    with pytest.raises(ValueError, match="attention_mask"):
        distill.attention_map_loss(a, a, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="out of range"):
        distill.attention_distill_loss([a], [a, a], {1: 0})
    with pytest.raises(ValueError, match="layer_map"):
        distill.attention_distill_loss([a], [a], {})


# --- hidden states ---------------------------------------------------------------------------


def test_hidden_state_loss_matches_a_loop_in_value_and_gradient():
    gen = torch.Generator().manual_seed(4)
    hs = torch.randn(2, 4, 3, generator=gen, requires_grad=True)
    ht = torch.randn(2, 4, 6, generator=gen)
    proj = nn.Linear(3, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = distill.hidden_state_loss(hs, ht, projection=proj, attention_mask=mask)
    total, count = 0.0, 0
    for b in range(2):
        for n in range(4):
            if mask[b, n]:
                v = hs[b, n] @ proj.weight.T + proj.bias
                total = total + sum((v[d] - ht[b, n, d]) ** 2 for d in range(6)) / 6
                count += 1
    expected = total / count
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(got, [hs, proj.weight])
    grads_loop = torch.autograd.grad(expected, [hs, proj.weight])
    for g, g_loop in zip(grads, grads_loop, strict=True):
        torch.testing.assert_close(g, g_loop, atol=1e-5, rtol=1e-5)


def test_hidden_losses_are_zero_when_student_equals_teacher():
    h = torch.randn(2, 5, 8)
    assert distill.hidden_state_loss(h, h).item() == 0.0
    proj = nn.Linear(8, 8)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(8))
        proj.bias.zero_()
    assert distill.hidden_state_loss(h, h, projection=proj).item() < 1e-12


def test_hidden_state_bad_inputs():
    hs, ht = torch.randn(2, 4, 3), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"nn.Linear\(3, 6\)"):
        distill.hidden_state_loss(hs, ht)
    with pytest.raises(ValueError, match=r"share \(B, N\)"):
        distill.hidden_state_loss(hs, torch.randn(2, 5, 6), projection=nn.Linear(3, 6))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        distill.hidden_state_loss(hs[0], ht[0])
    with pytest.raises(ValueError, match="layer_map"):
        distill.HiddenStateDistiller(student_dim=3, teacher_dim=6, layer_map={})


def test_hidden_state_distiller_uses_one_projection_per_layer():
    d = distill.HiddenStateDistiller(student_dim=3, teacher_dim=6, layer_map={1: 3, 2: 6})
    hs = [torch.randn(2, 4, 3) for _ in range(3)]
    ht = [torch.randn(2, 4, 6) if k in (3, 6) else None for k in range(7)]
    got = d(hs, ht)
    expected = (
        distill.hidden_state_loss(hs[1], ht[3], projection=d.projections["1"])
        + distill.hidden_state_loss(hs[2], ht[6], projection=d.projections["2"])
    ) / 2
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="out of range"):
        d(hs[:2], ht)


# --- the composite loss and the models --------------------------------------------------------


def test_distill_config_checks():
    with pytest.raises(ValueError, match="temperature"):
        distill.DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="hard_weight"):
        distill.DistillConfig(hard_weight=-1)
    with pytest.raises(ValueError, match="attention_layer_map"):
        distill.DistillConfig(attention_weight=1.0)
    with pytest.raises(ValueError, match="hidden_layer_map"):
        distill.DistillConfig(hidden_weight=1.0)
    with pytest.raises(ValueError, match="attention_heads"):
        distill.DistillConfig(attention_heads="sum")
    with pytest.raises(ValueError, match="student_dim"):
        distill.Distiller(distill.DistillConfig(hidden_weight=1.0, hidden_layer_map={1: 1}))


def test_distiller_is_the_weighted_sum_of_its_terms():
    z_s, z_t, y = _logits()
    a = [_attention(B, 2, 4, seed=i) for i in range(2)]
    h = [torch.randn(B, 4, 3) for _ in range(3)]
    config = distill.DistillConfig(
        temperature=2.0,
        soft_weight=0.5,
        hard_weight=0.25,
        attention_weight=2.0,
        attention_layer_map={0: 1},
        hidden_weight=3.0,
        hidden_layer_map={2: 2},
    )
    d = distill.Distiller(config, student_dim=3, teacher_dim=3)
    out = d(
        z_s,
        z_t,
        labels=y,
        student_attentions=a,
        teacher_attentions=a[::-1],
        student_hidden=h,
        teacher_hidden=h,
    )
    assert set(out.terms) == {"soft", "hard", "attention", "hidden"}
    expected = (
        0.5 * distill.soft_label_loss(z_s, z_t, temperature=2.0)
        + 0.25 * F.cross_entropy(z_s, y)
        + 2.0 * distill.attention_map_loss(a[0], a[0])
        + 3.0 * d.hidden(h, h)
    )
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="student_attentions"):
        d(z_s, z_t, labels=y)


def _tiny_classifier(vocab=20, dim=16, layers=2, heads=2, seed=0):
    torch.manual_seed(seed)
    config = TextEncoderConfig(
        vocab_size=vocab,
        max_position_embeddings=8,
        dim=dim,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=2 * dim,
        dropout=0.0,
        attention_dropout=0.0,
        add_pooling_layer=False,
    )
    return distill.TextClassifier(TextEncoder(config), num_classes=C)


def test_text_classifier_outputs_and_forward_from():
    model = _tiny_classifier().eval()
    ids = torch.randint(1, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    out = model(ids, mask, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, C)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 6, 16)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, 6, 6)
    assert torch.allclose(
        out.attentions[0][0, :, :, 4:], torch.zeros(1)
    )  # padded keys get no weight
    # The pooled vector ignores padding: changing a padded token changes nothing.
    ids2 = ids.clone()
    ids2[0, 5] = 1 if ids[0, 5] != 1 else 2
    torch.testing.assert_close(model(ids2, mask).logits, out.logits)
    # Running from block 1 on the cached input of block 1 gives the same logits.
    top = model.forward_from(out.hidden_states[1], mask, start_layer=1, output_attentions=True)
    torch.testing.assert_close(top.logits, out.logits)
    torch.testing.assert_close(top.attentions[0], out.attentions[1])
    with pytest.raises(ValueError, match="start_layer"):
        model.forward_from(out.hidden_states[1], mask, start_layer=3)
    with pytest.raises(ValueError, match="hidden"):
        model.forward_from(out.hidden_states[1][..., :8], mask, start_layer=1)


def test_one_batch_overfit_with_the_composite_loss():
    """A tiny student fits one batch of a tiny teacher: all four terms fall, accuracy 100%."""
    teacher = _tiny_classifier(dim=32, layers=3, heads=4, seed=1).eval()
    with torch.no_grad():  # sharpen the teacher's attention: at init it is almost uniform
        for block in teacher.encoder.blocks:
            block.self_attn.q_proj.weight.mul_(30)
            block.self_attn.k_proj.weight.mul_(30)
    ids = torch.randint(1, 20, (8, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(8, 6, dtype=torch.long)
    mask[::2, 5] = 0
    with torch.no_grad():
        t = teacher(ids, mask, output_hidden_states=True, output_attentions=True)
    t_logits = t.logits * 5  # a confident teacher
    labels = t_logits.argmax(-1)
    labels[4:] = -100  # half of the batch unlabelled
    student = _tiny_classifier(dim=16, layers=2, heads=2, seed=2)
    config = distill.DistillConfig(
        temperature=2.0,
        attention_weight=1.0,
        attention_layer_map={0: 1, 1: 2},
        hidden_weight=1.0,
        hidden_layer_map={1: 1, 2: 3},
    )
    d = distill.Distiller(config, student_dim=16, teacher_dim=32)
    params = [*student.parameters(), *d.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def step():
        s = student(ids, mask, output_hidden_states=True, output_attentions=True)
        return d(
            s.logits,
            t_logits,
            labels=labels,
            student_attentions=s.attentions,
            teacher_attentions=t.attentions,
            student_hidden=s.hidden_states,
            teacher_hidden=t.hidden_states,
            attention_mask=mask,
        ), s

    first, _ = step()
    for _ in range(150):
        out, _ = step()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last, s = step()
    for name in ("soft", "hard", "attention", "hidden"):
        assert last.terms[name] < 0.3 * first.terms[name], (
            name,
            first.terms[name],
            last.terms[name],
        )
    assert (s.logits.argmax(-1) == t_logits.argmax(-1)).all()


def test_compact_vocabulary():
    ids = torch.tensor([[101, 7, 9, 102, 0], [101, 9, 42, 102, 0]])
    lookup = distill.compact_vocabulary(ids, vocab_size=200)
    assert lookup.shape == (200,)
    assert lookup[0] == 0  # padding stays 0
    small = lookup[ids]
    assert int(lookup.max()) + 1 == 7  # [PAD] [UNK] [CLS] [SEP] + 7, 9, 42
    assert len(set(small.flatten().tolist())) == 6
    assert lookup[55] == lookup[100]  # unseen -> [UNK]
    with pytest.raises(ValueError, match="vocab_size"):
        distill.compact_vocabulary(torch.tensor([300]), vocab_size=200)
