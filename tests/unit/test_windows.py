"""Windowing long audio at quiet points (pipeline/windows.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from whisper_batch.pipeline.windows import find_cut, iter_windows, plan_windows

SR = 16000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _bursts(total_s: float, pauses: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Loud modulated noise everywhere except near-silent pauses [(start_s, end_s), ...]."""
    rng = np.random.default_rng(seed)
    n = int(total_s * SR)
    t = np.arange(n) / SR
    audio = 0.3 * rng.standard_normal(n) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))  # syllable-like envelope
    for start, end in pauses:
        a, b = int(start * SR), int(end * SR)
        audio[a:b] = 1e-3 * rng.standard_normal(b - a)
    return audio.astype(np.float32)


def _assert_tiling(windows: list[tuple[int, int]], n: int, max_len: int = 30 * SR) -> None:
    assert windows[0][0] == 0 and windows[-1][1] == n
    for (_s0, e0), (s1, _) in zip(windows, windows[1:]):
        assert e0 == s1  # contiguous: no gap, no overlap
    assert all(0 < e - s <= max_len for s, e in windows)


def test_cuts_land_in_the_pauses():
    pauses = [(26.0, 26.6), (52.5, 53.5), (80.2, 80.5)]
    audio = _bursts(100.0, pauses)
    windows = plan_windows(audio)
    _assert_tiling(windows, len(audio))
    cuts = [e / SR for _, e in windows[:-1]]
    assert len(cuts) == len(pauses)
    for cut, (a, b) in zip(cuts, pauses):
        assert a < cut < b
        assert abs(cut - (a + b) / 2) < 0.05  # the middle of the pause: silence on both sides


def test_pause_outside_the_search_range_is_not_used():
    # the only pause is at 10 s, far before the search range (25..30 s): cut at the quietest point near 30 s
    audio = _bursts(45.0, [(10.0, 11.0)])
    (s0, e0), (s1, e1) = plan_windows(audio)
    assert 25 * SR <= e0 <= 30 * SR and (s1, e1) == (e0, len(audio))


def test_search_range_is_configurable():
    audio = _bursts(40.0, [(21.0, 21.5), (27.0, 27.2)])
    audio[21 * SR : int(21.5 * SR)] = 0.0  # the pause at 21 s is the quieter one
    assert 27.0 * SR < plan_windows(audio)[0][1] < 27.2 * SR  # default search: 25..30 s
    assert 21.0 * SR < plan_windows(audio, min_seconds=20.0)[0][1] < 21.5 * SR  # search 20..30 s
    windows = plan_windows(audio, max_seconds=10.0, min_seconds=8.0)
    _assert_tiling(windows, len(audio), max_len=10 * SR)


@pytest.mark.parametrize("seconds", [0.1, 5.0, 29.99, 30.0])
def test_short_audio_is_one_window(seconds):
    audio = _bursts(seconds, [])
    assert plan_windows(audio) == [(0, len(audio))]


def test_just_over_the_limit_is_two_windows():
    audio = _bursts(30.0, [])
    audio = np.concatenate([audio, audio[:1]])
    windows = plan_windows(audio)
    assert len(windows) == 2
    _assert_tiling(windows, len(audio))


def test_empty_audio_has_no_windows():
    assert plan_windows(np.zeros(0, np.float32)) == []
    assert list(iter_windows([np.zeros(0, np.float32)])) == []


@pytest.mark.parametrize("seed", range(5))
def test_tiling_without_pauses(seed):
    # no pause anywhere: still contiguous, each window between min and max length except the last
    n = int(np.random.default_rng(seed).uniform(31, 200) * SR)
    audio = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    windows = plan_windows(audio)
    _assert_tiling(windows, n)
    assert all(25 * SR <= e - s for s, e in windows[:-1])


def test_silence_is_cut_in_the_middle_of_the_search_range():
    # all-zero audio is one long pause: the cut goes to the middle of the 25..30 s range
    cut = find_cut(np.zeros(30 * SR, np.float32), 25 * SR)
    assert abs(cut - 27.5 * SR) <= 0.01 * SR


@pytest.mark.parametrize("chunk", [1000, 7777, 30 * SR, 30 * SR + 1, 10**6])
def test_streaming_equals_in_memory(chunk):
    audio = _bursts(100.0, [(26.0, 26.6), (52.5, 53.5), (80.2, 80.5)], seed=3)
    windows = plan_windows(audio)
    streamed = list(iter_windows(audio[i : i + chunk] for i in range(0, len(audio), chunk)))
    assert [(s, s + len(w)) for s, w in streamed] == windows
    for (_s, w), (a, b) in zip(streamed, windows):
        np.testing.assert_array_equal(w, audio[a:b])


def test_streaming_holds_a_bounded_buffer():
    """Windows come out while chunks are still arriving: at most a window + a chunk ahead."""
    audio = _bursts(200.0, [])
    chunk = SR  # 1 s chunks
    consumed = [0]

    def chunks():
        for i in range(0, len(audio), chunk):
            consumed.append(i + chunk)
            yield audio[i : i + chunk]

    buffered = [consumed[-1] - start for start, _ in iter_windows(chunks())]
    assert len(buffered) >= 7
    assert max(buffered) <= 30 * SR + chunk  # never more than one window plus one chunk held


def test_bad_limits_are_rejected():
    audio = np.zeros(SR, np.float32)
    with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
        plan_windows(audio, max_seconds=10, min_seconds=20)
    with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
        plan_windows(audio, min_seconds=0)


def test_real_speech_cut_between_sentences():
    """The 41 s espeak example: the cut lands in a pause (quiet), not inside a word."""
    path = EXAMPLES / "anna.ogg"
    if not path.exists():
        pytest.skip(f"{path} is absent (run examples/make_examples.sh)")
    from whisper_batch.pipeline.audio import decode_audio

    audio = decode_audio(path.read_bytes())
    windows = plan_windows(audio)
    assert len(windows) == 2
    _assert_tiling(windows, len(audio))
    cut = windows[0][1]
    around = audio[cut - int(0.05 * SR) : cut + int(0.05 * SR)]
    peak_db = 10 * np.log10(np.mean(audio**2))
    assert 10 * np.log10(np.mean(around**2) + 1e-10) < peak_db - 40  # 100 ms of near-silence around the cut
