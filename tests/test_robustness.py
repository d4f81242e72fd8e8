"""Attacks equal torchattacks', their sanity properties, corruptions, adversarial training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from mmcourse import robustness as R
from mmcourse.fusion import FusionClassifier, FusionConfig
from mmcourse.train import TrainConfig, fit


def _image_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)
    ).eval()  # (B, 1, 8, 8) -> (B, 10)


def _image_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _wrapped(net):
    return R.RawInputModel(net, ranges={"image": (0.0, 1.0)}, as_list=False)


def _trained_image_model(seed=0):
    """A small model fitted to a learnable rule, so that attacks have something to break."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 8, 8, generator=g)
    w = torch.randn(64, 4, generator=g)
    y = (x.flatten(1) @ w).argmax(1)  # 4 classes from a linear rule
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    model = _wrapped(net)
    batches = R.make_batches({"image": x}, y, batch_size=64, epochs=30, seed=seed)
    fit(
        model,
        batches,
        loss_fn=R.clean_loss,
        config=TrainConfig(max_steps=120, lr=1e-2, eval_every=120, progress=False, device="cpu"),
    )
    return model.eval(), {"image": x[:128]}, y[:128]


# --- equal to torchattacks -----------------------------------------------------------------


def test_fgsm_equals_torchattacks():
    net = _image_net()
    x, y = _image_data()
    ours = R.fgsm(_wrapped(net), {"image": x}, y, budgets={"image": 8 / 255})["image"]
    theirs = torchattacks.FGSM(net, eps=8 / 255)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("steps", [1, 7])
def test_pgd_linf_equals_torchattacks(steps):
    net = _image_net(1)
    x, y = _image_data(seed=1)
    eps, alpha = 0.1, 0.03
    ours = R.pgd(
        _wrapped(net),
        {"image": x},
        y,
        budgets={"image": R.Budget(eps, step_size=alpha)},
        steps=steps,
    )["image"]
    theirs = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - x).abs().max() <= eps + 1e-6


def test_pgd_l2_equals_torchattacks():
    net = _image_net(2)
    x, y = _image_data(seed=2)
    eps, alpha = 0.8, 0.2
    budget = R.Budget(eps, norm="l2", step_size=alpha)
    ours = R.pgd(_wrapped(net), {"image": x}, y, budgets={"image": budget}, steps=6)["image"]
    theirs = torchattacks.PGDL2(net, eps=eps, alpha=alpha, steps=6, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ((ours - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


def test_one_pgd_step_matches_autograd_and_brute_force():
    """The step direction is the sign of the input gradient; that gradient equals finite differences."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double().eval()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1  # away from the range's edges
    y = torch.tensor([1, 2, 3, 4])
    eps = alpha = 0.05
    adv = R.pgd(
        R.RawInputModel(net, ranges={"image": (0, 1)}, as_list=False),
        {"image": x},
        y,
        budgets={"image": R.Budget(eps, step_size=alpha)},
        steps=1,
    )["image"]
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(adv, (x + alpha * grad.sign()).clamp(x - eps, x + eps))
    # brute force: central differences of the summed loss along a few pixels
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 0, 3, 4), (3, 0, 7, 7)]:
        e = torch.zeros_like(x)
        e[idx] = h
        loss = lambda z: F.cross_entropy(net(z), y, reduction="sum").item()  # noqa: E731
        numeric = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(numeric - grad[idx].item()) < 1e-6


def test_projection_and_direction():
    d = torch.tensor([[3.0, 4.0], [0.3, -0.4], [0.0, 0.0]])
    torch.testing.assert_close(
        R.project(d, eps=1.0, norm="l2"), torch.tensor([[0.6, 0.8], [0.3, -0.4], [0.0, 0.0]])
    )
    torch.testing.assert_close(
        R.project(d, eps=0.5, norm="linf"), torch.tensor([[0.5, 0.5], [0.3, -0.4], [0, 0.0]])
    )
    g = torch.tensor([[3.0, -4.0]])
    torch.testing.assert_close(R.ascent_direction(g, norm="linf"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(R.ascent_direction(g, norm="l2"), torch.tensor([[0.6, -0.8]]))


# --- sanity properties ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    return _trained_image_model()


def test_eps_zero_gives_clean_accuracy_exactly(trained):
    model, x, y = trained
    clean = R.accuracy(model, x, y)
    for attack in (R.fgsm, R.pgd):
        adv_acc, adv = R.attack_accuracy(
            model, x, y, attack=attack, budgets={"image": 0.0}, return_adversarial=True
        )
        assert adv_acc == clean
        assert torch.equal(adv["image"], x["image"])
    assert clean > 0.7  # the model learned the rule


def test_accuracy_does_not_rise_with_eps_and_pgd_beats_fgsm(trained):
    model, x, y = trained
    eps_grid = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
    pgd_acc = [R.attack_accuracy(model, x, y, budgets={"image": e}, steps=20) for e in eps_grid]
    fgsm_acc = [
        R.attack_accuracy(model, x, y, attack=R.fgsm, budgets={"image": e}) for e in eps_grid
    ]
    assert all(b <= a for a, b in zip(pgd_acc, pgd_acc[1:], strict=False)), pgd_acc
    assert all(b <= a for a, b in zip(fgsm_acc, fgsm_acc[1:], strict=False)), fgsm_acc
    assert all(p <= f for p, f in zip(pgd_acc, fgsm_acc, strict=True)), (pgd_acc, fgsm_acc)
    assert pgd_acc[-1] < 0.2 * pgd_acc[0]


def test_more_restarts_never_help_the_model(trained):
    model, x, y = trained
    accs = []
    for restarts in (1, 2, 4, 8):
        g = torch.Generator().manual_seed(0)
        accs.append(
            R.attack_accuracy(
                model, x, y, budgets={"image": 0.03}, steps=3, restarts=restarts, generator=g
            )
        )
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False)), accs


def test_random_noise_of_the_same_norm_hurts_far_less(trained):
    model, x, y = trained
    clean = R.accuracy(model, x, y)
    acc, adv = R.attack_accuracy(
        model, x, y, budgets={"image": 0.1}, steps=10, return_adversarial=True
    )
    noisy = R.random_noise_like(
        adv, x, ranges=model.ranges, generator=torch.Generator().manual_seed(0)
    )
    d_adv, d_noise = (
        (adv["image"] - x["image"]).flatten(1),
        (noisy["image"] - x["image"]).flatten(1),
    )
    # the same magnitudes, shuffled, with random signs; clipping to [0, 1] can only shrink them
    assert (d_noise.abs() <= 0.1 + 1e-6).all()
    assert (d_noise.norm(dim=1) <= d_adv.norm(dim=1) + 1e-5).all()
    assert d_noise.norm(dim=1).sum() > 0.8 * d_adv.norm(dim=1).sum()
    noise_acc = R.accuracy(model, noisy, y)
    assert clean - noise_acc < 0.25 * (clean - acc), (clean, noise_acc, acc)


def test_multimodal_attack_touches_only_the_attacked_modality():
    torch.manual_seed(0)
    cfg = FusionConfig(strategy="late_average", num_tokens=(4, 3), token_dims=(4, 5), dim=8)
    model = R.RawInputModel(
        FusionClassifier(cfg).eval(),
        ranges={"image": (0, 1), "audio": (-1, 1)},
        preprocess={"image": nn.Unflatten(1, (4, 4)), "audio": nn.Unflatten(1, (3, 5))},
        accepts_present=True,
    )
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.rand(6, 16, generator=g), "audio": torch.rand(6, 15, generator=g) * 2 - 1}
    y = torch.arange(6)
    adv = R.pgd(model, x, y, budgets={"audio": 0.05}, steps=3)
    assert torch.equal(adv["image"], x["image"])
    assert 0 < (adv["audio"] - x["audio"]).abs().max() <= 0.05 + 1e-6
    both = R.pgd(model, x, y, budgets={"image": R.Budget(0.1), "audio": R.Budget(0.5, norm="l2")})
    assert (both["image"] - x["image"]).abs().max() <= 0.1 + 1e-6
    assert ((both["audio"] - x["audio"]).norm(dim=1) <= 0.5 + 1e-5).all()
    assert both["audio"].abs().max() <= 1.0
    # a missing modality goes through present=
    assert model(x, present=torch.tensor([True, False])).shape == (6, 10)


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        R.pgd(model, x, y, budgets={"image": -0.1})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        R.pgd(model, x, y, budgets={"image": 0.1}, steps=0)
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        R.pgd(model, x, y, budgets={"image": 0.1}, restarts=0)
    with pytest.raises(ValueError, match="cannot attack modality 'audio'.*\\['image'\\]"):
        R.pgd(model, x, y, budgets={"audio": 0.1})
    with pytest.raises(ValueError, match="outside its declared range \\[0, 1\\]"):
        R.pgd(model, {"image": x["image"] * 2}, y, budgets={"image": 0.1})
    with pytest.raises(ValueError, match="outside its declared range"):
        R.accuracy(model, {"image": x["image"] - 0.5}, y)
    with pytest.raises(ValueError, match="missing \\['image'\\]"):
        R.pgd(model, {"img": x["image"]}, y, budgets={"image": 0.1})
    with pytest.raises(ValueError, match="norm must be one of"):
        R.Budget(0.1, norm="l1")
    with pytest.raises(ValueError, match="at least one modality"):
        R.pgd(model, x, y, budgets={})
    with pytest.raises(ValueError, match="labels must be"):
        R.pgd(model, x, y[:3], budgets={"image": 0.1})
    with pytest.raises(ValueError, match="method must be one of"):
        R.AdversarialLoss(budgets={"image": 0.1}, method="trades")
    with pytest.raises(ValueError, match="eps must be"):
        R.AdversarialLoss(budgets={"image": -1.0})
    with pytest.raises(ValueError, match="lo < hi"):
        R.RawInputModel(nn.Identity(), ranges={"image": (1, 0)})
    with pytest.raises(ValueError, match="does not take present"):
        model(x, present=torch.tensor([True]))


# --- adversarial training through train.fit --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", R.AT_METHODS)
def test_adversarial_training_overfits_one_batch(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    model = _wrapped(net)
    x, y = _image_data(n=16, seed=5)
    budgets = {"image": 0.02}
    loss_fn = R.AdversarialLoss(budgets=budgets, method=method, steps=3)
    batch = ({"image": x}, y)
    first = loss_fn(model.train(), batch).item()
    fit(
        model,
        [batch],
        loss_fn=loss_fn,
        config=TrainConfig(max_steps=150, lr=1e-2, eval_every=150, progress=False, device="cpu"),
    )
    last = loss_fn(model.train(), batch).item()
    assert last < 0.05 * first, (first, last)
    assert R.attack_accuracy(model, {"image": x}, y, budgets=budgets, steps=10) == 1.0


def test_adversarial_loss_restores_mode_and_leaves_no_parameter_gradients():
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))
    model = _wrapped(net).train()
    x, y = _image_data(n=8)
    loss = R.AdversarialLoss(budgets={"image": 0.1}, method="pgd", steps=2)
    adv = loss.attack(model, {"image": x}, y)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert (adv["image"] - x).abs().max() <= 0.1 + 1e-6


# --- corruptions and MultiBench metrics ------------------------------------------------------


def test_corruptions():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 8, 8, generator=g)
    occluded = R.occlude(images, fraction=0.25, generator=g)
    assert ((occluded == 0) & (images != 0)).flatten(1).sum(1).eq(16).all()  # a 4 x 4 square
    noisy = R.gaussian_noise(images, std=0.3, generator=g)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, images)
    flat = torch.full((1, 1, 8, 8), 0.7)
    torch.testing.assert_close(R.blur(flat, sigma=1.5), flat)  # a constant stays constant
    sharp = torch.zeros(1, 1, 9, 9)
    sharp[0, 0, 4, 4] = 1.0
    blurred = R.blur(sharp, sigma=1.0)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))  # mass kept away from edges
    assert blurred[0, 0, 4, 4] < 0.2
    wave = torch.sin(torch.linspace(0, 300, 8000)).repeat(3, 1) * 0.5
    for snr in (20.0, 0.0):
        noisy = R.add_noise_snr(wave, snr_db=snr, generator=torch.Generator().manual_seed(1))
        measured = 10 * torch.log10(wave.pow(2).mean(1) / (noisy - wave).pow(2).mean(1))
        assert (measured - snr).abs().max() < 0.3
    masked = R.time_mask(wave, fraction=0.25, generator=g)
    assert ((masked == 0) & (wave != 0)).sum(1).le(2000).all()
    assert (masked == 0).sum(1).ge(2000).all()


def test_multibench_robustness_metrics():
    # MultiBench: trapezoid area with levels 0.1 apart; effective robustness vs a reference
    assert R.relative_robustness([1.0, 0.8, 0.6]) == pytest.approx((1.8 + 1.4) * 0.05)
    f, lf = [0.9, 0.8, 0.7], [0.8, 0.6, 0.4]
    assert R.effective_robustness(f, lf) == pytest.approx(sum(np.array(f) - (np.array(lf) + 0.1)))
    assert R.effective_robustness(lf, lf) == 0.0
    with pytest.raises(ValueError, match="same levels"):
        R.effective_robustness([1.0, 0.5], [1.0])
    with pytest.raises(ValueError, match="2 or more levels"):
        R.relative_robustness([1.0])


def test_av_digits_front_ends_are_differentiable_and_standardised():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 8, 8, generator=g)
    waves = (torch.rand(20, 8000, generator=g) * 2 - 1) * 0.3
    img, aud = R.ImageTokens(images), R.AudioTokens(waves)
    t_img, t_aud = img(images), aud(waves)
    assert t_img.shape == (20, 16, 4) and t_aud.shape == (20, 26, 20)
    torch.testing.assert_close(t_img.mean((0, 1)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t_aud.mean((0, 1)), torch.zeros(20), atol=1e-4, rtol=0)
    w = waves[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(aud(w).sum(), w)
    assert grad.abs().sum() > 0


# --- the chapter's explorer, headless ----------------------------------------------------------


def _tiny_av_model():
    torch.manual_seed(0)
    cfg = FusionConfig(strategy="late_average", num_tokens=(4, 3), token_dims=(4, 100), dim=8)
    return R.RawInputModel(
        FusionClassifier(cfg).eval(),
        ranges={"image": (0, 1), "audio": (-1, 1)},
        preprocess={
            "image": nn.Sequential(
                nn.Flatten(1), nn.Unflatten(1, (4, 4))
            ),  # (1, 1, 4, 4) -> (1, 4, 4)
            "audio": nn.Unflatten(1, (3, 100)),  # (1, 300) -> (1, 3, 100)
        },
        accepts_present=True,
    )


def test_explorer_draws_clean_and_attacked_example():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    model = _tiny_av_model()
    g = torch.Generator().manual_seed(0)
    x = {
        "image": torch.rand(1, 1, 4, 4, generator=g),
        "audio": torch.rand(1, 300, generator=g) - 0.5,
    }
    with torch.no_grad():
        clean = model(x).softmax(-1)[0]
    label = int(clean.argmax())
    before = plt.get_fignums()
    fig = Figure(figsize=(13, 3))
    kw = dict(model=model, inputs=x, label=label, audio_ratio=0.1, steps=3, window=(100, 200))
    # eps = 0: nothing changes, the prediction is the clean one
    probs = R.draw_attack_example(fig, eps=0.0, attacked="both", **kw)
    torch.testing.assert_close(probs, clean)
    assert len(fig.axes) == 5
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), x["image"][0, 0].numpy())
    assert not fig.axes[2].images[0].get_array().any()  # no image change
    # the image attacked: its change fills the ball, the audio stays untouched
    for attacked, image_moves, audio_moves in [
        ("image", True, False),
        ("audio", False, True),
        ("both", True, True),
    ]:
        fig.clear()
        probs = R.draw_attack_example(fig, eps=0.3, attacked=attacked, **kw)
        assert probs.shape == (10,) and abs(probs.sum().item() - 1) < 1e-5
        change = np.asarray(fig.axes[2].images[0].get_array())  # image change / eps
        assert (np.abs(change).max() > 0.5) == image_moves and np.abs(change).max() <= 1 + 1e-5
        audio_change = fig.axes[3].lines[1].get_ydata()  # (change / audio eps) * 0.5
        assert (np.abs(audio_change).max() > 0) == audio_moves
        assert np.abs(audio_change).max() <= 0.5 + 1e-4
        assert (
            f"true {label}" in fig.axes[4].get_title() and "eps = 0.30" in fig._suptitle.get_text()
        )
        assert probs[label] <= clean[label] + 1e-6  # the attack never helps the true class here
    with pytest.raises(ValueError, match="attacked must be one of"):
        R.draw_attack_example(fig, eps=0.1, attacked="text", **kw)
    with pytest.raises(ValueError, match="one example"):
        R.draw_attack_example(
            fig,
            eps=0.1,
            attacked="both",
            **{**kw, "inputs": {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in x.items()}},
        )
    assert plt.get_fignums() == before


def test_conv_image_tower_shapes_upsampling_and_errors():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    for upsample in (1, 2):
        tower = R.ConvImageTower(R.ConvTowerConfig(width=4, upsample=upsample, hidden=8)).eval()
        logits = tower(x)
        assert logits.shape == (5, 10)
        (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), x)
        assert g.shape == x.shape and g.abs().sum() > 0  # an attack can reach the pixels
    # nearest upsampling inside the model equals upsampling the input of a tower without it
    up = R.ConvImageTower(R.ConvTowerConfig(width=4, upsample=2, hidden=8)).eval()
    plain = R.ConvImageTower(R.ConvTowerConfig(image_size=16, width=4, upsample=1, hidden=8)).eval()
    plain.load_state_dict(up.state_dict())
    big = x.detach().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (5, 1, 16, 16)
    torch.testing.assert_close(up(x.detach()), plain(big), atol=1e-6, rtol=0)
    no_bn = R.ConvImageTower(R.ConvTowerConfig(width=4, batch_norm=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    with pytest.raises(ValueError, match="width must be a positive integer"):
        R.ConvTowerConfig(width=0)
    with pytest.raises(ValueError, match="must be even"):
        R.ConvTowerConfig(image_size=7, upsample=1)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\)"):
        up(torch.rand(2, 3, 8, 8))


@pytest.mark.slow
def test_fgsm_from_zero_collapses_on_the_conv_tower():
    """Chapter 12's claim at its full size (co_steps=400), for one seed: PGD accuracy peaks, then falls
    to less than half its peak while FGSM accuracy stays far above it (the notebook's settings)."""
    from mmcourse.data import avdigits

    splits = {
        s: avdigits.av_digits_tensors(
            s, config=avdigits.AVDigitsConfig(seed=0), features="waveform"
        )
        for s in ("train", "validation")
    }
    x_val, y_val = {"image": splits["validation"]["image"]}, splits["validation"]["label"]
    budget = {"image": 0.3}

    def robust_validation(model):
        with torch.enable_grad():
            return {
                "accuracy": R.accuracy(model, x_val, y_val),
                "fgsm": R.attack_accuracy(model, x_val, y_val, attack=R.fgsm, budgets=budget),
                "pgd": R.attack_accuracy(model, x_val, y_val, budgets=budget, steps=10),
            }

    torch.manual_seed(0)
    tower = R.ConvImageTower(R.ConvTowerConfig(width=32, upsample=2))
    model = R.RawInputModel(tower, ranges={"image": (0.0, 1.0)}, as_list=False)
    batches = R.make_batches(
        {"image": splits["train"]["image"]},
        splits["train"]["label"],
        batch_size=128,
        epochs=60,
        seed=0,
    )
    config = TrainConfig(
        max_steps=400,
        lr=3e-3,
        schedule="constant",
        grad_clip=None,
        weight_decay=5e-4,
        eval_every=40,
        progress=False,
        restore_best=False,
        device="cpu",
    )
    loss = R.AdversarialLoss(budgets=budget, method="fgsm", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is several times faster here
    try:
        rows = fit(model, batches, loss_fn=loss, config=config, evaluate_fn=robust_validation)
    finally:
        torch.set_num_threads(threads)
    pgd = [row["pgd"] for row in rows.evaluations()]
    fgsm = [row["fgsm"] for row in rows.evaluations()]
    assert max(pgd) - pgd[-1] >= 0.5 * max(pgd), pgd
    assert fgsm[-1] > 3 * pgd[-1], (fgsm, pgd)
