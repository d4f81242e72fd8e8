"""Exercises for notebooks/10_captioning_and_vqa."""

from __future__ import annotations

import torch

from mmcourse.caption_metrics import ngrams
from mmcourse.captioning import caption_loss
from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_equal
from mmcourse.generation import beam_step

# --- 1. one step of beam search ---------------------------------------------------------------


def _beam_solution(log_probs: torch.Tensor, beam_scores: torch.Tensor):
    K, V = log_probs.shape
    total = beam_scores[:, None] + log_probs  # (K, V): score of every extension
    scores, flat = torch.topk(total.reshape(-1), K)  # the K best of all K * V
    return scores, flat // V, flat % V  # beam = row, token = column


def _check_beam(fn) -> None:
    gen = torch.Generator().manual_seed(10)
    for K, V in [(2, 5), (3, 7), (4, 4), (1, 6)]:
        log_probs = torch.log_softmax(torch.randn(K, V, generator=gen) * 2, -1)
        beam_scores = -torch.rand(K, generator=gen) * 3
        what = f"K={K} beams over V={V} tokens"
        got = call(fn, log_probs.clone(), beam_scores.clone(), what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise Mismatch(
                f"{what}: return three tensors (scores, beam, token), got {type(got).__name__}"
            )
        ref = beam_step(log_probs, beam_scores[None], num_candidates=K)
        scores, beam, token = (torch.as_tensor(t) for t in got)
        only_lp = torch.topk(log_probs.reshape(-1), K).values
        if scores.shape == only_lp.shape and torch.allclose(scores.float(), only_lp) and K > 1:
            if not torch.allclose(only_lp, ref.scores[0]):
                raise Mismatch(
                    f"{what}: add each beam's accumulated score to its log-probabilities"
                )
        if K > 1 and beam.shape == (K,) and torch.equal(beam, torch.arange(K)):
            raise Mismatch(
                f"{what}: a beam may be extended several times or not at all: take the K best of "
                "all K * V extensions, not the best token of each beam"
            )
        if (
            token.shape == (K,)
            and torch.equal(token, ref.token[0])
            and not torch.equal(beam, ref.beam[0])
        ):
            raise Mismatch(
                f"{what}: the beam index is flat_index // V (the row), the token flat_index % V"
            )
        expect_close(scores, ref.scores[0], f"scores for {what}")
        expect_equal(beam.tolist(), ref.beam[0].tolist(), f"beam indices for {what}")
        expect_equal(token.tolist(), ref.token[0].tolist(), f"tokens for {what}")


q1 = Exercise(
    "Exercise 1: one step of beam search",
    checker=_check_beam,
    hints=[
        "Every (beam k, token v) pair is a candidate with score beam_scores[k] + log_probs[k, v].",
        "Flatten the (K, V) scores, take torch.topk(..., K); the flat index i is beam i // V, "
        "token i % V.",
    ],
    solution_fn=_beam_solution,
)

# --- 2. clipped n-gram precision --------------------------------------------------------------


def _clipped_solution(
    hypothesis: list[str], references: list[list[str]], n: int
) -> tuple[int, int]:
    h = ngrams(hypothesis, n)
    max_ref: dict = {}
    for r in references:
        for g, c in ngrams(r, n).items():
            max_ref[g] = max(max_ref.get(g, 0), c)
    return sum(min(c, max_ref.get(g, 0)) for g, c in h.items()), sum(h.values())


def _check_clipped(fn) -> None:
    cases = [
        ("the the the the".split(), ["the cat".split(), "the the cat".split()], 1),
        (
            "a red circle on the left".split(),
            ["a red disk on the left".split(), "there is a red circle".split()],
            2,
        ),
        ("a red red circle".split(), ["a red circle".split(), "red red red".split()], 1),
        ("a blue square".split(), ["a blue square and a red circle".split()], 3),
        ("circle".split(), ["a circle".split()], 2),
        (
            "a big blue box near the top".split(),
            ["a box".split(), "big blue box near the top".split()],
            4,
        ),
    ]
    for hyp, refs, n in cases:
        what = f"hypothesis {' '.join(hyp)!r}, n={n}"
        got = call(fn, list(hyp), [list(r) for r in refs], n, what=what)
        expected = _clipped_solution(hyp, refs, n)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Mismatch(f"{what}: return (matches, total), got {got!r}")
        matches, total = int(got[0]), int(got[1])
        unclipped = sum(
            c for g, c in ngrams(hyp, n).items() if any(g in ngrams(r, n) for r in refs)
        )
        if matches == unclipped != expected[0]:
            raise Mismatch(
                f"{what}: {matches} matches - clip each n-gram's count at its largest count "
                "in any single reference"
            )
        summed = sum(min(c, sum(ngrams(r, n)[g] for r in refs)) for g, c in ngrams(hyp, n).items())
        if matches == summed != expected[0]:
            raise Mismatch(f"{what}: clip at the maximum over the references, not their sum")
        expect_equal((matches, total), expected, f"(matches, total) for {what}")


q2 = Exercise(
    "Exercise 2: clipped n-gram precision",
    checker=_check_clipped,
    hints=[
        "Count the hypothesis's n-grams with collections.Counter of tuple(words[i:i+n]).",
        "For each n-gram, the clip is max over the references of its count there; matches = "
        "sum of min(count, clip); total = the number of n-grams of the hypothesis.",
    ],
    solution_fn=_clipped_solution,
)

# --- 3. the caption loss ----------------------------------------------------------------------


def _loss_solution(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    target = input_ids[:, 1:]
    nll = -log_p.gather(-1, target[..., None]).squeeze(-1)  # (B, T-1)
    return (nll * loss_mask[:, 1:]).sum()


def _check_loss(fn) -> None:
    gen = torch.Generator().manual_seed(3)
    for B, T, V in [(2, 5, 7), (3, 8, 11), (1, 4, 5)]:
        logits = torch.randn(B, T, V, generator=gen) * 2
        ids = torch.randint(0, V, (B, T), generator=gen)
        mask = (torch.rand(B, T, generator=gen) > 0.3).long()
        mask[:, 0] = 0
        what = f"logits of shape {(B, T, V)}"
        got = call(fn, logits.clone(), ids.clone(), mask.clone(), what=what)
        expected = caption_loss(logits, ids, mask, reduction="sum")
        wrong = isinstance(got, torch.Tensor) and got.numel() == 1
        wrong = wrong and not torch.isclose(got.float(), expected, atol=1e-4)
        if wrong:
            unshifted = torch.nn.functional.cross_entropy(
                logits.reshape(-1, V), ids.reshape(-1), reduction="none"
            ).view(B, T)
            if torch.isclose(got.float(), (unshifted * mask).sum(), atol=1e-4):
                raise Mismatch(f"{what}: shift by one - logits[:, t] predict input_ids[:, t + 1]")
            if torch.isclose(got.float(), caption_loss(logits, ids, mask), atol=1e-4):
                raise Mismatch(f"{what}: that is the mean; return the sum over the target tokens")
            full = torch.ones_like(mask)
            if torch.isclose(
                got.float(), caption_loss(logits, ids, full, reduction="sum"), atol=1e-4
            ):
                raise Mismatch(
                    f"{what}: only the targets marked in loss_mask (of the token predicted) count"
                )
        expect_close(got, expected, f"the loss for {what}", atol=1e-4)


q3 = Exercise(
    "Exercise 3: the caption loss",
    checker=_check_loss,
    hints=[
        "log_softmax over the vocabulary; the target of position t is input_ids[:, t + 1].",
        "Gather the log-probability of each target, negate, multiply by loss_mask[:, 1:], sum.",
    ],
    solution_fn=_loss_solution,
)
