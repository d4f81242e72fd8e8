"""The explorer helper, headless: redraws one figure, never leaks, degrades to a static figure."""

import ipywidgets as widgets
import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from mmcourse import widgets as mw

matplotlib.use("Agg")


def draw_line(fig, *, slope, label, kind=0, offset=0.0):
    ax = fig.subplots()
    ax.plot([0, 1], [offset, offset + slope])
    ax.set_title(f"{label}: slope {slope}")


def make(**kw):
    return mw.Explorer(
        draw_line,
        {
            "slope": widgets.FloatSlider(value=1.0, min=-2, max=2),
            "label": widgets.Text(value="a"),
            "kind": widgets.Dropdown(
                options=[("colour word", 0), ("shape word", 1)], description="query"
            ),
        },
        **kw,
    )


class FakeHandle:
    def __init__(self):
        self.updates = 0

    def update(self, obj):
        assert isinstance(obj, Figure)
        self.updates += 1


@pytest.fixture
def shown(monkeypatch):
    """Capture what show() displays instead of printing it."""
    out = []

    def fake_display(*objs, display_id=None, **_):
        out.extend(objs)
        return FakeHandle() if display_id else None

    monkeypatch.setattr("IPython.display.display", fake_display)
    return out


def test_update_redraws_the_same_figure_without_leaking():
    before = plt.get_fignums()
    explorer = make(fixed={"offset": 0.5})
    fig = explorer.update()
    assert fig.axes[0].get_title() == "a: slope 1.0"
    for slope in (-2.0, 0.0, 1.5):
        assert explorer.update(slope=slope) is fig
        assert len(fig.axes) == 1, "the figure is cleared before each draw"
        assert fig.axes[0].get_title() == f"a: slope {slope}"
        assert fig.axes[0].lines[0].get_ydata()[0] == 0.5
    explorer.controls["label"].value = "b"
    assert explorer.update().axes[0].get_title() == "b: slope 1.0"
    assert plt.get_fignums() == before


def test_static_show_displays_the_figure_and_a_one_line_note(shown):
    before = plt.get_fignums()
    explorer = make()
    explorer.show(live=False)
    fig, note = shown
    assert fig is explorer.figure and fig.axes[0].get_title() == "a: slope 1.0"
    assert "\n" not in note.data and "slope = 1" in note.data and "label = 'a'" in note.data
    assert "query = colour word" in note.data  # a Dropdown's label and description
    assert "Run this notebook in Jupyter" in note.data
    assert plt.get_fignums() == before


def test_live_show_redraws_in_place_when_a_control_moves(shown):
    explorer = make()
    explorer.show(live=True)
    fig, box = shown
    assert isinstance(box, widgets.VBox)
    slider = explorer.controls["slope"]
    assert slider.continuous_update is False
    slider.value = -1.5
    assert explorer._handle.updates == 1  # drawn once before display, then updated once
    assert fig.axes[0].get_title() == "a: slope -1.5"
    assert explorer.error is None


def test_a_failing_draw_is_reported_under_the_controls(shown):
    def draw(fig, *, n):
        if n > 3:
            raise ValueError("n too large")
        fig.subplots().set_title(str(n))

    explorer = mw.explore(draw, n=widgets.IntSlider(value=1, max=9), live=True)
    explorer.controls["n"].value = 5
    assert "n too large" in explorer.error and "n too large" in explorer._status.value
    explorer.controls["n"].value = 2
    assert explorer.error is None and explorer.figure.axes[0].get_title() == "2"


def test_headless_executors_are_recognised():
    yes = [
        ["/usr/bin/python3", "-m", "pytest", "-q", "--nbval-lax", "notebooks/02_attention.ipynb"],
        ["/venv/bin/python", "/venv/bin/papermill", "in.ipynb", "out.ipynb"],
        ["/venv/bin/python", "/venv/bin/mmcourse", "refresh", "03"],
        ["python", "-m", "jupyter", "nbconvert", "--execute", "x.ipynb"],
        ["/venv/bin/python", "/venv/bin/jupyter-execute", "x.ipynb"],
    ]
    no = [
        ["/venv/bin/python", "/venv/bin/jupyter-lab", "--no-browser"],
        ["python", "-m", "jupyterlab", "--port", "8888"],
        ["/venv/bin/python", "-m", "ipykernel_launcher", "-f", "/tmp/pytest-kernel.json"],
        [],
        None,
    ]
    assert all(mw.launched_by_headless_executor(c) for c in yes)
    assert not any(mw.launched_by_headless_executor(c) for c in no)


def test_frontend_detection(monkeypatch):
    monkeypatch.delenv(mw.STATIC_ENV, raising=False)
    assert mw.frontend_attached() is False  # a plain test process has no kernel
    monkeypatch.setenv(mw.STATIC_ENV, "0")
    assert mw.frontend_attached() is True
    monkeypatch.setenv(mw.STATIC_ENV, "yes")
    assert mw.frontend_attached() is False
    monkeypatch.setenv(mw.STATIC_ENV, "maybe")
    with pytest.raises(ValueError, match="MMCOURSE_STATIC"):
        mw.frontend_attached()


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(TypeError, match="draw must be a function"):
        mw.Explorer("draw", {"n": widgets.IntSlider()})
    with pytest.raises(ValueError, match="non-empty dict"):
        mw.Explorer(draw_line, {})
    with pytest.raises(TypeError, match="control 'n' must be an ipywidgets control"):
        mw.Explorer(draw_line, {"n": 3})
    with pytest.raises(ValueError, match="both fixed and controlled"):
        mw.Explorer(draw_line, {"slope": widgets.FloatSlider()}, fixed={"slope": 1})
    with pytest.raises(TypeError, match="unknown control"):
        make().update(slop=1.0)
