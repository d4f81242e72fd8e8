"""Exercises for notebooks/05_fusion_strategies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_shape
from mmcourse.fusion import tensor_fusion as _tensor_fusion

# --- 1. late fusion -------------------------------------------------------------------------


def _late_fusion_solution(logits: list[torch.Tensor], weights: torch.Tensor | None = None):
    stacked = torch.stack(list(logits), dim=1)  # (B, M, C)
    if weights is None:
        return stacked.mean(dim=1)  # the average of the per-modality logits
    return torch.einsum("bmc,m->bc", stacked, weights)  # sum_m w_m * l_m


def _check_late_fusion(fn) -> None:
    gen = torch.Generator().manual_seed(5)
    cases = [
        (2, None),
        (3, None),
        (1, None),
        (2, torch.tensor([0.7, 0.3])),
        (3, torch.tensor([0.2, 0.5, 0.3])),
    ]
    for M, weights in cases:
        logits = [torch.randn(4, 6, generator=gen) * 3 for _ in range(M)]
        what = f"{M} modalities of logits (4, 6)" + (
            f" with weights {weights.tolist()}" if weights is not None else ", weights=None"
        )
        got = call(fn, [t.clone() for t in logits], weights, what=what)
        expected = _late_fusion_solution(logits, weights)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and M > 1:
            stacked = torch.stack(logits, 1)  # (B, M, C)
            if torch.allclose(got, stacked.sum(1), atol=1e-5):
                raise Mismatch(
                    f"{what}: you summed the logits - that is 000 §4.1's additive model, with the "
                    "same argmax, but late fusion averages: divide by M (or apply the weights)"
                )
            probs = stacked.softmax(-1)
            if torch.allclose(got, probs.mean(1), atol=1e-5) or (
                weights is not None
                and torch.allclose(got, torch.einsum("bmc,m->bc", probs, weights), atol=1e-5)
            ):
                raise Mismatch(
                    f"{what}: you combined probabilities (softmax first); here late fusion "
                    "combines the logits themselves, as fusion.LateFusion does"
                )
            if weights is not None and torch.allclose(got, stacked.mean(1), atol=1e-5):
                raise Mismatch(f"{what}: the weights were ignored; use sum_m w_m * logits_m")
        expect_close(got, expected, f"fused logits for {what}")


q1 = Exercise(
    "Exercise 1: late fusion of per-modality logits",
    checker=_check_late_fusion,
    hints=[
        "Stack the list into one tensor (B, M, C) with torch.stack(logits, dim=1).",
        "Without weights: the mean over the modality axis. With weights (M,): "
        "(stacked * weights[None, :, None]).sum(1).",
    ],
    solution_fn=_late_fusion_solution,
)

# --- 2. tensor fusion ------------------------------------------------------------------------


def _tensor_fusion_solution(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    h1 = F.pad(h1, (0, 1), value=1.0)  # [h1; 1], (B, d1 + 1)
    h2 = F.pad(h2, (0, 1), value=1.0)  # [h2; 1], (B, d2 + 1)
    return torch.einsum("bi,bj->bij", h1, h2).flatten(1)  # (B, (d1 + 1) * (d2 + 1))


def _check_tensor_fusion(fn) -> None:
    gen = torch.Generator().manual_seed(6)
    for B, d1, d2 in [(2, 3, 4), (3, 5, 2), (1, 1, 1)]:
        h1, h2 = torch.randn(B, d1, generator=gen), torch.randn(B, d2, generator=gen)
        what = f"h1 of shape {(B, d1)} and h2 of shape {(B, d2)}"
        got = call(fn, h1.clone(), h2.clone(), what=what)
        expected = _tensor_fusion([h1, h2])
        if isinstance(got, torch.Tensor):
            if got.shape[1:] == (d1 * d2,) or got.shape[1:] == (d1, d2):
                raise Mismatch(
                    f"{what}: {tuple(got.shape)} - you forgot to append the 1 to each vector; "
                    "without it the unimodal terms h1 and h2 are lost"
                )
            if got.shape[1:] == (d1 + 1, d2 + 1):
                raise Mismatch(f"{what}: right values, now flatten them to (B, (d1+1)*(d2+1))")
            if got.shape == expected.shape and not torch.allclose(got, expected, atol=1e-5):
                one1, one2 = F.pad(h1, (1, 0), value=1.0), F.pad(h2, (1, 0), value=1.0)
                if torch.allclose(got, torch.einsum("bi,bj->bij", one1, one2).flatten(1)):
                    raise Mismatch(f"{what}: you put the 1 first; append it at the end, [h; 1]")
                outer = expected.reshape(B, d1 + 1, d2 + 1)
                if torch.allclose(got, outer.transpose(1, 2).flatten(1), atol=1e-5):
                    raise Mismatch(
                        f"{what}: the flattening order is transposed; h1's index must vary "
                        "slowest (entry [i, j] goes to position i * (d2 + 1) + j)"
                    )
        expect_close(got, expected, f"tensor fusion of {what}")


q2 = Exercise(
    "Exercise 2: tensor fusion of two modalities",
    checker=_check_tensor_fusion,
    hints=[
        "Append a 1 to each vector: torch.cat([h, torch.ones(B, 1)], dim=1) or F.pad(h, (0, 1), value=1).",
        "The outer product per example: torch.einsum('bi,bj->bij', a, b), or a[:, :, None] * b[:, None, :].",
        "Flatten the last two axes with .flatten(1) (row-major: h1's index varies slowest).",
    ],
    solution_fn=_tensor_fusion_solution,
)

# --- 3. a modality-dropout mask -----------------------------------------------------------------


def _modality_dropout_solution(
    batch_size: int, num_modalities: int, p: float, generator: torch.Generator
) -> torch.Tensor:
    keep = torch.rand(batch_size, num_modalities, generator=generator) >= p  # (B, M)
    empty = ~keep.any(dim=1)  # (B,) examples that lost every modality
    rescue = torch.randint(0, num_modalities, (batch_size,), generator=generator)  # (B,)
    keep[empty, rescue[empty]] = True  # give each of them one modality back
    return keep


def _check_modality_dropout(fn) -> None:
    for B, M, p in [(4000, 2, 0.2), (4000, 3, 0.3), (500, 2, 0.0), (500, 1, 0.5), (4000, 2, 0.5)]:
        what = f"batch_size={B}, num_modalities={M}, p={p}"
        got = call(fn, B, M, p, torch.Generator().manual_seed(7), what=what)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"{what}: expected a torch tensor, got {type(got).__name__}")
        expect_shape(got, (B, M), f"mask for {what}")
        if got.dtype != torch.bool:
            raise Mismatch(f"{what}: expected a boolean mask (True = keep), got dtype {got.dtype}")
        if not got.any(dim=1).all():
            raise Mismatch(
                f"{what}: {int((~got.any(dim=1)).sum())} examples lost every modality; "
                "never drop all of them (give one back)"
            )
        if p == 0 and not got.all():
            raise Mismatch(f"{what}: with p=0 nothing may be dropped")
        if M > 1 and p > 0 and (got == got[0]).all():
            raise Mismatch(
                f"{what}: every example got the same mask; draw the decision per example "
                "(a (B, M) random tensor), not once for the batch"
            )
        dropped = 1 - got.float().mean().item()
        if p > 0 and M > 1 and not _plausible_drop_rate(dropped, p, M):
            flip = _plausible_drop_rate(dropped, 1 - p, M)
            raise Mismatch(
                f"{what}: {dropped:.2f} of the entries were dropped, expected about {p}"
                + (
                    " (is p the probability of *keeping*? it is the probability of dropping)"
                    if flip
                    else ""
                )
            )


def _plausible_drop_rate(dropped: float, p: float, M: int) -> bool:
    """Whether ``dropped`` is the share of dropped entries of a valid mask.

    Independent drops with one modality given back to empty rows drop p - p**M / M of the
    entries; redrawing the empty rows instead drops (p - p**M) / (1 - p**M). Both are fine.
    """
    return (p - p**M) / (1 - p**M) - 0.03 <= dropped <= p + 0.03


q3 = Exercise(
    "Exercise 3: a modality-dropout mask",
    checker=_check_modality_dropout,
    hints=[
        "torch.rand(batch_size, num_modalities, generator=generator) >= p keeps each entry "
        "with probability 1 - p.",
        "Rows with no True left: ~keep.any(dim=1). For each of them set one random column "
        "(torch.randint) back to True.",
    ],
    solution_fn=_modality_dropout_solution,
)

# --- 4. which strategy survives a missing modality? ---------------------------------------------

_WRONG_CHOICES = {
    "a": "early fusion's joint MLP reads the image and audio features together; with the "
    "audio replaced by its average, those layers see a combination they never met in training",
    "b": "every product h_image[i] * h_audio[j] changes when the audio changes, and the "
    "classifier reads all of them at once; only the appended-1 terms pass h_image unchanged",
    "d": "in this FiLM the classifier reads the audio tokens, which the image scales and "
    "shifts; without the audio the image acts on a constant input, a computation never "
    "done in training (it may partly work, but nothing guarantees it)",
}


def _check_survivor(answer) -> None:
    if not isinstance(answer, str) or answer.strip().lower() not in ("a", "b", "c", "d"):
        raise Mismatch(f'answer with one of the letters "a", "b", "c" or "d", got {answer!r}')
    choice = answer.strip().lower()
    if choice in _WRONG_CHOICES:
        raise Mismatch(f"not ({choice}): {_WRONG_CHOICES[choice]}")


q4 = Exercise(
    "Exercise 4: which model's image pathway is untouched when the audio is missing?",
    checker=_check_survivor,
    hints=[
        "Ask of each model: is there a part of it that was trained to predict from the image "
        "alone, and can it be used unchanged?"
    ],
    solution_text="""
        (c). Late fusion has one complete classifier per modality; its image head computes
        exactly what it computed in training, so averaging only the heads that are present
        (here: the image head) feeds no layer an input it never saw. Every other strategy
        mixes the modalities *inside* the model, so a missing one shifts what its later
        layers see. One caveat, measured in section 5: a head trained only through the
        average was never asked to be right on its own, so it is weaker than a model
        trained on the image alone. Modality dropout (or a loss on each head) fixes that.
    """,
)
