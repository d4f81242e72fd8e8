"""One way to build every chapter's explorer: controls that redraw one figure in place.

An explorer is a draw function ``draw(fig, **values)`` that fills a matplotlib figure for one
setting of its knobs, plus a dict of ipywidgets controls named like the function's keyword
arguments. :func:`explore` draws the figure once at the controls' starting values and shows it
as an ordinary cell output, so the notebook *stores* that figure:

* with a Jupyter front end attached (JupyterLab, Notebook, VS Code, Colab) the controls are
  shown under the figure, and moving one clears the same figure, calls ``draw`` again and
  replaces the displayed image in place (``display_id`` + ``update``): one figure object for
  the explorer's life, never registered with pyplot, so nothing leaks and nothing flickers
  through a cleared output area;
* without one (papermill, nbclient, nbval, ``nbconvert --execute``, a static site built from the
  stored outputs) the controls are not shown; a one-line note under the figure says which values
  it was drawn at and that running the notebook in Jupyter makes it live. A learner who opens an
  executed chapter without running it sees a figure, not ``interactive(children=(...`` text.

Whether a front end is attached is decided by :func:`frontend_attached`:

1. the environment variable ``MMCOURSE_STATIC`` wins: ``1``/``true``/``yes`` -> static,
   ``0``/``false``/``no`` -> live (set it to ``0`` when you drive JupyterLab from a test process
   that would otherwise look like a headless executor, to ``1`` for any headless run the rules
   below miss);
2. no IPython kernel (plain Python, a unit test) or no ``ipywidgets`` -> static;
3. the kernel was started by a known headless executor -> static. The kernel process's parent
   is the process that launched it: papermill, nbclient, nbconvert or pytest (nbval) launch it
   themselves, as does ``mmcourse run``/``refresh``; JupyterLab and the others launch it from
   their server. The parent's command line is read from ``/proc`` (Linux); where it cannot be
   read, the kernel is taken to be live;
4. otherwise -> live.

Taught in notebooks/02_attention (the first explorer); used by every chapter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

STATIC_ENV = "MMCOURSE_STATIC"
# Programs that execute notebooks without a front end, as they appear in their command line
# (a script name or a ``-m`` module): they launch the kernel as their own child process.
HEADLESS_EXECUTORS = frozenset(
    {
        "papermill",
        "nbclient",
        "jupyter-execute",
        "nbconvert",
        "jupyter-nbconvert",
        "pytest",
        "py.test",
        "mmcourse",
    }
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parent_command_line() -> list[str] | None:
    """The command line of this process's parent, or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg for arg in raw.decode(errors="replace").split("\0") if arg]


def launched_by_headless_executor(command_line: list[str] | None) -> bool:
    """True when a parent command line names a headless notebook executor (see the module doc).

    Args:
        command_line: the parent process's arguments (``None``: unknown).
    Returns:
        Whether one argument, as a program or module name, is one of ``HEADLESS_EXECUTORS``.
    """
    if not command_line:
        return False
    for arg in command_line:
        name = Path(arg).name.lower()
        for suffix in (".exe", ".py"):
            name = name.removesuffix(suffix)
        if name in HEADLESS_EXECUTORS or name.split(".")[0] in HEADLESS_EXECUTORS:
            return True
    return False


def frontend_attached() -> bool:
    """Whether a Jupyter front end can show live widgets here (the rules in the module doc)."""
    forced = os.environ.get(STATIC_ENV, "").strip().lower()
    if forced in _TRUE:
        return False
    if forced in _FALSE:
        return True
    if forced:
        raise ValueError(f"{STATIC_ENV} must be one of 1/true/yes or 0/false/no, got {forced!r}")
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    return not launched_by_headless_executor(_parent_command_line())


def _describe(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    return str(value)


class Explorer:
    """One figure redrawn by ``draw(fig, **values)`` whenever a control changes.

    Args:
        draw: fills a cleared figure for one setting; takes the figure and, as keyword
            arguments, one value per control (plus ``fixed``).
        controls: ipywidgets controls by the keyword they feed (``{"tau": FloatSlider(...)}``).
        figsize: the figure's (width, height) in inches; it stays the same for every redraw.
        fixed: keyword arguments passed to every call of ``draw`` unchanged (models, data).
    """

    def __init__(
        self,
        draw: Callable[..., Any],
        controls: Mapping[str, Any],
        *,
        figsize: tuple[float, float] = (7.0, 3.5),
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(draw):
            raise TypeError(
                f"draw must be a function draw(fig, **values), got {type(draw).__name__}"
            )
        if not isinstance(controls, Mapping) or not controls:
            raise ValueError("controls must be a non-empty dict {keyword: ipywidgets control}")
        for name, control in controls.items():
            if not hasattr(control, "value") or not hasattr(control, "observe"):
                raise TypeError(
                    f"control {name!r} must be an ipywidgets control with .value and .observe, "
                    f"got {type(control).__name__}"
                )
        if len(figsize) != 2 or min(figsize) <= 0:
            raise ValueError(f"figsize must be (width, height) in inches > 0, got {figsize!r}")
        self.draw = draw
        self.controls = dict(controls)
        self.fixed = dict(fixed or {})
        clash = set(self.fixed) & set(self.controls)
        if clash:
            raise ValueError(f"names both fixed and controlled: {sorted(clash)}")
        # Made without pyplot: never shown by the inline backend at the end of a cell, never
        # counted by plt.get_fignums(), so redrawing cannot leak figures.
        self.figure = Figure(figsize=figsize)
        self._handle = None
        self._status = None
        self.error: str | None = None

    @property
    def values(self) -> dict[str, Any]:
        """The controls' current values, by keyword."""
        return {name: control.value for name, control in self.controls.items()}

    def update(self, **values: Any) -> Figure:
        """Redraw the figure at the controls' values, overridden by ``values``; return it.

        Raises:
            TypeError: a keyword that is not one of the controls.
        """
        unknown = set(values) - set(self.controls)
        if unknown:
            raise TypeError(
                f"unknown control(s) {sorted(unknown)}; expected {sorted(self.controls)}"
            )
        self.figure.clear()
        self.draw(self.figure, **self.fixed, **{**self.values, **values})
        if self._handle is not None:
            self._handle.update(self.figure)
        return self.figure

    def _on_change(self, _change: Any = None) -> None:
        try:
            self.update()
            self.error = None
        except Exception as exc:  # shown under the controls; the kernel must not lose the widget
            self.error = f"could not draw: {type(exc).__name__}: {exc}"
            logger.exception("explorer redraw failed")
        if self._status is not None:
            self._status.value = self.error or ""

    def static_note(self) -> str:
        """The one line shown under the figure when no front end is attached."""
        values = ", ".join(
            f"{getattr(control, 'description', '') or name} = "
            # a Dropdown or SelectionSlider shows its label, not the value behind it
            f"{getattr(control, 'label', None) or _describe(control.value)}"
            for name, control in self.controls.items()
        )
        return (
            f"*Static figure at {values}. Run this notebook in Jupyter to move "
            f"the control{'s' if len(self.controls) > 1 else ''} and redraw it.*"
        )

    def show(self, *, live: bool | None = None) -> list[Any]:
        """Draw once and display the figure, then the controls (live) or a note (static).

        Args:
            live: force live (True) or static (False); None decides by :func:`frontend_attached`.
        Returns:
            What was displayed, in order (for tests).
        """
        from IPython.display import Markdown, display

        if live is None:
            live = frontend_attached()
        self.update()
        self._handle = display(self.figure, display_id=True)
        if not live:
            note = Markdown(self.static_note())
            display(note)
            return [self.figure, note]
        import ipywidgets as widgets

        for control in self.controls.values():
            if hasattr(control, "continuous_update"):
                # Redraw when a slider is let go: a draw of ~0.1-0.5 s never queues up.
                control.continuous_update = False
            control.observe(self._on_change, names="value")
        self._status = widgets.HTML("")
        row = widgets.HBox(
            list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap")
        )
        box = widgets.VBox([row, self._status])
        display(box)
        return [self.figure, box]


def explore(
    draw: Callable[..., Any],
    *,
    figsize: tuple[float, float] = (7.0, 3.5),
    fixed: Mapping[str, Any] | None = None,
    live: bool | None = None,
    **controls: Any,
) -> Explorer:
    """Build an :class:`Explorer` and show it: the one call a notebook makes.

    Example::

        explore(draw_softmax, tau=widgets.FloatLogSlider(value=1, min=-1, max=1), fixed={"x": x})

    Args:
        draw: ``draw(fig, **values)``, filling the figure for one setting.
        figsize: the figure's size in inches.
        fixed: keyword arguments passed unchanged to every draw.
        live: force live/static; None decides by :func:`frontend_attached`.
        **controls: the ipywidgets controls, by the keyword of ``draw`` they set.
    Returns:
        The explorer (its ``figure`` and ``update`` are there for a test or a closer look).
    """
    explorer = Explorer(draw, controls, figsize=figsize, fixed=fixed)
    explorer.show(live=live)
    return explorer
