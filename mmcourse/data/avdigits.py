"""AV-Digits: real handwritten digits paired by label with spoken digits, plus optional text.

Mirrors the AV-MNIST benchmark of MultiBench (MNIST images paired with spoken digits)
at laptop scale:

- image: the 1,797 real 8x8 handwritten digits of ``sklearn.datasets.load_digits``,
  scaled from 0..16 to [0, 1];
- audio: the spoken digit words rendered with espeak-ng in several voices and speeds
  (``spoken_digits.npz``, see :mod:`mmcourse.data.speech`), 8 kHz, one second;
- text (optional): the digit's name, ``"seven"``, or with probability ``text_drop`` the
  uninformative ``"a digit"``.

Each image gets a clip of its own label. The images are split (stratified, seeded)
into train / validation / test; the test split only hears voices that train and
validation never hear (``test_voices``), so audio accuracy on it measures
generalisation to unseen speakers. Knobs degrade each modality on purpose
(``image_noise``, ``image_occlusion``, ``audio_snr_db``) so that neither modality alone
is enough and fusion matters; :meth:`AVDigitsConfig.noisy` is such a setting.

Everything is deterministic given the config: the split, the pairing, the noise and
the occlusion come from ``seed``, and each knob draws from its own random stream, so
changing one knob leaves everything else exactly as it was.

Taught in notebooks/05_fusion_strategies (first met in notebooks/00_setup_and_tour).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from mmcourse import utils
from mmcourse.audio import log_mel_spectrogram
from mmcourse.data.speech import DIGIT_WORDS, SAMPLE_RATE, SpokenDigits

logger = logging.getLogger(__name__)

SPOKEN_DIGITS_PATH = Path(__file__).with_name("spoken_digits.npz")
RENDER_HINT = "run `python scripts/render_spoken_digits.py` to render it (needs espeak-ng)"
# SHA-256 of the shipped spoken_digits.npz: a re-saved file (shuffled labels, silent clips)
# does not load in its place. Update it only with a deliberate re-render.
SPOKEN_DIGITS_SHA256 = "5d14a8a6aee9fcab9c193ca9e06259e1a14730eb9622fc908a799680bf2a764f"
SPLITS = ("train", "validation", "test")
LABEL_NAMES = DIGIT_WORDS  # ClassLabel names: label 7 is "seven"
UNINFORMATIVE_TEXT = "a digit"  # what a dropped text field says
IMAGE_SIZE = 8  # sklearn digits are 8x8
# Held out for the test split: an accent, a female voice and a klatt-synthesised one
# that train and validation never hear (their variants do occur with other accents).
DEFAULT_TEST_VOICES = ("en-gb-scotland+f4", "en-gb-x-rp+m7", "en-us-nyc+klatt")
_FIELDS = ("waveforms", "lengths", "digits", "voices", "speeds", "sample_rate", "espeak_version")
# independent random streams, one per purpose, so that one knob never shifts another
_STREAMS = {"pairing": 0, "image_noise": 1, "occlusion": 2, "audio_noise": 3, "text_drop": 4}


# --- the spoken clips ------------------------------------------------------------------


def load_spoken_digits(
    path: str | Path | None = None, *, verify: bool | None = None
) -> SpokenDigits:
    """Load and validate the spoken-digit clips written by ``scripts/render_spoken_digits.py``.

    Args:
        path: the ``.npz`` file; None means the one shipped with the package
            (``mmcourse/data/spoken_digits.npz``).
        verify: check the file's SHA-256 against the shipped file's
            (``SPOKEN_DIGITS_SHA256``); None: only for the shipped file (``path=None``),
            not for a file you rendered yourself. The file is read with
            ``allow_pickle=False`` either way.

    Returns:
        :class:`~mmcourse.data.speech.SpokenDigits` with read-only arrays (cached per
        file: do not modify them, copy).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable ``.npz``, or a field is missing or has the
            wrong shape, dtype or sample rate (the message names the field).
    """
    if verify is None:
        verify = path is None
    path = Path(SPOKEN_DIGITS_PATH if path is None else path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"spoken digits file not found: {path}; {RENDER_HINT}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a readable .npz file: it is corrupted (an .npz is a zip archive of "
            f".npy arrays, and this is not one); {RENDER_HINT}"
        )
    if verify:
        from mmcourse.pretrained import sha256_file

        actual = sha256_file(path)
        if actual != SPOKEN_DIGITS_SHA256:
            raise ValueError(
                f"{path}: corrupted or modified, its SHA-256 is not the shipped file's\n"
                f"  expected SHA-256 {SPOKEN_DIGITS_SHA256}\n  got      SHA-256 {actual}\n"
                "Reinstall mmcourse's data file (git checkout mmcourse/data/spoken_digits.npz), "
                "or pass verify=False for clips you rendered yourself"
            )
    stat = path.stat()
    return _load_spoken_digits(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _load_spoken_digits(path: str, _mtime_ns: int, _size: int) -> SpokenDigits:
    """Read ``path``; the modification time and size are in the cache key only."""
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError)
    try:
        with np.load(path, allow_pickle=False) as npz:  # object arrays: ValueError
            arrays = {name: npz[name] for name in _FIELDS if name in npz.files}
            found = sorted(npz.files)
    except unreadable as error:
        if "pickle" in str(error):  # numpy's advice to allow pickle is not for this file
            raise ValueError(
                f"{path}: not a readable .npz file: it holds pickled Python objects, which are "
                f"never loaded (they could run code); {RENDER_HINT}"
            ) from None
        raise ValueError(
            f"{path}: not a readable .npz file, it is corrupted ({type(error).__name__}: "
            f"{error}); {RENDER_HINT}"
        ) from None
    missing = [name for name in _FIELDS if name not in arrays]
    if missing:
        raise ValueError(
            f"{path}: missing field(s) {missing}; expected fields {list(_FIELDS)}, "
            f"got {found}; {RENDER_HINT}"
        )
    for name in ("sample_rate", "espeak_version"):
        if arrays[name].ndim != 0:
            raise ValueError(
                f"{path}: field {name!r} should be a scalar, got shape {arrays[name].shape}"
            )
    if not np.issubdtype(arrays["sample_rate"].dtype, np.integer):
        raise ValueError(
            f"{path}: field 'sample_rate' should be an integer, got dtype {arrays['sample_rate'].dtype}"
        )
    data = SpokenDigits(
        waveforms=arrays["waveforms"],
        lengths=arrays["lengths"],
        digits=arrays["digits"],
        voices=arrays["voices"],
        speeds=arrays["speeds"],
        sample_rate=int(arrays["sample_rate"]),
        espeak_version=str(arrays["espeak_version"]),
    )
    data.validate(sample_rate=SAMPLE_RATE, source=path)
    for name in ("waveforms", "lengths", "digits", "voices", "speeds"):
        getattr(data, name).flags.writeable = False  # shared through the cache
    return data


# --- the config ------------------------------------------------------------------------


@dataclass(frozen=True)
class AVDigitsConfig:
    """How to build AV-Digits. Frozen (hashable): the built data is cached per config.

    Use :meth:`noisy` for a setting where each modality alone is clearly worse than both.
    """

    seed: int = 0  # seeds the split, the image-clip pairing and all noise
    validation_fraction: float = 0.15  # share of the 1,797 images in "validation"
    test_fraction: float = 0.15  # share of the images in "test" (stratified by label)
    test_voices: tuple[str, ...] = DEFAULT_TEST_VOICES  # voices heard only in "test"
    image_noise: float = 0.0  # std of Gaussian noise added to the [0, 1] image (no clipping)
    image_occlusion: float = 0.0  # fraction of the 8x8 image zeroed by one random rectangle
    audio_snr_db: float | None = None  # white noise at this SNR (dB, over the speech); None: clean
    text: bool = False  # add a "text" field with the digit's name ("seven")
    text_drop: float = 0.0  # probability that the text is replaced by "a digit"
    spoken_digits_path: str | None = None  # the clips file; None: the shipped one

    def __post_init__(self) -> None:
        utils.non_negative_int(seed=self.seed)
        utils.fraction(
            validation_fraction=self.validation_fraction,
            test_fraction=self.test_fraction,
            image_occlusion=self.image_occlusion,
            text_drop=self.text_drop,
        )
        if self.validation_fraction <= 0 or self.test_fraction <= 0:
            raise ValueError(
                "validation_fraction and test_fraction must be > 0, got "
                f"{self.validation_fraction} and {self.test_fraction}"
            )
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be < 1 (the rest is train), got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        if not _is_real(self.image_noise) or self.image_noise < 0:
            raise ValueError(f"image_noise must be a number >= 0, got {self.image_noise!r}")
        if self.audio_snr_db is not None and not _is_real(self.audio_snr_db):
            raise ValueError(
                f"audio_snr_db must be None (clean) or a finite number of dB, got {self.audio_snr_db!r}"
            )
        if not isinstance(self.text, bool):
            raise ValueError(f"text must be True or False, got {self.text!r}")
        voices = self.test_voices
        if isinstance(voices, str) or not all(isinstance(v, str) for v in voices or ()):
            raise ValueError(f"test_voices must be a list of voice names, got {voices!r}")
        if len(voices) == 0 or len(set(voices)) != len(voices):
            raise ValueError(f"test_voices must be non-empty and without repeats, got {voices!r}")
        object.__setattr__(self, "test_voices", tuple(voices))  # lists become hashable tuples

    @classmethod
    def noisy(cls, **overrides: Any) -> AVDigitsConfig:
        """A setting where image-only and audio-only are both clearly worse than both together.

        Half of each image is hidden by a rectangle (``image_occlusion=0.5``) and the speech
        lies under white noise 10 dB louder than itself (``audio_snr_db=-10``). Chosen so
        that the two modalities are about equally weak alone: a logistic regression on
        pixels, on log-mel, and on both concatenated is measured in notebooks/05.

        Args:
            **overrides: any field to change (``seed=1``).

        Returns:
            The config.
        """
        preset = cls(image_occlusion=0.5, audio_snr_db=-10.0)
        return dataclasses.replace(preset, **overrides)


def _is_real(value: Any) -> bool:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def _rng(config: AVDigitsConfig, split: str, stream: str) -> np.random.Generator:
    """The random stream for one purpose in one split, derived from the seed."""
    return np.random.default_rng([config.seed, SPLITS.index(split), _STREAMS[stream]])


# --- the corruptions, as building blocks ------------------------------------------------


def occlusion_masks(
    num: int, *, fraction: float, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Random axis-aligned rectangles covering about ``fraction`` of a size x size image.

    The rectangle h x w (1 <= h, w <= size) is the one whose area is closest to
    ``fraction * size**2`` (the squarest on ties), transposed with probability 1/2 and
    placed uniformly. The covered fraction is exact when that area is a product of two
    numbers <= size, otherwise within 4 / 64 for 8 x 8 images.

    Args:
        num: B, the number of masks.
        fraction: share of the pixels to cover, in [0, 1].
        rng: the random generator.
        size: image side.

    Returns:
        (B, size, size) bool, True where the image is hidden.
    """
    utils.non_negative_int(num=num)
    utils.positive_int(size=size)
    utils.fraction(fraction=fraction)
    target = round(fraction * size * size)
    if target == 0:
        return np.zeros((num, size, size), dtype=bool)
    pairs = [(h, w) for h in range(1, size + 1) for w in range(h, size + 1)]
    h, w = min(pairs, key=lambda p: (abs(p[0] * p[1] - target), p[1] - p[0]))
    flip = rng.random(num) < 0.5
    heights = np.where(flip, w, h)  # (B,)
    widths = np.where(flip, h, w)  # (B,)
    top = rng.integers(0, size - heights + 1)  # (B,) upper bound exclusive, per mask
    left = rng.integers(0, size - widths + 1)  # (B,)
    rows = np.arange(size)[None, :, None]  # (1, size, 1)
    cols = np.arange(size)[None, None, :]  # (1, 1, size)
    in_rows = (rows >= top[:, None, None]) & (rows < (top + heights)[:, None, None])
    in_cols = (cols >= left[:, None, None]) & (cols < (left + widths)[:, None, None])
    return in_rows & in_cols  # (B, size, size)


def add_white_noise(
    waveforms: np.ndarray, *, lengths: np.ndarray, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """Add white Gaussian noise at a given signal-to-noise ratio.

    The signal power P_s is the mean of x^2 over each clip's speech (its first
    ``lengths[i]`` samples, not the zero padding); the noise has variance
    P_s / 10^(snr_db / 10) and covers the whole clip, padding included.

    Args:
        waveforms: (B, T) float waveforms.
        lengths: (B,) number of speech samples in each.
        snr_db: the SNR in dB (0 dB: noise as loud as the speech; negative: louder).
        rng: the random generator.

    Returns:
        (B, T) float32 noisy waveforms.
    """
    if waveforms.ndim != 2 or lengths.shape != waveforms.shape[:1]:
        raise ValueError(
            f"expected waveforms (B, T) and lengths (B,), got {waveforms.shape} and {lengths.shape}"
        )
    if not _is_real(snr_db):
        raise ValueError(f"snr_db must be a finite number of dB, got {snr_db!r}")
    t = waveforms.shape[1]
    if lengths.min(initial=1) <= 0 or lengths.max(initial=0) > t:
        raise ValueError(f"lengths must be in 1..{t}, got {lengths.min()}..{lengths.max()}")
    speech = np.arange(t)[None, :] < lengths[:, None]  # (B, T)
    signal_power = (waveforms.astype(np.float64) ** 2 * speech).sum(1) / lengths  # (B,)
    noise_std = np.sqrt(signal_power / 10.0 ** (snr_db / 10.0))  # (B,)
    noise = rng.standard_normal(waveforms.shape, dtype=np.float32)  # (B, T)
    return (waveforms + noise * noise_std[:, None].astype(np.float32)).astype(np.float32)


# --- building the splits ---------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits as (1797, 8, 8) float32 in [0, 1] and (1797,) int64 labels."""
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # 0..16 -> [0, 1]
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=2)
def _split_indices(config: AVDigitsConfig) -> dict[str, np.ndarray]:
    """Stratified, seeded indices into the 1,797 digits for each split."""
    _, labels = _digits()
    n = labels.shape[0]
    for name in ("validation_fraction", "test_fraction"):
        if round(getattr(config, name) * n) < 10:
            raise ValueError(
                f"{name}={getattr(config, name)} gives fewer than 10 of the {n} images, "
                "too few to hold every digit"
            )
    state = int(np.random.SeedSequence([config.seed, 99]).generate_state(1)[0])
    everything = np.arange(n)
    rest, test = train_test_split(
        everything, test_size=config.test_fraction, stratify=labels, random_state=state
    )
    train, validation = train_test_split(
        rest,
        test_size=config.validation_fraction / (1.0 - config.test_fraction),
        stratify=labels[rest],
        random_state=state,
    )
    return {"train": train, "validation": validation, "test": test}


def _split_voices(config: AVDigitsConfig, clips: SpokenDigits) -> dict[str, list[str]]:
    """Which voices each split hears; checks that the test voices exist."""
    available = list(dict.fromkeys(clips.voices.tolist()))
    unknown = [v for v in config.test_voices if v not in available]
    if unknown:
        raise ValueError(
            f"test_voices {unknown} are not in the spoken digits; available: {available}"
        )
    seen = [v for v in available if v not in config.test_voices]
    if not seen:
        raise ValueError(
            f"test_voices {list(config.test_voices)} leave no voice for train and validation"
        )
    held_out = list(config.test_voices)
    return {"train": seen, "validation": seen, "test": held_out}


@lru_cache(maxsize=6)  # two configs' worth of splits (~60 MB each)
def _build_split(config: AVDigitsConfig, split: str) -> dict[str, Any]:
    """All fields of one split as numpy arrays (read-only: cached)."""
    utils.one_of("split", split, SPLITS)
    clips = load_spoken_digits(config.spoken_digits_path)
    images, labels = _digits()
    index = _split_indices(config)[split]  # (N,) into the 1,797 digits
    label = labels[index]  # (N,)
    n = index.shape[0]

    # 1) pair each image with a clip of its own label, spoken by one of the split's voices
    voices = _split_voices(config, clips)[split]
    allowed = np.isin(clips.voices, voices)
    u = _rng(config, split, "pairing").random(n)  # (N,) one uniform draw per image
    clip_index = np.empty(n, dtype=np.int64)
    for digit in range(10):
        pool = np.flatnonzero(allowed & (clips.digits == digit))
        if pool.size == 0:
            raise ValueError(f"no clip of digit {digit} spoken by the {split} voices {voices}")
        rows = label == digit
        clip_index[rows] = pool[(u[rows] * pool.size).astype(np.int64)]

    # 2) the image: occlude, then add noise (the sensor noise covers the patch too)
    image = images[index].copy()  # (N, 8, 8)
    if config.image_occlusion > 0:
        mask = occlusion_masks(
            n, fraction=config.image_occlusion, rng=_rng(config, split, "occlusion")
        )
        image[mask] = 0.0
    if config.image_noise > 0:
        noise = _rng(config, split, "image_noise").standard_normal(image.shape, dtype=np.float32)
        image += np.float32(config.image_noise) * noise

    # 3) the audio: int16 -> float in [-1, 1], then white noise at the requested SNR
    audio = clips.waveforms[clip_index].astype(np.float32) / 32768.0  # (N, T)
    if config.audio_snr_db is not None:
        audio = add_white_noise(
            audio,
            lengths=clips.lengths[clip_index],
            snr_db=float(config.audio_snr_db),
            rng=_rng(config, split, "audio_noise"),
        )

    out: dict[str, Any] = {
        "image": image,
        "audio": audio,
        "label": label,
        "voice": clips.voices[clip_index],
        "speed": clips.speeds[clip_index],
        "image_index": index,
        "clip_index": clip_index,
    }
    # 4) the text, dropped to an uninformative phrase with probability text_drop
    if config.text:
        dropped = _rng(config, split, "text_drop").random(n) < config.text_drop
        names = np.asarray(LABEL_NAMES)[label]
        out["text"] = np.where(dropped, UNINFORMATIVE_TEXT, names)
    for value in out.values():
        value.flags.writeable = False
    return out


# --- the public views: a DatasetDict and tensors ----------------------------------------


def av_digits_dataset(*, config: AVDigitsConfig | None = None) -> datasets.DatasetDict:
    """AV-Digits as a Hugging Face ``DatasetDict`` with "train", "validation", "test".

    Features: ``image`` Array2D (8, 8) float32; ``audio`` float32 list of T samples (the
    waveform; ``datasets.Audio`` would need torchcodec to encode); ``sample_rate``;
    ``label`` ClassLabel "zero".."nine"; ``voice``; ``speed`` (words per minute);
    ``image_index`` (row of ``sklearn.datasets.load_digits``); ``clip_index`` (row of
    the spoken digits); ``text`` when ``config.text``.

    Args:
        config: the knobs; None means ``AVDigitsConfig()`` (clean).

    Returns:
        The ``DatasetDict`` (about 1,257 / 270 / 270 rows with the default fractions).
    """
    config = AVDigitsConfig() if config is None else config
    clips = load_spoken_digits(config.spoken_digits_path)
    num_samples = clips.waveforms.shape[1]
    features = {
        "image": datasets.Array2D(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype="float32"),
        "audio": datasets.List(datasets.Value("float32"), length=num_samples),
        "sample_rate": datasets.Value("int32"),
        "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
        "voice": datasets.Value("string"),
        "speed": datasets.Value("int32"),
        "image_index": datasets.Value("int32"),
        "clip_index": datasets.Value("int32"),
    }
    if config.text:
        features["text"] = datasets.Value("string")
    features = datasets.Features(features)
    schema = features.arrow_schema
    splits = {}
    for split in SPLITS:
        data = _build_split(config, split)
        columns = dict(data)
        columns["sample_rate"] = np.full(len(data["label"]), clips.sample_rate, dtype=np.int32)
        table = pa.Table.from_arrays(
            [_arrow_column(columns[f.name], f.type) for f in schema], schema=schema
        )
        splits[split] = datasets.Dataset(table, split=datasets.NamedSplit(split))
    return datasets.DatasetDict(splits)


def _arrow_column(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """One Arrow column straight from a numpy array of N rows.

    ``Dataset.from_dict`` converts the (N, 8000) audio row by row in Python (about 2.5 s);
    wrapping the numpy buffer as fixed-size lists takes a few milliseconds.
    """
    if values.ndim == 1:
        return pa.array(values.tolist() if values.dtype.kind == "U" else values, type=arrow_type)
    array = pa.array(np.ascontiguousarray(values).reshape(-1))  # (N * prod(rest),)
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)  # nest: (N, *rest)
    if isinstance(arrow_type, pa.ExtensionType):  # Array2D: an extension over list<list<>>
        return pa.ExtensionArray.from_storage(arrow_type, array.cast(arrow_type.storage_type))
    return array.cast(arrow_type)


def av_digits_tensors(
    split: str,
    *,
    config: AVDigitsConfig | None = None,
    features: str = "logmel",
    **logmel_kwargs: Any,
) -> dict[str, Any]:
    """One split of AV-Digits as torch tensors, ready for a model.

    Args:
        split: "train", "validation" or "test".
        config: the knobs; None means ``AVDigitsConfig()`` (clean).
        features: ``"logmel"`` (log-mel spectrogram in dB via
            :func:`mmcourse.audio.log_mel_spectrogram`) or ``"waveform"``.
        **logmel_kwargs: passed to :func:`~mmcourse.audio.log_mel_spectrogram`
            (``n_mels``, ``n_fft``, ``hop_length``, ``top_db``...); the sample rate is the
            data's.

    Returns:
        dict with ``image`` (N, 1, 8, 8) float32; ``audio`` (N, n_mels, frames) float32
        log-mel (default (N, 40, 101)) or (N, T) float32 waveform; ``label`` (N,) int64;
        ``voice`` list of N str; ``text`` list of N str when ``config.text``.
    """
    utils.one_of("split", split, SPLITS)
    utils.one_of("features", features, ("logmel", "waveform"))
    config = AVDigitsConfig() if config is None else config
    if features == "waveform" and logmel_kwargs:
        raise ValueError(
            f"log-mel options {sorted(logmel_kwargs)} were given with features='waveform'; "
            "use features='logmel'"
        )
    if "sample_rate" in logmel_kwargs:
        raise ValueError("sample_rate is the data's (8000 Hz) and cannot be passed")
    data = _build_split(config, split)
    audio = torch.from_numpy(data["audio"].copy())  # (N, T)
    if features == "logmel":
        sample_rate = load_spoken_digits(config.spoken_digits_path).sample_rate
        audio = log_mel_spectrogram(audio, sample_rate=sample_rate, **logmel_kwargs)  # (N, J, M)
    out: dict[str, Any] = {
        "image": torch.from_numpy(data["image"].copy()).unsqueeze(1),  # (N, 1, 8, 8)
        "audio": audio,
        "label": torch.from_numpy(data["label"].copy()),  # (N,) int64
        "voice": data["voice"].tolist(),
    }
    if config.text:
        out["text"] = data["text"].tolist()
    return out


# --- tokens for the fusion models of chapter 05 ----------------------------------------


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Standardise each feature (last axis) with the mean and std of ``train`` only.

    Args:
        train: (..., F) training tensor: the statistics come from it.
        *others: tensors (..., F) to transform with the same statistics (validation, test).

    Returns:
        ``(train, *others)`` standardised.

    Taught in notebooks/05_fusion_strategies.
    """
    dims = tuple(range(train.dim() - 1))
    mean = train.mean(dims)  # (F,)
    std = train.std(dims).clamp_min(eps)  # (F,)
    return tuple((x - mean) / std for x in (train, *others))


def av_digits_tokens(
    image: Tensor, logmel: Tensor, *, patch_size: int = 2, mel_pool: int = 2, frame_pool: int = 4
) -> list[Tensor]:
    """AV-Digits as raw token sequences: image patches and (pooled) log-mel frames.

    Args:
        image: (B, 1, H, W).
        logmel: (B, J, T) log-mel spectrograms.
        patch_size: P, the side of an image patch.
        mel_pool: average this many adjacent mel bands into one.
        frame_pool: average this many adjacent frames into one (the last group may be short).

    Taught in notebooks/05_fusion_strategies.

    Returns:
        ``[image_tokens (B, (H/P)(W/P), P*P), audio_tokens (B, ceil(T/frame_pool), J/mel_pool)]``.
    """
    from mmcourse.modalities import patchify  # chapter 01's patches

    utils.positive_int(mel_pool=mel_pool, frame_pool=frame_pool)
    if logmel.dim() != 3:
        raise ValueError(f"expected log-mel spectrograms (B, J, T), got {tuple(logmel.shape)}")
    pooled = F.avg_pool2d(logmel[:, None], (mel_pool, frame_pool), ceil_mode=True)[:, 0]
    return [patchify(image, patch_size), pooled.transpose(1, 2)]


__all__ = [
    "standardize",
    "av_digits_tokens",
    "AVDigitsConfig",
    "SpokenDigits",
    "load_spoken_digits",
    "av_digits_dataset",
    "av_digits_tensors",
    "occlusion_masks",
    "add_white_noise",
    "LABEL_NAMES",
    "SPLITS",
]
