"""Exercises for notebooks/09_knowledge_distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcourse.exercises import Exercise, Mismatch, call, expect_close

# --- 1. the softened softmax -----------------------------------------------------------------


def _softmax_t_solution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits / temperature  # divide first, then an ordinary (stable) softmax
    z = z - z.max(dim=-1, keepdim=True).values  # subtracting the max changes nothing but overflow
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)


def _check_softmax_t(fn) -> None:
    gen = torch.Generator().manual_seed(9)
    cases = [((3, 5), 1.0, 1.0), ((2, 6), 4.0, 3.0), ((7,), 0.5, 2.0), ((2, 3, 4), 8.0, 1.0)]
    cases.append(((2, 5), 2.0, 400.0))  # large logits: a naive exp overflows
    for shape, T, scale in cases:
        z = torch.randn(*shape, generator=gen) * scale
        what = f"logits of shape {shape} (scale {scale:g}) at T={T:g}"
        got = call(fn, z.clone(), T, what=what)
        expected = _softmax_t_solution(z, T)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if not torch.isfinite(got).all():
                raise Mismatch(
                    f"{what}: NaN or inf - exp overflowed; subtract the largest logit of each "
                    "row before exp (or use torch.softmax)"
                )
            distinct = not torch.allclose(expected, torch.softmax(z, -1), atol=1e-5)
            if distinct and torch.allclose(got, torch.softmax(z, -1), atol=1e-5):
                raise Mismatch(f"{what}: that is the softmax at T=1; divide the logits by T first")
            if distinct and torch.allclose(got, torch.softmax(z * T, -1), atol=1e-5):
                raise Mismatch(f"{what}: you multiplied by T; divide the logits by T")
            if len(shape) > 1 and torch.allclose(
                got.sum(0), torch.ones_like(got.sum(0)), atol=1e-5
            ):
                if not torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5):
                    raise Mismatch(f"{what}: normalised over the wrong axis; use the last (dim=-1)")
        expect_close(got, expected, f"p^T for {what}")


q1 = Exercise(
    "Exercise 1: the softmax with temperature",
    checker=_check_softmax_t,
    hints=[
        "Divide the logits by T, then take an ordinary softmax over the last axis.",
        "torch.softmax(logits / temperature, dim=-1) is stable; by hand, subtract "
        "z.max(dim=-1, keepdim=True).values before torch.exp.",
    ],
    solution_fn=_softmax_t_solution,
)

# --- 2. Hinton's loss ------------------------------------------------------------------------


def _kd_solution(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    T = temperature
    log_p_s = F.log_softmax(student_logits / T, dim=-1)  # (B, C)
    p_t = F.softmax(teacher_logits / T, dim=-1)  # (B, C)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean")  # sum over C, mean over B
    return alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)


def _check_kd(fn) -> None:
    gen = torch.Generator().manual_seed(10)
    for B, C, T, alpha in [
        (6, 10, 4.0, 0.7),
        (4, 5, 1.0, 0.5),
        (3, 24, 2.0, 1.0),
        (5, 7, 8.0, 0.3),
    ]:
        z_s = torch.randn(B, C, generator=gen)
        z_t = torch.randn(B, C, generator=gen) * 3
        y = torch.randint(0, C, (B,), generator=gen)
        what = f"B={B}, C={C}, T={T:g}, alpha={alpha:g}"
        got = call(fn, z_s.clone(), z_t.clone(), y.clone(), T, alpha, what=what)
        expected = _kd_solution(z_s, z_t, y, T, alpha)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            g = got.reshape(())
            ce = F.cross_entropy(z_s, y)
            kl = (
                expected.new_tensor(0.0)
                if alpha == 0
                else (expected - (1 - alpha) * ce) / (alpha * T**2)
            )
            log_p_s, p_t = F.log_softmax(z_s / T, -1), F.softmax(z_t / T, -1)
            wrong = {
                "the soft term is missing the factor T^2": alpha * kl + (1 - alpha) * ce,
                'the KL is averaged over all B*C entries (reduction="mean"); sum over classes and '
                'average over the batch ("batchmean")': alpha
                * T**2
                * (p_t * (p_t.log() - log_p_s)).mean()  # what reduction="mean" gives
                + (1 - alpha) * ce,
                "the KL goes the wrong way: it is KL(teacher || student), the teacher's distribution first": alpha
                * T**2
                * F.kl_div(
                    F.log_softmax(z_t / T, -1), F.softmax(z_s / T, -1), reduction="batchmean"
                )
                + (1 - alpha) * ce,
                "alpha weighs the soft term and 1 - alpha the hard one, not the other way round": (
                    1 - alpha
                )
                * T**2
                * kl
                + alpha * ce,
                "you took the cross-entropy on z_s / T; take it at T=1, on z_s itself": alpha
                * T**2
                * kl
                + (1 - alpha) * F.cross_entropy(z_s / T, y),
            }
            for message, value in wrong.items():
                if (
                    abs(g.item() - value.item()) < 1e-5
                    and abs(value.item() - expected.item()) > 1e-4
                ):
                    raise Mismatch(f"{what}: {message}")
        if isinstance(got, torch.Tensor) and got.dim() > 0 and got.numel() > 1:
            raise Mismatch(f"{what}: expected a scalar loss, got shape {tuple(got.shape)}")
        expect_close(got, expected, f"loss for {what}")


q2 = Exercise(
    "Exercise 2: the distillation loss with T^2 and batchmean",
    checker=_check_kd,
    hints=[
        "Soft term: F.kl_div(F.log_softmax(z_s / T, -1), F.softmax(z_t / T, -1), "
        'reduction="batchmean") - the student as log-probabilities, the teacher as probabilities.',
        "Multiply the soft term by T**2 and alpha; add (1 - alpha) * F.cross_entropy(z_s, labels).",
    ],
    solution_fn=_kd_solution,
)

# --- 3. the hidden-state loss ----------------------------------------------------------------


def _hidden_solution(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    projected = student_hidden @ W + b  # (B, N, Dt)
    per_token = ((projected - teacher_hidden) ** 2).mean(dim=-1)  # (B, N)
    m = mask.float()
    return (per_token * m).sum() / m.sum()  # the mean over real tokens


def _check_hidden(fn) -> None:
    gen = torch.Generator().manual_seed(11)
    for B, N, Ds, Dt in [(2, 5, 3, 6), (3, 4, 4, 4), (1, 6, 2, 5)]:
        hs = torch.randn(B, N, Ds, generator=gen)
        ht = torch.randn(B, N, Dt, generator=gen)
        W = torch.randn(Ds, Dt, generator=gen)
        b = torch.randn(Dt, generator=gen)
        mask = torch.ones(B, N, dtype=torch.long)
        mask[0, -2:] = 0  # the first example has two padding tokens
        what = f"student (B={B}, N={N}, Ds={Ds}), teacher Dt={Dt}, 2 padded tokens"
        got = call(fn, hs.clone(), ht.clone(), W.clone(), b.clone(), mask.clone(), what=what)
        expected = _hidden_solution(hs, ht, W, b, mask)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            g = got.reshape(()).item()
            sq = ((hs @ W + b - ht) ** 2).mean(-1)  # (B, N)
            if abs(g - sq.mean().item()) < 1e-5 and abs(sq.mean().item() - expected.item()) > 1e-5:
                raise Mismatch(f"{what}: the padding tokens were counted; weight by the mask")
            summed = ((hs @ W + b - ht) ** 2).sum(-1)
            if abs(g - ((summed * mask).sum() / mask.sum()).item()) < 1e-5:
                raise Mismatch(f"{what}: summed over the features; average them (mean over Dt)")
            if (
                abs(g - ((hs @ W - ht) ** 2).mean(-1).mul(mask).sum().item() / mask.sum().item())
                < 1e-5
            ):
                raise Mismatch(f"{what}: the bias b is missing from the projection")
        expect_close(got, expected, f"loss for {what}")


q3 = Exercise(
    "Exercise 3: the hidden-state loss with a projection",
    checker=_check_hidden,
    hints=[
        "Project: student_hidden @ W + b has shape (B, N, Dt).",
        "Square the difference, .mean(-1) over the features, then sum(per_token * mask) / mask.sum().",
    ],
    solution_fn=_hidden_solution,
)

# --- 4. T^2 and Adam ---------------------------------------------------------------------------

_WRONG = {
    "b": "with plain SGD the steps would shrink 64-fold, but Adam divides each update by a running "
    "estimate of the gradient's own size, so a constant factor on the loss cancels (up to its "
    "tiny epsilon); the T^2 matters when the soft term is mixed with another term",
    "c": "there are no hard labels in this loss; the soft term is the only thing the student sees",
}


def _check_adam(answer) -> None:
    if not isinstance(answer, str) or answer.strip().lower() not in ("a", "b", "c"):
        raise Mismatch(f'answer with one of the letters "a", "b" or "c", got {answer!r}')
    choice = answer.strip().lower()
    if choice in _WRONG:
        raise Mismatch(f"not ({choice}): {_WRONG[choice]}")


q4 = Exercise(
    "Exercise 4: what does T^2 do when the soft term is alone?",
    checker=_check_adam,
    hints=[
        "Write Adam's update: m / (sqrt(v) + eps). What happens to it if every gradient is scaled by c?"
    ],
    solution_text="""
        (a). Scaling the loss by a constant c scales every gradient by c; Adam's first moment
        m grows by c and the square root of its second moment v by c too, so the update
        m / (sqrt(v) + eps) is unchanged while sqrt(v) >> eps. The factor T^2 only matters
        relative to the other terms of the loss: next to the hard-label cross-entropy (or the
        attention and hidden terms), dropping it makes the soft term 64 times weaker at T = 8,
        which the temperature sweep of section 7 shows. With plain SGD it would matter alone too.
    """,
)
