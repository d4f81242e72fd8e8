"""Transformer encoders of chapter 04: the block equals torch's, the text tower equals BERT."""

import os

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmcourse.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    EncoderOutput,
    FeedForward,
    TextEncoder,
    TextEncoderConfig,
    TransformerBlock,
    ViTConfig,
    ViTEncoder,
    bert_weight_map,
    count_parameters,
    load_from_bert,
    load_from_torch_layer,
)
from mmcourse.modalities import patchify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ATOL = 1e-5  # float32, as CONTRIBUTING asks
TINY_BERT = dict(
    vocab_size=99,
    max_position_embeddings=24,
    type_vocab_size=2,
    dim=32,
    num_layers=2,
    num_heads=4,
    hidden_dim=48,
)
MINILM = dict(  # all-MiniLM-L6-v2
    vocab_size=30522,
    max_position_embeddings=512,
    type_vocab_size=2,
    dim=384,
    num_layers=6,
    num_heads=12,
    hidden_dim=1536,
)


# Tiny models: one CPU thread is fastest (and does not fight other processes for cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_vit(**kw) -> ViTConfig:
    return ViTConfig(**{"image_size": 16, "patch_size": 4, "dim": 32, "num_layers": 2, **kw})


def _tiny_audio(**kw) -> AudioEncoderConfig:
    base = {"n_mels": 8, "max_frames": 12, "dim": 16, "num_layers": 2, "num_heads": 2}
    return AudioEncoderConfig(**{**base, **kw})


def _bert(config: TextEncoderConfig, **kw):
    from transformers import BertModel

    bert_config = config.to_bert_config()
    bert_config._attn_implementation = "eager"  # returns attention weights
    return BertModel(bert_config, **kw)


# --- the block against nn.TransformerEncoderLayer ----------------------------------------


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_block_equals_torch_layer_in_value_and_gradient(norm_first, padded, activation):
    torch.manual_seed(0)
    D, H, F_, B, N = 16, 4, 40, 3, 7
    layer = nn.TransformerEncoderLayer(
        D, H, F_, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    block = TransformerBlock(
        dim=D, num_heads=H, hidden_dim=F_, dropout=0.1, norm_first=norm_first,
        activation=activation, layer_norm_eps=1e-5,
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped norm shows
        for p in (layer.norm1.weight, layer.norm2.weight, layer.norm1.bias, layer.norm2.bias):
            p.add_(0.3 * torch.randn_like(p))
    load_from_torch_layer(block, layer)
    mask = None
    if padded:
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask[0, 5:] = True
        mask[2, 3:] = True
    x = torch.randn(B, N, D)
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, _ = block(x_ours, key_padding_mask=mask)
    theirs = layer(x_torch, src_key_padding_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_torch.grad, atol=ATOL, rtol=0)
    w_q = layer.self_attn.in_proj_weight.grad[:D]
    torch.testing.assert_close(block.self_attn.q_proj.weight.grad, w_q, atol=ATOL, rtol=0)
    w_v = layer.self_attn.in_proj_weight.grad[2 * D :]
    torch.testing.assert_close(block.self_attn.v_proj.weight.grad, w_v, atol=ATOL, rtol=0)
    for ours_p, theirs_p in [
        (block.ffn.linear1.weight, layer.linear1.weight),
        (block.ffn.linear2.bias, layer.linear2.bias),
        (block.norm1.weight, layer.norm1.weight),
        (block.norm2.bias, layer.norm2.bias),
        (block.self_attn.out_proj.weight, layer.self_attn.out_proj.weight),
    ]:
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=ATOL, rtol=0)


def test_block_attention_weights_are_per_head_and_ignore_padding():
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, num_heads=4, norm_first=True).eval()
    mask = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    out, weights = block(torch.randn(2, 7, 16), key_padding_mask=mask, need_weights=True)
    assert out.shape == (2, 7, 16) and weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert weights[0, :, :, 5:].abs().max() == 0
    assert block(torch.randn(2, 7, 16))[1] is None


def test_feed_forward_is_the_formula():
    torch.manual_seed(0)
    ffn = FeedForward(dim=6, hidden_dim=10)
    x = torch.randn(2, 3, 6)
    W1, b1, W2, b2 = ffn.linear1.weight, ffn.linear1.bias, ffn.linear2.weight, ffn.linear2.bias
    expected = F.gelu(x @ W1.T + b1) @ W2.T + b2  # FFN(x) = W2 GELU(W1 x + b1) + b2
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"norm_first": True}, "norm_first=False, the block True"),
        ({"layer_norm_eps": 1e-12}, "layer_norm_eps=1e-05"),
        ({"activation": "relu"}, "uses gelu, the block relu"),
        ({"hidden_dim": 20}, "FFN width=40, the block 20"),
    ],
)
def test_load_from_torch_layer_refuses_a_different_layer(change, match):
    layer = nn.TransformerEncoderLayer(16, 4, 40, activation="gelu", batch_first=True)
    kwargs = {"dim": 16, "num_heads": 4, "hidden_dim": 40, "norm_first": False, **change}
    with pytest.raises(ValueError, match=match):
        load_from_torch_layer(TransformerBlock(**kwargs), layer)


# --- the text tower against transformers.BertModel ---------------------------------------


@pytest.mark.parametrize("sizes", [TINY_BERT, MINILM], ids=["tiny", "minilm"])
@pytest.mark.parametrize("pooler", [True, False], ids=["pooler", "no-pooler"])
def test_text_encoder_has_the_parameter_count_of_bert(sizes, pooler):
    config = TextEncoderConfig(**sizes, add_pooling_layer=pooler)
    with torch.device("meta"):  # shapes only: no memory, no time
        ours = TextEncoder(config)
        bert = _bert(config, add_pooling_layer=pooler)
    assert count_parameters(ours) == count_parameters(bert)
    if sizes is MINILM and pooler:
        assert count_parameters(ours) == 22_713_216  # all-MiniLM-L6-v2's published size


def test_text_encoder_structure_corresponds_to_bert_one_to_one():
    config = TextEncoderConfig(**TINY_BERT)
    with torch.device("meta"):
        ours = dict(TextEncoder(config).named_parameters())
        theirs = dict(_bert(config).named_parameters())
    mapping = bert_weight_map(config)
    assert set(mapping) == set(ours)
    assert sorted(mapping.values()) == sorted(theirs)  # every BERT parameter exactly once
    for name, bert_name in mapping.items():
        assert ours[name].shape == theirs[bert_name].shape, name


def test_text_encoder_config_round_trips_through_bert_config():
    config = TextEncoderConfig(**TINY_BERT, dropout=0.2, attention_dropout=0.05)
    assert TextEncoderConfig.from_bert_config(config.to_bert_config()) == config
    assert TextEncoderConfig() == TextEncoderConfig(**MINILM)


def test_text_encoder_with_bert_weights_equals_bert_in_value_and_gradient():
    torch.manual_seed(0)
    config = TextEncoderConfig(**TINY_BERT)
    bert = _bert(config).eval()
    ours = TextEncoder(config).eval()
    load_from_bert(ours, bert)
    ids = torch.randint(1, config.vocab_size, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    out = ours(ids, mask, types, output_attentions=True)
    ref = bert(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=ATOL, rtol=0)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    g = torch.randn_like(out.last_hidden_state)
    ((out.last_hidden_state * g).sum() + out.pooled.sum()).backward()
    ((ref.last_hidden_state * g).sum() + ref.pooler_output.sum()).backward()
    theirs = dict(bert.named_parameters())
    for name, p in ours.named_parameters():
        # Some gradients reach ~30 (summed over tokens): allow float32's relative error too.
        bert_grad = theirs[bert_weight_map(config)[name]].grad
        torch.testing.assert_close(p.grad, bert_grad, atol=ATOL, rtol=1e-5)


def test_text_encoder_with_minilm_weights_equals_the_real_minilm():
    from mmcourse.pretrained import load_text_encoder

    tokenizer, minilm = load_text_encoder()
    ours = TextEncoder(TextEncoderConfig.from_bert_config(minilm.config)).eval()
    load_from_bert(ours, minilm)
    batch = tokenizer(
        ["a red circle on the left", "someone says seven"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ref = minilm(**batch)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-4, rtol=0)


def test_text_encoder_without_pooler_pools_the_cls_token():
    torch.manual_seed(0)
    ours = TextEncoder(TextEncoderConfig(**TINY_BERT, add_pooling_layer=False)).eval()
    out = ours(torch.randint(0, 99, (2, 5)))
    assert ours.pooler is None
    torch.testing.assert_close(out.pooled, out.last_hidden_state[:, 0])


def test_load_from_bert_refuses_a_different_config():
    config = TextEncoderConfig(**TINY_BERT)
    with torch.device("meta"):
        bert = _bert(TextEncoderConfig(**{**TINY_BERT, "num_layers": 3}))
        ours = TextEncoder(config)
    with pytest.raises(ValueError, match="num_layers=3, the TextEncoder 2"):
        load_from_bert(ours, bert)
    with torch.device("meta"):
        no_pooler = _bert(config, add_pooling_layer=False)
    with pytest.raises(ValueError, match="without a pooler"):
        load_from_bert(ours, no_pooler)


# --- shapes of the image and audio towers -------------------------------------------------


@pytest.mark.parametrize("position", ["sincos", "learned"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_vit_shapes_and_attention_maps(position, pool, norm_first):
    config = _tiny_vit(position=position, pool=pool, norm_first=norm_first, num_classes=5)
    model = ViTEncoder(config).eval()
    out = model(torch.rand(2, 3, 16, 16), output_attentions=True)
    assert isinstance(out, EncoderOutput)
    N = 1 + config.num_patches  # [CLS] + 16 patches
    assert out.last_hidden_state.shape == (2, N, 32)
    assert out.pooled.shape == (2, 32) and out.logits.shape == (2, 5)
    assert len(out.attentions) == 2
    for a in out.attentions:
        assert a.shape == (2, config.num_heads, N, N)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, config.num_heads, N))
    expected = (
        out.last_hidden_state[:, 0] if pool == "cls" else out.last_hidden_state[:, 1:].mean(1)
    )
    torch.testing.assert_close(out.pooled, expected)
    plain = model(torch.rand(2, 3, 16, 16))
    assert plain.attentions is None
    learned = sum(p.numel() for n, p in model.named_parameters() if n == "pos_embed")
    assert learned == (N * 32 if position == "learned" else 0)


def test_vit_patch_embedding_is_patchify_then_linear():
    torch.manual_seed(0)
    model = ViTEncoder(_tiny_vit(num_layers=1)).eval()
    images = torch.rand(2, 3, 16, 16)
    conv = model.patch_embed
    weight = rearrange(conv.weight, "d c p1 p2 -> d (p1 p2 c)")  # the Linear's (D, P*P*C)
    tokens = patchify(images, 4) @ weight.T + conv.bias  # (B, N - 1, D)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1) + model.pos_embed
    block_out, _ = model.blocks[0](expected)
    torch.testing.assert_close(
        model(images).last_hidden_state, model.norm(block_out), atol=ATOL, rtol=0
    )


def test_vit_without_head_has_no_logits_and_counts_parameters():
    config = _tiny_vit()
    model = ViTEncoder(config)
    assert model(torch.rand(1, 3, 16, 16)).logits is None
    D, F_, C, P = 32, 128, 3, 4
    block = 4 * (D * D + D) + 2 * 2 * D + (D * F_ + F_) + (F_ * D + D)
    assert count_parameters(model) == (C * P * P * D + D) + D + 2 * block + 2 * D


@pytest.mark.parametrize(
    "kw, tokens",
    [
        ({}, 12),  # a token per frame
        ({"patch_frames": 5}, 2),  # 5-frame tokens; 2 leftover frames dropped
        ({"patch_mels": 4, "patch_frames": 3}, 2 * 4),  # 2 x 4 spectrogram patches
        ({"patch_mels": 4, "patch_frames": 3, "position": "learned", "pool": "mean"}, 8),
    ],
)
def test_audio_encoder_shapes(kw, tokens):
    model = AudioEncoder(_tiny_audio(num_classes=3, **kw)).eval()
    out = model(torch.randn(2, 8, 12), output_attentions=True)
    assert out.last_hidden_state.shape == (2, 1 + tokens, 16)
    assert out.pooled.shape == (2, 16) and out.logits.shape == (2, 3)
    assert [a.shape for a in out.attentions] == [(2, 2, 1 + tokens, 1 + tokens)] * 2


def test_audio_encoder_takes_shorter_clips_and_frames_are_linear_tokens():
    torch.manual_seed(0)
    model = AudioEncoder(_tiny_audio()).eval()
    short = torch.randn(2, 8, 9)
    out = model(short)
    assert out.last_hidden_state.shape == (2, 10, 16)
    # a frame token is Linear(J -> D) of that frame, plus its position
    conv = model.patch_embed
    frames = short.transpose(1, 2) @ conv.weight[:, 0, :, 0].T + conv.bias  # (B, M, D)
    first = torch.cat([model.cls_token.expand(2, -1, -1), frames + model.pos_embed[0, :9]], 1)
    block_out, _ = model.blocks[0](first)
    second, _ = model.blocks[1](block_out)
    torch.testing.assert_close(out.last_hidden_state, model.norm(second), atol=ATOL, rtol=0)


# --- every tower learns: one batch, overfit ----------------------------------------------


def _overfit(
    model: nn.Module, forward, labels: torch.Tensor, *, steps: int, lr: float = 3e-3
) -> None:
    """Train on one fixed batch: the loss must fall from ~ln(classes) to near zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = forward()
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
    assert (logits.argmax(-1) == labels).all()


def test_vit_overfits_one_batch():
    torch.manual_seed(0)
    model = ViTEncoder(_tiny_vit(num_classes=4))
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    _overfit(model, lambda: model(images).logits, labels, steps=80)


def test_post_norm_vit_overfits_one_batch():
    torch.manual_seed(0)
    model = ViTEncoder(_tiny_vit(num_classes=4, norm_first=False, position="learned"))
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    _overfit(model, lambda: model(images).logits, labels, steps=80)


def test_text_encoder_overfits_one_batch():
    torch.manual_seed(0)
    model = TextEncoder(TextEncoderConfig(**TINY_BERT, dropout=0.0, attention_dropout=0.0))
    head = nn.Linear(32, 3)
    ids = torch.randint(1, 99, (6, 8))
    mask = torch.ones(6, 8, dtype=torch.long)
    mask[::2, 5:] = 0
    labels = torch.arange(6) % 3
    both = nn.ModuleList([model, head])
    _overfit(both, lambda: head(model(ids, mask).pooled), labels, steps=80)


def test_audio_encoder_overfits_one_batch():
    torch.manual_seed(0)
    model = AudioEncoder(_tiny_audio(num_classes=4, patch_frames=3, pool="mean"))
    log_mel, labels = torch.randn(8, 8, 12), torch.arange(8) % 4
    _overfit(model, lambda: model(log_mel).logits, labels, steps=80)


# --- clear errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: ViTConfig(image_size=30, patch_size=8),
            "image_size=30 is not divisible by patch_size=8",
        ),
        (lambda: ViTConfig(dim=60, num_heads=8), "dim must be divisible by num_heads"),
        (lambda: ViTConfig(dim=66, num_heads=2), "needs dim divisible by 4"),
        (lambda: ViTConfig(position="rope"), "position must be one of"),
        (lambda: ViTConfig(pool="max"), "pool must be one of"),
        (lambda: ViTConfig(num_classes=-1), "num_classes must be an integer >= 0"),
        (lambda: ViTConfig(activation="swish"), "activation must be one of"),
        (lambda: ViTConfig(num_layers=0), "num_layers must be a positive integer"),
        (
            lambda: AudioEncoderConfig(n_mels=40, patch_mels=16),
            "n_mels=40 is not divisible by patch_mels=16",
        ),
        (lambda: AudioEncoderConfig(max_frames=10, patch_frames=20), "longer than max_frames=10"),
        (lambda: TextEncoderConfig(pad_token_id=40000), "pad_token_id must be in"),
        (
            lambda: TransformerBlock(dim=16, num_heads=4, norm_first="pre"),
            "norm_first must be True",
        ),
        (lambda: FeedForward(dim=8, hidden_dim=0), "hidden_dim must be a positive integer"),
    ],
)
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_images_raise_clear_errors():
    model = ViTEncoder(_tiny_vit())
    with pytest.raises(
        ValueError,
        match=r"expected image batch of shape \(B, 3, 16, 16\).*got \(2, 3, 32, 32\).*resize",
    ):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 16, 16, 3\) \(channels last"):
        model(torch.rand(2, 16, 16, 3))
    with pytest.raises(ValueError, match=r"got \(3, 16, 16\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"floating-point images, got dtype torch.uint8"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_bad_log_mels_raise_clear_errors():
    model = AudioEncoder(_tiny_audio(patch_frames=3))
    with pytest.raises(
        ValueError,
        match=r"expected log-mel of shape \(B, n_mels=8, frames <= 12\), got \(2, 40, 12\)",
    ):
        model(torch.randn(2, 40, 12))
    with pytest.raises(ValueError, match="log-mel of 13 frames is longer than max_frames=12"):
        model(torch.randn(2, 8, 13))
    with pytest.raises(ValueError, match="shorter than patch_frames=3"):
        model(torch.randn(2, 8, 2))


def test_bad_token_inputs_raise_clear_errors():
    model = TextEncoder(TextEncoderConfig(**TINY_BERT))
    with pytest.raises(
        ValueError, match="sequence of 25 tokens is longer than max_position_embeddings=24"
    ):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"token ids must be in \[0, vocab_size=99\), got ids from 0 to 99"
    ):
        model(torch.tensor([[0, 99]]))
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, type_vocab_size=2\)"):
        model(torch.zeros(1, 4, dtype=torch.long), token_type_ids=torch.full((1, 4), 2))
    with pytest.raises(ValueError, match="integer dtype"):
        model(torch.zeros(1, 4))
    with pytest.raises(
        ValueError, match=r"expected attention_mask of the shape of input_ids \(1, 4\)"
    ):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))


# --- devices -----------------------------------------------------------------------------


def test_fixed_positions_follow_the_module_to_another_dtype():
    model = ViTEncoder(_tiny_vit()).to(torch.float64)
    assert model.pos_embed.dtype == torch.float64
    assert model(torch.rand(1, 3, 16, 16, dtype=torch.float64)).pooled.dtype == torch.float64


def _gpu() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    return torch.device("mps") if mps is not None and mps.is_available() else None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu() is None, reason="needs a CUDA or MPS device")
def test_towers_run_in_bfloat16_on_a_gpu():
    """bf16 autocast smoke test; bf16 has ~3 significant digits, so compare loosely (0.1)."""
    device = _gpu()
    torch.manual_seed(0)
    cases = [
        (ViTEncoder(_tiny_vit(num_classes=3)), torch.rand(4, 3, 16, 16)),
        (AudioEncoder(_tiny_audio(num_classes=3)), torch.randn(4, 8, 12)),
        (TextEncoder(TextEncoderConfig(**TINY_BERT)), torch.randint(0, 99, (4, 10))),
    ]
    for model, x in cases:
        model = model.to(device).eval()
        x = x.to(device)
        with torch.no_grad():
            reference = model(x).pooled.float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, output_attentions=True)
        assert out.pooled.device.type == device.type and torch.isfinite(out.pooled).all()
        torch.testing.assert_close(out.pooled.float(), reference, atol=0.1, rtol=0.1)
        out.pooled.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
