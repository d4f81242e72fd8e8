"""Rendering spoken digits with espeak-ng: the script, the package functions, the errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmcourse.data import speech
from mmcourse.data.avdigits import load_spoken_digits
from mmcourse.data.speech import ESPEAK_NOT_FOUND, render_digit, render_spoken_digits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_spoken_digits.py"
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs the espeak-ng program"
)


@pytest.mark.espeak
@needs_espeak
def test_script_renders_a_tiny_subset_that_loads(tmp_path):
    out = tmp_path / "tiny.npz"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--voices", "en-us", "--speeds", "170"]
    result = subprocess.run(
        [*cmd, "--digits", "1", "7"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 clips" in result.stderr
    data = load_spoken_digits(out)
    assert data.waveforms.shape == (2, 8000) and data.sample_rate == 8000
    assert data.digits.tolist() == [1, 7]
    assert data.voices.tolist() == ["en-us", "en-us"] and data.speeds.tolist() == [170, 170]
    assert (np.abs(data.waveforms).max(axis=1) > 0.8 * 32767).all()  # not silent


@pytest.mark.espeak
@needs_espeak
def test_script_reports_a_bad_voice(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.npz"), "--voices", "en-us+nope"]
    result = subprocess.run([*cmd, "--digits", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no variant 'nope'" in result.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.espeak
@needs_espeak
def test_render_digit_is_trimmed_normalised_and_reproduces_the_shipped_clip():
    clip = render_digit(7, voice="en-us+f3", speed=170)
    assert clip.dtype == np.int16 and clip.ndim == 1
    assert 0.2 * 8000 < clip.shape[0] < 8000
    assert np.abs(clip).max() == round(speech.PEAK * 32767)
    shipped = load_spoken_digits()
    if shipped.espeak_version != speech.espeak_version():
        pytest.skip(f"shipped clips come from {shipped.espeak_version}")
    row = np.flatnonzero(
        (shipped.digits == 7) & (shipped.voices == "en-us+f3") & (shipped.speeds == 170)
    )
    assert row.size == 1
    np.testing.assert_array_equal(shipped.waveforms[row[0], : shipped.lengths[row[0]]], clip)


@pytest.mark.espeak
@needs_espeak
@pytest.mark.parametrize(
    "voice, match",
    [("xx-nowhere", "espeak-ng failed for voice 'xx-nowhere'"), ("en+nope", "no variant 'nope'")],
)
def test_unknown_voices_fail_loudly(voice, match):
    with pytest.raises(ValueError, match=match):
        render_digit(3, voice=voice, speed=170)


@pytest.mark.espeak
@needs_espeak
def test_ignored_variant_is_caught():
    """espeak-ng 1.51 renders 'en-gb+m3' exactly like 'en-gb': the renderer must notice."""
    with pytest.raises(ValueError, match="render identical audio"):
        render_spoken_digits(digits=[4], voices=["en-gb", "en-gb+m3"], speeds=[170])


@pytest.mark.espeak
@needs_espeak
def test_too_long_clip_fails_instead_of_being_cut():
    with pytest.raises(ValueError, match="longer than clip_seconds=0.2"):
        render_spoken_digits(digits=[7], voices=["en-us"], speeds=[130], clip_seconds=0.2)


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng") as error:
        render_digit(1, voice="en-us", speed=170)
    assert str(error.value) == ESPEAK_NOT_FOUND


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"digit": 10}, "digit must be in 0..9"),
        ({"speed": 0}, "speed must be a positive integer"),
        ({"voice": "-x"}, "voice must be an espeak-ng voice name"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"digit": 1, "voice": "en-us", "speed": 170, **kwargs}
    with pytest.raises(ValueError, match=match):
        render_digit(args.pop("digit"), **args)
