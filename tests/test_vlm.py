"""The LLaVA-style VLM: label mask, image splice, generation with the cache, errors, overfit."""

import numpy as np
import pytest
import torch

from mmcourse.data.shapes import generate_shapes
from mmcourse.finetune import apply_lora, freeze
from mmcourse.generation import GenerationConfig, generate, recompute_step_fn
from mmcourse.train import TrainConfig, fit
from mmcourse.vlm import (
    IGNORE_INDEX,
    LORA_TARGETS,
    encode_chat,
    exact_match,
    generate_replies,
    make_batches,
    make_dialogue,
    normalize_answer,
    pad_batch,
    pope_metrics,
    pope_questions,
    question_chat,
    region_pooling,
    region_targets,
    tower_loss,
    vlm_loss,
)
from tests.vlm_helpers import tiny_tokenizer, tiny_vlm


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scenes():
    return generate_shapes(8, split="train")


def _encode(tok, chat, model, **kw):
    return encode_chat(
        tok,
        chat,
        num_image_tokens=model.num_image_tokens,
        image_token_id=model.image_token_id,
        **kw,
    )


def test_only_the_assistant_answers_are_supervised(tok):
    model = tiny_vlm(tok)
    chat = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many objects are there?"},
        {"role": "assistant", "content": "two"},
    ]
    ids, labels = _encode(tok, chat, model)
    assert len(ids) == len(labels)
    supervised = [(i, t) for i, t in enumerate(labels) if t != IGNORE_INDEX]
    # exactly the two answer words and their two end-of-turn tokens
    assert (
        tok.decode([t for _, t in supervised])
        == "red<|im_end|>two<|im_end|>".replace("<|im_end|>", " <|im_end|> ")
        .strip()
        .replace("  ", " ")
        or len(supervised) == 4
    )
    assert len(supervised) == 4
    assert [tok.convert_ids_to_tokens(t) for _, t in supervised] == [
        "red",
        "<|im_end|>",
        "two",
        "<|im_end|>",
    ]
    # labels equal the ids where set; no image position and no prompt token carries one
    for i, t in supervised:
        assert ids[i] == t
    image_positions = [i for i, t in enumerate(ids) if t == model.image_token_id]
    assert len(image_positions) == model.num_image_tokens == 5
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    first_answer = supervised[0][0]
    assert all(label == IGNORE_INDEX for label in labels[:first_answer])


def test_placeholder_and_context_errors(tok):
    model = tiny_vlm(tok, max_positions=32)
    no_image = question_chat("What colour is the circle?", image=False)
    with pytest.raises(ValueError, match="needs exactly one '<image>' placeholder"):
        _encode(tok, no_image, model)
    with pytest.raises(ValueError, match="placeholder.*but no image is given"):
        _encode(tok, question_chat("What?"), model, has_image=False)
    twice = [{"role": "user", "content": "<image> <image>"}]
    with pytest.raises(
        ValueError, match="exactly one '<image>' placeholder in a user message, found 2"
    ):
        _encode(tok, twice, model)
    long = question_chat("what colour is the circle? " * 10)
    with pytest.raises(ValueError, match="does not fit the context length 32"):
        _encode(tok, long, model, max_length=32)
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        _encode(tok, [{"role": "robot", "content": "x"}], model)


def test_image_embeddings_land_at_the_placeholders(tok):
    model = tiny_vlm(tok)
    ids, _ = _encode(
        tok, question_chat("What colour is the circle?"), model, add_generation_prompt=True
    )
    input_ids = torch.tensor([ids, ids])
    feats = torch.randn(2, 5, 16)
    embeds = model.embed(input_ids, feats)
    where = input_ids[0] == model.image_token_id
    torch.testing.assert_close(embeds[:, where], model.projector(feats))
    torch.testing.assert_close(embeds[:, ~where], model.lm.embed_tokens(input_ids[:, ~where]))


def test_bad_images_and_features_are_refused(tok):
    model = tiny_vlm(tok)
    ids, _ = _encode(tok, question_chat("What?"), model)
    input_ids = torch.tensor([ids])
    with pytest.raises(ValueError, match=r"expected image batch of shape \(B, 3, 32, 32\)"):
        model(input_ids, images=torch.rand(1, 32, 32, 3))
    with pytest.raises(
        ValueError, match=r"image_features of shape \(B, N_img, D_v\) = \(1, 5, D_v\)"
    ):
        model(input_ids, image_features=torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="placeholder ids but no image_features"):
        model(input_ids)
    text_ids, _ = _encode(tok, question_chat("What?", image=False), model, has_image=False)
    with pytest.raises(ValueError, match="every row needs 5 image placeholder ids"):
        model(torch.tensor([text_ids]), image_features=torch.randn(1, 5, 16))


def test_patch_tokens_and_region_pooling(tok):
    pool = region_pooling(4)
    assert pool.shape == (5, 16)
    torch.testing.assert_close(pool.sum(1), torch.ones(5))
    model = tiny_vlm(tok, image_tokens="patches")
    assert model.num_image_tokens == 16
    assert model.tower(torch.rand(2, 3, 32, 32)).shape == (2, 16, 16)


def test_generation_with_and_without_cache_give_the_same_tokens(tok, scenes):
    model = tiny_vlm(tok).eval()
    images = torch.tensor(scenes["images"][:3]).permute(0, 3, 1, 2).float() / 255
    feats = model.image_features(images)
    chats = [question_chat(q) for q in scenes["question"][:3]]
    chats[1] = question_chat("How many objects are there in the image?")  # another length
    ids = [_encode(tok, c, model, add_generation_prompt=True)[0] for c in chats]
    input_ids, mask = pad_batch(ids, pad_value=0, side="left")
    config = GenerationConfig(max_new_tokens=8)
    state = {"image_features": feats, "cache": None}
    cached = generate(model.step_fn, input_ids, attention_mask=mask, state=state, config=config)
    full = generate(
        recompute_step_fn(model.step_fn), input_ids, attention_mask=mask, state=state, config=config
    )
    assert torch.equal(cached.sequences, full.sequences)
    replies = generate_replies(model, tok, chats, image_features=feats, max_new_tokens=3)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)


def test_answers_are_normalised_and_pope_is_counted():
    assert normalize_answer("  The Red. ") == "red"
    assert (
        exact_match("2", "two")
        and exact_match("Yes!", "yes")
        and not exact_match("red circle", "red")
    )
    m = pope_metrics(["Yes", "yes.", "No", "no"], ["yes", "no", "no", "yes"])
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    scenes = generate_shapes(20, split="test")
    rng = np.random.default_rng(0)
    for mode in ("random", "adversarial"):
        qs = pope_questions(scenes["objects"], mode=mode, rng=rng)
        assert [a for _, _, a in qs].count("yes") == 20
        for i, q, a in qs:
            named = q.removeprefix("Is there a ").removesuffix(" in the image?")
            present = {f"{o['colour']} {o['shape']}" for o in scenes["objects"][i]}
            assert (named in present) == (a == "yes")
            if mode == "adversarial" and a == "no":
                colour, shape = named.split()
                assert any(
                    o["colour"] == colour or o["shape"] == shape for o in scenes["objects"][i]
                )


@pytest.mark.slow
def test_tower_pretraining_and_one_batch_overfit(tok, scenes):
    """Stage 0 trains the tower on region attributes; stage 2 (LoRA + projector) overfits a batch."""
    model = tiny_vlm(tok)
    images = torch.tensor(scenes["images"]).permute(0, 3, 1, 2).float() / 255
    tower_batch = {"images": images, "targets": region_targets(scenes["objects"])}
    first = tower_loss(model.tower, tower_batch).item()
    fit(
        model.tower,
        [tower_batch],
        loss_fn=tower_loss,
        config=TrainConfig(max_steps=80, lr=1e-2, progress=False, device="cpu"),
    )
    assert tower_loss(model.tower, tower_batch).item() < 0.5 * first

    freeze(model.tower)
    feats = model.tower(images).detach()
    rng = np.random.default_rng(0)
    encoded = [
        _encode(tok, make_dialogue(o, "conversation", rng), model) for o in scenes["objects"]
    ]
    input_ids, mask = pad_batch([e[0] for e in encoded], pad_value=0)
    labels, _ = pad_batch([e[1] for e in encoded], pad_value=IGNORE_INDEX)
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "image_features": feats,
    }
    apply_lora(model.lm, target_modules=LORA_TARGETS, r=8, alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector") for n in trainable)
    result = fit(
        model,
        [batch],
        loss_fn=vlm_loss,
        config=TrainConfig(max_steps=80, lr=1e-2, progress=False, device="cpu"),
    )
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]


def test_vlm_loss_refuses_a_batch_without_labels(tok):
    model = tiny_vlm(tok)
    ids, _ = _encode(tok, question_chat("What?"), model)
    batch = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids)),
        "labels": torch.full((1, len(ids)), IGNORE_INDEX),
        "image_features": torch.randn(1, 5, 16),
    }
    with pytest.raises(ValueError, match="no position carries a label"):
        vlm_loss(model, batch)


def test_shared_prefix_and_length_grouping_give_the_same_loss_and_gradients(tok, scenes):
    """make_batches cuts the common prefix and groups by length: same loss, same gradients."""
    model = tiny_vlm(tok)
    freeze(model.tower)
    apply_lora(model.lm, target_modules=LORA_TARGETS, r=4, alpha=8)
    for p in model.lm.parameters():  # LoRA's B starts at 0: move it so that its gradient shows
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    rng = np.random.default_rng(0)
    kinds = ["conversation", "description", "reasoning", "conversation"] * 2
    encoded = [
        _encode(tok, make_dialogue(o, k, rng), model)
        for o, k in zip(scenes["objects"], kinds, strict=True)
    ]
    feats = torch.randn(len(encoded), 5, 16)
    plain = make_batches(
        encoded,
        feats,
        batch_size=8,
        pad_id=0,
        image_token_id=model.image_token_id,
        seed=0,
        group_by_length=False,
        share_prefix=False,
    )
    (cut,) = make_batches(
        encoded,
        feats,
        batch_size=8,
        pad_id=0,
        image_token_id=model.image_token_id,
        seed=0,
        group_by_length=False,
    )
    assert len(plain) == 1 and "prefix_ids" not in plain[0]
    prefix = cut["prefix_ids"][0].tolist()
    assert prefix == encoded[0][0][: len(prefix)] and len(prefix) >= 4
    assert model.image_token_id not in prefix  # the image is spliced after the prefix
    assert bool((cut["input_ids"] == model.image_token_id).sum(1).eq(5).all())
    assert int((cut["labels"] != IGNORE_INDEX).sum()) == int(
        (plain[0]["labels"] != IGNORE_INDEX).sum()
    )

    def loss_and_grads(batch):
        model.zero_grad()
        loss = vlm_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss_a, grads_a = loss_and_grads(plain[0])
    loss_b, grads_b = loss_and_grads(cut)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)

    grouped = make_batches(
        encoded, feats, batch_size=2, pad_id=0, image_token_id=model.image_token_id, seed=1
    )
    assert sorted(len(b["input_ids"]) for b in grouped) == [2, 2, 2, 2]
    padding = sum(int((1 - b["attention_mask"]).sum()) for b in grouped)
    shuffled = make_batches(
        encoded,
        feats,
        batch_size=2,
        pad_id=0,
        image_token_id=model.image_token_id,
        seed=1,
        group_by_length=False,
    )
    assert padding <= sum(int((1 - b["attention_mask"]).sum()) for b in shuffled)
    with pytest.raises(ValueError, match="one image per conversation"):
        make_batches(encoded, feats[:3], batch_size=2, pad_id=0, image_token_id=1, seed=0)


def test_scene_explorer_draws_the_answers_it_is_given():
    """The chapter's explorer: image, nearest tokens and answers, right/wrong against the truth."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from mmcourse.vlm import draw_scene_answers

    before = plt.get_fignums()
    scenes = generate_shapes(3, split="test")
    fig = Figure(figsize=(8, 3))
    for scene in (0, 2):
        fig.clear()
        qa = [
            ("What colour is the circle?", "red", "blue", "red"),
            ("How many?", "2", "one", "two"),
        ]
        nearest = {"left": [" red", " Red"], "center": ["ausea", " pop"]}
        draw_scene_answers(
            fig,
            image=scenes["images"][scene],
            caption=scenes["canonical_caption"][scene],
            nearest=nearest,
            qa=qa,
            title=f"test scene {scene}",
        )
        texts = [t.get_text() for t in fig.axes[1].texts]
        assert len(fig.axes) == 2 and fig._suptitle.get_text() == f"test scene {scene}"
        assert scenes["canonical_caption"][scene] in texts[0]
        marks = [t for t in texts if "->" in t and "(truth)" not in t]
        assert len(marks) == 2 and all("; right)" in t for t in marks)  # "2" matches "two"
        assert any("' red', ' Red'" in t for t in texts)
    fig.clear()
    draw_scene_answers(
        fig, image=scenes["images"][0], caption="c", nearest={}, qa=[("Q?", "blue", "", "red")]
    )
    assert any("; wrong)" in t.get_text() for t in fig.axes[1].texts)
    with pytest.raises(ValueError, match="expected an image of shape"):
        draw_scene_answers(fig, image=np.zeros((3, 8, 8)), caption="", nearest={}, qa=[])
    assert plt.get_fignums() == before
