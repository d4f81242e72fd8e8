"""Chapter discovery, parameters, papermill runs and the `mmcourse` command line."""

import json
import subprocess
import sys

import pytest

from mmcourse import chapters as ch
from mmcourse.cli import main


def test_chapters_are_found_in_order():
    names = [c.name for c in ch.list_chapters()]
    assert names[:2] == ["00_setup_and_tour", "01_modalities_as_tensors"]
    assert names == sorted(names)


@pytest.mark.parametrize("key", ["1", "01", "01_modalities_as_tensors", "modalities", "01.ipynb"])
def test_find_chapter_accepts_numbers_and_names(key):
    assert ch.find_chapter(key).number == "01"


def test_find_chapter_errors_list_what_exists():
    with pytest.raises(ch.ChapterError, match="no chapter '99'; available chapters: 00_setup"):
        ch.find_chapter("99")


def test_every_chapter_has_seed_and_device_parameters():
    for chapter in ch.list_chapters():
        params = ch.chapter_parameters(chapter)
        assert params["seed"]["default"] == 0, chapter.name
        assert params["device"]["default"] == "auto", chapter.name


def test_parameter_names_and_types_are_checked():
    chapter = ch.find_chapter("00")
    with pytest.raises(ch.ChapterError, match="has no parameter 'sede'; its parameters are: seed"):
        ch.resolve_parameters(chapter, {"sede": 1})
    with pytest.raises(
        ch.ChapterError, match="parameter 'seed' of chapter 00_setup_and_tour takes a int"
    ):
        ch.resolve_parameters(chapter, {"seed": "one"})
    assert ch.resolve_parameters(chapter, {"seed": 3}) == {"seed": 3}


def test_papermill_run_records_results_that_follow_the_parameters(tmp_path):
    chapter = ch.find_chapter("00")
    results = ch.run_chapter(chapter, tmp_path, {"seed": 3, "image_size": 48, "num_examples": 4})
    assert results["shapes_image_shape"] == [48, 48, 3]
    assert results["num_examples_shown"] == 4
    assert (tmp_path / chapter.path.name).is_file()


def test_cli_run_writes_results_json(tmp_path, capsys):
    code = main(
        [
            "run",
            "00",
            "-p",
            "image_size",
            "40",
            "-p",
            "num_examples",
            "2",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "shapes_image_shape = [40, 40, 3]" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["00_setup_and_tour"]["shapes_image_shape"] == [40, 40, 3]


def test_cli_bad_parameter_value_fails_inside_the_chapter_with_its_message(tmp_path, capsys):
    code = main(["run", "00", "-p", "num_examples", "-1", "--output", str(tmp_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "num_examples must be a positive integer, got -1" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "42"], "no chapter '42'"),
        (["run", "00", "-p", "nope", "1"], "has no parameter 'nope'"),
        (["run", "00", "-p", "seed", "abc"], "takes a int"),
        (["run"], "name at least one chapter"),
        (["run", "00", "--all"], "not both"),
    ],
)
def test_cli_usage_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_list_shows_parameters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert (
        "01_modalities_as_tensors" in out and "seed = 0 (int)" in out and "device = 'auto'" in out
    )


def test_cli_doctor_passes_here():
    result = subprocess.run(
        [sys.executable, "-m", "mmcourse.cli", "doctor"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHA-256 verified" in result.stdout and "all good" in result.stdout
