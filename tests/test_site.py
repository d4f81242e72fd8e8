"""`mmcourse site`: the static HTML book, built offline from the stored notebook outputs."""

import json
import re
import socket
from pathlib import Path

import pytest
from pytest_socket import SocketBlockedError, disable_socket, enable_socket

from mmcourse import cli
from mmcourse.site import MARKER, SiteError, build_site, check_output, landing_page

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _text(html: str) -> str:
    """The visible text of an HTML page, roughly: tags dropped, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


def _offline_build(output: Path, **kwargs) -> Path:
    """build_site with every socket blocked (not even 127.0.0.1): no CDN, no download."""
    disable_socket()
    try:
        with pytest.raises(SocketBlockedError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return build_site(output, **kwargs)
    finally:
        enable_socket()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The real course, built once for this module with the network blocked."""
    out = tmp_path_factory.mktemp("built") / "site"
    return _offline_build(out, repo_url="https://github.com/example/mmcourse")


def _tiny_repo(root: Path) -> Path:
    """A two-file course: enough for Sphinx, quick to build."""
    (root / "notebooks").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "README.md").write_text(
        "# Tiny course\n\nIntro.\n\n## Chapters\n\n| # | notebook |\n|---|---|\n"
        "| 00 | [Start](notebooks/00_start.ipynb) |\n\n## Set up\n\npip install\n"
    )
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {},
        "cells": [
            {"cell_type": "markdown", "id": "a", "metadata": {}, "source": "# 00 Start\n\n$x^2$"}
        ],
    }
    (root / "notebooks" / "00_start.ipynb").write_text(json.dumps(nb))
    (root / "notebooks" / "GLOSSARY.md").write_text("# Glossary\n")
    (root / "docs" / "SOURCES.md").write_text("# Sources\n")
    (root / "docs" / "DESIGN.md").write_text("# Design\n")
    return root


@pytest.mark.slow
def test_every_chapter_is_a_page_with_figures_and_typeset_math(site):
    assert (site / "index.html").is_file() and (site / MARKER).is_file()
    for stem in CHAPTERS:
        page = (site / "notebooks" / f"{stem}.html").read_text(encoding="utf-8")
        assert "<img" in page, f"{stem}: no stored figure on its page"
        assert f"jupyter lab notebooks/{stem}.ipynb" in _text(page), f"{stem}: no launch note"
        assert (
            f"colab.research.google.com/github/example/mmcourse/blob/main/notebooks/{stem}" in page
        )
    page = (site / "notebooks" / "02_attention.html").read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert images and all((site / "notebooks" / src).resolve().is_file() for src in images)
    # Math goes to MathJax as \( \) / \[ \] spans, and MathJax is served by the site itself.
    assert page.count('class="math notranslate nohighlight"') > 10
    script = re.search(r'<script[^>]+src="([^"]*tex-chtml\.js)"', page)
    assert script and not script.group(1).startswith("http"), "MathJax must not come from a CDN"
    assert (site / "notebooks" / script.group(1)).resolve().is_file()
    assert (site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    # No widget views (no kernel on a static page) and no widget text where an explorer is.
    assert "IntSlider(" not in page and "widget-view" not in page


@pytest.mark.slow
def test_landing_page_glossary_sources_design_and_search(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    for stem in CHAPTERS:
        assert f'href="notebooks/{stem}.html"' in index, f"landing page misses {stem}"
    for page in ("notebooks/GLOSSARY.html", "docs/SOURCES.html", "docs/DESIGN.html"):
        assert (site / page).is_file(), page
        assert page in index
    assert (site / "search.html").is_file()
    assert "Attention" in (site / "searchindex.js").read_text(encoding="utf-8")
    assert (site / ".nojekyll").is_file()


def test_landing_page_is_the_readme_up_to_set_up():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    text = landing_page(readme)
    assert "## Chapters" in text and "](notebooks/02_attention.ipynb)" in text
    assert "## Set up" not in text
    with pytest.raises(SiteError, match="chapter table"):
        landing_page("# A readme without chapters\n")


def test_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.md").write_text("precious")
    with pytest.raises(SiteError, match="not made by `mmcourse site`"):
        build_site(mine, repo_root=_tiny_repo(tmp_path / "repo"))
    assert (mine / "thesis.md").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.md"]
    assert not list(tmp_path.glob(".my-notes.*")), "no half-built folder is left behind"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(SiteError, match="is a file"):
        check_output(a_file)


def test_cli_refuses_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli.main(["site", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mmcourse site: error:" in err and "refusing to overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_rebuilds_its_own_site_but_not_one_a_user_added_files_to(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_REPOSITORY", raising=False)  # set in GitHub Actions
    repo = _tiny_repo(tmp_path / "repo")
    out = _offline_build(tmp_path / "out", repo_root=repo)
    assert (out / "notebooks" / "00_start.html").is_file()
    page = (out / "notebooks" / "00_start.html").read_text()
    assert "jupyter lab notebooks/00_start.ipynb" in _text(page)
    assert "colab" not in page.lower().replace("colab_url", ""), "no repository, no Colab link"
    (repo / "notebooks" / "GLOSSARY.md").write_text("# Glossary\n\nnew term\n")
    assert build_site(out, repo_root=repo, repo_url=None) == out  # its own site: replaced
    assert "new term" in (out / "notebooks" / "GLOSSARY.html").read_text()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SiteError, match="did not write"):
        build_site(out, repo_root=repo)
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temp left behind"


def test_missing_sources_are_named(tmp_path):
    repo = _tiny_repo(tmp_path / "repo")
    (repo / "docs" / "DESIGN.md").unlink()
    with pytest.raises(SiteError, match="DESIGN.md"):
        build_site(tmp_path / "out", repo_root=repo)
    assert not (tmp_path / "out").exists()
