"""Exercises for notebooks/03_positional_encoding."""

from __future__ import annotations

import torch

from mmcourse.exercises import (
    Exercise,
    Mismatch,
    call,
    expect_close,
    expect_equal,
    expect_shape,
)
from mmcourse.positional import apply_rotary, rope_cos_sin, sinusoidal_shift_matrix

# --- 1. the sinusoidal table ------------------------------------------------------------


def _sinusoidal_solution(num_positions: int, dim: int) -> torch.Tensor:
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (N, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)[None, :]  # (1, d/2): 2i
    angle = pos / 10000.0 ** (two_i / dim)  # (N, d/2)
    pe = torch.zeros(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)  # PE(pos, 2i)
    pe[:, 1::2] = torch.cos(angle)  # PE(pos, 2i+1)
    return pe.float()


def _interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N, d/2) and (N, d/2) -> (N, d) with columns first_0, second_0, first_1, ..."""
    return torch.stack([first, second], dim=-1).flatten(-2)


def _sinusoidal_mistakes(num_positions: int, dim: int) -> dict[str, torch.Tensor]:
    """What the common slips produce, each with the feedback that names it."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    right = pos / 10000.0 ** (2 * i / dim)
    k = torch.arange(dim, dtype=torch.float64)[None, :]  # the dimension index 0 .. d-1
    by_dim = pos / 10000.0 ** (k / dim)  # (N, d)
    from_one = (pos + 1) / 10000.0 ** (2 * i / dim)
    return {
        "sin and cos are swapped: even dimensions 2i take the sine, odd dimensions 2i+1 "
        "the cosine": _interleave(right.cos(), right.sin()),
        "the exponent uses i/d; the formula has 2i/d, where i counts sin/cos pairs "
        "(i = 0 .. d/2 - 1), so the frequencies fall twice as fast": _interleave(
            (pos / 10000.0 ** (i / dim)).sin(), (pos / 10000.0 ** (i / dim)).cos()
        ),
        "the exponent uses the dimension index itself (k/d for column k): a sin and the cos "
        "next to it must share one frequency, 2i/d for both columns 2i and 2i+1": _interleave(
            by_dim[:, 0::2].sin(), by_dim[:, 1::2].cos()
        ),
        "right values, wrong layout: you put all sines first and then all cosines "
        "(concatenated); the formula interleaves them, sin in column 2i and cos in 2i+1": (
            torch.cat([right.sin(), right.cos()], dim=1)
        ),
        "positions start at 1; the first position is pos = 0, whose row is (0, 1, 0, 1, ...)": (
            _interleave(from_one.sin(), from_one.cos())
        ),
        "you multiplied pos by 10000^(2i/d); divide by it (the frequencies must *fall* "
        "with i, from 1 down to about 1/10000)": _interleave(
            (pos * 10000.0 ** (2 * i / dim)).sin(), (pos * 10000.0 ** (2 * i / dim)).cos()
        ),
    }


def _check_sinusoidal(fn) -> None:
    for N, d in [(12, 8), (50, 16), (7, 4), (3, 2)]:
        what = f"num_positions={N}, dim={d}"
        got = call(fn, N, d, what=what)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        got = torch.as_tensor(got)
        if tuple(got.shape) == (d, N) and N != d:
            raise Mismatch(
                f"{what}: expected shape {(N, d)} (positions x dimensions), got {(d, N)}"
            )
        expect_shape(got, (N, d), f"the table for {what}")
        expected = _sinusoidal_solution(N, d)
        if not torch.allclose(got.double(), expected.double(), atol=1e-4):
            for message, wrong in _sinusoidal_mistakes(N, d).items():
                if torch.allclose(got.double(), wrong, atol=1e-4):
                    raise Mismatch(f"{what}: {message}")
        expect_close(got, expected, f"the table for {what}", atol=1e-4)


q1 = Exercise(
    "Exercise 1: the sinusoidal position table",
    checker=_check_sinusoidal,
    hints=[
        "Make a column of positions pos (N, 1) and a row of pair indices 2i = 0, 2, 4, ... (1, d/2).",
        "angle = pos / 10000 ** (2i / d) has shape (N, d/2); one frequency per sin/cos pair.",
        "Fill pe[:, 0::2] with sin(angle) and pe[:, 1::2] with cos(angle).",
    ],
    solution_fn=_sinusoidal_solution,
)

# --- 2. RoPE: rotate queries and keys ---------------------------------------------------


def _apply_rotary_solution(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # the two halves: channel j pairs with channel j + d/2
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return x * cos + rotated * sin


def _check_apply_rotary(fn) -> None:
    gen = torch.Generator().manual_seed(3)
    for shape, base in [((6, 8), 10000.0), ((2, 3, 10, 16), 100.0)]:
        N, d = shape[-2:]
        x = torch.randn(*shape, generator=gen)
        cos, sin = rope_cos_sin(N, d, base)
        what = f"x of shape {shape}"
        got = call(fn, x.clone(), cos.clone(), sin.clone(), what=what)
        expected = apply_rotary(x, cos, sin)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if not torch.allclose(got, expected, atol=1e-5):
                x1, x2 = x.chunk(2, dim=-1)
                half = d // 2
                c, s = cos[..., :half], sin[..., :half]
                x_even, x_odd = x[..., 0::2], x[..., 1::2]
                interleaved = _interleave(x_even * c - x_odd * s, x_even * s + x_odd * c)
                mistakes = {
                    "you rotate by minus the angle: rotate_half(x) is (-x2, x1), not (x2, -x1)": (
                        x * cos + torch.cat([x2, -x1], dim=-1) * sin
                    ),
                    "you pair neighbouring channels (0, 1), (2, 3), ... - the RoFormer paper's "
                    "interleaved layout; cos and sin here are in Llama's half-split layout, "
                    "which pairs channel j with channel j + d/2": interleaved,
                    "x * sin needs the rotated x: x * cos + rotate_half(x) * sin": x * cos
                    + x * sin,
                    "only x * cos: the sine term rotate_half(x) * sin is missing": x * cos,
                }
                for message, wrong in mistakes.items():
                    if torch.allclose(got, wrong, atol=1e-5):
                        raise Mismatch(f"{what}: {message}")
        expect_close(got, expected, f"the rotated {what}", atol=1e-5)


q2 = Exercise(
    "Exercise 2: apply rotary position embeddings (Llama layout)",
    checker=_check_apply_rotary,
    hints=[
        "Split the last axis into two halves x1, x2; rotate_half(x) = cat(-x2, x1).",
        "Then x * cos + rotate_half(x) * sin; cos and sin (N, d) broadcast over leading axes.",
    ],
    solution_fn=_apply_rotary_solution,
)

# --- 3. the shift matrix M_k ----------------------------------------------------------


def _shift_matrix_solution(k: int, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (d/2,)
    M = torch.zeros(dim, dim, dtype=torch.float64)
    for i, w in enumerate(omega):
        c, s = torch.cos(k * w), torch.sin(k * w)
        # [sin((p+k)w), cos((p+k)w)] = [[c, s], [-s, c]] @ [sin(pw), cos(pw)]
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[c, s], [-s, c]])
    return M.float()


def _check_shift_matrix(fn) -> None:
    for k, d in [(1, 4), (5, 8), (-3, 16), (12, 32)]:
        what = f"k={k}, dim={d}"
        got = call(fn, k, d, what=what)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        got = torch.as_tensor(got).double()
        expect_shape(got, (d, d), f"M_k for {what}")
        expected = sinusoidal_shift_matrix(k, d).double()
        if not torch.allclose(got, expected, atol=1e-4):
            if torch.allclose(got, expected.T, atol=1e-4):
                raise Mismatch(
                    f"{what}: your matrix takes PE(p) to PE(p - k), a rotation the other way; "
                    "transpose it (the sine above the diagonal is +sin(k w))"
                )
            if torch.allclose(got, torch.eye(d, dtype=torch.float64), atol=1e-4):
                raise Mismatch(
                    f"{what}: that is the identity; each pair turns by the angle k * w_i"
                )
        expect_close(got, expected, f"M_k for {what}", atol=1e-4)


q3 = Exercise(
    "Exercise 3: the matrix M_k with PE(p + k) = M_k PE(p)",
    checker=_check_shift_matrix,
    hints=[
        "Use sin(a + b) = sin a cos b + cos a sin b and cos(a + b) = cos a cos b - sin a sin b "
        "with a = p w_i and b = k w_i.",
        "So each pair (2i, 2i+1) gets the 2 x 2 block [[cos kw, sin kw], [-sin kw, cos kw]]; "
        "all other entries are 0 (torch.block_diag helps).",
    ],
    solution_fn=_shift_matrix_solution,
)

# --- 4. the size of a learned table -----------------------------------------------------


def _check_table_size(answer) -> None:
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise Mismatch(f"expected a whole number of parameters, got {answer!r}")
    if answer == 196 * 768:
        raise Mismatch("close: ViT also gives its [CLS] token a position, 196 patches + 1")
    if answer in (197, 196):
        raise Mismatch("that is the number of rows; every row is a vector of D = 768 numbers")
    if answer == 0:
        raise Mismatch("a *learned* table has parameters; the sinusoidal one has none")
    expect_equal(answer, 197 * 768, "parameters of the learned position table")


q4 = Exercise(
    "Exercise 4: how many parameters has ViT-B/16's learned position table at 224 x 224 (D = 768)?",
    checker=_check_table_size,
    hints=["One row per token: the 14 x 14 patches and the [CLS] token; one D-vector per row."],
    solution_text="(14 * 14 + 1) * 768 = 197 * 768 = 151,296 parameters.",
)
