"""Recording a chapter's key results so that papermill and ``mmcourse run`` can read them back.

A notebook calls :func:`record`; the value is shown in the notebook and also written into
the cell's output under a dedicated MIME type, so an executed ``.ipynb`` carries its own
results. :func:`read_results` collects them from such a file. Optional floors turn a key
result into a check: a regression fails the run (and CI) with a message naming the result.

**Timings.** A result that measures time (a duration, a speed-up, a throughput) is not
reproducible: it changes from run to run and machine to machine. Such a result is named
so that it says so: one of the words ``seconds``, ``speedup`` or ``per_second`` in its
``_``-separated name (``fit_seconds``, ``fused_speedup_at_max_length``,
``images_per_second_torchrun``). :func:`is_timing` applies this convention, and
``read_results(..., include_timings=False)`` leaves timings out; everything else a chapter
records must repeat exactly with the same seed on the same machine (tests/test_safety.py
runs a chapter twice to check).

:func:`merge_results_file` writes ``mmcourse run``'s ``results.json``: merged per chapter
into what is already there, through a temporary file and a rename, so an interrupted or
failed run never leaves it half written or emptied.

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MIME_TYPE = "application/vnd.mmcourse.result+json"

_RECORDED: dict[str, Any] = {}

# a result whose name holds one of these words measures time (see the module docstring)
TIMING_WORDS = ("seconds", "speedup", "per_second")
_TIMING_NAME = re.compile(r"(?:^|_)(?:" + "|".join(TIMING_WORDS) + r")(?:_|$)")


def is_timing(name: str) -> bool:
    """True if a result name says that it measures time (``*_seconds``, ``*_speedup*``,
    ``*_per_second*``): such a result is not expected to repeat exactly.

    Taught in notebooks/00_setup_and_tour.
    """
    return bool(_TIMING_NAME.search(name))


def _plain(value: Any) -> Any:
    """Turn numpy/torch scalars and arrays, tuples and mappings into JSON-ready values."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):  # pandas DataFrame / Series
        return _plain(value.to_dict())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"record() takes numbers, strings, lists and dicts of them; got {type(value)}")


def record(
    name: str,
    value: Any,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    display: bool = True,
) -> None:
    """Record a named result of this chapter, optionally checked against a floor or ceiling.

    Args:
        name: a short identifier, e.g. ``"retrieval_top1"``.
        value: a number, string, or a list/dict of them (a table).
        at_least: if given, ``value`` must be >= this, or ``AssertionError`` is raised.
        at_most: if given, ``value`` must be <= this, or ``AssertionError`` is raised.
        display: show the value in the notebook (and store it in the output).

    The value is stored as JSON (numpy and torch numbers become plain numbers); read it
    back with :func:`recorded` in this process or :func:`read_results` from the notebook.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"result name must be an identifier such as 'top1_acc', got {name!r}")
    plain = _plain(value)
    if at_least is not None or at_most is not None:
        if not isinstance(plain, (int, float)) or isinstance(plain, bool) or math.isnan(plain):
            raise TypeError(f"a floor or ceiling needs a number for {name!r}, got {plain!r}")
        if at_least is not None and plain < at_least:
            raise AssertionError(f"result {name} = {plain:.4g} fell below its floor {at_least}")
        if at_most is not None and plain > at_most:
            raise AssertionError(f"result {name} = {plain:.4g} rose above its ceiling {at_most}")
    _RECORDED[name] = plain
    if display:
        try:
            from IPython import get_ipython
            from IPython.display import display as ipy_display
        except ImportError:  # pragma: no cover - IPython ships with the course environment
            get_ipython = lambda: None
        if get_ipython() is not None:
            shown = f"{plain:.4g}" if isinstance(plain, float) else json.dumps(plain)
            ipy_display(
                {
                    MIME_TYPE: {"name": name, "value": plain},
                    "text/plain": f"[recorded] {name} = {shown}",
                },
                raw=True,
            )


def recorded() -> dict[str, Any]:
    """The results recorded so far in this process, ``{name: value}``."""
    return dict(_RECORDED)


def read_results(notebook: str | Path | Mapping, *, include_timings: bool = True) -> dict[str, Any]:
    """Collect the results recorded in an executed notebook, ``{name: value}``.

    Args:
        notebook: a path to an ``.ipynb`` file or an already loaded notebook dict.
        include_timings: False leaves out the timings (:func:`is_timing`), keeping only
            the results that repeat exactly with the same seed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a notebook.
    """
    if isinstance(notebook, Mapping):
        nb = notebook
    else:
        path = Path(notebook)
        if not path.is_file():
            raise FileNotFoundError(f"no executed notebook at {path}")
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a notebook (invalid JSON: {err})") from err
    if "cells" not in nb:
        raise ValueError("not a notebook: it has no 'cells'")
    results: dict[str, Any] = {}
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if MIME_TYPE in data:
                item = data[MIME_TYPE]
                if isinstance(item, str):
                    item = json.loads(item)
                if include_timings or not is_timing(item["name"]):
                    results[item["name"]] = item["value"]
    return results


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename,
    so that the file holds either its old or its new content, never a part of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a ``results.json`` of ``mmcourse run``: ``{chapter: {result: value}}``; ``{}``
    if there is none.

    Raises:
        ValueError: the file exists but does not hold such a mapping (it is then not
            ours to rewrite).
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} exists but is not a results file of `mmcourse run` ({err}); it is left "
            "untouched: move it away or choose another --output"
        ) from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"{path} exists but does not hold {{chapter: {{result: value}}}}; it is left "
            "untouched: move it away or choose another --output"
        )
    return data


def merge_results_file(path: str | Path, chapter: str, results: Mapping[str, Any]) -> None:
    """Set one chapter's results in ``results.json``, keeping every other chapter's entry.

    The file is re-read just before the write and replaced atomically
    (:func:`write_text_atomic`); call it while holding the output folder's lock
    (:func:`mmcourse.chapters.lock_output`).
    """
    merged = load_results_file(path)
    merged[chapter] = _plain(dict(results))
    write_text_atomic(path, json.dumps(merged, indent=2) + "\n")
