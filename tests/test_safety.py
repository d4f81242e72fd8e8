"""Nothing lost, nothing unsafe: the runner, the loaders and the training loop under bad input.

Each numbered case of issue 11 is a test here (the number is in the test's comment):
data loss by ``mmcourse run`` and ``mmcourse refresh`` (1-4), unsafe or silently wrong
loading and training (5-9, 11, 13), papermill's parameter parsing (10), clear messages
instead of tracebacks (12), and same seed -> same results (determinism).

The runner tests use tiny chapter notebooks written into a temporary folder
(``MMCOURSE_NOTEBOOKS``), so a kernel start is their only cost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcourse import chapters as ch
from mmcourse.cli import main
from mmcourse.results import read_results

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# --- tiny chapters ------------------------------------------------------------------------


def _write_chapter(folder: Path, name: str = "01_tiny", body: str | None = None) -> Path:
    """A chapter pair NAME.ipynb + NAME.py: parameters, then one cell that records ``value``."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 01 · A tiny chapter"),
        nbformat.v4.new_code_cell(
            'seed = 0  # random seed\ndevice = "auto"  # the device\n'
            "value = 1  # the number to record\nfail = False  # raise in the next cell",
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell(
            body
            or (
                "import mmcourse\n"
                "if fail:\n"
                '    raise ValueError("asked to fail")\n'
                'mmcourse.record("value", value)'
            )
        ),
    ]
    path = folder / f"{name}.ipynb"
    jupytext.write(nb, path)
    ch.twin_path(path).parent.mkdir(exist_ok=True)
    jupytext.write(nb, ch.twin_path(path), fmt="py:percent")
    return path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A notebooks folder with one tiny chapter, used by the chapter functions and the CLI."""
    folder = tmp_path / "notebooks"
    path = _write_chapter(folder)
    monkeypatch.setenv("MMCOURSE_NOTEBOOKS", str(folder))
    return path


def _run(output: Path, *params: str) -> int:
    argv = ["run", "01", "--output", str(output)]
    for pair in zip(params[::2], params[1::2], strict=True):
        argv += ["-p", *pair]
    return main(argv)


# --- 1-3: mmcourse run never loses earlier work --------------------------------------------


@pytest.fixture(scope="module")
def good_then_failed_run(tmp_path_factory):
    """A folder with an earlier chapter's results, then a good run of 01, then a failed one."""
    tmp_path = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMCOURSE_NOTEBOOKS", str(_write_chapter(tmp_path / "notebooks").parent))
        out = tmp_path / "runs"
        out.mkdir()
        (out / "results.json").write_text(json.dumps({"99_earlier": {"acc": 0.9}}))
        assert _run(out, "value", "2") == 0
        after_good = json.loads((out / "results.json").read_text())
        good_notebook = (out / "01_tiny.ipynb").read_text()
        assert _run(out, "value", "3", "fail", "True") == 1
    return out, after_good, good_notebook


def test_results_are_merged_per_chapter_and_survive_a_failed_run(good_then_failed_run):
    # case 1
    out, after_good, _ = good_then_failed_run
    assert after_good == {"99_earlier": {"acc": 0.9}, "01_tiny": {"value": 2}}
    assert json.loads((out / "results.json").read_text()) == after_good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_run_keeps_the_good_executed_notebook(good_then_failed_run):
    # case 2
    out, _, good_notebook = good_then_failed_run
    assert (out / "01_tiny.ipynb").read_text() == good_notebook
    assert read_results(out / "01_tiny.ipynb") == {"value": 2}
    failed = json.loads((out / "01_tiny.failed.ipynb").read_text())
    errors = [
        o for c in failed["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"
    ]
    assert errors and errors[0]["evalue"] == "asked to fail"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "01_tiny.failed.ipynb",
        "01_tiny.ipynb",
        "results.json",
    ]


def test_an_interrupted_run_keeps_the_good_executed_notebook(tiny, tmp_path, monkeypatch):
    # case 2: Ctrl-C while papermill is writing the notebook cell by cell
    import papermill

    out = tmp_path / "runs"
    out.mkdir()
    (out / "01_tiny.ipynb").write_text("the good executed notebook")
    (out / "results.json").write_text(json.dumps({"01_tiny": {"value": 2}}))

    def interrupted(input_path, output_path, **kwargs):
        Path(output_path).write_text("a partial notebook")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    assert _run(out, "value", "5") == 130
    assert (out / "01_tiny.ipynb").read_text() == "the good executed notebook"
    assert json.loads((out / "results.json").read_text()) == {"01_tiny": {"value": 2}}
    assert (out / "01_tiny.failed.ipynb").read_text() == "a partial notebook"


def test_a_corrupted_results_json_is_never_overwritten(tiny, tmp_path, capsys):
    # case 1: a results.json that is not ours to merge into is left alone
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.json").write_text("my notes, not JSON")
    assert _run(out) == 2
    assert "results.json" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "my notes, not JSON"
    assert not (out / "01_tiny.ipynb").exists()


def test_a_second_run_into_a_locked_folder_is_refused(tiny, tmp_path, capsys):
    # case 3
    out = tmp_path / "runs"
    out.mkdir()
    with ch.lock_output(out):
        assert _run(out) == 2
    err = capsys.readouterr().err
    assert "another `mmcourse run`" in err and str(out) in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []


def test_the_lock_is_held_across_processes_and_not_left_stale(tmp_path):
    # case 3: another process is refused while the lock is held; a dead holder leaves none
    out = tmp_path / "runs"
    out.mkdir()
    probe = (
        "import sys; from mmcourse import chapters as ch\n"
        "try:\n"
        "    with ch.lock_output(sys.argv[1]): print('acquired')\n"
        "except ch.ChapterError as err: print(err)\n"
    )
    with ch.lock_output(out):
        held = subprocess.run(
            [sys.executable, "-c", probe, str(out)], capture_output=True, text=True
        )
        assert "another `mmcourse run`" in held.stdout, held.stdout + held.stderr
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys; from mmcourse import chapters as ch\n"
         "ch.lock_output(sys.argv[1]).__enter__(); print('held', flush=True); os._exit(9)",
         str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == 9 and killed.stdout.strip() == "held", killed.stderr
    assert (out / ch.LOCK_NAME).exists()  # the file is left behind, its lock is not
    with ch.lock_output(out):
        pass


# --- 4: mmcourse refresh compares contents, never file times ------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_refresh_keeps_py_edits_after_an_autosave_and_refuses_when_both_changed(tiny):
    # case 4
    py = ch.twin_path(tiny)
    chapter = ch.find_chapter("01")
    assert ch.refresh_chapter(chapter) == "ipynb"  # in sync: nothing to choose
    # the author edits the .py; Jupyter then autosaves the .ipynb (newer, same cells)
    _edit(py, "value = 1  #", "value = 7  #")
    os.utime(tiny)  # the notebook is now the newer file
    assert ch.refresh_chapter(chapter) == "py"
    assert read_results(tiny) == {"value": 7}
    assert "value = 7  #" in py.read_text()
    # both edited since the last sync: refuse, name both choices, change nothing
    _edit(py, "value = 7  #", "value = 8  #")
    nb = json.loads(tiny.read_text())
    nb["cells"][1]["source"] = "".join(nb["cells"][1]["source"]).replace("value = 7", "value = 9")
    tiny.write_text(json.dumps(nb))
    before = (py.read_text(), tiny.read_text())
    with pytest.raises(ch.ChapterError, match="both .* changed") as err:
        ch.refresh_chapter(chapter)
    assert "--from py" in str(err.value) and "--from ipynb" in str(err.value)
    assert (py.read_text(), tiny.read_text()) == before
    assert main(["refresh", "01", "--from", "ipynb"]) == 0
    assert read_results(tiny) == {"value": 9} and "value = 9  #" in py.read_text()


def test_refresh_before_any_recorded_sync_compares_with_git(tiny):
    # case 4: a pair never refreshed by this version: the committed versions say what changed
    folder, py = tiny.parent, ch.twin_path(tiny)
    chapter = ch.find_chapter("01")
    _edit(py, "value = 1  #", "value = 2  #")
    with pytest.raises(ch.ChapterError, match="nothing records their last sync"):
        ch.choose_source(chapter)  # no record and no git: refuse
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    _edit(py, "value = 2  #", "value = 1  #")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "pair"], check=True)
    _edit(py, "value = 1  #", "value = 2  #")
    os.utime(tiny)  # newer, unchanged notebook
    assert ch.choose_source(chapter) == "py"
    _edit(py, "value = 2  #", "value = 1  #")
    nb = json.loads(tiny.read_text())
    nb["cells"][1]["source"] = "".join(nb["cells"][1]["source"]).replace("value = 1", "value = 3")
    tiny.write_text(json.dumps(nb))
    assert ch.choose_source(chapter) == "ipynb"
    _edit(py, "value = 1  #", "value = 2  #")
    with pytest.raises(ch.ChapterError, match="changed since they were last in sync"):
        ch.choose_source(chapter)


def test_refresh_trusts_a_committed_pair_over_a_stale_sync_record(tiny):
    # a refresh records its sync; the pair is then edited in sync by other means
    # (jupytext --sync, a merge) and committed; a later .py edit must still be recognised
    folder, py = tiny.parent, ch.twin_path(tiny)
    chapter = ch.find_chapter("01")
    assert ch.refresh_chapter(chapter) == "ipynb"  # records the sync hash
    _edit(py, "value = 1  #", "value = 4  #")
    nb = json.loads(tiny.read_text())
    nb["cells"][1]["source"] = "".join(nb["cells"][1]["source"]).replace("value = 1", "value = 4")
    tiny.write_text(json.dumps(nb))  # both files changed together: the record is now stale
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "pair synced by hand"], check=True)
    _edit(py, "value = 4  #", "value = 5  #")
    assert ch.choose_source(chapter) == "py"


# --- 5-7: the training loop ----------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)
    ]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class _RunsCode:
    """Unpickling this calls exec: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    # case 5
    from mmcourse.train import TrainConfig, fit

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": _model().state_dict(), "step": 1, "rng": _RunsCode(marker)}, ckpt)
    config = TrainConfig(
        max_steps=4, eval_every=2, progress=False, device="cpu", checkpoint_path=str(ckpt)
    )
    with pytest.raises(ValueError, match="refusing to load .*ckpt.pt") as err:
        fit(_model(), _batches(), loss_fn=_loss, config=config, resume=True)
    assert "weights_only" in str(err.value)
    assert not marker.exists()


def test_resume_from_a_genuine_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    # case 5: what fit writes loads under weights_only=True, and only so
    from mmcourse.train import TrainConfig, fit

    def evaluate(model):
        return {"accuracy": 0.5}

    ckpt = str(tmp_path / "ckpt.pt")
    kw = dict(eval_every=2, progress=False, device="cpu", checkpoint_path=ckpt)
    fit(
        _model(),
        _batches(),
        loss_fn=_loss,
        config=TrainConfig(max_steps=2, **kw),
        evaluate_fn=evaluate,
    )
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    result = fit(_model(), _batches(), loss_fn=_loss, config=TrainConfig(max_steps=4, **kw),
                 evaluate_fn=evaluate, resume=True)  # fmt: skip
    assert calls == [True] and result.steps == 4 and result.history[0]["step"] == 1


def test_a_nan_metric_stops_training_and_never_counts_as_best():
    # case 6
    from mmcourse.train import TrainConfig, _better, fit

    values = iter([0.5, float("nan"), 0.9])
    config = TrainConfig(max_steps=6, eval_every=2, patience=1, progress=False, device="cpu")
    with pytest.raises(FloatingPointError, match="evaluate_fn returned accuracy = nan at step 4"):
        fit(_model(), _batches(), loss_fn=_loss, config=config,
            evaluate_fn=lambda model: {"accuracy": next(values)})  # fmt: skip
    assert not _better(float("nan"), 0.5, "max") and not _better(float("nan"), None, "min")


def test_an_exhausted_one_shot_iterable_is_named():
    # case 7
    from mmcourse.train import TrainConfig, fit

    config = TrainConfig(max_steps=6, eval_every=6, progress=False, device="cpu")
    with pytest.raises(ValueError, match="exhausted after 4 batches") as err:
        fit(_model(), iter(_batches(4)), loss_fn=_loss, config=config)
    assert "list" in str(err.value) and "re-iterable" in str(err.value)
    with pytest.raises(ValueError, match="train_batches is empty"):
        fit(_model(), [], loss_fn=_loss, config=config)


# --- 8: every file that is read is hash-checked -------------------------------------------


def _model_copy(tmp_path: Path) -> Path:
    from mmcourse.pretrained import default_model_path

    folder = tmp_path / "minilm"
    folder.mkdir()
    for file in default_model_path().iterdir():
        if file.is_file():
            if file.name == "model.safetensors":  # 90 MB: a link is enough to read it
                (folder / file.name).symlink_to(file)
            else:
                shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize(
    "file,old,new",
    [
        ("config.json", '"num_hidden_layers": 6', '"num_hidden_layers": 3'),
        ("tokenizer.json", '"red":2417,', '"red":2418,'),
        ("tokenizer_config.json", '"do_lower_case": true', '"do_lower_case": false'),
        ("special_tokens_map.json", '"[MASK]"', '"[UNK]"'),
    ],
)
def test_every_file_transformers_reads_is_hash_checked(tmp_path, file, old, new):
    # case 8
    from mmcourse.pretrained import ModelFileError, load_text_encoder

    folder = _model_copy(tmp_path)
    text = (folder / file).read_text()
    assert old in text
    (folder / file).write_text(text.replace(old, new))
    with pytest.raises(ModelFileError, match=f"not the official one: .*{file}"):
        load_text_encoder(folder)


def test_a_file_transformers_would_also_read_is_refused(tmp_path):
    # case 8: e.g. added_tokens.json changes the tokenizer without touching a checked file
    from mmcourse.pretrained import ModelFileError, load_text_encoder

    folder = _model_copy(tmp_path)
    (folder / "added_tokens.json").write_text('{"red": 5}')
    with pytest.raises(ModelFileError, match="added_tokens.json"):
        load_text_encoder(folder)


@pytest.mark.slow
def test_the_hash_table_covers_every_file_transformers_opens():
    # case 8: traced, so a transformers upgrade that reads one more file fails here
    code = (
        "import sys\n"
        "from mmcourse.pretrained import EXPECTED_SHA256, default_model_path\n"
        "root = str(default_model_path())\n"
        "opened = set()\n"
        "sys.addaudithook(lambda e, a: opened.add(str(a[0])) if e == 'open' and "
        "str(a[0]).startswith(root) else None)\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "AutoTokenizer.from_pretrained(root); AutoModel.from_pretrained(root)\n"
        "names = {p[len(root) + 1:] for p in opened}\n"
        "print(sorted(names - set(EXPECTED_SHA256)), sorted(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[] ["), done.stdout  # nothing opened outside the table
    assert "tokenizer.json" in done.stdout and "config.json" in done.stdout


def test_doctor_says_which_files_it_verified(capsys):
    # case 8
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("config.json", "tokenizer.json", "model.safetensors", "vocab.txt"):
        assert name in out
    assert "spoken digits OK, SHA-256 verified" in out
    assert "language model OK, SHA-256 verified" in out and "SmolLM2-135M-Instruct" in out


def test_the_shipped_spoken_digits_are_hash_checked(tmp_path, monkeypatch):
    # case 8: a re-saved file with shuffled labels no longer loads in place of the shipped one
    from mmcourse.data import avdigits

    real = avdigits.load_spoken_digits()
    rng = np.random.default_rng(0)
    shuffled = real.__class__(**{**real.__dict__, "digits": rng.permutation(real.digits)})
    fake = shuffled.save(tmp_path / "spoken_digits.npz")
    monkeypatch.setattr(avdigits, "SPOKEN_DIGITS_PATH", fake)
    with pytest.raises(ValueError, match="SHA-256"):
        avdigits.load_spoken_digits()
    with pytest.raises(ValueError, match="SHA-256"):
        avdigits.load_spoken_digits(fake, verify=True)
    assert len(avdigits.load_spoken_digits(fake)) == len(real)  # a file of your own: no hash


def test_a_corrupted_npz_says_it_is_corrupted(tmp_path):
    # case 8: never numpy's advice to allow pickle
    from mmcourse.data import avdigits

    text = tmp_path / "spoken_digits.npz"
    text.write_text("this is not an npz file\n")
    with pytest.raises(ValueError, match="corrupted") as err:
        avdigits.load_spoken_digits(text)
    assert "pickle" not in str(err.value)
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, waveforms=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="never loaded") as err:
        avdigits.load_spoken_digits(pickled)
    assert "allow_pickle=`" not in str(err.value)


# --- 9 and 12: command-line values and messages --------------------------------------------


def test_parameters_are_parsed_as_their_declared_type():
    # case 9
    chapter = ch.find_chapter("02")
    parse = ch.parse_parameters
    assert parse(chapter, {"lr": "1e-3", "seed": "7", "device": "cpu"}) == {
        "lr": 0.001,
        "seed": 7,
        "device": "cpu",
    }
    assert parse(chapter, {"lr": "3"}) == {"lr": 3.0}
    with pytest.raises(ch.ChapterError, match="leading zero"):
        parse(chapter, {"seed": "010"})
    with pytest.raises(ch.ChapterError, match="takes a int"):
        parse(chapter, {"seed": "1.5"})
    with pytest.raises(ch.ChapterError, match="takes a float"):
        parse(chapter, {"lr": "fast"})
    with pytest.raises(ch.ChapterError, match="takes a int"):
        parse(chapter, {"seed": "true"})


def test_cli_rejects_a_leading_zero_before_running(capsys):
    # case 9
    assert main(["run", "02", "-p", "seed", "010"]) == 2
    assert "leading zero" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda tmp: tmp / "a_file", "is a file, not a folder"),
        (lambda tmp: tmp / "a_file" / "runs", "cannot create the output folder"),
        (lambda tmp: Path("/sys/mmcourse-runs"), "cannot create the output folder"),
    ],
    ids=["a-file", "under-a-file", "unwritable"],
)
def test_cli_output_problems_are_messages(tmp_path, capsys, make, message):
    # case 12
    (tmp_path / "a_file").write_text("mine")
    assert main(["run", "00", "--output", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_cli_unwritable_output_folder_is_a_message(tmp_path, capsys, monkeypatch):
    # case 12: a folder that exists but cannot be written to (root may write anywhere, so
    # the refusal of the operating system is simulated where the lock file is opened)
    out = tmp_path / "runs"
    out.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert main(["run", "00", "--output", str(out)]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_refresh_of_a_notebook_with_a_syntax_error_is_a_message(tmp_path, monkeypatch, capsys):
    # case 12
    folder = tmp_path / "notebooks"
    path = _write_chapter(folder, body="x = (1,\nprint(x)")
    monkeypatch.setenv("MMCOURSE_NOTEBOOKS", str(folder))
    before = path.read_text()
    assert main(["refresh", "01"]) == 2
    err = capsys.readouterr().err
    assert "SyntaxError" in err and "cell 2" in err and "not changed" in err
    assert "Traceback" not in err and path.read_text() == before


def test_seed_beyond_64_bits_is_a_message(capsys, monkeypatch):
    # case 12
    from mmcourse.utils import seed_everything

    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))

    assert main(["run", "00", "-p", "seed", str(2**64)]) == 2
    assert "seed must be an integer in 0..2**64 - 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"seed must be an integer in 0..2\*\*64 - 1"):
        seed_everything(2**64)
    seed_everything(2**64 - 1)
    assert os.environ["PYTHONHASHSEED"] == str((2**64 - 1) % 2**32)  # what Python accepts


def test_a_hub_name_blocked_by_the_offline_guard_says_so():
    # case 12
    from mmcourse.offline import NetworkAccessError
    from mmcourse.pretrained import load_text_encoder

    with pytest.raises(
        NetworkAccessError, match="network access is disabled while the course runs"
    ):
        load_text_encoder("bert-base-uncased", verify=False)


# --- 10: papermill reads every parameter line ----------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter_line(path, caplog):
    # case 10: a second '=' in a parameter's comment makes papermill skip the line
    import papermill

    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = papermill.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("papermill")]
    cell = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    names = [
        line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line
    ]
    assert list(found) == names


# --- 11: the public functions refuse input that gives NaN or nonsense ---------------------


def test_contrastive_losses_refuse_bad_temperature_empty_and_non_finite_input():
    # case 11
    from mmcourse.contrastive import clip_loss, info_nce, siglip_loss

    u, v = torch.randn(4, 8), torch.randn(4, 8)
    for bad in (
        -1.0,
        0.0,
        float("nan"),
        float("inf"),
        torch.tensor(-2.0),
        torch.tensor(float("nan")),
    ):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            info_nce(u, v, temperature=bad)
        if not (isinstance(bad, float) and bad == 0.0):  # s = 0 (uniform logits) is allowed
            with pytest.raises(ValueError, match="logit_scale must be a finite number >= 0"):
                clip_loss(u, v, bad)
    with pytest.raises(ValueError, match="logit_bias must be a finite number"):
        siglip_loss(u, v, 10.0, float("nan"))
    empty = torch.zeros(0, 8)
    with pytest.raises(ValueError, match="empty batch"):
        info_nce(empty, empty, temperature=0.07)
    with pytest.raises(ValueError, match="empty batch"):
        clip_loss(empty, empty, 10.0)
    for bad_value in (float("nan"), float("inf")):
        w = u.clone()
        w[1, 2] = bad_value
        with pytest.raises(ValueError, match="image_embeds holds non-finite values"):
            clip_loss(w, v, 10.0)
        with pytest.raises(ValueError, match="query holds non-finite values"):
            info_nce(w, v, temperature=0.07)
    assert torch.isfinite(clip_loss(u, v, torch.tensor(10.0, requires_grad=True)))


def test_attention_refuses_a_bad_scale_and_no_keys():
    # case 11
    from mmcourse.attention import fused_attention, scaled_dot_product_attention

    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    for fn in (scaled_dot_product_attention, fused_attention):
        for bad in (-1.0, 0.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="scale must be a finite number > 0"):
                fn(q, k, k, scale=bad)
        with pytest.raises(ValueError, match="no keys"):
            fn(q, k[:, :0], k[:, :0])


def test_fusion_refuses_no_modality_and_replaces_a_missing_one():
    # case 11
    from mmcourse.fusion import FusionClassifier, FusionConfig

    config = FusionConfig(modalities=("image", "audio"), num_tokens=(2, 3), token_dims=(5, 4),
                          strategy="early", dim=8, num_classes=3)  # fmt: skip
    torch.manual_seed(0)
    model = FusionClassifier(config).eval()
    inputs = [torch.randn(4, 2, 5), torch.randn(4, 3, 4)]
    with pytest.raises(ValueError, match="no modality present"):
        model(inputs, present=[False, False])
    with pytest.raises(ValueError, match=r"example\(s\) \[1, 3\] have no modality present"):
        model(inputs, present=torch.tensor([[True, False], [False, False]] * 2))
    nan_audio = [inputs[0], torch.full_like(inputs[1], float("nan"))]
    logits = model(nan_audio, present=[True, False])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model([inputs[0], torch.zeros_like(inputs[1])]))


# --- 13: the offline guard -----------------------------------------------------------------


def test_the_offline_guard_forces_the_hf_offline_variables(monkeypatch):
    # case 13
    from mmcourse import offline

    was_installed = offline.is_installed()
    for name in offline.HF_OFFLINE_VARIABLES:
        monkeypatch.setenv(name, "0")
    offline.install()
    try:
        assert all(os.environ[name] == "1" for name in offline.HF_OFFLINE_VARIABLES)
    finally:
        offline.uninstall()
    assert all(os.environ[name] == "0" for name in offline.HF_OFFLINE_VARIABLES)
    if was_installed:  # as mmcourse's import left it (monkeypatch restores the variables)
        offline.install()
    env = {
        **os.environ,
        "MMCOURSE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
    }
    code = "import os, mmcourse; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["1", "1"], done.stderr


# --- determinism and stale stored outputs --------------------------------------------------


def test_timing_results_are_named_as_timings():
    from mmcourse.results import is_timing

    assert is_timing("fused_speedup_at_max_length") and is_timing("images_per_second_torchrun")
    assert is_timing("epoch_seconds") and is_timing("student_speedup_batch32")
    assert is_timing("dynamic_batching_throughput_ratio") and is_timing("compile_break_even_calls")
    assert not is_timing("second_modality_accuracy") and not is_timing("region_accuracy")
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {"application/vnd.mmcourse.result+json": v}}
        for v in ({"name": "acc", "value": 1}, {"name": "fit_seconds", "value": 2.5})
    ]}]}  # fmt: skip
    assert read_results(nb) == {"acc": 1, "fit_seconds": 2.5}
    assert read_results(nb, include_timings=False) == {"acc": 1}


@pytest.mark.slow
def test_a_chapter_repeats_exactly_with_the_same_seed(tmp_path):
    # determinism: chapter 02 at small sizes, twice; every result but the timings is equal
    from mmcourse.results import is_timing

    chapter = ch.find_chapter("02")
    params = dict(max_dk=64, n_pairs=1000, n_train=600, train_steps=150, max_length=128,
                  cost_repeats=1, device="cpu")  # fmt: skip
    first = ch.run_chapter(chapter, tmp_path / "a", params)
    second = ch.run_chapter(chapter, tmp_path / "b", params)
    assert any(is_timing(name) for name in first)  # the speed-up is recorded, and left out
    reproducible = {k: v for k, v in first.items() if not is_timing(k)}
    assert len(reproducible) >= 10
    assert reproducible == {k: v for k, v in second.items() if not is_timing(k)}


def test_notebook_00_lists_every_chapter_present():
    # issue 10 §4: 00's stored `mmcourse list` output is not stale
    nb = json.loads((REPO / "notebooks" / "00_setup_and_tour.ipynb").read_text())
    cell = next(c for c in nb["cells"] if 'mmcourse_cli(["list"])' in "".join(c["source"]))
    text = "".join("".join(o.get("text", "")) for o in cell["outputs"])
    listed = [line.split("  -  ")[0] for line in text.splitlines() if "  -  " in line]
    assert listed == [c.name for c in ch.list_chapters(REPO / "notebooks")]
    assert "Unable to parse" not in text and "WARNING" not in text
