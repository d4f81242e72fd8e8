"""The tiny CLIP: tokenizer, towers, the training loop and its bad-input errors."""

import pytest
import torch
import torch.nn.functional as F

from mmcourse.clip import (
    ClipTrainConfig,
    TinyClip,
    TinyClipConfig,
    WordTokenizer,
    encode_images,
    encode_texts,
    train_clip,
)
from mmcourse.contrastive import ClipLoss, SigLipLoss, retrieval_metrics

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
    with pytest.raises(ValueError, match="steps"):
        ClipTrainConfig(steps=0)
    with pytest.raises(ValueError, match="one caption per image"):
        train_clip(model, ClipLoss(), torch.rand(3, 3, 16, 16), tok(CAPTIONS))
    with pytest.raises(ValueError, match="batch_size"):
        train_clip(
            model,
            ClipLoss(),
            torch.rand(4, 3, 16, 16),
            tok(CAPTIONS),
            config=ClipTrainConfig(batch_size=8),
        )


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
    images = torch.rand(8, 3, 16, 16)
    loss = loss_fn()
    config = ClipTrainConfig(steps=200, batch_size=8, lr=5e-3, warmup_steps=5, progress=False)
    history = train_clip(model, loss, images, tok(captions), config=config)
    assert history.loss[-1] < 0.2 * history.loss[0]
    assert len(history.logit_scale) == 200 and history.pairs_per_second > 0
    if loss_fn is ClipLoss:
        similarity = encode_images(model, images) @ encode_texts(model, tok(captions)).T
        assert retrieval_metrics(similarity)["image_to_text_R@1"] == 1.0
    assert not model.training


def test_learned_scale_moves_and_frozen_scale_stays():
    captions = ["a red circle", "a blue square", "a green cross", "a cyan star"]
    tok = WordTokenizer.from_texts(captions)
    images = torch.rand(4, 3, 16, 16)
    config = ClipTrainConfig(steps=10, batch_size=4, warmup_steps=0, progress=False)
    learned = ClipLoss(init_scale=10.0)
    history = train_clip(
        TinyClip(tiny_config(len(tok))), learned, images, tok(captions), config=config
    )
    assert history.logit_scale[-1] != pytest.approx(10.0)
    fixed = ClipLoss(init_scale=10.0)
    fixed.logit_scale.log_scale.requires_grad_(False)
    history = train_clip(
        TinyClip(tiny_config(len(tok))), fixed, images, tok(captions), config=config
    )
    assert history.logit_scale == pytest.approx([10.0] * 10)


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
    config = ClipTrainConfig(steps=5, batch_size=4, progress=False)
    history = train_clip(
        model, ClipLoss(), torch.rand(4, 3, 16, 16), tok(CAPTIONS), config=config, device="cuda"
    )
    assert all(torch.isfinite(torch.tensor(history.loss)))
