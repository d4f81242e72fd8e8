"""Exercises with instant feedback: ``check()``, ``hint()`` and ``solution()``.

In the spirit of Kaggle Learn's *learntools*: each exercise knows a reference solution and a
set of hidden cases. ``q1.check(your_function)`` runs your function on those cases and says,
in words, what is wrong (a shape, a value, an exception) or that it is correct.

A chapter's exercises live in ``mmcourse.exercises.chNN`` and are used as::

    from mmcourse.exercises.ch01 import q1
    q1.check(patchify)   # prints feedback and returns True / False
    q1.hint()
    q1.solution()

Taught in notebooks/00_setup_and_tour (how exercises work) and used in every chapter.
"""

from __future__ import annotations

import inspect
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Exercise", "Mismatch", "expect_close", "expect_shape", "expect_equal", "call"]


class Mismatch(Exception):
    """Raised by a checker: the learner's answer is wrong, the message says how."""


class NotAttempted(Exception):
    """The learner's function still raises ``NotImplementedError`` or is ``None``."""


def call(fn: Callable, *args: Any, what: str | None = None, **kwargs: Any) -> Any:
    """Call the learner's function; turn its exceptions into feedback that names the inputs."""
    if fn is None:
        raise NotAttempted
    if not callable(fn):
        raise Mismatch(f"expected a function, got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        raise NotAttempted from err
    except Exception as err:  # the learner's bug: report it, do not crash the notebook
        where = f" on {what}" if what else ""
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        raise Mismatch(f"your function raised an error{where}: {last}") from err


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def expect_shape(got: Any, expected: Sequence[int], what: str) -> None:
    """Fail with a message naming ``what`` unless ``got`` has shape ``expected``."""
    shape = tuple(getattr(got, "shape", np.shape(got)))
    if shape != tuple(expected):
        raise Mismatch(f"{what}: expected shape {tuple(expected)}, got {shape}")


def expect_close(
    got: Any, expected: Any, what: str, *, atol: float = 1e-5, rtol: float = 1e-4
) -> None:
    """Fail unless ``got`` matches ``expected`` in shape and value (within tolerances)."""
    if got is None:
        raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
    g, e = _as_array(got).astype(float), _as_array(expected).astype(float)
    expect_shape(g, e.shape, what)
    if not np.all(np.isfinite(g)):
        raise Mismatch(f"{what}: your result contains NaN or inf")
    if not np.allclose(g, e, atol=atol, rtol=rtol):
        worst = np.unravel_index(np.argmax(np.abs(g - e)), e.shape) if e.ndim else ()
        raise Mismatch(
            f"{what}: values differ; largest difference {np.max(np.abs(g - e)):.3g} at index "
            f"{tuple(int(i) for i in worst)} (yours {g[worst]:.5g}, expected {e[worst]:.5g})"
        )


def expect_equal(got: Any, expected: Any, what: str) -> None:
    """Fail unless ``got == expected`` (for ints, strings, lists)."""
    if got != expected:
        raise Mismatch(f"{what}: expected {expected!r}, got {got!r}")


@dataclass
class Exercise:
    """One exercise: a prompt, a checker run on hidden cases, a hint and a solution.

    Args:
        name: shown in feedback, e.g. ``"Exercise 1: cut an image into patches"``.
        checker: called with the learner's answer; raises :class:`Mismatch` when wrong.
        hints: one or more hints, shown one at a time by :meth:`hint`.
        solution_fn: the reference solution; :meth:`solution` shows its source.
        solution_text: shown instead of (or before) the source, for non-code answers.
    """

    name: str
    checker: Callable[[Any], None]
    hints: Sequence[str] = ()
    solution_fn: Callable | None = None
    solution_text: str = ""
    _hint_index: int = field(default=0, repr=False)

    def feedback(self, answer: Any) -> tuple[bool, str]:
        """Run the checker on ``answer``; return ``(passed, message)`` without printing.

        ``None`` and ``...`` (the placeholders in the notebooks) count as not attempted.
        """
        try:
            if answer is None or answer is Ellipsis:
                raise NotAttempted
            self.checker(answer)
        except NotAttempted:
            return False, (
                f"[not attempted] {self.name}: replace the placeholder "
                "(`raise NotImplementedError` or `...`) with your answer."
            )
        except Mismatch as err:
            return False, f"[incorrect] {self.name}: {err}"
        return True, f"[correct] {self.name}. Well done!"

    def check(self, answer: Any) -> None:
        """Run the checker on ``answer`` and print what is right or wrong."""
        print(self.feedback(answer)[1])

    def passes(self, answer: Any) -> bool:
        """Whether ``answer`` passes, silently (for tests and scripts)."""
        return self.feedback(answer)[0]

    def hint(self) -> None:
        """Print the next hint (cycling through them)."""
        if not self.hints:
            print(f"{self.name}: no hint for this one; try solution().")
            return
        text = self.hints[self._hint_index % len(self.hints)]
        self._hint_index += 1
        print(f"Hint ({self._hint_index}/{len(self.hints)}): {text}")

    def solution(self) -> None:
        """Print the reference solution."""
        parts = [f"Solution: {self.name}"]
        if self.solution_text:
            parts.append(textwrap.dedent(self.solution_text).strip())
        if self.solution_fn is not None:
            parts.append(textwrap.dedent(inspect.getsource(self.solution_fn)).strip())
        print("\n\n".join(parts))
