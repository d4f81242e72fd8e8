"""Every notebook follows the conventions: parameters cell first, executed, paired with jupytext."""

import json
from pathlib import Path

import jupytext
import pytest

from mmcourse import chapters as ch

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), (
        "first code cell must be tagged 'parameters'"
    )
    source = "".join(code[0]["source"])
    assert "seed = 0" in source and 'device = "auto"' in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed_without_errors(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        assert cell["execution_count"] is not None, (
            f"unexecuted cell: {''.join(cell['source'])[:60]}"
        )
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"]
    counts = [
        c["execution_count"]
        for c in nb["cells"]
        if c["cell_type"] == "code" and c["execution_count"]
    ]
    assert counts == list(range(1, len(counts) + 1)), "not executed top to bottom in a fresh kernel"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_jupytext_pair_is_in_sync(path):
    paired = ch.twin_path(path)
    assert paired.is_file(), (
        f"missing jupytext pair {paired.name} (run: jupytext --sync {path.name})"
    )
    ipynb = jupytext.read(path)
    py = jupytext.read(paired)
    assert len(ipynb.cells) == len(py.cells), "different number of cells; run jupytext --sync"
    for a, b in zip(ipynb.cells, py.cells, strict=True):
        assert a.cell_type == b.cell_type
        assert a.source.strip() == b.source.strip(), f"cell differs: {a.source[:80]!r}"


def test_every_chapter_notebook_is_a_chapter():
    names = {p.name for p in NOTEBOOKS}
    assert names == {c.path.name for c in ch.list_chapters()}
