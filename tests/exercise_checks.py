"""Shared assertions for the exercise-checker tests of every chapter."""


def assert_all_pass(answers, capsys) -> None:
    """Each (exercise, answer) passes silently and prints "[correct]" when checked."""
    for exercise, answer in answers:
        assert exercise.passes(answer), exercise.feedback(answer)[1]
        exercise.check(answer)
    assert capsys.readouterr().out.count("[correct]") == len(answers)


def assert_feedback(exercise, answer, phrase: str, capsys) -> None:
    """``answer`` fails, and the printed feedback says "[incorrect]" and ``phrase``."""
    assert not exercise.passes(answer), phrase
    exercise.check(answer)
    out = capsys.readouterr().out
    assert "[incorrect]" in out and phrase in out, (phrase, out)
