"""The captioner: decoder block = nn.TransformerDecoderLayer, cached step = recompute, overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse.captioning import (
    Captioner,
    CaptionerConfig,
    DecoderBlock,
    RegionProbe,
    answer_loss,
    caption_loss,
    encode_prompts,
    encode_sequences,
    generate_text,
    load_from_torch_decoder_layer,
    region_loss,
    region_targets,
    sequence_batches,
    sequence_loss,
)
from mmcourse.clip import WordTokenizer
from mmcourse.data.shapes import ANSWERS, captioning_data
from mmcourse.generation import GenerationConfig, generate, recompute_step_fn
from mmcourse.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    data = captioning_data(8, split="train")
    texts = [r for rs in data["references"] for r in rs] + [
        q["question"] for qa in data["qa"] for q in qa
    ]
    tok = WordTokenizer.from_texts([*texts, *ANSWERS])
    torch.manual_seed(0)
    cfg = CaptionerConfig(
        vocab_size=tok.vocab_size, num_answers=len(ANSWERS), dim=32, max_length=48
    )
    return data, tok, cfg


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu"), (False, "relu")])
def test_decoder_block_equals_torch_layer_in_value_and_gradient(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(
        16, 4, 40, dropout=0.0, batch_first=True, norm_first=norm_first, activation=activation
    )
    block = DecoderBlock(
        dim=16, num_heads=4, hidden_dim=40, norm_first=norm_first, activation=activation
    )
    load_from_torch_decoder_layer(block, layer)
    x = torch.randn(3, 6, 16, requires_grad=True)
    memory = torch.randn(3, 9, 16, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    theirs = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
    ours, present, _ = block(x, memory=memory)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert present[0].shape == (3, 4, 6, 4)
    g = torch.randn_like(ours)
    grads_theirs = torch.autograd.grad(theirs, [x, memory, *layer.parameters()], g)
    grads_ours = torch.autograd.grad(ours, [x, memory], g)
    for a, b in zip(grads_ours, grads_theirs[:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # parameter gradients: W^Q, W^K, W^V of the self-attention stacked as torch packs them
    ours_params = torch.autograd.grad(
        (block(x, memory=memory)[0] * g).sum(), list(block.parameters())
    )
    named = dict(zip([n for n, _ in block.named_parameters()], ours_params, strict=True))
    packed = torch.cat([named[f"self_attn.{r}_proj.weight"] for r in "qkv"])
    torch.testing.assert_close(
        packed, grads_theirs[2], atol=1e-5, rtol=1e-5
    )  # self_attn.in_proj_weight
    torch.testing.assert_close(
        named["ffn.linear2.weight"],
        dict(zip([n for n, _ in layer.named_parameters()], grads_theirs[2:], strict=True))[
            "linear2.weight"
        ],
        atol=1e-5,
        rtol=1e-5,
    )


def test_load_refuses_a_different_layer():
    block = DecoderBlock(dim=16, num_heads=4, hidden_dim=40)
    with pytest.raises(ValueError, match="norm_first"):
        load_from_torch_decoder_layer(
            block, nn.TransformerDecoderLayer(16, 4, 40, batch_first=True, activation="gelu")
        )
    with pytest.raises(ValueError, match="activation"):
        load_from_torch_decoder_layer(
            block, nn.TransformerDecoderLayer(16, 4, 40, batch_first=True, norm_first=True)
        )


def test_shapes(tiny):
    data, tok, cfg = tiny
    model = Captioner(cfg)
    enc = encode_sequences(tok, data["caption"])
    memory = model.encode(data["images"])
    assert memory.shape == (8, 16, 32)
    logits = model(data["images"], enc["input_ids"], enc["attention_mask"])
    assert logits.shape == (*enc["input_ids"].shape, tok.vocab_size)
    q = tok([qa[0]["question"] for qa in data["qa"]])
    assert model.answer_logits(data["images"], q["input_ids"], q["attention_mask"]).shape == (
        8,
        len(ANSWERS),
    )
    out = model.decode(enc["input_ids"], memory, enc["attention_mask"], need_weights=True)
    assert len(out.cross_attentions) == cfg.decoder_layers
    assert out.cross_attentions[0].shape == (8, cfg.num_heads, enc["input_ids"].shape[1], 16)
    torch.testing.assert_close(
        out.cross_attentions[0].sum(-1), torch.ones(8, cfg.num_heads, enc["input_ids"].shape[1])
    )


def test_cached_steps_equal_full_recompute_with_left_padding(tiny):
    data, tok, cfg = tiny
    model = Captioner(cfg).eval()
    prompts = encode_prompts(tok, [qa[-1]["question"] for qa in data["qa"][:4]] + ["", "a red"])
    ids = torch.cat([prompts["input_ids"], torch.randint(5, tok.vocab_size, (6, 5))], 1)
    mask = torch.cat([prompts["attention_mask"], torch.ones(6, 5, dtype=torch.long)], 1)
    images = data["images"][:6]
    with torch.no_grad():
        full = model.decode(ids, model.encode(images), mask).logits
        state = model.init_state(images)
        T0 = prompts["input_ids"].shape[1]
        logits, state = model.step(ids[:, :T0], state, mask[:, :T0])
        pieces = [logits]
        for t in range(T0, ids.shape[1]):
            logits, state = model.step(ids[:, t : t + 1], state, mask[:, : t + 1])
            pieces.append(logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert state["self_k"].shape[3] == ids.shape[1]


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(max_new_tokens=6),
        GenerationConfig(max_new_tokens=6, num_beams=3, length_penalty=0.5, num_return_sequences=2),
    ],
)
def test_generation_with_cache_equals_recompute(tiny, config):
    data, tok, cfg = tiny
    model = Captioner(cfg).eval()
    prompts = encode_prompts(tok, ["", "how many objects are there?", "what colour is the circle?"])
    from dataclasses import replace

    config = replace(config, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    state = model.init_state(data["images"][:3])
    cached = generate(
        model.step,
        prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        state=state,
        config=config,
    )
    slow = generate(
        recompute_step_fn(model.step),
        prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        state=model.init_state(data["images"][:3]),
        config=config,
    )
    assert torch.equal(cached.sequences, slow.sequences)
    torch.testing.assert_close(cached.sequences_scores, slow.sequences_scores, atol=1e-5, rtol=1e-5)
    texts, out = generate_text(
        model,
        tok,
        images=data["images"][:3],
        prompts=["", "how many objects are there?", "what colour is the circle?"],
        config=config,
    )
    assert (
        torch.equal(out.sequences, cached.sequences)
        and len(texts) == 3 * config.num_return_sequences
    )


def test_caption_loss_equals_a_loop_in_value_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    total = torch.zeros(())
    for b in range(2):
        for t in range(4):
            if loss_mask[b, t + 1]:
                total = total - torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
    ours = caption_loss(logits, ids, loss_mask, reduction="sum")
    torch.testing.assert_close(ours, total)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_loop,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(g_ours, g_loop, atol=1e-6, rtol=1e-6)
    mean = caption_loss(logits, ids, loss_mask)
    torch.testing.assert_close(mean, total / 5)
    # the gradient of the cross-entropy w.r.t. the logits is softmax - one-hot
    p = torch.softmax(logits[0, 2], -1).detach()
    torch.testing.assert_close(g_loop[0, 2], p - F.one_hot(ids[0, 3], 7).float())


@pytest.mark.slow
def test_one_batch_overfit_captioner(tiny):
    data, tok, cfg = tiny
    torch.manual_seed(0)
    model = Captioner(cfg)
    enc = encode_sequences(tok, data["caption"])
    batches = list(sequence_batches(data["images"], enc, batch_size=8, seed=0))
    before = sequence_loss(model, batches[0]).item()
    fit(
        model,
        batches,
        loss_fn=sequence_loss,
        config=TrainConfig(
            max_steps=150, lr=3e-3, schedule="constant", progress=False, device="cpu"
        ),
    )
    assert sequence_loss(model, batches[0]).item() < 0.02 * before
    texts, _ = generate_text(
        model, tok, images=batches[0]["images"], config=GenerationConfig(max_new_tokens=40)
    )
    targets = [
        tok.decode(row[m.bool()])
        for row, m in zip(batches[0]["input_ids"], batches[0]["loss_mask"], strict=True)
    ]
    assert sum(t == g for t, g in zip(targets, texts, strict=True)) >= 7


def test_one_batch_overfit_vqa_head(tiny):
    data, tok, cfg = tiny
    torch.manual_seed(0)
    vqa = Captioner(cfg)
    q = tok([qa[0]["question"] for qa in data["qa"]])
    answers = torch.tensor([ANSWERS.index(qa[0]["answer"]) for qa in data["qa"]])
    batch = {"images": data["images"], **q, "answer": answers}
    fit(
        vqa,
        [batch],
        loss_fn=answer_loss,
        config=TrainConfig(
            max_steps=80, lr=3e-3, schedule="constant", progress=False, device="cpu"
        ),
    )
    with torch.no_grad():
        pred = vqa.answer_logits(data["images"], q["input_ids"], q["attention_mask"]).argmax(-1)
    assert torch.equal(pred, answers)


def test_region_probe(tiny):
    data, _, cfg = tiny
    model = Captioner(cfg)
    probe = RegionProbe(model.encoder)
    targets = region_targets(data["objects"])
    assert targets.shape == (8, 5, 3) and (targets[..., 1] > 0).sum() == sum(
        len(o) for o in data["objects"]
    )
    assert probe(data["images"]).shape == (8, 5, 15)
    assert region_loss(probe, {"images": data["images"], "regions": targets}).dim() == 0


def test_bad_inputs(tiny):
    data, tok, cfg = tiny
    model = Captioner(cfg).eval()
    with pytest.raises(ValueError, match=r"expected image batch of shape \(B, 3, 32, 32\)"):
        model.encode(torch.rand(2, 32, 32, 3))
    with pytest.raises(ValueError, match="empty"):
        model.decode(torch.zeros(2, 0, dtype=torch.long), model.encode(data["images"][:2]))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(
            model.step,
            torch.zeros(1, 0, dtype=torch.long),
            state=model.init_state(data["images"][:1]),
        )
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="one prompt string per image"):
        generate_text(model, tok, images=data["images"][:2], prompts=["a"])
    with pytest.raises(ValueError, match="exceeds CaptionerConfig.max_length"):
        generate_text(
            model, tok, images=data["images"][:2], config=GenerationConfig(max_new_tokens=60)
        )
    with pytest.raises(ValueError, match=r"memory of shape \(B, N, 32\)"):
        model.init_state(memory=torch.rand(2, 16, 8))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        model.step(
            torch.ones(2, 1, dtype=torch.long),
            model.init_state(data["images"][:2]),
            torch.ones(2, 3),
        )
    with pytest.raises(ValueError, match="no answer head"):
        Captioner(CaptionerConfig(vocab_size=10)).answer_logits(
            data["images"][:1], torch.ones(1, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="bos_token_id"):
        CaptionerConfig(vocab_size=2)
    with pytest.raises(ValueError, match="reduction"):
        caption_loss(
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2),
            reduction="max",
        )


def test_sequence_batches_with_memory(tiny):
    data, tok, cfg = tiny
    enc = encode_sequences(tok, data["caption"])
    memory = torch.randn(8, 16, cfg.dim)
    batches = list(sequence_batches(memory, enc, batch_size=4, seed=0, key="memory"))
    assert len(batches) == 2 and set(batches[0]) == {
        "memory",
        "input_ids",
        "attention_mask",
        "loss_mask",
    }
    assert batches[0]["memory"].shape == (4, 16, cfg.dim)
    assert sequence_loss(Captioner(cfg), batches[0]).dim() == 0


def test_sequence_batches_equal_a_permutation_per_epoch(tiny):
    """Lazily made batches equal the eager loop they replace: one seeded generator, a fresh
    permutation per epoch, the last partial batch dropped, each batch cut to its longest row."""
    data, tok, _ = tiny
    enc = encode_sequences(tok, data["caption"])
    images = data["images"]
    expected, generator = [], torch.Generator().manual_seed(3)
    while len(expected) < 7:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - 3 + 1, 3):
            idx = order[start : start + 3]
            width = int(enc["attention_mask"][idx].sum(-1).max())
            expected.append(
                {"images": images[idx]} | {k: v[idx][:, :width] for k, v in enc.items()}
            )
    batches = sequence_batches(images, enc, batch_size=3, num_batches=7, seed=3)
    assert len(batches) == 7
    for _ in range(2):  # iterating again gives the same batches
        got = list(batches)
        assert len(got) == 7
        for g, e in zip(got, expected[:7], strict=True):
            assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in e)
    with pytest.raises(ValueError, match="key"):
        sequence_batches(images, enc, batch_size=3, key="pixels")
    with pytest.raises(ValueError, match="batch_size"):
        sequence_batches(images, enc, batch_size=len(images) + 1)


@pytest.mark.gpu
def test_decoding_on_the_device_equals_the_cpu(tiny):
    from mmcourse.utils import get_device

    data, tok, cfg = tiny
    device = get_device("auto")
    model = Captioner(cfg).eval()
    config = GenerationConfig(max_new_tokens=8, num_beams=3)
    cpu_texts, cpu_out = generate_text(model, tok, images=data["images"][:4], config=config)
    model.to(device)
    dev_texts, dev_out = generate_text(
        model, tok, images=data["images"][:4].to(device), config=config
    )
    assert dev_texts == cpu_texts
    torch.testing.assert_close(
        dev_out.sequences_scores.cpu(), cpu_out.sequences_scores, atol=1e-4, rtol=1e-4
    )
