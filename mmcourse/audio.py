"""Audio as a tensor: waveform -> power spectrogram -> mel filter bank -> log-mel.

From scratch in torch, with the symbols of the textbook and the argument names of
``transformers.audio_utils`` (whose numpy functions the tests compare against):

    mel(f) = 2595 log10(1 + f / 700)                      (HTK mel scale)
    X[m, k] = sum_n x[n + m H] w[n] e^{-2 pi i k n / N}    (STFT, N = n_fft, H = hop_length)
    S[k, m] = |X[m, k]|^2                                 (power spectrogram)
    M[j, m] = sum_k F[k, j] S[k, m]                       (mel spectrogram, F = filter bank)
    L[j, m] = 10 log10(max(M[j, m], eps))                 (log-mel, in decibels)

Axis letters: B batch, T samples, K frequency bins (n_fft // 2 + 1), J mel filters
(n_mels), M frames (1 + T // hop_length with centred frames).

Taught in notebooks/01_modalities_as_tensors.
"""

from __future__ import annotations

import math

import torch

from mmcourse.utils import one_of, positive_float, positive_int

MEL_SCALES = ("htk", "slaney")
NORMS = (None, "slaney")
WINDOWS = ("hann", "hamming", "boxcar")

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = 15.0  # = 3 * 1000 / 200
_SLANEY_LOGSTEP = 27.0 / math.log(6.4)  # mels per natural-log unit above 1 kHz


def _as_float_tensor(x: torch.Tensor | float) -> torch.Tensor:
    """Python numbers and integer tensors become float64 tensors; float tensors pass through."""
    if not torch.is_tensor(x):
        return torch.as_tensor(x, dtype=torch.float64)  # not the float32 default
    return x if x.is_floating_point() else x.to(torch.float64)


def hz_to_mel(f: torch.Tensor | float, *, mel_scale: str = "htk") -> torch.Tensor:
    """Convert frequencies in hertz to mels.

    ``"htk"``: mel = 2595 log10(1 + f / 700). ``"slaney"`` (librosa's default): mel = 3 f / 200
    below 1 kHz, 15 + 27 ln(f / 1000) / ln(6.4) above.

    Args:
        f: frequencies in Hz, any shape (a Python number gives a 0-d tensor).
        mel_scale: ``"htk"`` or ``"slaney"``.

    Returns:
        Tensor of the same shape, in mels (float64 for Python numbers).
    """
    one_of("mel_scale", mel_scale, MEL_SCALES)
    f = _as_float_tensor(f)
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    linear = 3.0 * f / 200.0
    log = _SLANEY_MIN_LOG_MEL + torch.log(f.clamp(min=_SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) * (
        _SLANEY_LOGSTEP
    )
    return torch.where(f >= _SLANEY_MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: torch.Tensor | float, *, mel_scale: str = "htk") -> torch.Tensor:
    """Convert mels back to hertz: the inverse of :func:`hz_to_mel`.

    Args:
        mel: frequencies in mels, any shape.
        mel_scale: ``"htk"`` or ``"slaney"``.

    Returns:
        Tensor of the same shape, in Hz.
    """
    one_of("mel_scale", mel_scale, MEL_SCALES)
    mel = _as_float_tensor(mel)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = 200.0 * mel / 3.0
    log = _SLANEY_MIN_LOG_HZ * torch.exp(
        (mel.clamp(min=_SLANEY_MIN_LOG_MEL) - _SLANEY_MIN_LOG_MEL) / _SLANEY_LOGSTEP
    )
    return torch.where(mel >= _SLANEY_MIN_LOG_MEL, log, linear)


def mel_filter_bank(
    *,
    num_frequency_bins: int,
    num_mel_filters: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Triangular mel filters F[k, j], as in ``transformers.audio_utils.mel_filter_bank``.

    Filter j rises linearly from centre frequency c_j to c_{j+1} and falls to c_{j+2},
    where c_0..c_{J+1} are J + 2 points evenly spaced in mels between ``min_frequency``
    and ``max_frequency``. ``norm="slaney"`` divides each triangle by its width in Hz
    (times 2), so every filter has the same area (librosa's default).

    Args:
        num_frequency_bins: K = n_fft // 2 + 1, the bins of a one-sided spectrogram.
        num_mel_filters: J, the number of mel bands.
        min_frequency: lowest edge in Hz.
        max_frequency: highest edge in Hz (at most sampling_rate / 2).
        sampling_rate: samples per second of the audio.
        norm: ``None`` or ``"slaney"``.
        mel_scale: ``"htk"`` or ``"slaney"``.
        dtype: dtype of the result (computed in float64 first).
        device: device of the result.

    Returns:
        (K, J) tensor: ``power_spectrogram.mT @ F`` maps power to mel power.
    """
    positive_int(num_mel_filters=num_mel_filters, sampling_rate=sampling_rate)
    if not isinstance(num_frequency_bins, int) or num_frequency_bins < 2:
        raise ValueError(f"num_frequency_bins must be an integer >= 2, got {num_frequency_bins!r}")
    one_of("norm", norm, NORMS)
    one_of("mel_scale", mel_scale, MEL_SCALES)
    if not 0.0 <= min_frequency < max_frequency <= sampling_rate / 2:
        raise ValueError(
            "expected 0 <= min_frequency < max_frequency <= sampling_rate / 2 = "
            f"{sampling_rate / 2}, got min_frequency={min_frequency}, max_frequency={max_frequency}"
        )
    # 1) J + 2 edge/centre frequencies, evenly spaced in mels
    mel_min = hz_to_mel(float(min_frequency), mel_scale=mel_scale)
    mel_max = hz_to_mel(float(max_frequency), mel_scale=mel_scale)
    mel_points = torch.linspace(0.0, 1.0, num_mel_filters + 2, dtype=torch.float64)
    filter_freqs = mel_to_hz(mel_min + (mel_max - mel_min) * mel_points, mel_scale=mel_scale)
    # 2) the frequency of each FFT bin; `sampling_rate // 2` as in transformers and
    #    torchaudio (differs from sampling_rate / 2 only for odd sampling rates)
    fft_freqs = torch.linspace(0.0, sampling_rate // 2, num_frequency_bins, dtype=torch.float64)
    # 3) triangles: the rising and falling slopes, clipped at zero
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (K, J + 2)
    widths = filter_freqs.diff()  # (J + 1,)
    down = -slopes[:, :-2] / widths[:-1]  # (K, J) rising edge
    up = slopes[:, 2:] / widths[1:]  # (K, J) falling edge
    filters = torch.minimum(down, up).clamp(min=0.0)  # (K, J)
    if norm == "slaney":
        filters = filters * (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    return filters.to(dtype=dtype, device=device)


def _check_waveform(waveform: torch.Tensor, *, n_fft: int) -> None:
    if not torch.is_tensor(waveform):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.ndim not in (1, 2):
        raise ValueError(f"expected waveform of shape (T,) or (B, T), got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        raise ValueError(
            f"expected a floating-point waveform, got dtype {waveform.dtype} "
            "(convert int16 samples with waveform.float() / 32768)"
        )
    if waveform.shape[-1] <= n_fft // 2:
        raise ValueError(
            f"waveform of shape {tuple(waveform.shape)} is too short for n_fft={n_fft}: "
            f"centred frames need more than n_fft // 2 = {n_fft // 2} samples"
        )


def _window(name: str, n_fft: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    one_of("window", name, WINDOWS)
    if name == "boxcar":
        return torch.ones(n_fft, dtype=dtype, device=device)
    make = torch.hann_window if name == "hann" else torch.hamming_window
    return make(n_fft, periodic=True, dtype=dtype, device=device)  # periodic, for the STFT


def power_spectrogram(
    waveform: torch.Tensor, *, n_fft: int, hop_length: int, window: str = "hann"
) -> torch.Tensor:
    """Power spectrogram S = |STFT(x)|^2 with centred frames (reflect padding).

    Frame m covers samples around m * hop_length; the waveform is padded by n_fft // 2
    on each side by reflection, as ``torch.stft(center=True)`` and librosa do.

    Args:
        waveform: (T,) or (B, T) float waveform.
        n_fft: N, the frame and FFT length in samples.
        hop_length: H, the step between frames in samples.
        window: ``"hann"`` (periodic), ``"hamming"`` or ``"boxcar"``.

    Returns:
        (K, M) or (B, K, M) with K = n_fft // 2 + 1 and M = 1 + T // hop_length.
    """
    positive_int(n_fft=n_fft, hop_length=hop_length)
    _check_waveform(waveform, n_fft=n_fft)
    w = _window(window, n_fft, dtype=waveform.dtype, device=waveform.device)
    stft = torch.stft(
        waveform,
        n_fft=n_fft,
        hop_length=hop_length,
        window=w,
        center=True,
        pad_mode="reflect",
        onesided=True,
        return_complex=True,
    )  # (..., K, M) complex
    return stft.real.square() + stft.imag.square()  # |X|^2, differentiable everywhere


def log_mel_spectrogram(
    waveform: torch.Tensor,
    *,
    sample_rate: int = 8000,
    n_fft: int = 256,
    hop_length: int = 80,
    n_mels: int = 40,
    f_min: float = 0.0,
    f_max: float | None = None,
    eps: float = 1e-10,
    top_db: float | None = None,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> torch.Tensor:
    """Log-mel spectrogram in decibels: L = 10 log10(max(F^T S, eps)).

    Power (not magnitude) spectrogram, HTK mel filters by default, decibels relative to
    a mel power of 1 (no normalisation by the clip's maximum). ``eps = 1e-10`` floors silence at -100 dB. With ``top_db``, each clip is clamped to
    at most ``top_db`` below its own maximum (librosa/transformers ``db_range``).

    Args:
        waveform: (T,) or (B, T) float waveform in [-1, 1].
        sample_rate: samples per second.
        n_fft: FFT length (32 ms at 8 kHz for 256).
        hop_length: step between frames (10 ms at 8 kHz for 80).
        n_mels: J, number of mel bands; at most n_fft // 2 + 1.
        f_min: lowest mel edge in Hz.
        f_max: highest mel edge in Hz; None means sample_rate / 2.
        eps: floor on the mel power before the logarithm.
        top_db: dynamic range kept per clip, in dB; None keeps everything.
        norm: mel filter normalisation, ``None`` or ``"slaney"``.
        mel_scale: ``"htk"`` or ``"slaney"``.

    Returns:
        (J, M) or (B, J, M) float tensor in dB, M = 1 + T // hop_length; same device and
        dtype as the waveform; differentiable.
    """
    positive_int(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
    positive_float(eps=eps)
    if top_db is not None:
        positive_float(top_db=top_db)
    num_bins = n_fft // 2 + 1
    if n_mels > num_bins:
        raise ValueError(
            f"n_mels must be at most n_fft // 2 + 1 = {num_bins} for n_fft={n_fft}, got {n_mels}"
        )
    f_max = sample_rate / 2 if f_max is None else f_max
    _check_waveform(waveform, n_fft=n_fft)
    power = power_spectrogram(waveform, n_fft=n_fft, hop_length=hop_length)  # (..., K, M)
    filters = mel_filter_bank(
        num_frequency_bins=num_bins,
        num_mel_filters=n_mels,
        min_frequency=f_min,
        max_frequency=f_max,
        sampling_rate=sample_rate,
        norm=norm,
        mel_scale=mel_scale,
        dtype=waveform.dtype,
        device=waveform.device,
    )  # (K, J)
    mel = filters.mT @ power  # (J, K) @ (..., K, M) -> (..., J, M)
    log_mel = 10.0 * torch.log10(mel.clamp(min=eps))  # (..., J, M) dB
    if top_db is not None:
        peak = log_mel.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1), per clip
        log_mel = torch.maximum(log_mel, peak - top_db)
    return log_mel


__all__ = [
    "hz_to_mel",
    "mel_to_hz",
    "mel_filter_bank",
    "power_spectrogram",
    "log_mel_spectrogram",
]
