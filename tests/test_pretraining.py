"""mmcourse.pretraining: BERT's masking, the MLM head and loss, the fusion encoder, ITM with
hard negatives - checked against transformers and torch, plus statistics and overfits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse.encoders import TextEncoder, TextEncoderConfig, ViTConfig, load_from_bert
from mmcourse.pretraining import (
    CrossAttentionBlock,
    CrossAttentionMatcher,
    ImageTextConfig,
    ImageTextEncoder,
    MlmHead,
    PretrainConfig,
    attribute_neighbours,
    bank_negative_weights,
    itm_loss,
    itm_pairs,
    itm_triplets,
    linear_probe_accuracy,
    load_from_torch_decoder_layer,
    mask_positions,
    mask_tokens,
    match_log_odds,
    match_probability,
    mlm_loss,
    predict_masked,
    pretrain,
    rerank,
    sample_bank_negatives,
    sample_negatives,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("a", "small", "large", "red", "blue", "green", "circle", "square", "on", "the", "left")
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
V = len(VOCAB)


def _batch(gen, B=6, N=9):
    """(B, N) captions: [CLS] words [SEP] [PAD]..., of varying length."""
    ids = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(3, N - 1, (1,), generator=gen))
        ids[b, 0], ids[b, n + 1] = 2, 3
        ids[b, 1 : n + 1] = torch.randint(5, V, (n,), generator=gen)
    return ids


# --- masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("probability", [0.15, 0.5])
def test_mask_tokens_equals_the_transformers_collator(seed, probability):
    from transformers import BertTokenizer, DataCollatorForLanguageModeling

    tokenizer = BertTokenizer(vocab=dict(VOCAB))
    assert len(tokenizer) == V and tokenizer.mask_token_id == 4
    ids = _batch(torch.Generator().manual_seed(seed + 100), B=8, N=10)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability, seed=seed)
    theirs = collator([{"input_ids": row} for row in ids])
    masked, labels = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=V,
        special_ids=tokenizer.all_special_ids,
        probability=probability,
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(masked, theirs["input_ids"])
    assert torch.equal(labels, theirs["labels"])


def test_mask_tokens_statistics_follow_80_10_10():
    gen = torch.Generator().manual_seed(0)
    B, N = 400, 60
    ids = torch.randint(5, V, (B, N), generator=gen)
    ids[:, 0], ids[:, -1], ids[:, -5:-1] = 2, 3, 0  # [CLS] ... [PAD] x4 [SEP]
    masked, labels = mask_tokens(
        ids, mask_token_id=4, vocab_size=V, special_ids=(0, 1, 2, 3, 4), generator=gen
    )
    special = (ids == 0) | (ids == 2) | (ids == 3)
    chosen = labels != -100
    assert not (chosen & special).any()  # specials (padding included) are never chosen
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens are untouched
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    rate = chosen.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (masked == 4) & chosen
    same = (masked == ids) & chosen
    other = chosen & ~to_mask & ~same
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # a random replacement equals the original with probability 1/V
    assert abs(other.sum().item() / n - 0.1 * (1 - 1 / V)) < 0.015
    assert abs(same.sum().item() / n - (0.1 + 0.1 / V)) < 0.015


def test_mask_tokens_is_reproducible_and_does_not_modify_its_input():
    ids = _batch(torch.Generator().manual_seed(3))
    before = ids.clone()
    a = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=V,
        special_ids=(0, 2, 3, 4),
        generator=torch.Generator().manual_seed(5),
    )
    b = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=V,
        special_ids=(0, 2, 3, 4),
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(ids, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": torch.zeros(2, 3)}, "integer dtype"),
        ({"input_ids": torch.zeros(6, dtype=torch.long)}, "shape (B, N)"),
        ({"mask_token_id": V}, "mask_token_id"),
        ({"special_ids": ()}, "special_ids"),
        ({"special_ids": (0, 2, 3)}, "include mask_token_id"),
        ({"probability": 1.5}, "probability"),
        ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "<= 1"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_mask_tokens_rejects_bad_inputs(kwargs, message):
    args = {
        "input_ids": torch.full((2, 4), 6),
        "mask_token_id": 4,
        "vocab_size": V,
        "special_ids": (0, 2, 3, 4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mask_tokens(args.pop("input_ids"), **args)


def test_mask_positions():
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 8, 3]])
    masked, labels = mask_positions(ids, torch.tensor([1, 2]), mask_token_id=4)
    assert masked.tolist() == [[2, 4, 6, 3], [2, 7, 4, 3]]
    assert labels.tolist() == [[-100, 5, -100, -100], [-100, -100, 8, -100]]
    with pytest.raises(ValueError, match="one position per row"):
        mask_positions(ids, torch.tensor([1]), mask_token_id=4)
    with pytest.raises(ValueError, match=r"in \[0, N=4\)"):
        mask_positions(ids, torch.tensor([1, 4]), mask_token_id=4)


# --- the MLM head and loss against transformers' BertForMaskedLM ---------------------------------


def _tiny_bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = BertForMaskedLM(config).eval()
    with torch.no_grad():  # a non-zero output bias, so that it is tested too
        hf.cls.predictions.bias.normal_()
    encoder = TextEncoder(
        TextEncoderConfig.from_bert_config(config, add_pooling_layer=False)
    ).eval()
    load_from_bert(encoder, hf.bert)
    head = MlmHead(dim=16, vocab_size=V, word_embeddings=encoder.embeddings.word_embeddings)
    theirs = hf.cls.predictions
    with torch.no_grad():
        head.dense.load_state_dict(theirs.transform.dense.state_dict())
        head.norm.load_state_dict(theirs.transform.LayerNorm.state_dict())
        head.decoder.bias.copy_(theirs.bias)
    return hf, encoder, head


def test_mlm_head_and_loss_equal_bert_for_masked_lm_in_value_and_gradient():
    hf, encoder, head = _tiny_bert_mlm()
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    assert head.decoder.weight is encoder.embeddings.word_embeddings.weight  # tied
    ids = _batch(torch.Generator().manual_seed(1))
    attention = (ids != 0).long()
    masked, labels = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=V,
        special_ids=(0, 1, 2, 3, 4),
        probability=0.4,
        generator=torch.Generator().manual_seed(2),
    )
    out = hf(input_ids=masked, attention_mask=attention, labels=labels)
    logits = head(encoder(masked, attention).last_hidden_state)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    loss = mlm_loss(logits, labels)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    loss.backward()
    pairs = [
        (encoder.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight),
        (head.dense.weight, hf.cls.predictions.transform.dense.weight),
        (head.decoder.bias, hf.cls.predictions.bias),
        (
            encoder.blocks[0].self_attn.q_proj.weight,
            hf.bert.encoder.layer[0].attention.self.query.weight,
        ),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_mlm_loss_counts_masked_positions_only():
    logits = torch.randn(2, 3, V)
    labels = torch.tensor([[-100, 5, -100], [7, -100, -100]])
    expected = (
        F.cross_entropy(logits[0, 1:2], labels[0, 1:2])
        + F.cross_entropy(logits[1, :1], labels[1, :1])
    ) / 2
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="no masked position"):
        mlm_loss(logits, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match=r"logits \(B, N, V\) and labels \(B, N\)"):
        mlm_loss(logits, labels[:, :2])


def test_mlm_head_checks_the_tied_table():
    with pytest.raises(ValueError, match="to be tied"):
        MlmHead(dim=8, vocab_size=V, word_embeddings=nn.Embedding(V, 16))


# --- the fusion block against nn.TransformerDecoderLayer ---------------------------------------


def test_cross_attention_block_equals_torch_decoder_layer_in_value_and_gradient():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(
        d_model=16,
        nhead=2,
        dim_feedforward=32,
        dropout=0.0,
        activation="gelu",
        layer_norm_eps=1e-12,
        batch_first=True,
        norm_first=False,
    )
    block = CrossAttentionBlock(dim=16, num_heads=2, hidden_dim=32)
    load_from_torch_decoder_layer(block, layer)
    x = torch.randn(3, 5, 16, requires_grad=True)
    image = torch.randn(3, 7, 16, requires_grad=True)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    theirs = layer(x, image, tgt_key_padding_mask=pad)
    ours, _ = block(x, image, key_padding_mask=pad)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ours)
    ga = torch.autograd.grad(theirs, (x, image, layer.multihead_attn.in_proj_weight), g)
    gb = torch.autograd.grad(ours, (x, image, block.multihead_attn.q_proj.weight), g)
    torch.testing.assert_close(gb[0], ga[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb[1], ga[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb[2], ga[2][:16], atol=1e-5, rtol=1e-4)  # W^Q rows


def test_load_from_torch_decoder_layer_refuses_a_pre_norm_layer():
    layer = nn.TransformerDecoderLayer(
        16, 2, 32, 0.0, "gelu", 1e-12, batch_first=True, norm_first=True
    )
    with pytest.raises(ValueError, match="norm_first"):
        load_from_torch_decoder_layer(
            CrossAttentionBlock(dim=16, num_heads=2, hidden_dim=32), layer
        )


# --- the model ---------------------------------------------------------------------------------


def _model(**kwargs):
    torch.manual_seed(0)
    config = dict(
        vocab_size=V, max_text_length=12, image_dim=8, dim=16, num_heads=2, fusion_layers=1
    )
    config.update(kwargs)
    return ImageTextEncoder(ImageTextConfig(**config))


def test_image_text_encoder_shapes():
    model = _model()
    ids = _batch(torch.Generator().manual_seed(0), B=4, N=9)
    image = torch.randn(4, 5, 8)
    states, maps = model.fused(image, ids, (ids != 0).long(), output_attentions=True)
    assert states.shape == (4, 9, 16) and maps[0].shape == (4, 2, 9, 5)
    assert model.itm_logits(image, ids).shape == (4, 2)
    assert model.mlm_logits(image, ids).shape == (4, 9, V)
    text_only = _model(use_image=False)
    assert text_only.mlm_logits(None, ids).shape == (4, 9, V)
    vision = ViTConfig(image_size=16, patch_size=8, dim=8, num_layers=1, num_heads=2)
    with_tower = _model(vision=vision)
    assert with_tower.itm_logits(torch.rand(4, 3, 16, 16), ids).shape == (4, 2)


def test_image_text_encoder_rejects_bad_inputs():
    model = _model()
    ids = torch.tensor([[2, 5, 3]])
    with pytest.raises(ValueError, match="pass the images"):
        model.itm_logits(None, ids)
    with pytest.raises(ValueError, match=r"\(B, M, K=8\)"):
        model.itm_logits(torch.randn(1, 5, 7), ids)
    with pytest.raises(ValueError, match="one image per caption"):
        model.itm_logits(torch.randn(2, 5, 8), ids)
    with pytest.raises(ValueError, match="vocab_size"):
        ImageTextConfig()
    with pytest.raises(ValueError, match="must divide"):
        ImageTextConfig(vocab_size=V, dim=10, num_heads=4)
    with pytest.raises(ValueError, match="vision.dim"):
        ImageTextConfig(
            vocab_size=V,
            image_dim=8,
            vision=ViTConfig(image_size=16, patch_size=8, dim=16, num_layers=1, num_heads=2),
        )


# --- hard negatives ----------------------------------------------------------------------------


def test_negatives_are_never_positives_nor_identical_captions():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    for hard in (True, False):
        for _ in range(50):
            sim = torch.randn(8, 8, generator=gen) * 5
            sim += 10 * torch.eye(8)  # the positive is the most similar: must still be excluded
            t4i, i4t = sample_negatives(sim, ids=ids, hard=hard, generator=gen)
            assert (ids[t4i] != ids).all() and (ids[i4t] != ids).all()
    t4i, i4t = sample_negatives(torch.randn(5, 5), generator=gen)
    assert (t4i != torch.arange(5)).all() and (i4t != torch.arange(5)).all()


def test_hard_negatives_follow_the_softmax_of_the_similarity():
    sim = torch.tensor(
        [[9.0, 2.0, 1.0, 0.0], [0.0, 9.0, 0.0, 3.0], [1.0, 1.0, 9.0, 1.0], [0.0, 2.0, 4.0, 9.0]]
    )
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_negatives(sim, generator=gen)[0] for _ in range(4000)])  # (T, B)
    for i in range(4):
        expected = sim[i].masked_fill(torch.arange(4) == i, float("-inf")).softmax(0)
        freq = torch.bincount(draws[:, i], minlength=4).float() / len(draws)
        assert torch.allclose(freq, expected, atol=0.03), (i, freq, expected)
    # column direction: image j for text i
    draws_t = torch.stack([sample_negatives(sim, generator=gen)[1] for _ in range(4000)])
    expected = sim[:, 3].masked_fill(torch.arange(4) == 3, float("-inf")).softmax(0)
    freq = torch.bincount(draws_t[:, 3], minlength=4).float() / len(draws_t)
    assert torch.allclose(freq, expected, atol=0.03)
    # random negatives are uniform over the other pairs
    draws_r = torch.stack(
        [sample_negatives(sim, hard=False, generator=gen)[0] for _ in range(3000)]
    )
    freq = torch.bincount(draws_r[:, 0], minlength=4).float() / len(draws_r)
    assert torch.allclose(freq, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3]), atol=0.03)


def test_temperature_tempers_the_hard_negative_draw():
    sim = torch.tensor([[9.0, 6.0, 1.0, 0.0], [0.0, 9.0, 0.0, 3.0], [1.0, 1.0, 9.0, 1.0]])
    sim = torch.cat([sim, torch.tensor([[0.0, 2.0, 4.0, 9.0]])])
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack(
        [sample_negatives(sim, temperature=3.0, generator=gen)[0] for _ in range(4000)]
    )
    expected = (sim[0] / 3).masked_fill(torch.arange(4) == 0, float("-inf")).softmax(0)
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    sharp = (sim[0]).masked_fill(torch.arange(4) == 0, float("-inf")).softmax(0)
    assert expected.max() < sharp.max()  # T > 1 flattens the draw
    with pytest.raises(ValueError, match="temperature"):
        sample_negatives(sim, temperature=0.0)


def test_bank_negatives_exclude_the_own_caption_and_follow_the_tempered_softmax():
    gen = torch.Generator().manual_seed(4)
    sim = torch.randn(3, 6, generator=gen) * 3
    own = torch.tensor([0, 4, 4])
    sim[torch.arange(3), own] = 20.0  # the own caption is the most similar: still never drawn
    draws = torch.stack(
        [sample_bank_negatives(sim, own, temperature=2.0, generator=gen) for _ in range(4000)]
    )  # (T, B)
    assert (draws != own).all()
    for i in range(3):
        expected = (sim[i] / 2).masked_fill(torch.arange(6) == own[i], float("-inf")).softmax(0)
        freq = torch.bincount(draws[:, i], minlength=6).float() / len(draws)
        assert torch.allclose(freq, expected, atol=0.03), (i, freq, expected)
    uniform = torch.stack(
        [sample_bank_negatives(sim, own, hard=False, generator=gen) for _ in range(3000)]
    )
    freq = torch.bincount(uniform[:, 0], minlength=6).float() / len(uniform)
    assert torch.allclose(freq, torch.tensor([0.0] + [0.2] * 5), atol=0.03)
    with pytest.raises(ValueError, match="own of shape"):
        sample_bank_negatives(sim, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index the bank"):
        sample_bank_negatives(sim, torch.tensor([0, 1, 6]))
    with pytest.raises(ValueError, match="C >= 2"):
        sample_bank_negatives(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))


def test_sample_negatives_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        sample_negatives(torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(torch.randn(1, 1))
    with pytest.raises(ValueError, match=r"ids of shape \(3,\)"):
        sample_negatives(torch.randn(3, 3), ids=torch.zeros(4))
    with pytest.raises(ValueError, match="no negative candidate"):
        sample_negatives(torch.randn(3, 3), ids=torch.tensor([5, 5, 5]))


def test_itm_triplets_and_loss():
    image_index, text_index, labels = itm_triplets(torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    assert image_index.tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1]
    assert text_index.tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    logits = torch.randn(9, 2, requires_grad=True)
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        itm_loss(torch.randn(9, 3), labels)
    with pytest.raises(ValueError, match="0 \\(no match\\) or 1"):
        itm_loss(logits, labels + 1)
    with pytest.raises(ValueError, match="labels of shape"):
        itm_loss(logits, labels[:4])


def test_itm_loss_weights_the_positives():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 2, generator=gen, requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    w = torch.where(labels == 1, 2.0, 1.0)
    by_hand = (w * per_pair).sum() / w.sum()
    ours = itm_loss(logits, labels, positive_weight=2.0)
    torch.testing.assert_close(ours, by_hand)
    g_ours = torch.autograd.grad(ours, logits)[0]
    g_hand = torch.autograd.grad(by_hand, logits)[0]
    torch.testing.assert_close(g_ours, g_hand)
    # a pair-blind model: unweighted, the best constant is p = 1/3 (loss H(1/3));
    # with positives weighted 2, it is p = 1/2 (loss ln 2)
    blind = torch.zeros(9, 2)
    torch.testing.assert_close(
        itm_loss(blind, labels, positive_weight=2.0), torch.tensor(0.6931), atol=1e-4, rtol=0
    )
    third = torch.tensor([[0.0, -0.6931]]).expand(9, 2)  # p(match) = 1/3
    torch.testing.assert_close(itm_loss(third, labels), torch.tensor(0.6365), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="positive_weight"):
        itm_loss(blind, labels, positive_weight=0.0)


def test_match_log_odds_and_rerank():
    model = _model()
    gen = torch.Generator().manual_seed(6)
    ids = _batch(gen, B=5, N=9)
    attention = (ids != 0).long()
    image = torch.randn(5, 5, 8, generator=gen)
    logits = model.itm_logits(image, ids, attention).detach()
    torch.testing.assert_close(
        match_log_odds(model, image, ids, attention), logits[:, 1] - logits[:, 0]
    )
    p = match_probability(model, image, ids, attention)
    torch.testing.assert_close(
        match_log_odds(model, image, ids, attention), torch.log(p / (1 - p)), atol=1e-4, rtol=0
    )
    itc = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.2, 0.3, 0.8, 0.7]])
    itm = torch.tensor([[0.0, 1.0, 5.0, 9.0], [3.0, 0.0, 0.0, 0.5]])
    assert rerank(itc, itm, k=2).tolist() == [1, 3]  # ITM alone, within ITC's top-2
    assert rerank(itc, itm, k=1).tolist() == [0, 2]  # k = 1 is ITC's own choice
    assert rerank(itc, itm, k=2, itc_weight=10.0).tolist() == [0, 2]  # fused: 9 > 6, 8 > 7.5
    top = itc.topk(3, dim=1).indices
    assert torch.equal(rerank(itc, itm.gather(1, top), k=3), rerank(itc, itm, k=3))
    with pytest.raises(ValueError, match="itm_scores must be"):
        rerank(itc, itm[:, :3], k=2)
    with pytest.raises(ValueError, match="larger than"):
        rerank(itc, itm, k=5)


# --- one-batch overfits and the training loop --------------------------------------------------


def test_mlm_model_overfits_one_batch():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    ids = _batch(gen, B=8, N=9)
    attention = (ids != 0).long()
    image = torch.randn(8, 5, 8, generator=gen)
    masked, labels = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=V,
        special_ids=(0, 1, 2, 3, 4),
        probability=0.3,
        generator=gen,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = mlm_loss(model.mlm_logits(image, masked, attention), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    pred = predict_masked(model, image, masked, attention)
    assert torch.equal(pred[labels != -100], labels[labels != -100])


def test_itm_model_overfits_one_batch():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    ids = _batch(gen, B=8, N=9)
    attention = (ids != 0).long()
    image = torch.randn(8, 5, 8, generator=gen)
    t4i, i4t = sample_negatives(torch.randn(8, 8, generator=gen), generator=gen)
    image_index, text_index, labels = itm_triplets(t4i, i4t)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        logits = model.itm_logits(image[image_index], ids[text_index], attention[text_index])
        loss = itm_loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    p = match_probability(model, image[image_index], ids[text_index], attention[text_index])
    assert torch.equal((p > 0.5).long(), labels)


def test_pretrain_runs_both_objectives_and_checks_its_inputs():
    model = _model()
    gen = torch.Generator().manual_seed(2)
    ids = _batch(gen, B=16, N=9)
    attention = (ids != 0).long()
    image = torch.randn(16, 5, 8, generator=gen)
    embeds = F.normalize(torch.randn(16, 4, generator=gen), dim=-1)
    config = PretrainConfig(objectives=("mlm", "itm"), steps=3, batch_size=8, progress=False)
    history = pretrain(
        model,
        image_tokens=image,
        input_ids=ids,
        attention_mask=attention,
        config=config,
        similarity_embeds=(embeds, embeds, 10.0),
        caption_ids=torch.arange(16),
    )
    assert len(history.loss["itm"]) == 3 and not model.training
    bank_ids = _batch(gen, B=5, N=11)  # a bank with longer captions than the batch
    bank = (bank_ids, (bank_ids != 0).long(), F.normalize(torch.randn(5, 4, generator=gen), dim=-1))
    banked = PretrainConfig(
        objectives=("itm",),
        steps=2,
        batch_size=8,
        temperature=3.0,
        positive_weight=2.0,
        progress=False,
    )
    history = pretrain(
        model,
        image_tokens=image,
        input_ids=ids,
        attention_mask=attention,
        config=banked,
        similarity_embeds=(embeds, embeds, 10.0),
        caption_ids=torch.arange(16) % 5,
        caption_bank=bank,
    )
    assert len(history.loss["itm"]) == 2
    with pytest.raises(ValueError, match="index the bank"):
        pretrain(
            model,
            image_tokens=image,
            input_ids=ids,
            attention_mask=attention,
            config=banked,
            similarity_embeds=(embeds, embeds, 10.0),
            caption_ids=torch.arange(16),
            caption_bank=bank,
        )
    with pytest.raises(ValueError, match="temperature"):
        PretrainConfig(temperature=0.0)
    with pytest.raises(ValueError, match="similarity_embeds"):
        pretrain(model, image_tokens=image, input_ids=ids, attention_mask=attention, config=config)
    with pytest.raises(ValueError, match="larger than"):
        pretrain(
            model,
            image_tokens=image,
            input_ids=ids,
            attention_mask=attention,
            config=PretrainConfig(batch_size=32, progress=False),
        )
    with pytest.raises(ValueError, match="objective"):
        PretrainConfig(objectives=("itc",))
    with pytest.raises(ValueError, match="negatives"):
        PretrainConfig(negatives="semi-hard")


def test_linear_probe_accuracy():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=gen)
    x = F.one_hot(y, 3).float() * 3 + 0.1 * torch.randn(200, 3, generator=gen)
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) == 1.0
    with pytest.raises(ValueError, match="single class"):
        linear_probe_accuracy(x[:10], torch.zeros(10), x, y)
    with pytest.raises(ValueError, match="same F"):
        linear_probe_accuracy(x, y, x[:, :2], y)


# --- one-attribute negatives and the cheap ITM head (section 6b) -------------------------------


def test_attribute_neighbours_matches_a_loop():
    codes = torch.randint(0, 3, (12, 4), generator=torch.Generator().manual_seed(0))
    got = attribute_neighbours(codes)
    for i in range(12):
        for j in range(12):
            assert got[i, j] == (
                sum(int(a != b) for a, b in zip(codes[i], codes[j], strict=True)) == 1
            )
    assert not got.diagonal().any()
    with pytest.raises(ValueError, match="integer codes"):
        attribute_neighbours(codes.float())


def test_bank_negatives_stay_inside_the_allowed_pool():
    similarity = torch.randn(6, 10)
    own = torch.arange(6)
    allowed = torch.zeros(6, 10, dtype=torch.bool)
    allowed[:, 7:] = True
    for hard in (True, False):
        drawn = sample_bank_negatives(
            similarity, own, hard=hard, allowed=allowed, generator=torch.Generator().manual_seed(1)
        )
        assert (drawn >= 7).all()
    with pytest.raises(ValueError, match="no allowed negative"):
        bank_negative_weights(similarity, own, allowed=F.one_hot(own, 10).bool())
    with pytest.raises(ValueError, match="bool mask"):
        bank_negative_weights(similarity, own, allowed=allowed[:, :5])


def test_itm_pairs_are_balanced_and_never_a_false_negative():
    own = torch.tensor([0, 1, 2, 1])
    weights = bank_negative_weights(torch.randn(4, 5), own, hard=False)
    images, captions, labels = itm_pairs(
        weights, own, epochs=3, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == captions.shape == labels.shape == (24,)
    assert labels.sum() == 12
    assert (captions[labels == 1] == own[images[labels == 1]]).all()
    assert (captions[labels == 0] != own[images[labels == 0]]).all()
    with pytest.raises(ValueError, match="own caption"):
        itm_pairs(torch.ones(4, 5), own)


def test_cross_attention_matcher_shapes_and_learns_one_batch():
    from mmcourse.train import TrainConfig, fit

    torch.manual_seed(0)
    head = CrossAttentionMatcher(dim=16, image_dim=8, num_heads=2)
    states, tokens = torch.randn(8, 5, 16), torch.randn(8, 3, 8)
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 4] = 0
    assert head(states, tokens, mask).shape == (8, 2)
    labels = torch.tensor([0, 1] * 4)
    result = fit(
        head,
        [(states, tokens, mask, labels)],
        loss_fn=lambda m, b: F.cross_entropy(m(b[0], b[1], b[2]), b[3]),
        config=TrainConfig(max_steps=60, lr=1e-2, progress=False, device="cpu", eval_every=60),
    )
    assert result.history[-1]["loss"] < 0.1
    with pytest.raises(ValueError, match="one image per caption"):
        head(states, tokens[:3], mask)


def test_pretrain_draws_itm_negatives_from_the_pool():
    P, C = 8, 5
    model = ImageTextEncoder(ImageTextConfig(vocab_size=12, image_dim=8, dim=16, num_heads=2))
    ids = torch.randint(5, 12, (P, 4))
    mask = torch.ones_like(ids)
    own = torch.arange(P) % C
    bank = (torch.randint(5, 12, (C, 4)), torch.ones(C, 4, dtype=torch.long), torch.randn(C, 6))
    embeds = (F.normalize(torch.randn(P, 6), dim=-1), F.normalize(torch.randn(P, 6), dim=-1), 10.0)
    pool = ~torch.eye(C, dtype=torch.bool)
    config = PretrainConfig(objectives=("itm",), steps=2, batch_size=4, progress=False)
    kwargs = dict(
        image_tokens=torch.randn(P, 3, 8), input_ids=ids, attention_mask=mask, config=config
    )
    history = pretrain(
        model,
        **kwargs,
        similarity_embeds=embeds,
        caption_ids=own,
        caption_bank=bank,
        negative_pool=pool,
    )
    assert len(history.loss["itm"]) == 2
    with pytest.raises(ValueError, match="negative_pool must be"):
        pretrain(
            model,
            **kwargs,
            similarity_embeds=embeds,
            caption_ids=own,
            caption_bank=bank,
            negative_pool=pool[:, :3],
        )
    with pytest.raises(ValueError, match="pass caption_bank"):
        pretrain(model, **kwargs, similarity_embeds=embeds, caption_ids=own, negative_pool=pool)
