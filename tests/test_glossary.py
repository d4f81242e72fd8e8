"""Every Chinese term a notebook introduces, "English (中文)", is in the glossary."""

import json
import re
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHINESE_TERM = re.compile(r"\(([\u4e00-\u9fff][\u4e00-\u9fff\-A-Za-z ]*)")


def test_glossary_covers_every_term_in_the_notebooks():
    glossary = (NOTEBOOKS / "GLOSSARY.md").read_text()
    missing = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for term in CHINESE_TERM.findall("".join(cell["source"])):
                    if f"| {term.strip()} |" not in glossary:
                        missing.append(f"{path.stem}: {term}")
    assert not missing, f"terms missing from GLOSSARY.md: {missing}"


def test_glossary_rows_are_complete():
    rows = [
        line
        for line in (NOTEBOOKS / "GLOSSARY.md").read_text().splitlines()
        if line.startswith("| ")
    ]
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row
