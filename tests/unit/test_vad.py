"""VAD windows: speech only, ≤ 30 s, absolute starts, the same whatever the chunking; Silero on real speech."""

from pathlib import Path

import numpy as np
import pytest

from whisper_batch.pipeline.audio import decode_audio
from whisper_batch.pipeline.vad import VadOptions, VadWindows, group_segments

SR = 16000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def fake_detector(truth: list[tuple[int, int]]):
    """Detects the parts of ``truth`` (absolute sample ranges) inside each chunk, given where chunks start."""
    state = {"pos": 0}

    def detect(chunk):
        lo, hi = state["pos"], state["pos"] + len(chunk)
        state["pos"] = hi
        return [(max(s, lo) - lo, min(e, hi) - lo) for s, e in truth if s < hi and e > lo]

    return detect


def run(audio, truth, chunk_s, **kw):
    opts = VadOptions(pad_seconds=0.0, **kw)
    chunks = [audio[i : i + int(chunk_s * SR)] for i in range(0, len(audio), int(chunk_s * SR))]
    w = VadWindows(chunks, opts, detect=fake_detector(truth))
    out = [(s, len(a)) for s, a in w]
    assert w.samples == len(audio) and len(w.maps) == len(out)
    return out, w.maps


def test_group_segments():
    assert group_segments([(0, 10), (15, 20), (40, 50)], max_len=30, gap=5) == [(0, 20), (40, 50)]
    assert group_segments([(0, 10), (12, 35)], max_len=30, gap=5) == [(0, 10), (12, 35)]


def test_windows_cover_speech_only_and_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(200 * SR).astype(np.float32) * 0.1
    s = lambda a, b: (int(a * SR), int(b * SR))  # noqa: E731
    truth = [s(5, 12), s(13, 20), s(40, 45), s(59.5, 61), s(80, 150), s(190, 200)]
    expected, maps = run(audio, truth, chunk_s=1000)
    for chunk_s in (7, 30, 60.25):
        assert run(audio, truth, chunk_s) == (expected, maps)
    assert all(n <= 30 * SR for _, n in expected)
    # 5-20 s (its 1 s pause muted), 40-45 and 59.5-61 (gaps of 20 and 14.5 s left out) joined into one window, 1 s of
    # silence between the runs, with the map back to the file's clock
    assert expected[0] == (5 * SR, (15 + 1 + 5 + 1 + 1.5) * SR)
    assert maps[0] == [(0, 5 * SR, 15 * SR), (16 * SR, 40 * SR, 5 * SR), (22 * SR, s(59.5, 0)[0], int(1.5 * SR))]
    # the 70 s run is cut into windows at quiet points, contiguous; the last 10 s run makes a window of its own
    long = [(b, n) for b, n in expected[1:-1]]
    assert len(long) == 3 and long[0][0] == 80 * SR and sum(n for _, n in long) == 70 * SR
    assert [m[0][1] for m in maps[1:-1]] == [b for b, _ in long] and expected[-1] == (190 * SR, 10 * SR)
    speech = sum(e - b for b, e in truth)
    assert sum(n for _, n in expected) == speech + 3 * SR  # the muted 1 s pause and two 1 s joins: all non-speech


def test_no_speech_gives_no_window():
    audio = np.zeros(50 * SR, np.float32)
    assert run(audio, [], chunk_s=20) == ([], [])


def test_silero_finds_the_speech_between_silence_and_noise():
    pytest.importorskip("silero_vad")
    speech = decode_audio((EXAMPLES / "fox.flac").read_bytes())
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal(20 * SR) * 0.003).astype(np.float32)
    audio = np.concatenate([np.zeros(10 * SR, np.float32), speech, noise, speech, np.zeros(5 * SR, np.float32)])
    chunks = [audio[i : i + 15 * SR] for i in range(0, len(audio), 15 * SR)]
    w = VadWindows(chunks, VadOptions())
    windows = [(s / SR, len(a) / SR) for s, a in w]
    assert len(windows) == 1, windows  # both utterances joined into one window, the 20 s of noise left out
    [time_map] = w.maps
    second = 10 + len(speech) / SR + 20
    assert len(time_map) == 2
    for (_, start, length), at in zip(time_map, (10.0, second)):
        assert at - 0.5 <= start / SR <= at + 0.2 and length / SR <= len(speech) / SR + 1.0
    assert w.samples == len(audio) and w.speech_samples < 0.3 * len(audio)


def test_the_feature_stage_with_vad_sends_speech_windows_at_absolute_times(tmp_path):
    pytest.importorskip("silero_vad")
    from tests.integration.conftest import write_wav
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.features import load_features

    speech = decode_audio((EXAMPLES / "fox.flac").read_bytes())
    audio = np.concatenate([np.zeros(40 * SR, np.float32), speech, np.zeros(10 * SR, np.float32)])
    path = write_wav(tmp_path / "long.wav", audio)
    row = {"uri": str(path), "offset": 0.0, "duration": None}
    w = load_features(row, 80, load_config(None, ["audio.vad=true"]))
    assert len(w.starts) == 1 and 39.5 <= w.starts[0] <= 40.0 and w.frames[0] < 5 * 100
    assert abs(w.duration - len(audio) / SR) < 0.01  # the whole file, not only the speech
    silent = write_wav(tmp_path / "silent.wav", np.zeros(20 * SR, np.float32))
    w = load_features({"uri": str(silent)}, 80, load_config(None, ["audio.vad=true"]))
    assert w.starts == [] and w.frames == [] and abs(w.duration - 20.0) < 0.01


def test_pauses_inside_a_window_are_muted():
    rng = np.random.default_rng(2)
    audio = rng.standard_normal(40 * SR).astype(np.float32) * 0.1
    truth = [(5 * SR, 12 * SR), (13 * SR, 20 * SR)]
    [(start, window)] = list(VadWindows([audio], VadOptions(pad_seconds=0.0), detect=fake_detector(truth)))
    assert start == 5 * SR and len(window) == 15 * SR
    assert not window[7 * SR : 8 * SR].any()  # the 1 s pause between the two segments: zeros
    assert (np.array_equal(window[: 7 * SR], audio[5 * SR : 12 * SR])
            and np.array_equal(window[8 * SR :], audio[13 * SR : 20 * SR]))
