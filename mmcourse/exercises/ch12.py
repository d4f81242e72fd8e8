"""Exercises for notebooks/12_robustness_and_adversarial_learning."""

from __future__ import annotations

import torch

from mmcourse.exercises import Exercise, Mismatch, call, expect_close

# --- 1. one PGD step with projection ----------------------------------------------------------


def _pgd_step_solution(x, x_adv, grad, eps, alpha):
    x_next = x_adv + alpha * grad.sign()  # ascent step along the sign of the gradient
    x_next = torch.min(torch.max(x_next, x - eps), x + eps)  # back into the L-inf ball around x
    return x_next.clamp(0.0, 1.0)  # and into the valid pixel range


def _check_pgd_step(fn) -> None:
    gen = torch.Generator().manual_seed(12)
    cases = [((2, 1, 4, 4), 0.1, 0.03), ((3, 3, 5, 5), 0.05, 0.05), ((1, 1, 8, 8), 0.3, 0.2)]
    for shape, eps, alpha in cases:
        x = torch.rand(shape, generator=gen)
        x_adv = (x + (torch.rand(shape, generator=gen) * 2 - 1) * eps).clamp(
            0, 1
        )  # inside the ball
        grad = torch.randn(shape, generator=gen)
        what = f"inputs of shape {shape}, eps={eps}, alpha={alpha}"
        got = call(fn, x.clone(), x_adv.clone(), grad.clone(), eps, alpha, what=what)
        expected = _pgd_step_solution(x, x_adv, grad, eps, alpha)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            step = x_adv + alpha * grad.sign()
            mistakes = [
                (
                    (x_adv + alpha * grad).clamp(x - eps, x + eps).clamp(0, 1),
                    "you stepped along the gradient itself; L-inf PGD uses its sign",
                ),
                (
                    (x_adv - alpha * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1),
                    "you stepped down the loss; an attack goes up (+ alpha * sign)",
                ),
                (
                    step.clamp(0, 1),
                    "no projection onto the ball: every value must stay within eps of the clean "
                    "x (a ball around x_adv does nothing: one step never leaves it)",
                ),
                (
                    torch.min(torch.max(step, x - eps), x + eps),
                    "values left [0, 1]; clip to the valid pixel range last",
                ),
            ]
            for wrong, message in mistakes:
                if torch.allclose(got, wrong, atol=1e-6) and not torch.allclose(
                    wrong, expected, atol=1e-6
                ):
                    raise Mismatch(f"{what}: {message}")
        expect_close(got, expected, f"next adversarial input for {what}", atol=1e-6)


q1 = Exercise(
    "Exercise 1: one L-inf PGD step with projection",
    checker=_check_pgd_step,
    hints=[
        "Step: x_adv + alpha * grad.sign().",
        "Project: torch.min(torch.max(x_next, x - eps), x + eps), then .clamp(0, 1).",
    ],
    solution_fn=_pgd_step_solution,
)

# --- 2. the budget at which a model breaks ----------------------------------------------------


def _breaking_eps_solution(eps_grid, accuracies):
    clean = accuracies[0]
    for eps, acc in zip(eps_grid, accuracies, strict=True):
        if acc <= clean / 2:
            return eps
    return None


def _check_breaking_eps(fn) -> None:
    cases = [
        ([0.0, 0.01, 0.02, 0.05, 0.1], [0.9, 0.8, 0.6, 0.45, 0.1], 0.05),
        ([0.0, 0.01, 0.02, 0.05], [0.8, 0.7, 0.4, 0.1], 0.02),  # exactly half counts
        ([0.0, 0.1, 0.2], [0.6, 0.5, 0.4], None),
        ([0.0, 0.5, 1.0], [1.0, 0.2, 0.0], 0.5),
    ]
    for grid, accs, expected in cases:
        what = f"eps_grid={grid}, accuracies={accs}"
        got = call(fn, list(grid), list(accs), what=what)
        if got == expected or (
            expected is not None and got is not None and abs(got - expected) < 1e-12
        ):
            continue
        if expected is None:
            raise Mismatch(
                f"{what}: no budget brings the accuracy to half of {accs[0]}; return None"
            )
        if (
            got is not None
            and got in grid
            and accs[grid.index(got)] < accs[0] / 2
            and got > expected
        ):
            raise Mismatch(
                f"{what}: {got} is not the *smallest* breaking budget (at most half counts)"
            )
        if got in accs:
            raise Mismatch(f"{what}: return the budget eps, not the accuracy")
        raise Mismatch(f"{what}: expected {expected}, got {got!r}")


q2 = Exercise(
    "Exercise 2: the budget at which a model breaks",
    checker=_check_breaking_eps,
    hints=[
        "Walk through the grid in order; return the first eps with accuracy <= accuracies[0] / 2."
    ],
    solution_fn=_breaking_eps_solution,
)

# --- 3. a warning sign of gradient masking --------------------------------------------------

_WRONG = {
    "a": "a stronger attack finding more is what a sound evaluation looks like; the warning "
    "sign is the reverse",
    "b": "a one-step attack is weaker than a multi-step one, so FGSM accuracy above PGD "
    "accuracy is normal",
    "c": "an attack should hurt more than random noise; this is the other way round from a "
    "warning sign",
}


def _check_masking(answer) -> None:
    if not isinstance(answer, str) or answer.strip().lower() not in ("a", "b", "c", "d"):
        raise Mismatch(f'answer with one of the letters "a", "b", "c" or "d", got {answer!r}')
    choice = answer.strip().lower()
    if choice in _WRONG:
        raise Mismatch(f"not ({choice}): {_WRONG[choice]}")


q3 = Exercise(
    "Exercise 3: a warning sign of gradient masking",
    checker=_check_masking,
    hints=["An attack can only make things worse for the model, if it follows useful gradients."],
    solution_text="""
        (d). The clean input is one of the points FGSM could have chosen (eps = 0 is inside the
        ball). If the model is *more* accurate on FGSM's output than on clean inputs, the
        attack's single gradient step leads somewhere useless: the loss surface has been bent
        around the clean point, as after catastrophic overfitting. A multi-step attack with
        restarts will usually find the model fragile.
    """,
)
