"""Finding, inspecting and running the course's chapter notebooks (papermill).

A chapter is ``notebooks/NN_slug.ipynb``. Its first code cell, tagged ``parameters``, holds
its parameters and their defaults; ``mmcourse run`` executes it with papermill, with
changed parameters if asked, and reads back the results it recorded with
:func:`mmcourse.record`.

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcourse.results import read_results

logger = logging.getLogger(__name__)

CHAPTER_FILE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")


class ChapterError(ValueError):
    """A chapter name or a chapter parameter is not valid."""


@dataclass(frozen=True)
class Chapter:
    """One chapter notebook."""

    number: str  # two digits, "01"
    slug: str  # "modalities_as_tensors"
    path: Path  # the .ipynb file

    @property
    def name(self) -> str:
        return f"{self.number}_{self.slug}"

    @property
    def title(self) -> str:
        """The notebook's first Markdown heading."""
        nb = json.loads(self.path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                for line in "".join(cell["source"]).splitlines():
                    if line.startswith("#"):
                        return line.lstrip("#").strip()
        return self.slug.replace("_", " ")


def notebooks_dir() -> Path:
    """The folder of chapter notebooks: ``$MMCOURSE_NOTEBOOKS``, the repository's
    ``notebooks/`` next to this package, or ``./notebooks``."""
    env = os.environ.get("MMCOURSE_NOTEBOOKS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / "notebooks", Path.cwd() / "notebooks"]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("[0-9][0-9]_*.ipynb")):
            return folder
    raise ChapterError(
        "no chapter notebooks found; looked in "
        + ", ".join(str(c) for c in candidates)
        + ". Run from the course repository or set MMCOURSE_NOTEBOOKS."
    )


def list_chapters(folder: Path | None = None) -> list[Chapter]:
    """All chapters, in order."""
    folder = folder or notebooks_dir()
    chapters = []
    for path in sorted(folder.glob("*.ipynb")):
        match = CHAPTER_FILE.match(path.name)
        if match:
            chapters.append(Chapter(match[1], match[2], path))
    return chapters


def find_chapter(key: str, folder: Path | None = None) -> Chapter:
    """A chapter by number (``"6"``, ``"06"``), full name or a unique part of its slug."""
    chapters = list_chapters(folder)
    key = str(key).strip().lower().removesuffix(".ipynb")
    if key.isdigit():
        key = f"{int(key):02d}"
    matches = [c for c in chapters if key in (c.number, c.name)] or [
        c for c in chapters if key and key in c.slug
    ]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(c.name for c in chapters)
    if not matches:
        raise ChapterError(f"no chapter {key!r}; available chapters: {available}")
    raise ChapterError(f"{key!r} matches several chapters: {', '.join(c.name for c in matches)}")


def chapter_parameters(chapter: Chapter) -> dict[str, dict[str, Any]]:
    """The chapter's parameters: ``{name: {"default": value, "type": str, "help": str}}``."""
    import papermill

    found = papermill.inspect_notebook(str(chapter.path))
    params = {}
    for name, info in found.items():
        try:
            default = json.loads(info["default"]) if info["default"] != "None" else None
        except (json.JSONDecodeError, TypeError):
            default = info["default"].strip("'\"")
        kind = info["inferred_type_name"]  # from a type hint, "None" without one
        if kind == "None":
            kind = type(default).__name__ if default is not None else "None"
        params[name] = {
            "default": default,
            "type": kind,
            "help": info["help"],
        }
    if not params:
        raise ChapterError(f"chapter {chapter.name} has no cell tagged 'parameters'")
    return params


def _coerce(chapter: Chapter, name: str, value: Any, spec: dict[str, Any]) -> Any:
    """Check a parameter value against the type of its default; convert int -> float."""
    kind = spec["type"]
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
    }.get(kind)
    if ok is not None and not ok(value):
        raise ChapterError(
            f"parameter {name!r} of chapter {chapter.name} takes a {kind} "
            f"(default {spec['default']!r}), got {value!r}"
        )
    return float(value) if kind == "float" else value


def resolve_parameters(
    chapter: Chapter, parameters: dict[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Keep the parameters this chapter has, type-checked.

    Args:
        strict: raise for a name the chapter does not have (otherwise skip it).
    """
    specs = chapter_parameters(chapter)
    resolved = {}
    for name, value in parameters.items():
        if name not in specs:
            if strict:
                raise ChapterError(
                    f"chapter {chapter.name} has no parameter {name!r}; its parameters are: "
                    + ", ".join(specs)
                )
            continue
        resolved[name] = _coerce(chapter, name, value, specs[name])
    return resolved


def run_chapter(
    chapter: Chapter,
    output_dir: str | Path,
    parameters: dict[str, Any] | None = None,
    *,
    kernel_name: str | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Execute one chapter with papermill into ``output_dir``; return its recorded results.

    Raises:
        papermill.PapermillExecutionError: a cell failed (the executed notebook is still
            written, with the error, to ``output_dir``).
    """
    import papermill

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / chapter.path.name
    params = resolve_parameters(chapter, parameters or {})
    logger.info("running %s with %s", chapter.name, params)
    papermill.execute_notebook(
        str(chapter.path),
        str(out),
        parameters=params,
        cwd=str(chapter.path.parent),
        kernel_name=kernel_name,
        progress_bar=progress_bar,
        log_output=False,
    )
    return read_results(out)


def refresh_chapter(chapter: Chapter, *, timeout: int = 900) -> None:
    """Re-execute a chapter in place from a fresh kernel, storing its new outputs.

    If the chapter's jupytext pair (``NN_slug.py``) was edited more recently than the
    notebook, the cells are taken from it, so an author edits the ``.py`` and refreshes.
    Afterwards both files hold the same cells.
    """
    import jupytext
    from nbclient import NotebookClient

    paired = chapter.path.with_suffix(".py")
    if paired.is_file() and paired.stat().st_mtime > chapter.path.stat().st_mtime:
        logger.info("taking the cells of %s from %s", chapter.name, paired.name)
        nb = jupytext.read(paired)
    else:
        nb = jupytext.read(chapter.path)
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(chapter.path.parent)}},
    ).execute()
    jupytext.write(nb, chapter.path)
    if paired.is_file():
        jupytext.write(nb, paired, fmt="py:percent")
