"""Exercises for notebooks/02_attention."""

from __future__ import annotations

import math

import torch
from einops import rearrange

from mmcourse.attention import causal_mask as _causal_mask
from mmcourse.attention import scaled_dot_product_attention as _sdpa
from mmcourse.exercises import (
    Exercise,
    Mismatch,
    call,
    expect_close,
    expect_shape,
)

# --- 1. masked scaled dot-product attention ----------------------------------------------


def _masked_attention_solution(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, L, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # False = may not attend
    weights = torch.softmax(scores, dim=-1)  # over the keys: each row sums to 1
    return weights @ v  # (B, L, Ev)


def _attention_mistakes(q, k, v, mask) -> list[tuple[torch.Tensor, str]]:
    """What the common slips compute, each with the words that explain it."""
    d_k, d_v = q.shape[-1], v.shape[-1]
    raw = q @ k.transpose(-2, -1)  # (B, L, S)
    neg = float("-inf")

    def attend(scores, dim=-1):
        return torch.softmax(scores, dim=dim) @ v

    plain = torch.softmax((raw / math.sqrt(d_k)).masked_fill(~mask, neg), dim=-1)
    return [
        (
            attend(raw.masked_fill(~mask, neg)),
            "you forgot to divide the scores by sqrt(d_k): without it the softmax saturates "
            "as d_k grows",
        ),
        (
            attend((raw / d_k).masked_fill(~mask, neg)),
            "you divided the scores by d_k; divide by its square root, sqrt(d_k)",
        ),
        (
            attend((raw / math.sqrt(d_v)).masked_fill(~mask, neg)),
            "you scaled by sqrt of the value width; the scale is sqrt(d_k), the width of "
            "the queries and keys (q.shape[-1])",
        ),
        (
            attend((raw / math.sqrt(d_k)).masked_fill(~mask, neg), dim=-2),
            "your softmax runs over the queries (dim=-2); it must run over the keys "
            "(dim=-1), so that each query's weights sum to 1",
        ),
        (
            attend((raw / math.sqrt(d_k)).masked_fill(mask, neg)),
            "your mask is inverted: here True means *may attend* (the convention of "
            "F.scaled_dot_product_attention), so fill the scores where the mask is False",
        ),
        (
            attend(raw / math.sqrt(d_k)),
            "the mask is not applied: set the scores where mask is False to -inf before "
            "the softmax",
        ),
        (
            (torch.softmax(raw / math.sqrt(d_k), dim=-1) * mask) @ v,
            "you masked the weights after the softmax, so the rows no longer sum to 1; "
            "mask the scores (with -inf) before the softmax",
        ),
        (
            attend(raw / math.sqrt(d_k) * mask),
            "multiplying the scores by the mask sets them to 0, and exp(0) = 1 still gets "
            "weight; fill them with -inf instead",
        ),
        (plain, "you returned the attention weights; return the weighted values weights @ v"),
    ]


def _check_masked_attention(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    for B, L, S, E, Ev in [(1, 3, 3, 2, 2), (2, 4, 6, 16, 5), (3, 5, 7, 64, 8)]:
        q = torch.randn(B, L, E, generator=gen) * 2
        k = torch.randn(B, S, E, generator=gen) * 2
        v = torch.randn(B, S, Ev, generator=gen)
        mask = torch.rand(B, L, S, generator=gen) > 0.35
        mask[..., 0] = True  # every query may attend to at least one key
        what = f"q {(B, L, E)}, k {(B, S, E)}, v {(B, S, Ev)} and mask {(B, L, S)}"
        got = call(fn, q.clone(), k.clone(), v.clone(), mask.clone(), what=what)
        expected = _sdpa(q, k, v, attn_mask=mask)[0]
        if isinstance(got, torch.Tensor) and (
            got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4)
        ):
            for wrong, message in _attention_mistakes(q, k, v, mask):
                if got.shape == wrong.shape and torch.allclose(
                    got, wrong, atol=1e-4, equal_nan=True
                ):
                    raise Mismatch(f"{what}: {message}")
        expect_close(got, expected, f"attention output for {what}", atol=1e-4)


q1 = Exercise(
    "Exercise 1: masked scaled dot-product attention",
    checker=_check_masked_attention,
    hints=[
        "Scores: q @ k.transpose(-2, -1), shape (B, L, S), divided by sqrt(d_k) = "
        "sqrt(q.shape[-1]).",
        "Masked positions (mask False) get -inf with scores.masked_fill(~mask, float('-inf')).",
        "Softmax over the keys, dim=-1, then multiply by v: (B, L, S) @ (B, S, Ev).",
    ],
    solution_fn=_masked_attention_solution,
)

# --- 2. the causal mask -------------------------------------------------------------------


def _causal_mask_solution(L: int) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()  # mask[i, j] = j <= i


def _check_causal_mask(fn) -> None:
    for L in (1, 4, 7):
        got = call(fn, L, what=f"L={L}")
        expected = _causal_mask(L)
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"L={L}: expected a tensor, got {type(got).__name__}")
        expect_shape(got, (L, L), f"causal mask for L={L}")
        if got.dtype != torch.bool:
            same_pattern = torch.equal(got != 0, expected)
            raise Mismatch(
                f"L={L}: expected dtype torch.bool, got {got.dtype}"
                + (
                    " (right pattern: but a float mask is *added* to the scores, so 1/0 "
                    "would mask nothing; use .bool())"
                    if same_pattern
                    else ""
                )
            )
        if L > 1 and torch.equal(got, expected.T):
            raise Mismatch(
                f"L={L}: this lets each token see the future (j >= i); it must see the past "
                "and itself, j <= i (lower triangle)"
            )
        if torch.equal(got, expected.tril(-1)):
            raise Mismatch(
                f"L={L}: the diagonal is masked, so a token cannot attend to itself (and "
                "token 0 to anything); keep j <= i"
            )
        if not torch.equal(got, expected):
            raise Mismatch(f"L={L}: expected mask[i, j] = (j <= i), got\n{got.int()}")


q2 = Exercise(
    "Exercise 2: the causal mask (True = may attend)",
    checker=_check_causal_mask,
    hints=[
        "Row i is query i; it may attend to keys j = 0..i. That is the lower triangle.",
        "torch.ones(L, L, dtype=torch.bool).tril() - or torch.arange(L)[None, :] <= "
        "torch.arange(L)[:, None].",
    ],
    solution_fn=_causal_mask_solution,
)

# --- 3. split the model width into heads --------------------------------------------------


def _split_heads_solution(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, D = x.shape
    x = x.reshape(B, N, num_heads, D // num_heads)  # (B, N, H, Dh): split D
    return x.transpose(1, 2)  # (B, H, N, Dh)


def _check_split_heads(fn) -> None:
    gen = torch.Generator().manual_seed(2)
    for B, N, D, H in [(1, 3, 4, 2), (2, 5, 12, 3), (2, 6, 16, 4)]:  # N != H
        x = torch.randn(B, N, D, generator=gen)
        what = f"x of shape {(B, N, D)} with num_heads={H}"
        got = call(fn, x.clone(), H, what=what)
        expected = rearrange(x, "b n (h d) -> b h n d", h=H)
        if isinstance(got, torch.Tensor) and got.shape == (B, N, H, D // H):
            raise Mismatch(
                f"{what}: shape (B, N, H, Dh); move the head axis before the tokens, "
                "(B, H, N, Dh), e.g. with .transpose(1, 2)"
            )
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if torch.equal(got, x.reshape(B, H, N, D // H)):
                raise Mismatch(
                    f"{what}: you reshaped (B, N, D) straight into (B, H, N, Dh), which mixes "
                    "features of different tokens into one head; split D into (H, Dh) first, "
                    "then transpose"
                )
            if torch.equal(got, rearrange(x, "b n (d h) -> b h n d", h=H)):
                raise Mismatch(
                    f"{what}: head i must own the consecutive features i*Dh ... (i+1)*Dh - 1 "
                    "(the layout of nn.MultiheadAttention), not every H-th feature"
                )
        expect_close(got, expected, f"heads of {what}", atol=0, rtol=0)


q3 = Exercise(
    "Exercise 3: split (B, N, D) into heads (B, H, N, Dh)",
    checker=_check_split_heads,
    hints=[
        "First x.reshape(B, N, H, D // H): each token's D features become H groups of Dh.",
        "Then .transpose(1, 2) so that every head sees all the tokens: (B, H, N, Dh).",
        "Or with einops: rearrange(x, 'b n (h d) -> b h n d', h=num_heads).",
    ],
    solution_fn=_split_heads_solution,
)

# --- 4. how large do dot products get? ----------------------------------------------------


def _check_variance(answer) -> None:
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        raise Mismatch(f"expected a number, got {answer!r}")
    if math.isclose(answer, 8):
        raise Mismatch("8 is the standard deviation sqrt(64); the question asks for the variance")
    if math.isclose(answer, 1):
        raise Mismatch(
            "1 is the variance *after* dividing by sqrt(d_k); before, the d_k terms add up"
        )
    if math.isclose(answer, 64 * 64):
        raise Mismatch("each of the 64 products has variance 1, not 64; the variances add")
    if not math.isclose(answer, 64):
        raise Mismatch(f"not quite: got {answer!r}; add up the variances of the 64 products")


q4 = Exercise(
    "Exercise 4: q and k have d_k = 64 independent components of mean 0 and variance 1. "
    "What is the variance of q . k?",
    checker=_check_variance,
    hints=[
        "q . k is a sum of 64 products q_i k_i. Each product has mean 0 and variance "
        "E[q_i^2] E[k_i^2] = 1.",
        "Independent terms: their variances add.",
    ],
    solution_text=(
        "Var(q . k) = sum over i of Var(q_i k_i) = 64 * 1 = 64, a standard deviation of 8; "
        "dividing by sqrt(d_k) = 8 brings it back to 1, whatever d_k is."
    ),
)
