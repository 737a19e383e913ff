"""Log-mel features for Whisper: the reference pipeline, with the mel filterbank computed in code.

No I/O here: waveforms arrive as float32 arrays at 16 kHz (see ``pipeline/audio.py`` for decoding).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

# the audio hyper-parameters, importable from here as in the reference implementation (defined in constants.py)
from .constants import (  # noqa: E402,F401
    CHUNK_LENGTH,
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    N_SAMPLES_PER_TOKEN,
    SAMPLE_RATE,
    TOKENS_PER_SECOND,
)

SUPPORTED_N_MELS = (80, 128)

# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels at 1 kHz
_LOGSTEP = np.log(6.4) / 27.0  # 27 log-spaced mels per factor 6.4 in frequency


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, linear)


@cache
def _mel_filters_np(n_mels: int) -> np.ndarray:
    """Triangular filters on the Slaney scale, area-normalised; float64 math, float32 result."""
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, 1 + N_FFT // 2)  # (201,)
    # n_mels + 2 edges: each filter spans edges[i] .. edges[i + 2] and peaks at edges[i + 1]
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    widths = np.diff(edges)  # (n_mels + 1,)
    ramps = edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, 201)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, 201)
    # Slaney normalisation: every filter has (roughly) constant energy per Hz.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


@cache
def _mel_filters_cached(n_mels: int, device: str) -> torch.Tensor:
    return torch.from_numpy(_mel_filters_np(n_mels)).to(device)


def mel_filters(n_mels: int, device: str | torch.device | None = None) -> torch.Tensor:
    """Mel filterbank equal to ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)``.

    Args:
        n_mels: 80 (all models up to large-v2) or 128 (large-v3).
        device: where the (cached) tensor lives; CPU by default.

    Returns:
        Tensor (n_mels, N_FFT // 2 + 1) float32.
    """
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"unsupported n_mels={n_mels}: Whisper uses one of {SUPPORTED_N_MELS}")
    return _mel_filters_cached(n_mels, str(torch.device(device or "cpu")))


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz audio.

    Args:
        audio: waveform (T,) or a batch of equal-length waveforms (B, T), 16 kHz.
        n_mels: 80 or 128 mel bins.
        padding: zero samples appended on the right before the STFT.
        device: if given, the waveform is moved there before the STFT.

    Returns:
        Tensor (n_mels, n_frames), or (B, n_mels, n_frames) for a batch, n_frames = (T + padding) // HOP_LENGTH.
        For a batch the dynamic-range floor (max - 8) is taken per row, so each row equals its unbatched result.
    """
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be (T,) or (B, T), got shape {tuple(audio.shape)}")
    audio = audio.to(device=device, dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    # the last frame is centred past the end of the audio; the reference drops it
    magnitudes = stft[..., :-1].abs() ** 2  # (..., 201, n_frames)

    mel_spec = mel_filters(n_mels, audio.device) @ magnitudes  # (..., n_mels, n_frames)
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)  # keep 80 dB of dynamic range per waveform
    return (log_spec + 4.0) / 4.0


def pad_or_trim(array: np.ndarray | torch.Tensor, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut ``array`` along ``axis`` to exactly ``length`` (N_SAMPLES, or N_FRAMES for mels)."""
    size = array.shape[axis]
    if torch.is_tensor(array):
        if size > length:
            array = array.narrow(axis, 0, length)
        elif size < length:
            pads = [0, 0] * array.ndim
            # F.pad lists (left, right) pairs starting from the last dimension
            pads[2 * (array.ndim - 1 - (axis % array.ndim)) + 1] = length - size
            array = F.pad(array, pads)
        return array
    if size > length:
        array = np.take(array, np.arange(length), axis=axis)
    elif size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        array = np.pad(array, widths)
    return array


def check_mel(mel: np.ndarray | torch.Tensor, n_mels: int, path_hint: str | None = None) -> None:
    """Raise ValueError if ``mel`` (..., n_bins, n_frames) does not have the ``n_mels`` bins the model expects."""
    where = f" ({path_hint})" if path_hint else ""
    if mel.ndim < 2:
        raise ValueError(f"mel must be (..., n_mels, n_frames), got shape {tuple(mel.shape)}{where}")
    bins = mel.shape[-2]
    if bins != n_mels:
        hint = path_hint or "check the model's n_mels against the features' n_mels"
        raise ValueError(f"mel has {bins} bins, model expects {n_mels} ({hint})")
