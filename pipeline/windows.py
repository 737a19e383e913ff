"""Cut long audio into windows of at most 30 s, at quiet points.

Whisper sees 30 s at a time. Cutting blindly at 30 s splits words; instead each cut goes to the quietest spot
in the last few seconds before the limit (``min_seconds`` .. ``max_seconds`` into the window), so a pause
between words or sentences is used whenever there is one. Windows are contiguous: every sample belongs to
exactly one window.

The cut only depends on the audio of the current window, so the streaming ``iter_windows`` (bounded memory,
for hour-long files) and the in-memory ``plan_windows`` give identical windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from whisper_batch.model.constants import SAMPLE_RATE

FRAME_SECONDS = 0.025  # energy frame (25 ms: a few pitch periods, shorter than a phoneme)
HOP_SECONDS = 0.010
SMOOTH_FRAMES = 5  # moving average over 50 ms, so one quiet frame inside a word does not win
QUIET_TOLERANCE_DB = 6.0  # frames this close to the minimum count as the same pause (noise floors wobble)


def _check_limits(max_seconds: float, min_seconds: float, sr: int) -> tuple[int, int]:
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got min={min_seconds} max={max_seconds}")
    if max_seconds * sr < 2 * FRAME_SECONDS * sr:
        raise ValueError(f"max_seconds={max_seconds} is too short to place cuts")
    return int(round(max_seconds * sr)), int(round(min_seconds * sr))


def _frame_energy_db(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Mean-square energy in dB of frames ``x[i * hop : i * hop + frame]``, smoothed. Shape (n_frames,)."""
    n_frames = 1 + (len(x) - frame) // hop
    squares = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    starts = np.arange(n_frames) * hop
    power = (squares[starts + frame] - squares[starts]) / frame
    if n_frames >= SMOOTH_FRAMES:
        # edge frames are averaged over fewer neighbours rather than padded with zeros (which would look quiet)
        kernel = np.ones(SMOOTH_FRAMES)
        power = np.convolve(power, kernel, "same") / np.convolve(np.ones(n_frames), kernel, "same")
    return 10.0 * np.log10(power + 1e-10)


def find_cut(window: np.ndarray, min_len: int, sr: int = SAMPLE_RATE) -> int:
    """Where to end a window: the middle of the quietest stretch of ``window[min_len:]``.

    Args:
        window: audio (max_len,) starting at the window start; its end is the hard limit.
        min_len: earliest allowed cut, in samples from the window start.

    Returns:
        cut position in samples, ``min_len <= cut <= len(window)``.
    """
    frame, hop = int(FRAME_SECONDS * sr), int(HOP_SECONDS * sr)
    region = window[min_len:]
    if len(region) < frame:
        return len(window)
    energy = _frame_energy_db(region, frame, hop)
    best = int(np.argmin(energy))
    # widen to the whole pause around the minimum and cut in its middle: silence on both sides of the cut
    quiet = energy <= energy[best] + QUIET_TOLERANCE_DB
    lo, hi = best, best
    while lo > 0 and quiet[lo - 1]:
        lo -= 1
    while hi < len(energy) - 1 and quiet[hi + 1]:
        hi += 1
    centre = ((lo + hi) * hop + frame) // 2  # midpoint between the centres of frames lo and hi
    return min_len + min(centre, len(region))


def plan_windows(
    audio: np.ndarray, max_seconds: float = 30.0, min_seconds: float = 25.0, sr: int = SAMPLE_RATE
) -> list[tuple[int, int]]:
    """Split audio into contiguous windows of at most ``max_seconds``, cutting at quiet points.

    Args:
        audio: waveform (T,).
        max_seconds: hard limit on a window's length (Whisper's 30 s).
        min_seconds: cuts are searched between ``min_seconds`` and ``max_seconds`` into each window.
        sr: sample rate of ``audio``.

    Returns:
        [(start, end), ...] sample ranges in order, covering ``[0, T)`` with no gap or overlap; a single
        window if T fits in ``max_seconds``; empty for empty audio.
    """
    max_len, min_len = _check_limits(max_seconds, min_seconds, sr)
    windows, start = [], 0
    while len(audio) - start > max_len:
        end = start + find_cut(audio[start : start + max_len], min_len, sr)
        windows.append((start, end))
        start = end
    if start < len(audio):
        windows.append((start, len(audio)))
    return windows


def iter_windows(
    chunks: Iterable[np.ndarray], max_seconds: float = 30.0, min_seconds: float = 25.0, sr: int = SAMPLE_RATE
) -> Iterator[tuple[int, np.ndarray]]:
    """Streaming ``plan_windows``: consume audio chunks, yield ``(start_sample, window_audio)``.

    Holds at most one window plus one chunk of audio, so an hour-long file streams through in constant memory
    (with ``iter_audio_chunks``). The windows equal ``plan_windows`` on the concatenated chunks.
    """
    max_len, min_len = _check_limits(max_seconds, min_seconds, sr)
    parts: list[np.ndarray] = []  # buffered audio, concatenated only when a cut is due (chunks may be tiny)
    n_buffered, start = 0, 0
    for chunk in chunks:
        parts.append(np.asarray(chunk, dtype=np.float32))
        n_buffered += len(chunk)
        # only cut when more than a full window is buffered: otherwise the rest might still fit in one window
        if n_buffered <= max_len:
            continue
        buffer = np.concatenate(parts)
        while len(buffer) > max_len:
            cut = find_cut(buffer[:max_len], min_len, sr)
            yield start, buffer[:cut].copy()
            buffer, start = buffer[cut:], start + cut
        parts, n_buffered = [buffer], len(buffer)
    if n_buffered:
        yield start, np.concatenate(parts)
