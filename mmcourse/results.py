"""Recording a chapter's key results so that papermill and ``mmcourse run`` can read them back.

A notebook calls :func:`record`; the value is shown in the notebook and also written into
the cell's output under a dedicated MIME type, so an executed ``.ipynb`` carries its own
results. :func:`read_results` collects them from such a file. Optional floors turn a key
result into a check: a regression fails the run (and CI) with a message naming the result.

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MIME_TYPE = "application/vnd.mmcourse.result+json"

_RECORDED: dict[str, Any] = {}


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


def read_results(notebook: str | Path | Mapping) -> dict[str, Any]:
    """Collect the results recorded in an executed notebook, ``{name: value}``.

    Args:
        notebook: a path to an ``.ipynb`` file or an already loaded notebook dict.

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
                results[item["name"]] = item["value"]
    return results
