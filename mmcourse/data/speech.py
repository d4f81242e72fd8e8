"""Spoken digits "zero".."nine" rendered with the espeak-ng speech synthesiser.

The course has no recorded speech that it may ship, so it renders its own: every digit
word in several espeak-ng voices (accents x voice variants) and speaking rates, trimmed,
resampled to 8 kHz, peak-normalised and padded to one second. The result is rendered
once by ``scripts/render_spoken_digits.py`` and shipped as ``mmcourse/data/spoken_digits.npz``;
:func:`mmcourse.data.avdigits.load_spoken_digits` reads it back.

Taught in notebooks/01_modalities_as_tensors (audio -> waveform -> log-mel) and used by
the AV-Digits world (notebooks/05_fusion_strategies).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from mmcourse.utils import non_negative_int, positive_float, positive_int

logger = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
ESPEAK_NOT_FOUND = "espeak-ng not found: install it with apt-get install espeak-ng"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# espeak-ng voices as "<language>[+<variant>]". Accents from `espeak-ng --voices=en`,
# variants (pitch, formants, breathiness, klatt synthesis) from `espeak-ng --voices=variant`.
# Pitfall: "en-gb+<variant>" silently ignores the variant in espeak-ng 1.51 (it renders
# exactly like "en-gb"), so British English variants are spelled "en+<variant>".
# mbrola voices ("mb-*", "us-mbrola-*") are not used: they need extra packages.
DEFAULT_VOICES = (
    "en-us",  # American English, default male
    "en-us+f3",  # American English, female
    "en+m3",  # British English, male variant
    "en+f2",  # British English, female
    "en-gb-scotland",  # Scottish English, male
    "en-gb-scotland+f4",  # Scottish English, female
    "en-gb-x-rp+m7",  # Received Pronunciation, male variant
    "en-gb-x-gbclan+f5",  # Lancaster, female
    "en-gb-x-gbcwmd+m2",  # West Midlands, male variant
    "en-029+f1",  # Caribbean English, older female
    "en-us-nyc+klatt",  # New York City, klatt formant synthesiser
    "en+klatt4",  # British English, klatt formant synthesiser
)
DEFAULT_SPEEDS = (130, 170, 220)  # words per minute: slow, normal, fast
SAMPLE_RATE = 8000  # Hz, like the Free Spoken Digit Dataset used by AV-MNIST
CLIP_SECONDS = 1.0  # every clip is zero-padded to this duration
PEAK = 0.9  # peak amplitude after normalisation, as a fraction of int16 full scale
SILENCE_DB = -40.0  # samples quieter than this (relative to the peak) count as silence
MARGIN_SECONDS = 0.005  # silence kept on each side of the trimmed word


@dataclass(frozen=True)
class SpokenDigits:
    """The spoken-digit clips, as stored in ``spoken_digits.npz`` (N clips of T samples).

    Attributes:
        waveforms: (N, T) int16, each clip left-aligned and zero-padded to T samples.
        lengths: (N,) int64, number of samples of each clip before the zero padding.
        digits: (N,) int64, the digit spoken, 0..9.
        voices: (N,) str, the espeak-ng voice ("en-us+f3").
        speeds: (N,) int64, the speaking rate in words per minute.
        sample_rate: samples per second (8000).
        espeak_version: the ``espeak-ng --version`` line that rendered the clips.
    """

    waveforms: np.ndarray
    lengths: np.ndarray
    digits: np.ndarray
    voices: np.ndarray
    speeds: np.ndarray
    sample_rate: int
    espeak_version: str

    def __len__(self) -> int:
        return int(self.waveforms.shape[0])

    def validate(self, *, sample_rate: int = SAMPLE_RATE, source: str = "spoken digits") -> None:
        """Check shapes, dtypes and values; raise ``ValueError`` naming the first bad field.

        Args:
            sample_rate: the sample rate the clips must have.
            source: where the data came from, for the error message (a path).
        """

        def bad(field: str, expected: str, got: object) -> ValueError:
            return ValueError(f"{source}: field {field!r} should be {expected}, got {got}")

        w = self.waveforms
        if not isinstance(w, np.ndarray) or w.ndim != 2 or w.shape[0] == 0:
            raise bad("waveforms", "a non-empty 2-D array (N, T)", _describe(w))
        if w.dtype != np.int16:
            raise bad("waveforms", "dtype int16", f"dtype {w.dtype}")
        n, t = w.shape
        if int(self.sample_rate) != sample_rate:
            raise bad("sample_rate", f"{sample_rate} Hz", f"{self.sample_rate!r}")
        for field in ("lengths", "digits", "speeds", "voices"):
            value = getattr(self, field)
            if not isinstance(value, np.ndarray) or value.shape != (n,):
                raise bad(field, f"a 1-D array of shape ({n},) like waveforms", _describe(value))
        for field in ("lengths", "digits", "speeds"):
            dtype = getattr(self, field).dtype
            if not np.issubdtype(dtype, np.integer):
                raise bad(field, "an integer array", f"dtype {dtype}")
        if self.voices.dtype.kind != "U":
            raise bad("voices", "an array of str", f"dtype {self.voices.dtype}")
        if self.lengths.min() <= 0 or self.lengths.max() > t:
            raise bad(
                "lengths",
                f"in 1..{t} (the padded clip length)",
                f"values in {self.lengths.min()}..{self.lengths.max()}",
            )
        if self.digits.min() < 0 or self.digits.max() > 9:
            raise bad("digits", "in 0..9", f"values in {self.digits.min()}..{self.digits.max()}")
        if self.speeds.min() <= 0:
            raise bad("speeds", "positive words per minute", f"minimum {self.speeds.min()}")
        if not isinstance(self.espeak_version, str):
            raise bad("espeak_version", "a str", type(self.espeak_version).__name__)

    def save(self, path: str | Path) -> Path:
        """Validate and write the clips to one compressed ``.npz`` file.

        Args:
            path: the output file; its folder is created if missing.

        Returns:
            The path written.
        """
        self.validate(sample_rate=int(self.sample_rate), source="data to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a str
            np.savez_compressed(
                f,
                waveforms=self.waveforms,
                lengths=self.lengths.astype(np.int64),
                digits=self.digits.astype(np.int64),
                voices=self.voices.astype(str),
                speeds=self.speeds.astype(np.int64),
                sample_rate=np.int64(self.sample_rate),
                espeak_version=np.str_(self.espeak_version),
            )
        return path


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape} dtype {value.dtype}"
    return type(value).__name__


def _espeak() -> str:
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise FileNotFoundError(ESPEAK_NOT_FOUND)
    return exe


def espeak_version() -> str:
    """Return the ``espeak-ng --version`` line, e.g. ``"eSpeak NG text-to-speech: 1.51 ..."``."""
    out = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@lru_cache(maxsize=1)
def espeak_variants() -> frozenset[str]:
    """Return the names of the installed espeak-ng voice variants (``"f3"``, ``"klatt"``...)."""
    out = subprocess.run(
        [_espeak(), "--voices=variant"], capture_output=True, text=True, check=True
    ).stdout
    # rows look like " 5  variant  --/F  female3  !v/f3": the variant name is the file's
    return frozenset(line.split("!v/", 1)[1].strip() for line in out.splitlines() if "!v/" in line)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit WAV file into a float64 array in [-1, 1] and its sample rate."""
    with wave.open(str(path), "rb") as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise ValueError(
                f"expected a mono 16-bit WAV from espeak-ng, got {f.getnchannels()} channel(s) "
                f"of {8 * f.getsampwidth()} bits in {path}"
            )
        rate = f.getframerate()
        frames = f.readframes(f.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0, rate


def trim_silence(
    waveform: np.ndarray, *, sample_rate: int, silence_db: float = SILENCE_DB
) -> np.ndarray:
    """Cut the leading and trailing silence of a 1-D waveform.

    Args:
        waveform: (T,) float samples.
        sample_rate: samples per second, used for the :data:`MARGIN_SECONDS` kept each side.
        silence_db: samples below ``peak * 10**(silence_db / 20)`` count as silence.

    Returns:
        (T',) the slice from the first to the last loud sample, plus the margin.
    """
    peak = np.abs(waveform).max(initial=0.0)
    if peak == 0.0:
        raise ValueError("expected speech, got an all-zero waveform from espeak-ng")
    loud = np.flatnonzero(np.abs(waveform) >= peak * 10.0 ** (silence_db / 20.0))
    margin = int(round(MARGIN_SECONDS * sample_rate))
    start = max(int(loud[0]) - margin, 0)
    stop = min(int(loud[-1]) + 1 + margin, waveform.shape[0])
    return waveform[start:stop]


def render_digit(
    digit: int,
    *,
    voice: str,
    speed: int,
    sample_rate: int = SAMPLE_RATE,
    workdir: str | Path | None = None,
) -> np.ndarray:
    """Speak one digit word with espeak-ng; trim, resample and peak-normalise it.

    Args:
        digit: 0..9; the word spoken is ``DIGIT_WORDS[digit]``.
        voice: an espeak-ng voice, ``"<language>[+<variant>]"`` (``"en-us+f3"``).
        speed: speaking rate in words per minute (espeak-ng ``-s``; 80..450).
        sample_rate: output samples per second (espeak-ng renders at 22050 Hz).
        workdir: folder for the temporary WAV file (a fresh temporary folder if None).

    Returns:
        (T,) int16 waveform of the trimmed word, peak at ``PEAK`` of full scale.

    Raises:
        FileNotFoundError: espeak-ng is not installed.
        ValueError: a bad argument, or espeak-ng produced silence (an unknown voice).
    """
    non_negative_int(digit=digit)
    if digit > 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    positive_int(speed=speed, sample_rate=sample_rate)
    if not isinstance(voice, str) or not voice or voice.startswith("-"):
        raise ValueError(f"voice must be an espeak-ng voice name like 'en-us+f3', got {voice!r}")
    exe = _espeak()
    if "+" in voice:
        # espeak-ng falls back to the plain language, silently, for an unknown variant
        variant = voice.split("+", 1)[1]
        if variant not in espeak_variants():
            raise ValueError(
                f"voice {voice!r}: espeak-ng has no variant {variant!r}; "
                f"installed variants: {sorted(espeak_variants())}"
            )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        wav_path = Path(tmp) / "clip.wav"
        cmd = [exe, "-v", voice, "-s", str(speed), "-w", str(wav_path), DIGIT_WORDS[digit]]
        result = subprocess.run(cmd, capture_output=True, text=True)
        # espeak-ng exits 0 and prints to stderr for an unknown voice: check both.
        if result.returncode != 0 or not wav_path.exists() or result.stderr.strip():
            raise ValueError(
                f"espeak-ng failed for voice {voice!r} at speed {speed}: "
                f"exit code {result.returncode}, stderr {result.stderr.strip()!r}"
            )
        waveform, rate = _read_wav(wav_path)
    waveform = trim_silence(waveform, sample_rate=rate)
    g = gcd(sample_rate, rate)
    waveform = resample_poly(waveform, sample_rate // g, rate // g)  # e.g. up 160, down 441
    waveform = waveform * (PEAK / np.abs(waveform).max())
    return np.round(waveform * 32767.0).astype(np.int16)


def render_spoken_digits(
    *,
    digits: Sequence[int] = tuple(range(10)),
    voices: Sequence[str] = DEFAULT_VOICES,
    speeds: Sequence[int] = DEFAULT_SPEEDS,
    sample_rate: int = SAMPLE_RATE,
    clip_seconds: float = CLIP_SECONDS,
) -> SpokenDigits:
    """Render every (digit, voice, speed) combination into one :class:`SpokenDigits`.

    Args:
        digits: the digits to speak, 0..9.
        voices: espeak-ng voices (see :data:`DEFAULT_VOICES`).
        speeds: speaking rates in words per minute.
        sample_rate: output samples per second.
        clip_seconds: every clip is zero-padded to ``round(clip_seconds * sample_rate)``.

    Returns:
        The clips, ordered by voice, then speed, then digit.

    Raises:
        ValueError: a clip is longer than ``clip_seconds`` (nothing is ever cut), or
            two voices render identical audio (a variant espeak-ng ignored).
    """
    positive_int(sample_rate=sample_rate)
    positive_float(clip_seconds=clip_seconds)
    for name, values in (("digits", digits), ("voices", voices), ("speeds", speeds)):
        if len(values) == 0 or len(set(values)) != len(values):
            raise ValueError(f"{name} must be a non-empty list without repeats, got {values!r}")
    num_samples = int(round(clip_seconds * sample_rate))
    version = espeak_version()
    logger.info("rendering %d clips with %s", len(digits) * len(voices) * len(speeds), version)
    rows: list[tuple[np.ndarray, int, str, int]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for voice in voices:
            for speed in speeds:
                for digit in digits:
                    clip = render_digit(
                        digit, voice=voice, speed=speed, sample_rate=sample_rate, workdir=workdir
                    )
                    if clip.shape[0] > num_samples:
                        raise ValueError(
                            f"clip of {DIGIT_WORDS[digit]!r} by {voice!r} at {speed} wpm is "
                            f"{clip.shape[0] / sample_rate:.3f} s, longer than clip_seconds="
                            f"{clip_seconds}; raise clip_seconds or the speed"
                        )
                    rows.append((clip, digit, voice, speed))
            logger.info("rendered voice %s", voice)
    waveforms = np.zeros((len(rows), num_samples), dtype=np.int16)  # (N, T)
    for i, (clip, *_rest) in enumerate(rows):
        waveforms[i, : clip.shape[0]] = clip
    data = SpokenDigits(
        waveforms=waveforms,
        lengths=np.array([r[0].shape[0] for r in rows], dtype=np.int64),
        digits=np.array([r[1] for r in rows], dtype=np.int64),
        voices=np.array([r[2] for r in rows], dtype=str),
        speeds=np.array([r[3] for r in rows], dtype=np.int64),
        sample_rate=sample_rate,
        espeak_version=version,
    )
    _check_voices_differ(data)
    return data


def _check_voices_differ(data: SpokenDigits) -> None:
    """Raise ``ValueError`` if two voices render bit-identical clips for every digit and speed."""
    by_voice: dict[str, bytes] = {}
    for voice in dict.fromkeys(data.voices.tolist()):
        by_voice[voice] = data.waveforms[data.voices == voice].tobytes()
    seen: dict[bytes, str] = {}
    for voice, blob in by_voice.items():
        if blob in seen:
            raise ValueError(
                f"voices {seen[blob]!r} and {voice!r} render identical audio: espeak-ng ignored "
                "a variant (e.g. 'en-gb+m3' sounds like 'en-gb'; write 'en+m3')"
            )
        seen[blob] = voice
