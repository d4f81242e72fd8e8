"""Exercises for notebooks/01_modalities_as_tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_equal
from mmcourse.modalities import patchify as _patchify

# --- 1. image -> patches ----------------------------------------------------------------


def _check_patchify(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    for B, C, H, W, P in [(1, 1, 4, 4, 2), (2, 3, 8, 8, 4), (3, 3, 6, 9, 3), (1, 2, 16, 8, 8)]:
        images = torch.randn(B, C, H, W, generator=gen)
        what = f"images of shape {(B, C, H, W)} with patch_size={P}"
        got = call(fn, images.clone(), P, what=what)
        expected = _patchify(images, P)
        if (
            isinstance(got, torch.Tensor)
            and got.shape == expected.shape
            and not torch.allclose(got, expected)
        ):
            # A common slip: flattening each patch as (c, p1, p2) instead of (p1, p2, c).
            alt = images.unfold(2, P, P).unfold(3, P, P)  # (B, C, h, w, P, P)
            alt = alt.permute(0, 2, 3, 1, 4, 5).reshape(expected.shape)
            if torch.allclose(got, alt):
                raise Mismatch(
                    f"{what}: right patches, but each one is flattened channel-first (c, p1, p2); "
                    "the ViT layout is (p1, p2, c) - channels last"
                )
        expect_close(got, expected, f"patchify of {what}", atol=0, rtol=0)


q1 = Exercise(
    "Exercise 1: cut images into patches",
    checker=_check_patchify,
    hints=[
        "Split H into (H/P, P) and W into (W/P, P) with one reshape.",
        "Then permute so that the grid axes (h, w) come first and the patch axes (P, P, C) last.",
        "Or with einops: rearrange(images, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1=P, p2=P).",
    ],
    solution_fn=_patchify,
)

# --- 2. how many tokens does an image become? -------------------------------------------


def _check_token_count(answer) -> None:
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise Mismatch(f"expected a whole number of tokens, got {answer!r}")
    if answer == 224 // 16:
        raise Mismatch("that is the number of patches along one side; the grid is two-dimensional")
    if answer == 196 * 16 * 16 * 3:
        raise Mismatch("that is the number of values, not of tokens (one token per patch)")
    expect_equal(answer, (224 // 16) ** 2, "number of patch tokens")


q2 = Exercise(
    "Exercise 2: a 224x224 RGB image cut into 16x16 patches: how many tokens?",
    checker=_check_token_count,
    hints=["One token per patch; count patches along each side, then multiply."],
    solution_text="(224 / 16) ** 2 = 14 * 14 = 196 tokens, each a vector of 16*16*3 = 768 values.",
)

# --- 3. the mel scale -------------------------------------------------------------------


def _hz_to_mel_solution(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _check_hz_to_mel(fn) -> None:
    f = torch.tensor([0.0, 100.0, 440.0, 700.0, 1000.0, 4000.0, 8000.0])
    got = call(fn, f.clone(), what="frequencies [0, 100, 440, 700, 1000, 4000, 8000] Hz")
    if isinstance(got, torch.Tensor) and got.shape == f.shape:
        if torch.allclose(got, 2595.0 * torch.log(1.0 + f / 700.0), rtol=1e-4):
            raise Mismatch("you used the natural log with the constant 2595; use log10 with 2595")
    # 1127 * ln(1 + f/700) is the same scale written with ln, and passes too.
    expect_close(got, _hz_to_mel_solution(f), "mel values", atol=1e-2, rtol=1e-4)


q3 = Exercise(
    "Exercise 3: convert hertz to mels (HTK formula)",
    checker=_check_hz_to_mel,
    hints=["m = 2595 * log10(1 + f / 700); 1000 Hz should come out close to 1000 mel."],
    solution_fn=_hz_to_mel_solution,
)

# --- 4. similarity in the shared space --------------------------------------------------


def _cosine_similarity_solution(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # (B, M)


def _check_cosine(fn) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 8, generator=gen) * 3, torch.randn(7, 8, generator=gen)
    got = call(fn, a.clone(), b.clone(), what="a of shape (5, 8) and b of shape (7, 8)")
    if isinstance(got, torch.Tensor) and got.shape == (5, 7) and torch.allclose(got, a @ b.T):
        raise Mismatch("these are raw dot products; normalise each row to unit length first")
    expect_close(got, _cosine_similarity_solution(a, b), "similarity matrix (5, 7)", atol=1e-5)


q4 = Exercise(
    "Exercise 4: the cosine-similarity matrix between two sets of embeddings",
    checker=_check_cosine,
    hints=[
        "Divide each row by its L2 norm (torch.nn.functional.normalize(x, dim=-1)).",
        "Then one matrix product: (B, D) @ (D, M) -> (B, M).",
    ],
    solution_fn=_cosine_similarity_solution,
)
