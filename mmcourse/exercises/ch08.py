"""Exercises for notebooks/08_fine_tuning."""

from __future__ import annotations

import torch

from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_shape

# --- 1. the gradient of the cross-entropy -----------------------------------------------------


def _ce_grad_solution(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, C = z.shape
    p = torch.softmax(z, dim=-1)  # (B, C) predicted probabilities
    onehot = torch.nn.functional.one_hot(y, C).to(z.dtype)  # (B, C)
    return (p - onehot) / B  # d mean-CE / dz


def _check_ce_grad(fn) -> None:
    gen = torch.Generator().manual_seed(8)
    for B, C in [(4, 3), (7, 5), (1, 2)]:
        z = torch.randn(B, C, generator=gen) * 2
        y = torch.randint(0, C, (B,), generator=gen)
        what = f"logits z of shape {(B, C)}"
        got = call(fn, z.clone(), y.clone(), what=what)
        expected = _ce_grad_solution(z, y)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if B > 1 and torch.allclose(got, expected * B, atol=1e-5):
                raise Mismatch(
                    f"{what}: right direction, but the loss is the *mean* over the batch: "
                    "divide by B"
                )
            if torch.allclose(got, -expected, atol=1e-5):
                raise Mismatch(f"{what}: the sign is flipped; it is p - y, not y - p")
            onehot = torch.nn.functional.one_hot(y, C).to(z.dtype)
            if torch.allclose(got, (torch.sigmoid(z) - onehot) / B, atol=1e-5):
                raise Mismatch(
                    f"{what}: you used the sigmoid; with one label out of C classes the "
                    "probabilities are softmax(z)"
                )
        expect_close(got, expected, f"dL/dz for {what}", atol=1e-5)


q1 = Exercise(
    "Exercise 1: the gradient of the mean cross-entropy",
    checker=_check_ce_grad,
    hints=[
        "p = torch.softmax(z, dim=-1); y as one-hot: torch.nn.functional.one_hot(y, C).",
        "The loss is averaged over the B examples, so each row of the gradient is divided by B.",
    ],
    solution_fn=_ce_grad_solution,
)


# --- 2. one AdamW step ----------------------------------------------------------------------


def _adamw_solution(theta, g, m, v, t, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    theta = theta * (1 - lr * weight_decay)  # decoupled weight decay
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    return theta - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _adam_l2(theta, g, m, v, t, lr, betas, eps, weight_decay):
    return _adamw_solution(theta, g + weight_decay * theta, m, v, t, lr, betas, eps, 0.0)


def _check_adamw(fn) -> None:
    gen = torch.Generator().manual_seed(9)
    cases = [(1, 0.1, (0.9, 0.999), 0.1), (3, 0.01, (0.8, 0.99), 0.05), (10, 0.05, (0.9, 0.9), 0.0)]
    for t, lr, betas, wd in cases:
        theta, g = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        m, v = torch.randn(5, generator=gen) * 0.1, torch.rand(5, generator=gen) * 0.1
        if t == 1:
            m, v = torch.zeros(5), torch.zeros(5)
        args = (theta, g, m, v, t, lr, betas, 1e-8, wd)
        what = f"t={t}, lr={lr}, betas={betas}, weight_decay={wd}"
        got = call(fn, *(a.clone() if isinstance(a, torch.Tensor) else a for a in args), what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise Mismatch(f"{what}: return the three tensors (theta, m, v)")
        expected = _adamw_solution(*args)
        if wd > 0 and torch.allclose(got[0], _adam_l2(*args)[0], atol=1e-6):
            raise Mismatch(
                f"{what}: you added weight_decay * theta to the gradient: that is Adam with L2, "
                "whose decay is rescaled by 1/sqrt(v_hat). AdamW decays theta directly: "
                "theta <- theta - lr * weight_decay * theta"
            )
        no_correction = _adamw_solution(theta, g, m, v, 10**9, lr, betas, 1e-8, wd)
        if torch.allclose(got[0], no_correction[0], atol=1e-6):
            raise Mismatch(
                f"{what}: the bias correction m / (1 - beta1^t), v / (1 - beta2^t) is missing"
            )
        if wd > 0 and torch.allclose(
            got[0], _adamw_solution(theta, g, m, v, t, lr, betas, 1e-8, wd / lr)[0], atol=1e-6
        ):
            raise Mismatch(
                f"{what}: the decay is theta * (1 - lr * weight_decay): multiply by lr too"
            )
        for name, a, b in zip(("theta", "m", "v"), got, expected, strict=True):
            expect_shape(a, tuple(b.shape), f"{name} for {what}")
            expect_close(a, b, f"{name} after the step, {what}", atol=1e-6)


q2 = Exercise(
    "Exercise 2: one AdamW step by hand",
    checker=_check_adamw,
    hints=[
        "Order: decay theta, update m and v, bias-correct them, then take the step.",
        "theta = theta * (1 - lr * weight_decay); m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2.",
        "theta = theta - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)",
    ],
    solution_fn=_adamw_solution,
)


# --- 3. the LoRA forward pass ---------------------------------------------------------------


def _lora_solution(x, W, b, A, B, alpha, r):
    return x @ W.T + b + (alpha / r) * (x @ A.T @ B.T)  # (N, D_out)


def _check_lora(fn) -> None:
    gen = torch.Generator().manual_seed(10)
    for N, d_in, d_out, r, alpha in [(3, 6, 4, 2, 4.0), (5, 8, 8, 4, 4.0), (2, 5, 3, 1, 8.0)]:
        x, W, b = (
            torch.randn(N, d_in, generator=gen),
            torch.randn(d_out, d_in, generator=gen),
            torch.randn(d_out, generator=gen),
        )
        A, B = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
        what = (
            f"x {(N, d_in)}, W {(d_out, d_in)}, A {(r, d_in)}, B {(d_out, r)}, alpha={alpha}, r={r}"
        )
        got = call(fn, x, W, b, A, B, alpha, r, what=what)
        expected = _lora_solution(x, W, b, A, B, alpha, r)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            base = x @ W.T + b
            update = x @ A.T @ B.T
            if alpha != r and torch.allclose(got, base + update, atol=1e-4):
                raise Mismatch(f"{what}: the update must be scaled by alpha / r")
            if torch.allclose(got, base + (r / alpha) * update, atol=1e-4) and alpha != r:
                raise Mismatch(f"{what}: the scale is alpha / r, not r / alpha")
            if torch.allclose(got, base, atol=1e-4):
                raise Mismatch(f"{what}: the low-rank update (alpha / r) B A x is missing")
        expect_close(got, expected, f"LoRA output for {what}", atol=1e-4)


q3 = Exercise(
    "Exercise 3: the LoRA forward pass",
    checker=_check_lora,
    hints=[
        "A row-vector batch x (N, D_in) goes through W as x @ W.T.",
        "h = x W^T + b + (alpha / r) * (x A^T) B^T",
    ],
    solution_fn=_lora_solution,
)


# --- 4. which strategy? -------------------------------------------------------------------------


def _check_choice(answer) -> None:
    if not isinstance(answer, str) or answer.strip().lower() not in {"a", "b", "c", "d"}:
        raise Mismatch(f"answer with one of the letters 'a', 'b', 'c', 'd', got {answer!r}")
    letter = answer.strip().lower()
    why = {
        "a": "not (a): full fine-tuning keeps a whole copy of the 22.7 M weights per task, and "
        "AdamW two more for its moments while training - the most memory, not the least",
        "b": "not (b): top-k layers shares the frozen lower blocks but stores full copies of "
        "the top k blocks per task - millions of numbers, where LoRA stores a few matrices",
        "d": "not (d): a probe (head only) trains the fewest parameters but cannot change the "
        "features at all; the question asked for the tower to adapt",
    }
    if letter in why:
        raise Mismatch(why[letter])


q4 = Exercise(
    "Exercise 4: many tasks, one pretrained tower",
    checker=_check_choice,
    hints=[
        "Which strategy stores only a few matrices per task, and still changes the tower's features?"
    ],
    solution_text=(
        "(c). LoRA: per task only A and B (under 1 % of MiniLM's weights here) are stored and "
        "trained, the frozen tower is shared by all tasks, and the features still adapt; "
        "the adapters can even be merged into W for inference at no extra cost."
    ),
)
