"""Chapter 04's exercise checkers pass the solutions, fail common mistakes, and say why."""

import pytest
import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.encoders import ViTEncoder, count_parameters
from mmcourse.exercises import ch04
from mmcourse.exercises.ch04 import _VIT_CASES, _vit_parameters_solution


def _todo(*args):
    raise NotImplementedError


def _count_by_building(config):
    return count_parameters(ViTEncoder(config))


def test_solutions_pass(capsys):
    answers = [
        (ch04.q1, lambda x, W1, b1, W2, b2: F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)),
        (ch04.q2, lambda x, attn, ffn, n1, n2: (h := x + attn(n1(x))) + ffn(n2(h))),
        (ch04.q3, _vit_parameters_solution),
        (ch04.q3, _count_by_building),  # building the model and counting is fine too
        (ch04.q4, lambda m: ~m.bool()),
    ]
    assert_all_pass(answers, capsys)


def test_formula_matches_the_model_for_every_hidden_case():
    for config in _VIT_CASES:
        assert _vit_parameters_solution(config) == _count_by_building(config)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch04.q1, ch04.q2, ch04.q3, ch04.q4):
        assert not q.passes(_todo)
        q.check(_todo)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def _relu_ffn(x, W1, b1, W2, b2):
    return F.relu(x @ W1.T + b1) @ W2.T + b2


def _post_norm(x, attn, ffn, n1, n2):
    h = n1(x + attn(x))
    return n2(h + ffn(h))


def _normalised_stream(x, attn, ffn, n1, n2):
    x = n1(x)
    x = x + attn(x)
    return x + ffn(n2(x))


@pytest.mark.parametrize(
    "exercise, answer, phrase",
    [
        (ch04.q1, _relu_ffn, "ReLU"),
        (
            ch04.q1,
            lambda x, W1, b1, W2, b2: F.gelu(x @ W1.T + b1, approximate="tanh") @ W2.T + b2,
            "tanh approximation",
        ),
        (ch04.q1, lambda x, W1, b1, W2, b2: (x @ W1.T + b1) @ W2.T + b2, "no non-linearity"),
        (ch04.q1, lambda x, W1, b1, W2, b2: F.gelu(x @ W1.T + b1) @ W2.T, "output bias b2"),
        (ch04.q1, lambda x, W1, b1, W2, b2: x + F.gelu(x @ W1.T + b1) @ W2.T + b2, "residual"),
        (ch04.q1, lambda x, W1, b1, W2, b2: F.gelu(x @ W1 + b1) @ W2 + b2, "raised an error"),
        (ch04.q2, _post_norm, "post-norm"),
        (ch04.q2, _normalised_stream, "un-normalised x"),
        (ch04.q2, lambda x, attn, ffn, n1, n2: (h := x + attn(n1(x))) + ffn(n1(h)), "use norm2"),
        (ch04.q2, lambda x, attn, ffn, n1, n2: ffn(n2(x + attn(n1(x)))), "FFN's residual"),
        (ch04.q3, lambda c: _vit_parameters_solution(c) - c.dim, "[CLS] token"),
        (
            ch04.q3,
            lambda c: _vit_parameters_solution(c) + (c.num_patches + 1) * c.dim,
            "fixed buffer",
        ),
        (
            ch04.q3,
            lambda c: _vit_parameters_solution(c) - 2 * c.dim * c.norm_first,
            "final LayerNorm",
        ),
        (ch04.q3, lambda c: float(_vit_parameters_solution(c)), "whole number"),
        (ch04.q3, lambda c: 12345, "off by"),
        (ch04.q4, lambda m: m.bool(), "inverted"),
        (ch04.q4, lambda m: 1.0 - m.float(), "boolean mask"),
        (ch04.q4, lambda m: m[0] == 0, "expected shape (3, 4)"),
    ],
)
def test_mistakes_get_specific_feedback(exercise, answer, phrase, capsys):
    assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    ch04.q3.hint()
    ch04.q3.hint()
    ch04.q2.solution()
    out = capsys.readouterr().out
    assert "Hint (1/3)" in out and "Hint (2/3)" in out
    assert "def _pre_norm_solution" in out and "norm1(x)" in out


def test_checker_does_not_change_global_state():
    state = torch.random.get_rng_state()
    ch04.q2.passes(_post_norm)
    assert torch.equal(state, torch.random.get_rng_state())
