"""Exercises for notebooks/11_multimodal_llm."""

from __future__ import annotations

import math

import torch

from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_equal, expect_shape

IGNORE_INDEX = -100

# --- 1. the label mask ---------------------------------------------------------------------


def _label_mask_solution(ids: list[int], roles: list[str]) -> list[int]:
    return [i if r == "answer" else -100 for i, r in zip(ids, roles, strict=True)]


def _check_label_mask(fn) -> None:
    cases = [
        ([5, 6, 7, 7, 9, 2], ["prompt", "prompt", "image", "image", "answer", "answer"]),
        (
            [1, 3, 3, 4, 8, 2, 1, 4, 6, 2],
            [
                "prompt",
                "image",
                "image",
                "prompt",
                "answer",
                "answer",
                "prompt",
                "prompt",
                "answer",
                "answer",
            ],
        ),
    ]
    for ids, roles in cases:
        got = call(fn, list(ids), list(roles), what=f"ids={ids}")
        if got is None:
            raise Mismatch("your function returned None (did you forget `return`?)")
        got = [int(x) for x in got]
        expected = _label_mask_solution(ids, roles)
        if len(got) != len(ids):
            raise Mismatch(f"expected one label per token ({len(ids)}), got {len(got)}")
        if got == ids:
            raise Mismatch(
                "every token carries a label: the loss would train the model to "
                "predict the prompt and the image tokens; only answers are labelled"
            )
        if any(g != IGNORE_INDEX for g, r in zip(got, roles, strict=True) if r == "image"):
            raise Mismatch("an image position carries a label; image positions are -100")
        if all(g == IGNORE_INDEX for g in got):
            raise Mismatch("no token carries a label: the loss would be empty")
        expect_equal(got, expected, f"labels for roles {roles}")


q1 = Exercise(
    name="Exercise 1: the label mask",
    checker=_check_label_mask,
    hints=[
        "Keep the id where the role is 'answer'; write -100 (IGNORE_INDEX) everywhere else.",
        "The shift by one (position t predicts t + 1) happens in the loss, not in the labels.",
    ],
    solution_fn=_label_mask_solution,
)

# --- 2. splice the image tokens ------------------------------------------------------------


def _splice_solution(embeds, input_ids, image_embeds, image_token_id):
    is_image = (input_ids == image_token_id).unsqueeze(-1)  # (B, T, 1)
    return embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))


def _check_splice(fn) -> None:
    g = torch.Generator().manual_seed(0)
    b, t, n, d, image_id = 2, 9, 3, 4, 99
    input_ids = torch.randint(0, 50, (b, t), generator=g)
    input_ids[0, 2:5] = image_id
    input_ids[1, 4:7] = image_id
    embeds = torch.randn(b, t, d, generator=g)
    image_embeds = torch.randn(b, n, d, generator=g)
    got = call(fn, embeds.clone(), input_ids, image_embeds, image_id, what="a batch of 2")
    if got is None:
        raise Mismatch("your function returned None (did you forget `return`?)")
    expect_shape(got, (b, t, d), "spliced embeddings")
    expected = _splice_solution(embeds, input_ids, image_embeds, image_id)
    if torch.allclose(got[1, 4:7], image_embeds[1].flip(0)):
        raise Mismatch("the image tokens are in reverse order")
    if torch.allclose(got[1, 2:5], image_embeds[1]):
        raise Mismatch("row 1's image went to row 0's positions: find the placeholders per row")
    expect_close(got, expected, "spliced embeddings")


q2 = Exercise(
    name="Exercise 2: splice image embeddings at the placeholder",
    checker=_check_splice,
    hints=[
        "input_ids == image_token_id gives a (B, T) boolean mask of the placeholder positions.",
        "Tensor.masked_scatter fills the True positions in order with the rows of its source.",
    ],
    solution_fn=_splice_solution,
)

# --- 3. one KV-cache step ------------------------------------------------------------------


def _cached_step_solution(q, k_new, v_new, k_cache, v_cache):
    k = torch.cat([k_cache, k_new], dim=2)  # (B, H, T + 1, Dh)
    v = torch.cat([v_cache, v_new], dim=2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, 1, T + 1)
    return weights @ v, k, v


def _check_cached_step(fn) -> None:
    g = torch.Generator().manual_seed(1)
    b, h, t, dh = 2, 3, 5, 4
    q, k_new, v_new = (torch.randn(b, h, 1, dh, generator=g) for _ in range(3))
    k_cache, v_cache = torch.randn(b, h, t, dh, generator=g), torch.randn(b, h, t, dh, generator=g)
    got = call(fn, q, k_new, v_new, k_cache, v_cache, what="one step after 5 cached tokens")
    if not isinstance(got, tuple) or len(got) != 3:
        raise Mismatch("return a tuple (out, k, v): the output and the extended caches")
    out, k, v = got
    exp_out, exp_k, exp_v = _cached_step_solution(q, k_new, v_new, k_cache, v_cache)
    expect_shape(k, (b, h, t + 1, dh), "the extended key cache")
    if torch.allclose(k[:, :, 0], k_new[:, :, 0]):
        raise Mismatch("the new key went in front of the cache; append it at the end (dim=2)")
    expect_close(k, exp_k, "the extended key cache")
    expect_close(v, exp_v, "the extended value cache")
    no_scale = (q @ exp_k.transpose(-2, -1)).softmax(-1) @ exp_v
    if torch.allclose(out, no_scale, atol=1e-5):
        raise Mismatch("divide the scores by sqrt(Dh)")
    own_only = v_new
    if torch.allclose(out, own_only, atol=1e-5):
        raise Mismatch("the new token attends only to itself; it must attend to the cache too")
    expect_close(out, exp_out, "the attention output")


q3 = Exercise(
    name="Exercise 3: one KV-cache attention step",
    checker=_check_cached_step,
    hints=[
        "Concatenate the new key and value after the cached ones along the token axis (dim=2).",
        "The new query may attend to every cached position: no causal mask is needed for one "
        "query at the end.",
    ],
    solution_fn=_cached_step_solution,
)

__all__ = ["q1", "q2", "q3"]
