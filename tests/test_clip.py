"""The tiny CLIP: tokenizer, towers, the training loop and its bad-input errors."""

import pytest
import torch
import torch.nn.functional as F

from mmcourse.clip import (
    FeatureClip,
    FeatureClipConfig,
    PairBatches,
    TinyClip,
    TinyClipConfig,
    WordTokenizer,
    clip_recipe,
    duplicate_loss_floor,
    encode_images,
    encode_texts,
    record_logit_scale,
    zero_shot_scores,
)
from mmcourse.contrastive import (
    ClipLoss,
    PairObjective,
    SigLipLoss,
    clip_loss,
    multi_positive_clip_loss,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_predict,
)
from mmcourse.finetune import param_groups
from mmcourse.train import ShuffledBatches, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a red circle", "a blue square on the left", "a green cross", "a red square!"]


def tiny_config(vocab_size: int, **changes) -> TinyClipConfig:
    sizes = dict(
        embed_dim=16,
        image_size=16,
        patch_size=8,
        vision_dim=16,
        vision_layers=1,
        vision_heads=2,
        vocab_size=vocab_size,
        max_text_length=12,
        text_dim=16,
        text_layers=1,
        text_heads=2,
    )
    return TinyClipConfig(**{**sizes, **changes})


def train_pairs(model, images, text, *, steps, batch_size, loss=None, labels=None, **recipe):
    """CLIP training as the chapters run it: PairBatches + PairObjective through fit."""
    recipe = {"lr": 5e-3, "warmup_steps": 5, **recipe}
    result = fit(
        model,
        PairBatches(images, text, labels=labels, batch_size=batch_size),
        loss_fn=PairObjective(loss),
        config=clip_recipe(steps, **recipe),
        log_fn=record_logit_scale,
    )
    return [row["loss"] for row in result.history], [row["logit_scale"] for row in result.history]


def test_tokenizer_round_trip_and_padding():
    tok = WordTokenizer.from_texts(CAPTIONS)
    assert tok.id_to_token[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    batch = tok(["a red circle", "a blue square on the left"])
    assert batch["input_ids"].shape == (2, 8)  # [CLS] + 6 words + [SEP]
    assert batch["attention_mask"].tolist()[0] == [1] * 5 + [0] * 3
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    assert batch["input_ids"][0, 4] == tok.sep_token_id
    assert tok.decode(batch["input_ids"][1]) == "a blue square on the left"
    assert "!" in tok.token_to_id  # punctuation is its own token


def test_tokenizer_unknown_words_and_truncation():
    tok = WordTokenizer.from_texts(CAPTIONS)
    ids = tok(["a crimson circle"])["input_ids"][0]
    assert ids[2] == tok.unk_token_id
    assert tok.unknown_fraction(["a crimson disk", "a red circle"]) == pytest.approx(2 / 6)
    short = tok(["a blue square on the left"], max_length=4)["input_ids"][0]
    assert short.tolist() == [tok.cls_token_id, tok.token_to_id["a"], tok.token_to_id["blue"], 3]
    assert WordTokenizer.from_texts(["a a b"], min_count=2).id_to_token[5:] == ["a"]


def test_tokenizer_bad_input():
    tok = WordTokenizer.from_texts(CAPTIONS)
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)
    with pytest.raises(ValueError, match="string"):
        tok([3])
    with pytest.raises(ValueError, match="repeat"):
        WordTokenizer(["a", "a"])


def test_shapes_and_frozen_tower():
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(tiny_config(len(tok)))
    images = torch.rand(4, 3, 16, 16)
    image_embeds, text_embeds = model(images, tok(CAPTIONS))
    assert image_embeds.shape == text_embeds.shape == (4, 16)
    lit = TinyClip(tiny_config(0, text_tower="frozen", text_feature_dim=24))
    assert lit.text_encoder is None
    assert lit.encode_text(torch.randn(4, 24)).shape == (4, 16)
    assert encode_texts(lit, torch.randn(5, 24), batch_size=2).norm(dim=1).allclose(torch.ones(5))


def test_padding_does_not_change_the_text_embedding():
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(tiny_config(len(tok))).eval()
    alone = model.encode_text(tok(["a red circle"]))
    padded = model.encode_text(tok(["a red circle", "a blue square on the left"]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        TinyClipConfig()
    with pytest.raises(ValueError, match="text_tower"):
        TinyClipConfig(vocab_size=10, text_tower="bert")
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(tiny_config(len(tok)))
    with pytest.raises(ValueError, match="tokenizer's dict"):
        model.encode_text(torch.randn(2, 16))
    lit = TinyClip(tiny_config(0, text_tower="frozen", text_feature_dim=24))
    with pytest.raises(ValueError, match="text_feature_dim=24"):
        lit.encode_text(torch.randn(2, 10))
    with pytest.raises(ValueError, match="image batch"):
        model.encode_image(torch.rand(2, 16, 16, 3))
    with pytest.raises(ValueError, match="one caption per image"):
        PairBatches(torch.rand(3, 3, 16, 16), tok(CAPTIONS), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PairBatches(torch.rand(4, 3, 16, 16), tok(CAPTIONS), batch_size=8)
    with pytest.raises(ValueError, match="logit_scale_init"):
        tiny_config(len(tok), logit_scale_init=0.0)
    with pytest.raises(ValueError, match="logit bias"):  # SigLIP needs the model's bias
        PairObjective(SigLipLoss())(model, (torch.rand(4, 3, 16, 16), tok(CAPTIONS)))


def test_pair_batches_are_shuffled_batches_with_captions_trimmed():
    tok = WordTokenizer.from_texts(CAPTIONS)
    text, images, labels = tok(CAPTIONS * 3), torch.rand(12, 3, 16, 16), torch.arange(12)
    batches = list(PairBatches(images, text, labels=labels, batch_size=4, num_batches=5, seed=3))
    rows = ShuffledBatches(torch.arange(12), batch_size=4, num_batches=5, seed=3)
    assert len(batches) == 5
    for (batch_images, batch_text, batch_labels), (index,) in zip(batches, rows, strict=True):
        assert torch.equal(batch_labels, index) and torch.equal(batch_images, images[index])
        width = int(text["attention_mask"][index].sum(1).max())  # the longest caption
        assert torch.equal(batch_text["input_ids"], text["input_ids"][index, :width])
    features = torch.randn(12, 5)
    first = next(iter(PairBatches(images, features, batch_size=4, seed=3)))
    assert len(first) == 2 and torch.equal(first[1], features[next(iter(rows))[0]])


@pytest.mark.parametrize("loss_fn", [ClipLoss, SigLipLoss])
def test_overfits_one_batch(loss_fn):
    """Both losses train the towers; SigLIP, with its bias at -10 (tuned for 32k-pair
    batches), is slower on B = 8, so only the CLIP run is held to perfect retrieval."""
    torch.manual_seed(0)
    captions = [
        f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "cross", "star")
    ]
    tok = WordTokenizer.from_texts(captions)
    model = TinyClip(tiny_config(len(tok)))
    if loss_fn is SigLipLoss:  # the paper's initial scale and bias, owned by the model
        model = TinyClip(tiny_config(len(tok), logit_scale_init=10.0, logit_bias_init=-10.0))
    images = torch.rand(8, 3, 16, 16)
    losses, scales = train_pairs(
        model, images, tok(captions), steps=200, batch_size=8, loss=loss_fn()
    )
    assert losses[-1] < 0.2 * losses[0]
    assert len(scales) == 200 and scales[-1] != scales[0]
    if loss_fn is ClipLoss:
        similarity = encode_images(model, images) @ encode_texts(model, tok(captions)).T
        assert retrieval_metrics(similarity)["image_to_text_R@1"] == 1.0
    assert not model.training


def test_learned_scale_moves_and_frozen_scale_stays():
    captions = ["a red circle", "a blue square", "a green cross", "a cyan star"]
    tok = WordTokenizer.from_texts(captions)
    images = torch.rand(4, 3, 16, 16)
    model = TinyClip(tiny_config(len(tok), logit_scale_init=10.0))
    _, scales = train_pairs(model, images, tok(captions), steps=10, batch_size=4, warmup_steps=0)
    assert scales[-1] != pytest.approx(10.0)
    model = TinyClip(tiny_config(len(tok), logit_scale_init=10.0))
    model.logit_scale.log_scale.requires_grad_(False)  # a fixed temperature
    _, scales = train_pairs(model, images, tok(captions), steps=10, batch_size=4, warmup_steps=0)
    assert scales == pytest.approx([10.0] * 10)


def test_encoders_are_batched_consistently():
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(tiny_config(len(tok)))
    images = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(
        encode_images(model, images, batch_size=2),
        encode_images(model, images),
        atol=1e-5,
        rtol=1e-5,
    )
    direct = F.normalize(model.encode_text(tok(CAPTIONS)), dim=-1).detach()
    torch.testing.assert_close(
        encode_texts(model, tok(CAPTIONS), batch_size=3), direct, atol=1e-5, rtol=1e-5
    )


@pytest.mark.gpu
def test_trains_under_bf16_autocast_on_cuda():
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(tiny_config(len(tok)))
    losses, _ = train_pairs(
        model, torch.rand(4, 3, 16, 16), tok(CAPTIONS), steps=5, batch_size=4, device="cuda"
    )
    assert all(torch.isfinite(torch.tensor(losses)))


# --- chapter 06 additions: FeatureClip, zero-shot scores, repeated captions -------------------


def test_feature_clip_shapes_and_errors():
    tok = WordTokenizer.from_texts(CAPTIONS)
    bag = FeatureClip(FeatureClipConfig(image_feature_dim=10, vocab_size=len(tok), hidden_dim=8))
    image_embeds, text_embeds = bag(torch.randn(4, 10), tok(CAPTIONS))
    assert image_embeds.shape == text_embeds.shape == (4, 64)
    frozen = FeatureClip(FeatureClipConfig(image_feature_dim=10, text_feature_dim=6, embed_dim=5))
    assert frozen.encode_text(torch.randn(3, 6)).shape == (3, 5)
    assert encode_texts(frozen, torch.randn(5, 6), batch_size=2).norm(dim=1).allclose(torch.ones(5))
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        FeatureClipConfig(image_feature_dim=10)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        FeatureClipConfig(image_feature_dim=10, vocab_size=5, text_feature_dim=6)
    with pytest.raises(ValueError, match="image_feature_dim"):
        FeatureClipConfig(image_feature_dim=0, vocab_size=5)
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        bag.encode_image(torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="tokenizer's dict"):
        bag.encode_text(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        frozen.encode_text(tok(CAPTIONS))


def test_bag_of_words_ignores_padding_and_order():
    tok = WordTokenizer.from_texts(CAPTIONS)
    model = FeatureClip(FeatureClipConfig(image_feature_dim=3, vocab_size=len(tok))).eval()
    alone = model.encode_text(tok(["a red circle"]))
    padded = model.encode_text(tok(["a red circle", "a blue square on the left"]))[:1]
    swapped = model.encode_text(tok(["circle red a"]))
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, swapped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_kind", ["bag", "frozen"])
def test_feature_clip_overfits_one_batch(text_kind):
    torch.manual_seed(0)
    captions = [
        f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "cross", "star")
    ]
    tok = WordTokenizer.from_texts(captions)
    features = torch.randn(8, 12)
    if text_kind == "bag":
        config = FeatureClipConfig(image_feature_dim=12, vocab_size=len(tok), hidden_dim=32)
        text = tok(captions)
    else:
        config = FeatureClipConfig(image_feature_dim=12, text_feature_dim=7, hidden_dim=32)
        text = torch.randn(8, 7)
    model = FeatureClip(config)
    losses, _ = train_pairs(model, features, text, steps=150, batch_size=8)
    assert losses[-1] < 0.1 * losses[0]
    similarity = encode_images(model, features) @ encode_texts(model, text).T
    assert retrieval_metrics(similarity)["image_to_text_R@1"] == 1.0


def test_zero_shot_scores_mean_matches_the_package_classifier_and_max_is_brute_force():
    gen = torch.Generator().manual_seed(1)
    names, templates = ["circle", "square", "cross"], ["a {}", "a small {}", "a {} on the left"]
    table = {
        t.format(n): torch.randn(6, generator=gen) * (1 + 3 * torch.rand(1, generator=gen))
        for n in names
        for t in templates
    }
    encode = lambda texts: torch.stack([table[t] for t in texts])  # noqa: E731
    images = torch.randn(20, 6, generator=gen)
    prompts = encode([t.format(n) for n in names for t in templates]).reshape(3, 3, 6)
    mean = zero_shot_scores(images, prompts, ensemble="mean")
    classifier = zero_shot_classifier(names, templates, encode)
    torch.testing.assert_close(mean, F.normalize(images, dim=-1) @ classifier.T)
    assert torch.equal(mean.argmax(-1), zero_shot_predict(images, classifier))
    best = zero_shot_scores(images, prompts, ensemble="max")
    for n in range(20):
        for c in range(3):
            cosines = [F.cosine_similarity(images[n], prompts[c, t], dim=0) for t in range(3)]
            assert best[n, c] == pytest.approx(max(cosines).item(), abs=1e-5)
    with pytest.raises(ValueError, match="ensemble"):
        zero_shot_scores(images, prompts, ensemble="median")
    with pytest.raises(ValueError, match=r"\(C, T, E\)"):
        zero_shot_scores(images, prompts[:, 0])
    with pytest.raises(ValueError, match="width"):
        zero_shot_scores(images, prompts[..., :4])


def _multi_positive_loop(u, v, s, labels):
    """A brute-force loop over rows and columns, straight from the formula."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    B = len(labels)
    total = 0.0
    for i in range(B):
        positives = [j for j in range(B) if labels[j] == labels[i]]
        row = torch.stack([s * u[i] @ v[j] for j in range(B)])
        col = torch.stack([s * v[i] @ u[j] for j in range(B)])
        for j in positives:
            total = total - (row[j] - row.logsumexp(0)) / len(positives) / (2 * B)
            total = total - (col[j] - col.logsumexp(0)) / len(positives) / (2 * B)
    return total


def test_multi_positive_loss_equals_a_loop_and_clip_loss_in_value_and_gradient():
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(7, 5, generator=gen, requires_grad=True)
    v = torch.randn(7, 5, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    for lab in (labels, torch.arange(7)):
        ours = multi_positive_clip_loss(u, v, 12.0, lab)
        loop = _multi_positive_loop(u, v, 12.0, lab)
        torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
        for a, b in zip(
            torch.autograd.grad(ours, (u, v)), torch.autograd.grad(loop, (u, v)), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    distinct = multi_positive_clip_loss(u, v, 12.0, torch.arange(7))
    plain = clip_loss(u, v, 12.0)
    torch.testing.assert_close(distinct, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(
        torch.autograd.grad(distinct, (u, v)), torch.autograd.grad(plain, (u, v)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"labels of shape \(7,\)"):
        multi_positive_clip_loss(u, v, 12.0, labels[:3])
    with pytest.raises(ValueError, match="same shape"):
        multi_positive_clip_loss(u, v[:3], 12.0, labels)


def test_exact_repeats_only_shift_the_loss():
    """With identical captions (identical text embeddings), the identity-target loss equals
    the multi-positive loss, and is bounded below by mean log k."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 0, 2, 0, 1])
    text_bank = torch.randn(3, 4, generator=gen)
    v = text_bank[labels].clone().requires_grad_()
    u = torch.randn(6, 4, generator=gen, requires_grad=True)
    ours = clip_loss(u, v, 20.0)
    label_aware = multi_positive_clip_loss(u, v, 20.0, labels)
    torch.testing.assert_close(ours, label_aware, atol=1e-6, rtol=1e-6)
    gu, gv = torch.autograd.grad(ours, (u, v))
    mu, mv = torch.autograd.grad(label_aware, (u, v))
    torch.testing.assert_close(gu, mu, atol=1e-6, rtol=1e-6)
    summed = lambda g: torch.zeros(3, 4).index_add_(0, labels, g)  # noqa: E731
    torch.testing.assert_close(summed(gv), summed(mv), atol=1e-6, rtol=1e-6)
    floor = duplicate_loss_floor(labels)
    assert floor == pytest.approx(
        (3 * torch.log(torch.tensor(3.0)) + 2 * torch.log(torch.tensor(2.0))).item() / 6
    )
    assert ours.item() >= floor
    perfect = clip_loss(text_bank[labels], text_bank[labels] * 1.0, 100.0)  # aligned, sharp
    bank = F.normalize(torch.eye(3), dim=-1)[labels]  # orthogonal captions, perfectly aligned
    assert clip_loss(bank, bank, 100.0).item() == pytest.approx(floor, abs=1e-4)
    assert perfect.item() >= floor - 1e-6
    assert duplicate_loss_floor(torch.arange(5)) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        duplicate_loss_floor(torch.tensor([]))


def test_labels_reach_the_multi_positive_loss():
    torch.manual_seed(0)
    captions = ["a red circle", "a blue square", "a red circle", "a green cross"] * 2
    tok = WordTokenizer.from_texts(captions)
    labels = torch.tensor([0, 1, 0, 2] * 2)
    model = FeatureClip(FeatureClipConfig(image_feature_dim=6, vocab_size=len(tok), hidden_dim=16))
    features = torch.randn(3, 6)[labels] + 0.01 * torch.randn(8, 6)
    losses, scales = train_pairs(
        model, features, tok(captions), steps=100, batch_size=8, labels=labels
    )
    # the targets spread over k copies have entropy log k: the same floor as the CLIP loss
    assert losses[-1] < duplicate_loss_floor(labels) + 0.05 < losses[0]
    assert len(scales) == 100
    with pytest.raises(ValueError, match=r"labels of shape \(8,\)"):
        PairBatches(features, tok(captions), labels=labels[:3], batch_size=8)
    with pytest.raises(ValueError, match="world_size == 1"):
        ClipLoss(world_size=2, rank=0)(features, features, 1.0, labels)


def test_clip_recipe_and_the_model_owned_logit_scale():
    """CLIP's optimiser through fit: matrices decayed, biases, norms and the logit scale not;
    linear warm-up, then a cosine to 0; the scale is a weight of the model."""
    config = clip_recipe(14, lr=1.0, warmup_steps=4)
    assert (config.weight_decay, config.grad_clip, config.schedule) == (0.05, 1.0, "cosine")
    assert clip_recipe(5).warmup_steps == 5  # the warm-up never exceeds the run
    model = FeatureClip(FeatureClipConfig(image_feature_dim=4, text_feature_dim=3, hidden_dim=8))
    assert "logit_scale.log_scale" in model.state_dict() and model.logit_bias is None
    decay, no_decay = param_groups(model, config.weight_decay)
    assert any(p is model.logit_scale.log_scale for p in no_decay["params"])
    assert all(p.dim() >= 2 for p in decay["params"])
    result = fit(
        model,
        PairBatches(torch.randn(8, 4), torch.randn(8, 3), batch_size=4),
        loss_fn=PairObjective(),
        config=config,
    )
    lrs = [row["lr"] for row in result.history]
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # fit's warm-up, step / W
    assert lrs[9] == pytest.approx(0.5)  # the cosine, halfway
    siglip = FeatureClip(
        FeatureClipConfig(
            image_feature_dim=4, text_feature_dim=3, logit_scale_init=10.0, logit_bias_init=-10.0
        )
    )
    assert siglip.logit_scale().item() == pytest.approx(10.0)
    assert siglip.logit_bias.item() == -10.0 and siglip.logit_bias.requires_grad
