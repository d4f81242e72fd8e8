"""Build the course as a static HTML book from the notebooks' stored outputs.

``mmcourse site --output DIR`` turns the README's chapter table (the landing page), every
chapter notebook with its stored figures and math, the glossary, ``docs/SOURCES.md`` and
``docs/DESIGN.md`` into a searchable website that opens from disk or any static host
(GitHub Pages in CI). Nothing is re-executed: the pages show what the committed notebooks
show, so building takes seconds.

Why Sphinx + ``myst-nb`` + ``sphinx-book-theme``: all three are Python packages (pip
installs them; no Node.js, which Jupyter Book 2 / MyST-JS needs), they are the stack behind
Jupyter Book 1 and many scientific course books, ``myst-nb`` renders stored notebook
outputs without executing (``nb_execution_mode = "off"``) and understands the ``$...$``
and ``$$...$$`` math of our Markdown cells, Sphinx ships an offline full-text search, and
the book theme gives the chapter sidebar, a download button and launch buttons (Colab).
Math is typeset in the reader's browser by MathJax 3 served from the site itself
(``sphinx-mathjax-offline`` ships MathJax and its fonts and copies them into ``_static``),
so neither the build nor the reader needs a CDN.

Nothing a user made is overwritten: the site is built in a fresh sibling folder and moved
into place only when the build succeeded; an existing non-empty ``DIR`` is replaced only if
an earlier ``mmcourse site`` made it (a marker file lists what it wrote) and nobody added
files to it since; otherwise the build is refused with a message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".mmcourse-site.json"  # in a built site: who made it and which files it wrote
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class SiteError(RuntimeError):
    """The site cannot be built (bad output folder, missing source file, failed build)."""


@dataclass
class SiteConfig:
    """What the site is built from and how it links back to the repository."""

    repo_root: Path  # the repository checkout holding README.md, notebooks/ and docs/
    repo_url: str | None = None  # https://github.com/OWNER/NAME for Colab links; None: none
    branch: str = "main"  # the branch Colab opens the notebooks from


def default_repo_root() -> Path:
    """The checkout this package lives in (the folder above ``mmcourse/``)."""
    return Path(__file__).resolve().parent.parent


def detect_repo_url(repo_root: Path) -> str | None:
    """The GitHub URL of the course: ``$GITHUB_REPOSITORY`` (set in GitHub Actions) or the
    ``origin`` remote when it is on github.com; ``None`` when neither is known.

    Args:
        repo_root: the repository checkout.

    Returns:
        ``https://github.com/OWNER/NAME`` or ``None``.
    """
    slug = os.environ.get("GITHUB_REPOSITORY")
    if slug:
        return f"https://github.com/{slug}"
    try:
        remote = subprocess.run(
            ["git", "-C", str(repo_root), "remote", "get-url", "origin"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"github\.com[:/]([^/]+/[^/]+?)(?:\.git)?$", remote)
    return f"https://github.com/{match.group(1)}" if match else None


# --- the output folder ----------------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` as a sorted list of POSIX relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def check_output(output: str | Path) -> Path:
    """Check that the site may be written to ``output``, without writing anything.

    Allowed: a folder that does not exist, an empty folder, or a site an earlier
    ``mmcourse site`` built there to which nobody has added files.

    Args:
        output: the folder the site goes to.

    Returns:
        The folder as an absolute path.

    Raises:
        SiteError: ``output`` is a file, or a non-empty folder this command did not make,
            or a site folder that now holds files the build did not write.
    """
    folder = Path(output).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise SiteError(f"--output {folder} is a file; expected a new or empty folder")
    if not folder.exists() or not any(folder.iterdir()):
        return folder
    marker = folder / MARKER
    if not marker.is_file():
        raise SiteError(
            f"--output {folder} is not empty and was not made by `mmcourse site`; "
            "refusing to overwrite it. Choose a new or empty folder."
        )
    try:
        written = set(json.loads(marker.read_text(encoding="utf-8"))["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise SiteError(f"{marker} is unreadable ({err}); refusing to replace {folder}") from err
    added = [f for f in _files_under(folder) if f not in written and f != MARKER]
    if added:
        shown = ", ".join(added[:5]) + (" ..." if len(added) > 5 else "")
        raise SiteError(
            f"--output {folder} holds {len(added)} file(s) that `mmcourse site` did not write "
            f"({shown}); refusing to replace it. Move them or choose another folder."
        )
    return folder


# --- the Sphinx source tree -----------------------------------------------------------------


def landing_page(readme: str) -> str:
    """The landing page: the README from its title through the chapter table, up to (not
    including) the set-up section, with a table of contents for the sidebar.

    Args:
        readme: the text of README.md.

    Returns:
        MyST Markdown for ``index.md``.
    """
    if "| notebooks/" not in readme and "](notebooks/" not in readme:
        raise SiteError("README.md has no chapter table linking to notebooks/; cannot build")
    start = readme.find("## Chapters")
    cut = re.search(r"^## (?!Chapters\b)", readme[start:], re.M) if start >= 0 else None
    text = readme if cut is None else readme[: start + cut.start()]
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)
    return text.rstrip() + "\n"


def _toctree(caption: str, entries: list[str]) -> str:
    lines = "\n".join(entries)
    return f"\n```{{toctree}}\n:caption: {caption}\n:hidden:\n\n{lines}\n```\n"


def _launch_cell(name: str, config: SiteConfig) -> dict:
    """A Markdown cell for the top of a chapter page: how to open it in JupyterLab/Colab."""
    path = f"notebooks/{name}"
    ways = [f"in JupyterLab: `jupyter lab {path}` from the repository root"]
    if config.repo_url:
        slug = config.repo_url.removeprefix("https://github.com/")
        colab = f"https://colab.research.google.com/github/{slug}/blob/{config.branch}/{path}"
        ways.append(f"[in Colab]({colab})")
        ways.append(f"[on GitHub]({config.repo_url}/blob/{config.branch}/{path})")
    ways.append("or download it with the ⬇ button above")
    text = (
        f"> **Run this chapter** {' · '.join(ways)}. This page shows the outputs stored in "
        "the notebook; the explorers' controls come alive when you run it."
    )
    return {
        "cell_type": "markdown",
        "id": "mmcourse-launch",
        "metadata": {},
        "source": text,
    }


def _page_notebook(src: Path, dst: Path, config: SiteConfig) -> None:
    """Copy a chapter notebook for the site: widget views dropped (a static page has no
    kernel; each explorer's stored static figure stays), a launch note under the title."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET_MIME not in o.get("data", {})]
    cells = nb.get("cells", [])
    at = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown"), -1)
    if at >= 0:
        text = "".join(cells[at]["source"])
        title, _, rest = text.partition("\n")
        if title.startswith("# ") and rest.strip():  # the note goes right under the title
            cells[at] = {**cells[at], "source": title}
            rest_cell = {"cell_type": "markdown", "id": "mmcourse-intro", "metadata": {}}
            cells.insert(at + 1, {**rest_cell, "source": rest.lstrip("\n")})
    cells.insert(at + 1, _launch_cell(src.name, config))
    dst.write_text(json.dumps(nb), encoding="utf-8")


CONF = """\
# Written by mmcourse.site; see its module docstring.
project = {project!r}
author = "mmcourse contributors"
extensions = ["myst_nb", "sphinx-mathjax-offline"]
exclude_patterns = ["_build"]
nb_execution_mode = "off"           # render the stored outputs, never execute
nb_ipywidgets_js = {{}}             # no widget JavaScript from a CDN (widget views are dropped)
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "myst.xref_missing", "mystnb.unknown_mime_type"]
html_theme = "sphinx_book_theme"
html_title = {project!r}
html_show_sourcelink = False
html_theme_options = {theme_options!r}
"""


def stage_sources(stage: Path, config: SiteConfig) -> list[str]:
    """Lay out the Sphinx source tree in ``stage``: ``index.md``, ``notebooks/*.ipynb``,
    ``notebooks/GLOSSARY.md``, ``docs/SOURCES.md``, ``docs/DESIGN.md`` and ``conf.py``
    (the same relative paths as the repository, so the README's links resolve).

    Args:
        stage: an empty folder.
        config: where the sources are and how to link back.

    Returns:
        The chapter notebook names, in order.

    Raises:
        SiteError: a source file is missing.
    """
    root = config.repo_root
    readme = root / "README.md"
    wanted = [readme, root / "notebooks" / "GLOSSARY.md", root / "docs" / "SOURCES.md"]
    wanted.append(root / "docs" / "DESIGN.md")
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise SiteError(f"cannot build the site, missing: {', '.join(missing)}")
    chapters = sorted(p.name for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        raise SiteError(f"no chapter notebooks (NN_slug.ipynb) in {root / 'notebooks'}")
    (stage / "notebooks").mkdir()
    (stage / "docs").mkdir()
    for name in chapters:
        _page_notebook(root / "notebooks" / name, stage / "notebooks" / name, config)
    shutil.copy2(root / "notebooks" / "GLOSSARY.md", stage / "notebooks" / "GLOSSARY.md")
    for doc in ("SOURCES.md", "DESIGN.md"):
        shutil.copy2(root / "docs" / doc, stage / "docs" / doc)
    index = landing_page(readme.read_text(encoding="utf-8"))
    index += _toctree("Chapters", [f"notebooks/{Path(n).stem}" for n in chapters])
    index += _toctree("Reference", ["notebooks/GLOSSARY", "docs/SOURCES", "docs/DESIGN"])
    (stage / "index.md").write_text(index, encoding="utf-8")
    title = index.splitlines()[0].lstrip("# ").strip() or "mmcourse"
    options: dict = {"use_download_button": True, "show_toc_level": 2}
    if config.repo_url:
        options.update(
            repository_url=config.repo_url,
            repository_branch=config.branch,
            path_to_docs="",
            use_repository_button=True,
            launch_buttons={"colab_url": "https://colab.research.google.com"},
        )
    conf = CONF.format(project=title.split("·")[0].strip() or "mmcourse", theme_options=options)
    (stage / "conf.py").write_text(conf, encoding="utf-8")
    return chapters


# --- building -------------------------------------------------------------------------------


def build_site(
    output: str | Path,
    *,
    repo_root: str | Path | None = None,
    repo_url: str | None = None,
    branch: str = "main",
) -> Path:
    """Build the static HTML course into ``output`` from the stored notebook outputs.

    Args:
        output: the site folder (new, empty, or an earlier ``mmcourse site`` build).
        repo_root: the checkout to build from; default: the one this package is in.
        repo_url: ``https://github.com/OWNER/NAME`` for Colab/GitHub links; default:
            :func:`detect_repo_url`.
        branch: the branch those links open.

    Returns:
        The site folder; open ``index.html`` in it.

    Raises:
        SiteError: the output folder may not be written (see :func:`check_output`), a
            source is missing, or Sphinx failed (its messages are included).
    """
    from sphinx.application import Sphinx
    from sphinx.errors import SphinxError

    folder = check_output(output)
    root = Path(repo_root).resolve() if repo_root is not None else default_repo_root()
    config = SiteConfig(repo_root=root, repo_url=repo_url or detect_repo_url(root), branch=branch)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmcourse-site-src-") as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        chapters = stage_sources(stage, config)
        # Built next to the target and moved in only on success: a failed build leaves
        # the previous site (or nothing) in place.
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        warnings_log = Path(tmp) / "warnings.log"
        try:
            with open(warnings_log, "w", encoding="utf-8") as warn:
                app = Sphinx(
                    srcdir=str(stage),
                    confdir=str(stage),
                    outdir=str(building),
                    doctreedir=str(Path(tmp) / "doctrees"),
                    buildername="html",
                    status=None,
                    warning=warn,
                    freshenv=True,
                )
                app.build()
            if app.statuscode != 0:
                raise SiteError(f"sphinx failed:\n{warnings_log.read_text(encoding='utf-8')}")
        except (SphinxError, OSError) as err:
            shutil.rmtree(building, ignore_errors=True)
            raise SiteError(f"building the site failed: {err}") from err
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        for line in warnings_log.read_text(encoding="utf-8").splitlines():
            logger.info("sphinx: %s", line)
    (building / ".nojekyll").write_text("", encoding="utf-8")  # GitHub Pages: keep _static
    files = _files_under(building)
    (building / MARKER).write_text(
        json.dumps({"made_by": "mmcourse site", "chapters": chapters, "files": files}),
        encoding="utf-8",
    )
    check_output(folder)  # still ours (or absent) after the build
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        folder.rename(old / "site")
        building.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        building.rename(folder)
    logger.info("site with %d chapters written to %s", len(chapters), folder)
    return folder
