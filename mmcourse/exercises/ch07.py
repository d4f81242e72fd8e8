"""Exercises for notebooks/07_pretraining_objectives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_shape

# --- 1. the MLM loss ------------------------------------------------------------------------------


def _mlm_loss_solution(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    chosen = labels != -100  # (B, N): the masked positions
    log_p = logits.log_softmax(dim=-1)[chosen]  # (|M|, V)
    return -log_p.gather(1, labels[chosen][:, None]).mean()  # mean over masked tokens


def _check_mlm_loss(fn) -> None:
    gen = torch.Generator().manual_seed(7)
    for B, N, V in [(2, 5, 7), (3, 6, 11), (1, 4, 5)]:
        logits = torch.randn(B, N, V, generator=gen) * 2
        ids = torch.randint(0, V, (B, N), generator=gen)
        chosen = torch.rand(B, N, generator=gen) < 0.4
        chosen[0, 1] = chosen[0, 2] = True  # at least two masks, so that sum != mean
        if B > 1:  # rows with different numbers of masked tokens
            chosen[1] = False
            chosen[1, 2] = True
        labels = ids.masked_fill(~chosen, -100)
        what = f"logits {(B, N, V)} with {int(chosen.sum())} masked positions"
        got = call(fn, logits.clone(), labels.clone(), what=what)
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            everywhere = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            if torch.allclose(got.float(), everywhere, atol=1e-5):
                raise Mismatch(
                    f"{what}: you averaged over every position (as if the labels were the input "
                    "ids); the loss is over the masked positions only, labels == -100 are ignored"
                )
            total = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            if torch.allclose(got.float(), total, atol=1e-4):
                raise Mismatch(f"{what}: you summed; take the mean over the masked positions")
            per_row = [
                F.cross_entropy(logits[b][labels[b] != -100], labels[b][labels[b] != -100])
                for b in range(B)
                if (labels[b] != -100).any()
            ]
            if B > 1 and torch.allclose(got.float(), torch.stack(per_row).mean(), atol=1e-5):
                raise Mismatch(
                    f"{what}: you averaged per caption, then over captions; BERT averages over "
                    "all masked tokens of the batch at once (a caption with more masks weighs more)"
                )
            if chosen.sum() < B * N:
                over_all = -(
                    logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * chosen
                ).sum()
                if torch.allclose(got.float(), over_all / (B * N), atol=1e-5):
                    raise Mismatch(
                        f"{what}: right terms, wrong denominator - divide by the number of "
                        "masked positions, not by B * N"
                    )
        expect_close(got, expected, f"MLM loss for {what}")


q1 = Exercise(
    "Exercise 1: the MLM loss over masked positions",
    checker=_check_mlm_loss,
    hints=[
        "chosen = labels != -100 selects the masked positions (a (B, N) bool tensor).",
        "logits.log_softmax(-1)[chosen] is (|M|, V); pick each row's label with .gather and "
        "average the negatives. Or: F.cross_entropy(logits.flatten(0, 1), labels.flatten(), "
        "ignore_index=-100).",
    ],
    solution_fn=_mlm_loss_solution,
)

# --- 2. hard-negative sampling weights ------------------------------------------------------------


def _negative_weights_solution(similarity: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    positive = ids[:, None] == ids[None, :]  # (B, B): the diagonal and identical captions
    return similarity.masked_fill(positive, -math.inf).softmax(dim=1)  # rows sum to 1


def _check_negative_weights(fn) -> None:
    gen = torch.Generator().manual_seed(3)
    cases = [
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([0, 1, 1, 2, 3]),  # texts 1 and 2 are the same caption
        torch.tensor([4, 4, 5, 6, 6, 7]),
    ]
    for ids in cases:
        B = len(ids)
        sim = torch.randn(B, B, generator=gen) * 3 + 4 * torch.eye(B)
        what = f"a ({B}, {B}) similarity with ids {ids.tolist()}"
        got = call(fn, sim.clone(), ids.clone(), what=what)
        expected = _negative_weights_solution(sim, ids)
        expect_shape(got, (B, B), f"weights for {what}")
        got = got.float()
        if torch.isnan(got).any():
            raise Mismatch(f"{what}: NaN in the weights (a row with no candidate left?)")
        if (got.diagonal() > 1e-6).any():
            raise Mismatch(f"{what}: the positive pair (the diagonal) must get weight 0")
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(B, dtype=torch.bool)
        if same.any() and (got[same] > 1e-6).any():
            raise Mismatch(
                f"{what}: an identical caption (same id) got a non-zero weight - it is a false "
                "negative, as true as the positive; exclude every pair with the same id"
            )
        if not torch.allclose(got.sum(1), torch.ones(B), atol=1e-5):
            raise Mismatch(
                f"{what}: each row must sum to 1 over the negatives (did you take the softmax "
                "first and zero the positives after? renormalise, or mask with -inf before)"
            )
        allowed = ~(ids[:, None] == ids[None, :])
        uniform = allowed.float() / allowed.sum(1, keepdim=True)
        if torch.allclose(got, uniform, atol=1e-5):
            raise Mismatch(f"{what}: uniform weights are random negatives; use softmax(similarity)")
        expect_close(got, expected, f"weights for {what}")


q2 = Exercise(
    "Exercise 2: hard-negative sampling weights without false negatives",
    checker=_check_negative_weights,
    hints=[
        "positive = ids[:, None] == ids[None, :] marks the diagonal and every identical caption.",
        "similarity.masked_fill(positive, float('-inf')).softmax(dim=1): exp(-inf) = 0.",
    ],
    solution_fn=_negative_weights_solution,
)

# --- 3. re-ranking the top-k with the fused (BLIP) score ------------------------------------------


def _rerank_solution(
    itc_scores: torch.Tensor, itm_scores: torch.Tensor, k: int, weight: float
) -> torch.Tensor:
    top = itc_scores.topk(k, dim=1).indices  # (Q, k): the ITC shortlist
    fused = itm_scores.gather(1, top) + weight * itc_scores.gather(1, top)  # (Q, k)
    best = fused.argmax(dim=1, keepdim=True)  # (Q, 1): position in the list
    return top.gather(1, best).squeeze(1)  # (Q,): candidate index


def _check_rerank(fn) -> None:
    gen = torch.Generator().manual_seed(11)
    for Q, C, k, weight in [(4, 10, 3, 2.0), (6, 8, 5, 0.5), (3, 5, 1, 1.0), (8, 12, 4, 3.0)]:
        itc = torch.randn(Q, C, generator=gen)
        itm = torch.randn(Q, C, generator=gen) * 2
        what = f"{Q} queries, {C} candidates, k={k}, weight={weight}"
        got = call(fn, itc.clone(), itm.clone(), k, weight, what=what)
        expected = _rerank_solution(itc, itm, k, weight)
        expect_shape(got, (Q,), f"re-ranked choice for {what}")
        got = torch.as_tensor(got).long()
        if torch.equal(got, expected):
            continue
        fused_all = (itm + weight * itc).argmax(1)
        if torch.equal(got, fused_all):
            raise Mismatch(
                f"{what}: you took the arg-max over all candidates; the fused score is only "
                "computed on ITC's top-k (running ITM on every candidate is what re-ranking avoids)"
            )
        if torch.equal(got, itm.argmax(1)):
            raise Mismatch(
                f"{what}: you took the ITM argmax over all candidates; ITM only re-scores the "
                "ITC top-k, and the score is ITM + weight * ITC"
            )
        if torch.equal(got, _rerank_solution(itc, itm, k, 0.0)):
            raise Mismatch(
                f"{what}: that is ALBEF's ITM-only re-ranking; add weight * the ITC score "
                "(BLIP's fused score)"
            )
        if torch.equal(got, itc.argmax(1)):
            raise Mismatch(f"{what}: that is the ITC ranking unchanged; add the ITM score")
        top = itc.topk(k, dim=1).indices
        local = (itm.gather(1, top) + weight * itc.gather(1, top)).argmax(1)
        if torch.equal(got, local):
            raise Mismatch(
                f"{what}: you returned the position inside the top-k list; map it back to the "
                "candidate index"
            )
        raise Mismatch(f"{what}: expected {expected.tolist()}, got {got.tolist()}")


q3 = Exercise(
    "Exercise 3: re-rank the ITC top-k with the fused score ITM + weight * ITC",
    checker=_check_rerank,
    hints=[
        "top = itc_scores.topk(k, dim=1).indices is the (Q, k) shortlist of candidate indices.",
        "fused = itm_scores.gather(1, top) + weight * itc_scores.gather(1, top) is (Q, k); "
        "argmax picks a position in the list, top.gather(1, position) turns it back into a "
        "candidate index.",
    ],
    solution_fn=_rerank_solution,
)
