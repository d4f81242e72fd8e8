"""mmcourse.audio against transformers.audio_utils (numpy reference) on a real spoken clip."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers.audio_utils import hertz_to_mel as hf_hertz_to_mel
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
from transformers.audio_utils import mel_to_hertz as hf_mel_to_hertz
from transformers.audio_utils import spectrogram as hf_spectrogram
from transformers.audio_utils import window_function

from mmcourse.audio import (
    hz_to_mel,
    log_mel_spectrogram,
    mel_filter_bank,
    mel_to_hz,
    power_spectrogram,
)
from mmcourse.data.avdigits import load_spoken_digits

SR, N_FFT, HOP, N_MELS = 8000, 256, 80, 40


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    """Four real spoken digits from the shipped file, float64 in [-1, 1], shape (4, 8000)."""
    data = load_spoken_digits()
    rows = [int(np.flatnonzero(data.digits == d)[0]) for d in (0, 3, 7, 9)]
    return data.waveforms[rows].astype(np.float64) / 32768.0


def hf_log_mel(x: np.ndarray, *, norm=None, mel_scale="htk", db_range=None) -> np.ndarray:
    """transformers' log-mel with the conventions of mmcourse.audio.log_mel_spectrogram."""
    filters = hf_mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SR / 2,
        sampling_rate=SR,
        norm=norm,
        mel_scale=mel_scale,
    )
    return hf_spectrogram(
        x,
        window_function(N_FFT, "hann"),  # periodic Hann, like torch.hann_window
        frame_length=N_FFT,
        hop_length=HOP,
        power=2.0,
        center=True,
        pad_mode="reflect",
        mel_filters=filters,
        mel_floor=1e-10,  # = eps
        log_mel="dB",  # 10 log10(power / 1.0)
        min_value=1e-10,
        db_range=db_range,  # = top_db
        dtype=np.float64,
    )


# --- mel scale and filter bank ---------------------------------------------------------


@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
def test_hz_to_mel_matches_transformers_and_round_trips(mel_scale):
    f = np.array([0.0, 50.0, 440.0, 999.0, 1000.0, 1001.0, 4000.0, 11025.0])
    mel = hz_to_mel(torch.from_numpy(f), mel_scale=mel_scale)
    np.testing.assert_allclose(mel.numpy(), hf_hertz_to_mel(f.copy(), mel_scale), rtol=1e-12)
    np.testing.assert_allclose(
        mel_to_hz(mel, mel_scale=mel_scale).numpy(), f, rtol=1e-10, atol=1e-9
    )
    np.testing.assert_allclose(
        mel_to_hz(mel, mel_scale=mel_scale).numpy(),
        hf_mel_to_hertz(mel.numpy(), mel_scale),
        rtol=1e-12,
    )
    # Python numbers compute in float64, not torch's float32 default
    assert hz_to_mel(4000.0, mel_scale=mel_scale).dtype == torch.float64
    assert float(hz_to_mel(4000.0, mel_scale=mel_scale)) == pytest.approx(
        hf_hertz_to_mel(4000.0, mel_scale), rel=1e-14
    )


@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
@pytest.mark.parametrize("norm", [None, "slaney"])
@pytest.mark.parametrize(
    "sr, n_fft, n_mels, f_min, f_max",
    [
        (8000, 256, 40, 0.0, 4000.0),
        (16000, 400, 80, 20.0, 7600.0),
        (22050, 2048, 128, 0.0, 11025.0),
    ],
)
def test_mel_filter_bank_matches_transformers(mel_scale, norm, sr, n_fft, n_mels, f_min, f_max):
    kwargs = dict(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=f_min,
        max_frequency=f_max,
        sampling_rate=sr,
        norm=norm,
        mel_scale=mel_scale,
    )
    ours = mel_filter_bank(**kwargs)
    assert ours.shape == (n_fft // 2 + 1, n_mels) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), hf_mel_filter_bank(**kwargs), rtol=0, atol=1e-6)


# --- spectrograms on a real clip -------------------------------------------------------


def test_power_spectrogram_matches_transformers(clips):
    x = clips[2]
    ref = hf_spectrogram(
        x, window_function(N_FFT, "hann"), frame_length=N_FFT, hop_length=HOP, power=2.0,
        center=True, pad_mode="reflect", dtype=np.float64,
    )  # fmt: skip
    ours = power_spectrogram(torch.from_numpy(x), n_fft=N_FFT, hop_length=HOP)
    assert ours.shape == (N_FFT // 2 + 1, 1 + x.shape[0] // HOP) == ref.shape
    # the reference keeps the STFT in complex64: agree to float32 precision of the peak
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6 * ref.max())


@pytest.mark.parametrize("mel_scale, norm", [("htk", None), ("slaney", "slaney")])
def test_log_mel_matches_transformers_in_db(clips, mel_scale, norm):
    x = clips[1]
    ref = hf_log_mel(x, norm=norm, mel_scale=mel_scale)
    ours64 = log_mel_spectrogram(torch.from_numpy(x), norm=norm, mel_scale=mel_scale)
    ours32 = log_mel_spectrogram(torch.from_numpy(x).float(), norm=norm, mel_scale=mel_scale)
    assert ours64.shape == (N_MELS, 1 + x.shape[0] // HOP) == ref.shape
    assert ours32.dtype == torch.float32
    # tolerances in dB: float64 input agrees to the reference's complex64 round-off;
    # float32 loses a little more in quiet bins next to loud ones
    np.testing.assert_allclose(ours64.numpy(), ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours32.numpy(), ref, rtol=0, atol=1e-2)
    assert ref.min() == pytest.approx(-100.0)  # the zero padding sits on the eps floor


def test_top_db_matches_transformers_db_range(clips):
    x = clips[0]
    ours = log_mel_spectrogram(torch.from_numpy(x), top_db=60.0)
    np.testing.assert_allclose(ours.numpy(), hf_log_mel(x, db_range=60.0), rtol=0, atol=1e-4)
    assert float(ours.max() - ours.min()) == pytest.approx(60.0)


def test_batched_equals_per_item(clips):
    batch = torch.from_numpy(clips)  # (4, 8000)
    together = log_mel_spectrogram(batch, top_db=80.0)  # (4, 40, 101); top_db is per clip
    alone = torch.stack([log_mel_spectrogram(x, top_db=80.0) for x in batch])
    assert together.shape == (4, N_MELS, 101)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-8)


def test_gradient_flows_and_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 200, dtype=torch.float64, requires_grad=True)
    out = log_mel_spectrogram(x, n_fft=32, hop_length=16, n_mels=8)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    short = torch.randn(1, 48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: log_mel_spectrogram(w, n_fft=16, hop_length=8, n_mels=4), (short,)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(clips):
    x = torch.from_numpy(clips).float()
    cpu = log_mel_spectrogram(x)
    cuda = log_mel_spectrogram(x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-2)


# --- clear errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "waveform, kwargs, match",
    [
        (torch.zeros(2, 3, 8000), {}, r"\(T,\) or \(B, T\), got \(2, 3, 8000\)"),
        (
            torch.zeros(8000, dtype=torch.int16),
            {},
            "floating-point waveform, got dtype torch.int16",
        ),
        (np.zeros(8000, dtype=np.float32), {}, "torch.Tensor, got ndarray"),
        (torch.zeros(100), {}, r"too short for n_fft=256"),
        (torch.zeros(8000), {"n_fft": 0}, "n_fft must be a positive integer, got 0"),
        (torch.zeros(8000), {"hop_length": -80}, "hop_length must be a positive integer"),
        (torch.zeros(8000), {"n_mels": 200}, "n_mels must be at most n_fft // 2 \\+ 1 = 129"),
        (torch.zeros(8000), {"f_max": 5000.0}, "max_frequency <= sampling_rate / 2"),
        (torch.zeros(8000), {"top_db": -1.0}, "top_db must be a positive number"),
        (torch.zeros(8000), {"mel_scale": "kaldi"}, "mel_scale must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(waveform, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        log_mel_spectrogram(waveform, **kwargs)


def test_bad_filter_bank_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        mel_filter_bank(
            num_frequency_bins=129, num_mel_filters=40, min_frequency=0, max_frequency=4000,
            sampling_rate=8000, norm="area",
        )  # fmt: skip
    with pytest.raises(ValueError, match="min_frequency < max_frequency"):
        mel_filter_bank(
            num_frequency_bins=129, num_mel_filters=40, min_frequency=3000, max_frequency=2000,
            sampling_rate=8000,
        )  # fmt: skip
    with pytest.raises(ValueError, match="window must be one of"):
        power_spectrogram(torch.zeros(800), n_fft=64, hop_length=16, window="kaiser")
