"""Every chapter's explorer draw function, headless, at a few settings of its knobs."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from mmcourse import plotting

matplotlib.use("Agg")


@pytest.fixture
def fig():
    """A figure outside pyplot, as mmcourse.widgets uses; no test may leave pyplot figures."""
    before = plt.get_fignums()
    figure = Figure(figsize=(8, 3))
    yield figure
    assert plt.get_fignums() == before


def titles(fig):
    return (
        " | ".join(ax.get_title() for ax in fig.axes)
        + " | "
        + (fig._suptitle.get_text() if fig._suptitle else "")
    )


def test_ch00_scenes_follow_seed_and_object_count(fig):
    for seed, n in [(0, 1), (3, 3)]:
        fig.clear()
        plotting.draw_shapes_scenes(fig, seed=seed, num_objects=n, num_scenes=3)
        assert len(fig.axes) == 3 and f"seed {seed}, {n} object(s)" in titles(fig)
        assert "Q: " in fig.axes[0].get_title() and "A: " in fig.axes[0].get_title()
    first = fig.axes[0].get_title()
    fig.clear()
    plotting.draw_shapes_scenes(fig, seed=3, num_objects=3, num_scenes=3)
    assert fig.axes[0].get_title() == first  # deterministic in the seed


def test_ch01_patch_size_and_mel_bands(fig):
    image = torch.rand(3, 32, 32)
    wave = torch.sin(torch.linspace(0, 400, 4000))
    for P, J in [(8, 10), (16, 40)]:
        fig.clear()
        plotting.draw_patches_and_mel(
            fig, image=image, patch_size=P, wave=wave, sample_rate=8000, n_mels=J
        )
        t = titles(fig)
        assert (
            f"L = {(32 // P) ** 2} tokens of P*P*C = {P * P * 3}" in t and f"J = {J} mel bands" in t
        )
        assert fig.axes[1].images[0].get_array().shape[0] == J


def test_ch04_attention_map_per_layer_and_head(fig):
    attentions = torch.rand(2, 3, 17, 17).softmax(-1)  # (L, H, T, T), a 4 x 4 grid + [CLS]
    for layer, head, query in [(0, 0, 0), (1, 2, 5)]:
        fig.clear()
        plotting.draw_attention_map(
            fig,
            image=torch.rand(3, 32, 32),
            attentions=attentions,
            layer=layer,
            head=head,
            query=query,
        )
        shown = fig.axes[1].images[0].get_array()
        np.testing.assert_allclose(
            shown.ravel(), attentions[layer, head, query, 1:].numpy(), rtol=1e-6
        )
        assert f"block {layer + 1}, head {head}" in titles(fig)
    with pytest.raises(ValueError, match="layer/head/query"):
        plotting.draw_attention_map(
            fig, image=torch.rand(3, 32, 32), attentions=attentions, layer=2, head=0
        )


def test_ch05_accuracy_bars(fig):
    plotting.draw_accuracy_bars(
        fig,
        accuracies={"early": 0.9, "late": 0.7},
        title="noise 1",
        references={"chance": 0.1},
        spread={"early": 0.02},
    )
    ax = fig.axes[0]
    assert [round(b.get_height(), 2) for b in ax.patches] == [0.9, 0.7]
    assert ax.get_title() == "noise 1"


def test_ch06_clip_batch_loss_matches_clip_loss(fig):
    from mmcourse.contrastive import clip_loss

    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    v = F.normalize(u + 0.3 * torch.randn(16, 8, generator=g), dim=-1)
    for B, tau in [(4, 0.07), (16, 1.0)]:
        fig.clear()
        plotting.draw_clip_batch(
            fig, image_embeds=u, text_embeds=v, batch_size=B, tau=tau, learned_tau=0.05
        )
        expected = clip_loss(u[:B], v[:B], torch.tensor(1 / tau)).item()
        assert f"B = {B}" in titles(fig) and f"CLIP loss {expected:.3f}" in titles(fig)
        assert fig.axes[0].images[0].get_array().shape == (B, B)
    with pytest.raises(ValueError, match="batch_size"):
        plotting.draw_clip_batch(fig, image_embeds=u, text_embeds=v, batch_size=17, tau=0.1)


def test_ch06_retrieval_shows_the_top_scores(fig):
    scores = torch.tensor([0.1, 0.9, 0.5, -0.2])
    plotting.draw_retrieval(
        fig, images=torch.rand(4, 3, 8, 8), scores=scores, query="a red circle", k=2
    )
    assert [ax.get_title() for ax in fig.axes] == ["0.90", "0.50"]


def test_ch07_hard_negatives_expectation(fig):
    sim = torch.tensor([[5.0, 4.0, 0.0], [0.0, 5.0, 4.0]])
    own = torch.tensor([0, 1])
    differing = torch.tensor([[0, 1, 2], [2, 0, 1]])
    for hard, T in [(True, 1.0), (True, 100.0), (False, 1.0)]:
        fig.clear()
        plotting.draw_hard_negatives(
            fig,
            similarity=sim,
            own=own,
            differing=differing,
            temperature=T,
            hard=hard,
            example_captions=["a", "b", "c"],
        )
        one_off = fig.axes[0].patches[0].get_height()
        if hard and T == 1.0:
            assert one_off == pytest.approx(torch.tensor([4.0, 0.0]).softmax(0)[0].item(), rel=1e-5)
        else:  # uniform over the two other captions
            assert one_off == pytest.approx(0.5, abs=0.01)


def test_ch07_bank_weights_are_what_the_sampler_draws():
    from mmcourse.pretraining import bank_negative_weights, sample_bank_negatives

    sim = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    own = torch.arange(64) % 10
    w = bank_negative_weights(sim, own, temperature=2.0)
    assert torch.allclose(w.sum(1), torch.ones(64)) and (w[torch.arange(64), own] == 0).all()
    drawn = sample_bank_negatives(
        sim, own, temperature=2.0, generator=torch.Generator().manual_seed(0)
    )
    again = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    assert torch.equal(drawn, again)


def test_ch09_soft_labels_soften_with_temperature(fig):
    logits = torch.tensor([4.0, 1.0, 0.0])
    heights = {}
    for T in (1.0, 8.0):
        fig.clear()
        plotting.draw_soft_labels(
            fig,
            logits=logits,
            true=0,
            names=["a", "b", "c"],
            temperature=T,
            measured={1.0: 0.6, 4.0: 0.7},
        )
        heights[T] = [b.get_height() for b in fig.axes[0].patches]
        np.testing.assert_allclose(heights[T], (logits / T).softmax(0).numpy(), rtol=1e-6)
    assert heights[8.0][0] < heights[1.0][0]


def test_ch15_logits_memory(fig):
    for G, W in [(4096, 8), (65536, 512)]:
        fig.clear()
        plotting.draw_logits_memory(fig, global_batch=G, world_size=W, device_gib=79.6)
        bars = [b.get_height() for b in fig.axes[0].patches]
        assert bars[0] == pytest.approx(G * G * 4 / 2**30) and bars[1] == pytest.approx(
            G // W * G * 4 / 2**30
        )
    with pytest.raises(ValueError, match="divisible"):
        plotting.draw_logits_memory(fig, global_batch=100, world_size=8)


def test_ch07_pool_restricts_the_draw(fig):
    sim = torch.tensor([[5.0, 4.0, 0.0, 3.0]])
    own = torch.tensor([0])
    differing = torch.tensor([[0, 1, 2, 3]])
    pool = torch.tensor([[True, False, True, True]])
    plotting.draw_hard_negatives(
        fig, similarity=sim, own=own, differing=differing, temperature=1.0, pool=pool
    )
    heights = [b.get_height() for b in fig.axes[0].patches[:3]]
    expected = torch.tensor([0.0, 3.0]).softmax(0)
    assert heights == pytest.approx([0.0, expected[0].item(), expected[1].item()], rel=1e-5)
    assert "pool of 3" in titles(fig)


def test_ch07_masking_curve(fig):
    for rate in (0.2, 0.8):
        fig.clear()
        plotting.draw_masking_curve(
            fig,
            rates=[0.2, 0.8],
            accuracies={"with image": [0.9, 0.7], "text only": [0.5, 0.2]},
            rate=rate,
            trained_at=0.4,
            example=[("true", "a red circle"), ("masked", "a [MASK] circle")],
        )
        assert [list(line.get_ydata()) for line in fig.axes[0].lines[:2]] == [
            [0.9, 0.7],
            [0.5, 0.2],
        ]
        assert f"p = {rate:g}" in titles(fig)


def test_ch08_trainable_parameters(fig):
    for r in (1, 16):
        fig.clear()
        counts = {"head": 100, "lora": 100 + r * 768, "full": 10**6}
        plotting.draw_trainable_parameters(
            fig,
            counts=counts,
            measured={"probe": (100, 0.8), "full": (10**6, 0.85)},
            highlight="lora",
        )
        widths = sorted(b.get_width() for b in fig.axes[0].patches)
        assert widths == sorted(counts.values())
        assert len(fig.axes[1].collections) == 2


def test_ch10_word_attention_one_panel_per_word(fig):
    image = torch.rand(3, 32, 32)
    weights = torch.softmax(torch.randn(5, 16), dim=1)
    plotting.draw_word_attention(
        fig, image=image, words=["a", "red", "circle"], weights=weights, grid=4, title="t"
    )
    assert len(fig.axes) == 4 and '"red"' in titles(fig) and "t" in titles(fig)
    heat = fig.axes[2].images[1].get_array()
    assert heat.shape == (4, 4) and np.allclose(heat.ravel(), weights[1].numpy())
    fig.clear()
    plotting.draw_word_attention(
        fig, image=image, words=["w"] * 20, weights=torch.rand(20, 16), grid=4
    )
    assert len(fig.axes) == 13  # the image and at most 12 words
    with pytest.raises(ValueError, match="grid"):
        plotting.draw_word_attention(
            fig, image=image, words=["a"], weights=torch.rand(1, 9), grid=4
        )


def test_ch14_retrieval_shows_labels_of_the_top_images(fig):
    images = torch.rand(10, 3, 8, 8)
    scores = torch.arange(10.0)
    labels = [f"item {i}" for i in range(10)]
    plotting.draw_retrieval(fig, images=images, scores=scores, query="q", k=3, labels=labels)
    assert [ax.get_title() for ax in fig.axes] == ["9.00\nitem 9", "8.00\nitem 8", "7.00\nitem 7"]
