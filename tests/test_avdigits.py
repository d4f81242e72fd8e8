"""AV-Digits: the shipped spoken digits, the splits, the pairing, the knobs, the views."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses
import warnings

import datasets
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mmcourse.audio import log_mel_spectrogram
from mmcourse.data import avdigits
from mmcourse.data.avdigits import (
    LABEL_NAMES,
    SPLITS,
    SPOKEN_DIGITS_PATH,
    AVDigitsConfig,
    add_white_noise,
    av_digits_dataset,
    av_digits_tensors,
    load_spoken_digits,
    occlusion_masks,
)


@pytest.fixture(scope="module")
def clips():
    return load_spoken_digits()


def split_arrays(config: AVDigitsConfig) -> dict:
    """All fields of all splits, as numpy (the internal builder both views share)."""
    return {split: avdigits._build_split(config, split) for split in SPLITS}


# --- the shipped spoken digits ---------------------------------------------------------


def test_shipped_spoken_digits_are_valid(clips):
    n, t = clips.waveforms.shape
    assert clips.waveforms.dtype == np.int16 and t == 8000 and clips.sample_rate == 8000
    assert clips.espeak_version.startswith("eSpeak NG")
    assert SPOKEN_DIGITS_PATH.stat().st_size < 4_000_000
    voices = sorted(set(clips.voices.tolist()))
    assert len(voices) >= 10
    combos = set(
        zip(clips.voices.tolist(), clips.speeds.tolist(), clips.digits.tolist(), strict=True)
    )
    assert len(combos) == n  # every (voice, speed, digit) once
    for voice in voices:
        for digit in range(10):
            speeds = clips.speeds[(clips.voices == voice) & (clips.digits == digit)]
            assert len(set(speeds.tolist())) >= 3, (voice, digit)
    # padding is silent, the speech is not: peak-normalised, with real energy
    positions = np.arange(t)[None, :]
    assert not clips.waveforms[positions >= clips.lengths[:, None]].any()
    peak = np.abs(clips.waveforms.astype(np.int32)).max(axis=1)
    assert (peak > 0.8 * 32767).all()
    rms = np.sqrt((clips.waveforms.astype(np.float64) ** 2).sum(1) / clips.lengths) / 32768
    assert (rms > 0.05).all(), rms.min()
    assert (clips.lengths >= 0.15 * 8000).all() and (clips.lengths <= t).all()


def test_voices_really_differ(clips):
    """No two voices render the same audio (espeak-ng silently ignores some variants)."""
    sevens = {}
    for voice in set(clips.voices.tolist()):
        rows = (clips.voices == voice) & (clips.digits == 7)
        sevens[voice] = clips.waveforms[rows].tobytes()
    assert len(set(sevens.values())) == len(sevens)


def test_missing_file_says_how_to_render(tmp_path):
    path = tmp_path / "nowhere.npz"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz.*render_spoken_digits\.py"):
        load_spoken_digits(path)


def test_garbage_file_is_a_value_error(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not an npz file" * 10)
    with pytest.raises(ValueError, match=r"garbage\.npz: not a readable \.npz"):
        load_spoken_digits(path)
    path.write_bytes(b"PK\x03\x04" + b"truncated zip" * 10)
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_spoken_digits(path)


def _fields(clips) -> dict:
    return {f.name: getattr(clips, f.name) for f in dataclasses.fields(clips)}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sample_rate": 16000}, r"'sample_rate' should be 8000 Hz, got 16000"),
        ({"waveforms": "float"}, r"'waveforms' should be dtype int16, got dtype float32"),
        ({"lengths": "short"}, r"'lengths' should be a 1-D array of shape \(360,\)"),
        ({"digits": "eleven"}, r"'digits' should be in 0..9, got values in 0..11"),
        ({"voices": None}, r"missing field\(s\) \['voices'\]"),
    ],
)
def test_bad_fields_are_named(tmp_path, clips, change, match):
    arrays = _fields(clips)
    if "sample_rate" in change:
        arrays["sample_rate"] = change["sample_rate"]
    if "waveforms" in change:
        arrays["waveforms"] = clips.waveforms.astype(np.float32)
    if "lengths" in change:
        arrays["lengths"] = clips.lengths[:-1]
    if "digits" in change:
        arrays["digits"] = np.where(clips.digits == 9, 11, clips.digits)
    if "voices" in change:
        del arrays["voices"]
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_spoken_digits(path)


# --- splits and pairing ----------------------------------------------------------------


def test_image_splits_are_disjoint_complete_and_stratified():
    data = split_arrays(AVDigitsConfig())
    index = {s: data[s]["image_index"] for s in SPLITS}
    assert sum(len(i) for i in index.values()) == 1797
    assert len(np.unique(np.concatenate(list(index.values())))) == 1797
    assert abs(len(index["test"]) - 0.15 * 1797) <= 1
    assert abs(len(index["validation"]) - 0.15 * 1797) <= 1
    labels = load_digits().target
    overall = np.bincount(labels, minlength=10) / 1797
    for split in SPLITS:
        share = np.bincount(data[split]["label"], minlength=10) / len(index[split])
        assert np.abs(share - overall).max() < 0.01, split
        np.testing.assert_array_equal(data[split]["label"], labels[index[split]])


def test_test_voices_are_unseen_and_every_pair_shares_its_label(clips):
    config = AVDigitsConfig()
    data = split_arrays(config)
    heard = {s: set(data[s]["voice"].tolist()) for s in SPLITS}
    assert heard["test"] == set(config.test_voices)
    assert not heard["test"] & (heard["train"] | heard["validation"])
    assert heard["train"] == set(clips.voices.tolist()) - set(config.test_voices)
    images = (load_digits().images / 16.0).astype(np.float32)
    for split in SPLITS:
        d = data[split]
        np.testing.assert_array_equal(clips.digits[d["clip_index"]], d["label"])
        np.testing.assert_array_equal(d["voice"], clips.voices[d["clip_index"]])
        np.testing.assert_array_equal(d["image"], images[d["image_index"]])  # clean: untouched
        np.testing.assert_array_equal(d["audio"], clips.waveforms[d["clip_index"]] / 32768.0)


def test_same_config_same_data_and_seed_changes_it():
    config = AVDigitsConfig.noisy(image_noise=0.1, text=True, text_drop=0.5)
    first = split_arrays(config)
    avdigits._build_split.cache_clear()
    avdigits._split_indices.cache_clear()
    again = split_arrays(dataclasses.replace(config))
    for split in SPLITS:
        for key in first[split]:
            np.testing.assert_array_equal(first[split][key], again[split][key], err_msg=key)
    other = split_arrays(dataclasses.replace(config, seed=1))
    assert not np.array_equal(first["test"]["image_index"], other["test"]["image_index"])


def test_each_knob_leaves_the_other_modality_alone():
    clean = split_arrays(AVDigitsConfig())["train"]
    noisy_audio = split_arrays(AVDigitsConfig(audio_snr_db=0.0))["train"]
    noisy_image = split_arrays(AVDigitsConfig(image_noise=0.2, image_occlusion=0.3))["train"]
    np.testing.assert_array_equal(clean["image"], noisy_audio["image"])
    np.testing.assert_array_equal(clean["clip_index"], noisy_image["clip_index"])
    np.testing.assert_array_equal(clean["audio"], noisy_image["audio"])
    assert not np.array_equal(clean["audio"], noisy_audio["audio"])


# --- the knobs do what they say --------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.3, 0.5, 0.9, 1.0])
def test_occlusion_masks_cover_the_requested_fraction(fraction):
    masks = occlusion_masks(500, fraction=fraction, rng=np.random.default_rng(0))
    covered = masks.reshape(500, -1).mean(1)  # (B,)
    assert np.ptp(covered) == 0  # the same rectangle area for every image
    # exact when round(fraction * 64) is h * w with h, w <= 8; else the closest such area
    assert abs(covered[0] - fraction) <= 4 / 64
    if fraction in (0.0, 0.25, 0.5, 1.0):
        assert covered[0] == fraction
    if 0 < fraction <= 0.5:  # placed at random: every pixel is sometimes hidden, sometimes not
        assert masks.any(0).all() and not masks.all(0).any()


def test_occlusion_zeroes_exactly_the_masked_pixels():
    config = AVDigitsConfig(image_occlusion=0.5)
    clean = split_arrays(AVDigitsConfig())["validation"]["image"]
    occluded = split_arrays(config)["validation"]["image"]
    masks = occlusion_masks(
        len(clean), fraction=0.5, rng=avdigits._rng(config, "validation", "occlusion")
    )
    assert masks.mean() == 0.5
    assert (occluded[masks] == 0).all()
    np.testing.assert_array_equal(occluded[~masks], clean[~masks])


def test_image_noise_has_the_requested_std():
    clean = split_arrays(AVDigitsConfig())["train"]["image"]
    noisy = split_arrays(AVDigitsConfig(image_noise=0.3))["train"]["image"]
    noise = noisy - clean
    assert abs(noise.std() - 0.3) < 0.01 and abs(noise.mean()) < 0.01


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 12.0])
def test_audio_noise_has_the_requested_snr(clips, snr_db):
    clean = split_arrays(AVDigitsConfig())["train"]
    noisy = split_arrays(AVDigitsConfig(audio_snr_db=snr_db))["train"]
    noise = noisy["audio"].astype(np.float64) - clean["audio"]  # (N, T)
    lengths = clips.lengths[clean["clip_index"]]
    speech = np.arange(noise.shape[1])[None, :] < lengths[:, None]
    signal_power = (clean["audio"].astype(np.float64) ** 2 * speech).sum(1) / lengths
    measured = 10 * np.log10(signal_power / (noise**2).mean(1))  # (N,) dB, per clip
    assert np.abs(measured - snr_db).max() < 0.5
    assert abs(measured.mean() - snr_db) < 0.05


def test_add_white_noise_on_a_known_signal():
    t = np.arange(8000) / 8000
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]  # power 0.125
    noisy = add_white_noise(
        sine, lengths=np.array([8000]), snr_db=3.0, rng=np.random.default_rng(0)
    )
    noise_power = ((noisy - sine).astype(np.float64) ** 2).mean()
    assert 10 * np.log10(0.125 / noise_power) == pytest.approx(3.0, abs=0.25)  # 8000 noise samples


def test_text_field_and_its_drop_rate():
    config = AVDigitsConfig(text=True, text_drop=0.3)
    data = split_arrays(config)["train"]
    dropped = data["text"] == "a digit"
    assert abs(dropped.mean() - 0.3) < 0.05
    names = np.asarray(LABEL_NAMES)[data["label"]]
    np.testing.assert_array_equal(data["text"][~dropped], names[~dropped])
    assert "text" not in split_arrays(AVDigitsConfig())["train"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"image_occlusion": 1.5}, r"image_occlusion must be a number in \[0, 1\]"),
        ({"image_noise": -0.1}, "image_noise must be a number >= 0"),
        ({"audio_snr_db": float("nan")}, "audio_snr_db must be None"),
        ({"text_drop": 2}, "text_drop must be a number in"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"test_voices": "en-us"}, "test_voices must be a list of voice names"),
        ({"test_voices": ()}, "test_voices must be non-empty"),
        ({"text": "yes"}, "text must be True or False"),
    ],
)
def test_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AVDigitsConfig(**kwargs)


def test_unknown_test_voice_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"test_voices \['en-xx'\] are not in .*available: \["):
        av_digits_tensors("test", config=AVDigitsConfig(test_voices=["en-xx"]))


# --- the two views ---------------------------------------------------------------------


def test_dataset_dict_features_and_contents():
    config = AVDigitsConfig(text=True, text_drop=0.2)
    dd = av_digits_dataset(config=config)
    assert isinstance(dd, datasets.DatasetDict) and list(dd) == list(SPLITS)
    features = dd["train"].features
    assert features["image"] == datasets.Array2D(shape=(8, 8), dtype="float32")
    assert features["audio"] == datasets.List(datasets.Value("float32"), length=8000)
    assert features["label"].names == list(LABEL_NAMES)
    assert features["text"] == datasets.Value("string")
    assert features["voice"] == datasets.Value("string")
    data = split_arrays(config)
    for split in SPLITS:
        rows = dd[split].with_format("numpy")[:]
        assert (rows["sample_rate"] == 8000).all()
        for key in ("image", "audio", "label", "voice", "text", "clip_index"):
            np.testing.assert_array_equal(rows[key], data[split][key], err_msg=key)
    row = dd["test"][0]
    assert len(row["image"]) == 8 and len(row["audio"]) == 8000
    assert features["label"].int2str(row["label"]) == LABEL_NAMES[row["label"]]


def test_tensors_shapes_and_options():
    out = av_digits_tensors("validation")
    n = len(out["voice"])
    assert out["image"].shape == (n, 1, 8, 8) and out["image"].dtype == torch.float32
    assert out["audio"].shape == (n, 40, 101) and out["audio"].dtype == torch.float32
    assert out["label"].shape == (n,) and out["label"].dtype == torch.int64
    assert "text" not in out
    wave = av_digits_tensors("validation", features="waveform")
    assert wave["audio"].shape == (n, 8000)
    torch.testing.assert_close(out["audio"], log_mel_spectrogram(wave["audio"]))
    small = av_digits_tensors("validation", n_mels=20, hop_length=160, top_db=80.0)
    assert small["audio"].shape == (n, 20, 51)
    with pytest.raises(ValueError, match="split must be one of"):
        av_digits_tensors("valid")
    with pytest.raises(ValueError, match="features must be one of"):
        av_digits_tensors("train", features="mfcc")
    with pytest.raises(ValueError, match="with features='waveform'"):
        av_digits_tensors("train", features="waveform", n_mels=20)


# --- the data carry real signal, and fusion matters in the noisy preset -------------------


def _test_accuracies(config: AVDigitsConfig) -> dict[str, float]:
    """Logistic regression on pixels, on log-mel, on both; accuracy on the test split."""
    kwargs = {"n_mels": 20, "hop_length": 160}  # (20, 51) features per clip, to stay fast
    train = av_digits_tensors("train", config=config, **kwargs)
    test = av_digits_tensors("test", config=config, **kwargs)

    def views(d):
        image, audio = d["image"].flatten(1).numpy(), d["audio"].flatten(1).numpy()
        return {"image": image, "audio": audio, "both": np.hstack([image, audio])}

    x_train, x_test = views(train), views(test)
    accuracy = {}
    for name in x_train:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
        # one BLAS thread: on a busy 2-core machine, 2 threads make lbfgs ~10x slower
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")  # convergence warnings: the accuracy is the check
            model.fit(x_train[name], train["label"].numpy())
        accuracy[name] = model.score(x_test[name], test["label"].numpy())
    return accuracy


def test_clean_speech_is_recognised_from_unseen_voices():
    accuracy = _test_accuracies(AVDigitsConfig())
    assert accuracy["audio"] > 0.8  # chance is 0.1; the test voices are never trained on
    assert accuracy["image"] > 0.9


def test_noisy_preset_needs_both_modalities():
    accuracy = _test_accuracies(AVDigitsConfig.noisy())
    assert accuracy["image"] < 0.85 and accuracy["audio"] < 0.85, accuracy
    assert accuracy["both"] > max(accuracy["image"], accuracy["audio"]) + 0.08, accuracy
