"""Finding, inspecting and running the course's chapter notebooks (papermill).

A chapter is ``notebooks/NN_slug.ipynb``. Its first code cell, tagged ``parameters``, holds
its parameters and their defaults; ``mmcourse run`` executes it with papermill, with
changed parameters if asked, and reads back the results it recorded with
:func:`mmcourse.record`.

Nothing a user made is lost:

- :func:`run_chapter` executes into a temporary file in the output folder and renames it
  over ``NN_slug.ipynb`` only when every cell ran; a failed or interrupted run is kept as
  ``NN_slug.failed.ipynb`` (with the error), next to the good notebook it leaves alone;
- :func:`lock_output` holds an operating-system lock on the output folder, so a second
  run into the same folder is refused with a message instead of racing the first (the
  lock dies with its process: a killed run leaves no stale lock);
- :func:`refresh_chapter` decides between a notebook and its jupytext ``.py`` twin by
  their contents, never by file times, and refuses when both changed since they were
  last in sync (the hash of the synced cells is kept in the notebook's metadata).

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcourse.results import read_results, write_text_atomic

logger = logging.getLogger(__name__)

CHAPTER_FILE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")
TWIN_DIR = "py"  # notebooks/py/NN_slug.py: the jupytext twins, out of the learner's way
TWIN_FORMATS = f"ipynb,{TWIN_DIR}//py:percent"  # the pairing in each notebook's metadata


def twin_path(notebook: str | Path) -> Path:
    """The jupytext ``py:percent`` twin of a chapter notebook: ``notebooks/py/NN_slug.py``.

    The twins live in a subfolder so that JupyterLab's file browser shows each chapter
    once; the pairing is ``formats: ipynb,py//py:percent`` in both files.
    """
    notebook = Path(notebook)
    return notebook.parent / TWIN_DIR / f"{notebook.stem}.py"


SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1
LOCK_NAME = ".mmcourse-run.lock"  # in an output folder, while a run writes there
SYNC_KEY = "mmcourse"  # notebook metadata: {"synced_cells_sha256": ...} after a refresh


class ChapterError(ValueError):
    """A chapter name, a chapter parameter, an output folder or a notebook file is not valid."""


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
        try:  # a Python literal: 3, 1e-3, True, "auto", None
            default = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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
    if name == "seed" and kind == "int" and not 0 <= value < SEED_LIMIT:
        raise ChapterError(
            f"seed must be an integer in 0..2**64 - 1 (64 bits, what torch can seed with), "
            f"got {value}"
        )
    return float(value) if kind == "float" else value


_LEADING_ZERO = re.compile(r"[+-]?0+[0-9][0-9_]*")


def parse_value(chapter: Chapter, name: str, text: str, spec: dict[str, Any]) -> Any:
    """Turn the text of a command-line ``-p NAME VALUE`` into a value of the parameter's type.

    Numbers are read as Python literals (``3``, ``1e-3``, ``1_000``), a ``bool`` as
    ``True``/``False`` (any case), a ``str`` as the text itself; other types as a Python
    literal. Nothing is evaluated: this is ``ast.literal_eval``, not ``eval`` or YAML.

    Raises:
        ChapterError: the text is not a value of that type, naming the parameter, its type
            and its default (a leading zero, ``010``, is named: in Python it is an error,
            in YAML 1.1 it was octal 8).
    """
    kind = spec["type"]
    text = text.strip() if kind != "str" else text
    if kind == "str":
        return text
    if kind == "bool" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind in ("int", "float") and _LEADING_ZERO.fullmatch(text):
        raise ChapterError(
            f"parameter {name!r} of chapter {chapter.name} takes a {kind}, got {text!r}: "
            f"a leading zero is not a number here (write {int(text.replace('_', ''))} "
            "for the decimal number)"
        )
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if kind in ("int", "float", "bool"):
            raise ChapterError(
                f"parameter {name!r} of chapter {chapter.name} takes a {kind} "
                f"(default {spec['default']!r}), got {text!r}"
            ) from None
        return text  # a parameter without a known type: keep the text
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_parameters(
    chapter: Chapter, texts: dict[str, str], *, strict: bool = True
) -> dict[str, Any]:
    """Parse command-line parameter texts for ``chapter`` (:func:`parse_value`), then check
    them (:func:`resolve_parameters`). Names the chapter lacks raise when ``strict``,
    else are skipped."""
    specs = chapter_parameters(chapter)
    parsed = {}
    for name, text in texts.items():
        if name in specs:
            parsed[name] = parse_value(chapter, name, text, specs[name])
        elif strict:
            parsed[name] = text  # resolve_parameters names the unknown parameter
    return resolve_parameters(chapter, parsed, strict=strict)


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


# --- the output folder: checked, locked, written only on success -------------------------


def prepare_output(output_dir: str | Path) -> Path:
    """Create the output folder if needed; a clear :class:`ChapterError` if it cannot be.

    Raises:
        ChapterError: ``output_dir`` is a file, lies under a file, or cannot be created.
    """
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ChapterError(f"--output {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ChapterError(
            f"cannot create the output folder {folder}: {err.strerror or err}"
        ) from None
    return folder


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False if another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def lock_output(output_dir: str | Path) -> Iterator[Path]:
    """Hold the lock of an output folder while a run writes there.

    The lock is an operating-system lock (``flock`` on POSIX, ``msvcrt.locking`` on
    Windows) on the file ``.mmcourse-run.lock`` in the folder, which also names its holder.
    The system releases it when the holding process ends, however it ends, so a killed
    run never leaves a stale lock behind.

    Raises:
        ChapterError: another process holds the lock (naming it), or the folder cannot be
            created or written to.
    """
    folder = prepare_output(output_dir).resolve()
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ChapterError(
            f"cannot write to the output folder {folder}: {err.strerror or err}"
        ) from None
    try:
        if not _try_lock(fd):
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise ChapterError(
                f"another `mmcourse run` ({holder}) is writing to {folder}; wait for it to "
                "finish, or pass another --output"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        try:
            yield folder
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def failed_notebook_path(chapter: Chapter, output_dir: str | Path) -> Path:
    """Where a failed or interrupted run of ``chapter`` is kept: ``NN_slug.failed.ipynb``."""
    return Path(output_dir) / f"{chapter.name}.failed.ipynb"


def run_chapter(
    chapter: Chapter,
    output_dir: str | Path,
    parameters: dict[str, Any] | None = None,
    *,
    kernel_name: str | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Execute one chapter with papermill into ``output_dir``; return its recorded results.

    The notebook is executed into a temporary file in ``output_dir`` and renamed to
    ``NN_slug.ipynb`` only when every cell ran, so an earlier good notebook there is never
    replaced by a failed or partial one. The output folder is locked meanwhile
    (:func:`lock_output`).

    Raises:
        papermill.PapermillExecutionError: a cell failed; the executed notebook, with the
            error, is kept as :func:`failed_notebook_path` (also after an interrupt).
        ChapterError: a parameter is not valid, or the output folder is locked by another
            run or cannot be written.
    """
    params = resolve_parameters(chapter, parameters or {})
    with lock_output(output_dir) as folder:
        return run_chapter_locked(
            chapter, folder, params, kernel_name=kernel_name, progress_bar=progress_bar
        )


def run_chapter_locked(
    chapter: Chapter,
    folder: Path,
    params: dict[str, Any],
    *,
    kernel_name: str | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """:func:`run_chapter` for a caller that already holds ``folder``'s lock and has
    checked ``params`` (``mmcourse run`` locks once for all its chapters)."""
    import papermill

    out = folder / chapter.path.name
    failed = failed_notebook_path(chapter, folder)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{chapter.name}.", suffix=".ipynb")
    os.close(fd)
    tmp = Path(tmp_name)
    logger.info("running %s with %s", chapter.name, params)
    try:
        papermill.execute_notebook(
            str(chapter.path),
            str(tmp),
            parameters=params,
            cwd=str(chapter.path.parent),
            kernel_name=kernel_name,
            progress_bar=progress_bar,
            log_output=False,
        )
    except BaseException:  # a failed cell, Ctrl-C, a dead kernel: keep what ran, aside
        if tmp.exists() and tmp.stat().st_size > 0:
            os.replace(tmp, failed)
        tmp.unlink(missing_ok=True)
        raise
    results = read_results(tmp)
    os.replace(tmp, out)
    failed.unlink(missing_ok=True)  # an older failure of this chapter is now superseded
    return results


# --- refresh: the notebook and its jupytext twin, decided by content ----------------------


def cells_digest(nb: Any) -> str:
    """SHA-256 of a notebook's cells as jupytext pairs them: type, tags and stripped source
    of each cell (outputs, execution counts and other metadata are left out)."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        tags = sorted(cell.get("metadata", {}).get("tags", []))
        digest.update(json.dumps([cell.cell_type, tags, cell.source.strip()]).encode())
    return digest.hexdigest()


def _first_difference(a: Any, b: Any) -> str:
    """A short description of where two notebooks' cells first differ."""
    for i, (x, y) in enumerate(zip(a.cells, b.cells, strict=False), start=1):
        if x.cell_type != y.cell_type or x.source.strip() != y.source.strip():
            line = next(
                (
                    f"{p!r} vs {q!r}"
                    for p, q in zip(
                        x.source.strip().splitlines() + [""],
                        y.source.strip().splitlines() + [""],
                        strict=False,
                    )
                    if p != q
                ),
                "",
            )
            return f"first difference in cell {i}: {line[:160]}"
    return f"{len(a.cells)} vs {len(b.cells)} cells"


def _committed_digests(paths: list[Path]) -> set[str]:
    """Cell digests of these files as last committed to git (none if git cannot say)."""
    import subprocess

    import jupytext

    digests = set()
    for path in paths:
        try:
            shown = subprocess.run(
                ["git", "-C", str(path.parent), "show", f"HEAD:./{path.name}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return set()
        if shown.returncode == 0:
            fmt = "ipynb" if path.suffix == ".ipynb" else "py:percent"
            try:
                digests.add(cells_digest(jupytext.reads(shown.stdout, fmt=fmt)))
            except Exception:  # an unreadable committed version says nothing
                continue
    return digests


def choose_source(chapter: Chapter) -> str:
    """Which of a chapter's ``.ipynb`` and ``.py`` holds the cells to keep, by content.

    Equal cells: ``"ipynb"``. Otherwise the file that changed since the two were last in
    sync: known from the hash :func:`refresh_chapter` records in the notebook's metadata,
    and from the versions last committed to git (which also covers a pair synced since by
    ``jupytext --sync`` or a merge, which record nothing).

    Raises:
        ChapterError: both changed (or nothing tells which did), naming the first
            difference and the ``--from`` choices; or a file cannot be read.
    """
    paired = twin_path(chapter.path)
    ipynb_nb = _read_notebook(chapter.path)
    if not paired.is_file():
        return "ipynb"
    py_nb = _read_notebook(paired)
    ipynb_digest, py_digest = cells_digest(ipynb_nb), cells_digest(py_nb)
    if ipynb_digest == py_digest:
        return "ipynb"
    recorded = ipynb_nb.metadata.get(SYNC_KEY, {}).get("synced_cells_sha256")
    # the last refresh's record, and the committed versions: a pair kept in sync by other
    # means since (``jupytext --sync``, a merge) is committed in sync without a new record
    synced = ({recorded} if recorded else set()) | _committed_digests([chapter.path, paired])
    if py_digest in synced:
        return "ipynb"  # only the notebook was edited
    if ipynb_digest in synced:
        return "py"  # only the .py was edited
    since = "since they were last in sync" if synced else "and nothing records their last sync"
    raise ChapterError(
        f"{chapter.name}: both {paired.name} and {chapter.path.name} changed {since} "
        f"({_first_difference(py_nb, ipynb_nb)}); nothing was overwritten. Say which "
        f"to keep: `mmcourse refresh {chapter.number} --from py` or "
        f"`mmcourse refresh {chapter.number} --from ipynb` (the other file's cell "
        "edits are then replaced)"
    )


def _read_notebook(path: Path) -> Any:
    import jupytext

    try:
        return jupytext.read(path)
    except Exception as err:  # jupytext/nbformat raise several kinds for a broken file
        raise ChapterError(f"cannot read {path}: {type(err).__name__}: {err}") from None


def refresh_chapter(chapter: Chapter, *, timeout: int = 900, source: str | None = None) -> str:
    """Re-execute a chapter in place from a fresh kernel, storing its new outputs.

    Which file the cells come from is decided by content, never by file time:

    - the ``.ipynb`` and its jupytext twin ``NN_slug.py`` hold the same cells: either;
    - they differ, and one of them still holds the cells of the last refresh (their hash
      is kept in the notebook's metadata; before the first refresh, the versions last
      committed to git): the other one, the one that was edited;
    - both changed since then: refuse, and change nothing, unless ``source`` says which
      to keep (:func:`choose_source`).

    Afterwards both files hold the same cells, written through a temporary file and a
    rename. Nothing is written if a cell fails.

    Args:
        chapter: the chapter.
        timeout: seconds a single cell may run.
        source: ``"py"`` or ``"ipynb"`` to take the cells from that file regardless
            (the other file's cell edits are replaced); None decides as above.

    Returns:
        ``"py"`` or ``"ipynb"``: the file the cells came from.

    Raises:
        ChapterError: both files changed, a file cannot be read, or a cell failed (naming
            the cell and the error).
    """
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    if source not in (None, "py", "ipynb"):
        raise ChapterError(f"source must be 'py', 'ipynb' or None, got {source!r}")
    paired = twin_path(chapter.path)
    ipynb_nb = _read_notebook(chapter.path)
    if not paired.is_file():
        if source == "py":
            raise ChapterError(f"{chapter.name} has no jupytext twin {paired.name}")
        source = "ipynb"
    if source is None:
        source = choose_source(chapter)
    nb = _read_notebook(paired) if source == "py" else ipynb_nb
    if source == "py":
        logger.info("taking the cells of %s from %s", chapter.name, paired.name)
        nb.metadata = {**ipynb_nb.metadata, **nb.metadata}
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(chapter.path.parent)}},
        ).execute()
    except CellExecutionError as err:
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        failed = next(
            (
                i
                for i, c in enumerate(code_cells, start=1)
                if any(o.get("output_type") == "error" for o in c.get("outputs", []))
            ),
            None,
        )
        where = f"code cell {failed}" if failed else "a cell"
        raise ChapterError(
            f"{chapter.name}: {where} failed: {err.ename}: {err.evalue}; "
            f"{chapter.path.name} and {paired.name} were not changed"
        ) from None
    except (CellTimeoutError, DeadKernelError) as err:
        raise ChapterError(
            f"{chapter.name}: {type(err).__name__}: {str(err).splitlines()[0]}; "
            f"{chapter.path.name} and {paired.name} were not changed"
        ) from None
    nb.metadata[SYNC_KEY] = {"synced_cells_sha256": cells_digest(nb)}
    ipynb_text = jupytext.writes(nb, fmt="ipynb")
    py_text = jupytext.writes(nb, fmt="py:percent") if paired.is_file() else None
    write_text_atomic(chapter.path, ipynb_text.rstrip("\n") + "\n")  # as jupytext.write
    if py_text is not None:
        write_text_atomic(paired, py_text.rstrip("\n") + "\n")
    return source
