"""Voice activity detection (optional, ``audio.vad``): long audio cut into windows of speech only.

Long real recordings hold music, noise and silence where Whisper invents text. With ``audio.vad`` the CPU actors
run Silero VAD (the ``silero-vad`` package ships its model: nothing is downloaded) over each decoded chunk and cut
windows around the speech it finds:

- speech segments (padded by ``audio.vad_pad_seconds``) closer than ``audio.vad_merge_gap_seconds`` form a run, the
  pauses between them muted (zeros); a longer stretch of non-speech is left out: the next run follows after
  ``JOIN_GAP_SECONDS`` of silence in the same window while the window stays within ``audio.max_window_seconds``
  (speech joined into full windows, as faster-whisper's batched pipeline does), so music, noise and silence between
  speech cost no encoder passes; non-speech audio never reaches the model;
- one run longer than a window is cut at its quiet points, as without VAD (``whisper_batch.pipeline.windows``);
- each window comes with its time map (``VadWindows.maps``: where each run of it lies in the file), so segment and
  word times are mapped back to the file's clock.

Audio arrives in chunks (``iter_audio_chunks``); detection runs per chunk and a segment that runs across a chunk
boundary is joined, so memory stays at about one chunk plus the window being built.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from whisper_batch.model.constants import SAMPLE_RATE

from .config import AudioConfig
from .windows import plan_windows

_MODEL = None
_MODEL_LOCK = threading.Lock()
JOIN_GAP_SECONDS = 1.0  # silence between two runs of speech joined into one window (a pause the model knows)


@dataclass(frozen=True)
class VadOptions:
    """How speech is found and windowed; the defaults are the `audio.vad_*` config defaults."""

    # speech probability above which a 32 ms frame is speech (Silero's default)
    threshold: float = AudioConfig.vad_threshold
    # seconds added before and after each speech segment (clipped at the audio's ends)
    pad_seconds: float = AudioConfig.vad_pad_seconds
    # speech segments this close share a window (the pause goes to the model with them)
    merge_gap_seconds: float = AudioConfig.vad_merge_gap_seconds
    # shorter speech is dropped (clicks, coughs)
    min_speech_seconds: float = 0.25
    # a pause must last this long to end a segment
    min_silence_seconds: float = 0.16
    # hard limit on a window (Whisper's 30 s)
    max_window_seconds: float = AudioConfig.max_window_seconds
    # a segment longer than a window is cut at the quietest point in this many seconds before the limit
    cut_search_seconds: float = AudioConfig.cut_search_seconds


def silero_model():
    """Silero VAD's packaged sequence model (ONNX), loaded once per process.

    The sequence model runs a block of 512 frames (16 s) per call with the LSTM inside the graph: the same
    probabilities as the streaming model, without its Python loop over 32 ms frames (550x real time on one core
    against 91x: docs/accuracy.md#vad).
    """
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            try:
                from silero_vad import load_silero_vad

                _MODEL = load_silero_vad(sequence=True)
            except ImportError as e:  # pragma: no cover - depends on the install
                raise RuntimeError(
                    "audio.vad needs the silero-vad and onnxruntime packages: pip install 'whisper-batch[vad]' "
                    f"({e})"
                ) from e
        return _MODEL


def silero_detector(opts: VadOptions) -> Callable[[np.ndarray], list[tuple[int, int]]]:
    """audio (T,) float32 at 16 kHz → speech segments [(start, end), ...] in samples (Silero VAD)."""
    from silero_vad import get_speech_timestamps_sequence

    model = silero_model()

    def detect(audio: np.ndarray) -> list[tuple[int, int]]:
        if len(audio) < 512:
            return []
        stamps = get_speech_timestamps_sequence(
            audio,  # made contiguous float32 by the function itself
            model,
            threshold=opts.threshold,
            sampling_rate=SAMPLE_RATE,
            min_speech_duration_ms=int(opts.min_speech_seconds * 1000),
            min_silence_duration_ms=int(opts.min_silence_seconds * 1000),
            speech_pad_ms=0,  # padded here, after joining across chunks
        )
        return [(int(s["start"]), int(s["end"])) for s in stamps]

    return detect


def group_segments(segments: list[tuple[int, int]], max_len: int, gap: int) -> list[tuple[int, int]]:
    """Greedy: consecutive segments share a span while the pause is at most ``gap`` and the span ``max_len``."""
    return [(g[0][0], max(e for _, e in g)) for g in _groups(segments, max_len, gap)]


def _groups(segments: list[tuple[int, int]], max_len: int, gap: int) -> list[list[tuple[int, int]]]:
    groups: list[list[tuple[int, int]]] = []
    for s, e in segments:
        if groups and s - max(x for _, x in groups[-1]) <= gap and e - groups[-1][0][0] <= max_len:
            groups[-1].append((s, e))
        else:
            groups.append([(s, e)])
    return groups


class VadWindows:
    """Streaming speech windows: iterate for ``(start_sample, audio)``; ``samples`` is the audio's length after, and
    ``maps`` holds per window yielded its time map: ``[(window_sample, file_sample, samples), ...]``, one per run of
    speech in it (the window's sample ``window_sample + i`` is the file's ``file_sample + i``)."""

    def __init__(
        self,
        chunks: Iterable[np.ndarray],
        opts: VadOptions = VadOptions(),
        detect: Callable[[np.ndarray], list[tuple[int, int]]] | None = None,
        sr: int = SAMPLE_RATE,
    ):
        self.chunks, self.opts, self.sr = chunks, opts, sr
        self.detect = detect or silero_detector(opts)
        self.samples = 0  # audio decoded so far
        self.speech_samples = 0  # audio sent to the model
        self.maps: list[list[tuple[int, int, int]]] = []
        self._pending: list[tuple[int, np.ndarray]] = []  # runs of the window being joined: (file start, audio)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        o, sr = self.opts, self.sr
        max_len, gap, pad = int(o.max_window_seconds * sr), int(o.merge_gap_seconds * sr), int(o.pad_seconds * sr)
        buf, buf_start = np.zeros(0, np.float32), 0  # audio of [buf_start, buf_start + len(buf))
        segs: list[tuple[int, int]] = []  # unpadded speech segments not yet in a window, absolute
        for chunk in self.chunks:
            chunk = np.asarray(chunk, dtype=np.float32)
            start = buf_start + len(buf)
            found = [(start + s, start + e) for s, e in self.detect(chunk)]
            if found and segs and segs[-1][1] >= start - sr // 100 and found[0][0] <= start + sr // 100:
                segs[-1] = (segs[-1][0], found.pop(0)[1])  # one segment across the chunk boundary
            segs += found
            buf = np.concatenate([buf, chunk]) if len(buf) else chunk
            self.samples = start + len(chunk)
            # segments that can no longer grow or join: the stream is far enough past them
            ready = [sg for sg in segs if sg[1] + gap + 2 * pad < self.samples]
            if ready and len(ready) < len(segs):
                # keep the last ready segment's span open if the next one may still join it
                ready = ready[: _closed_prefix(ready, segs[len(ready)], max_len, gap, pad)]
            if ready:
                yield from self._windows(ready, buf, buf_start, max_len, gap, pad)
                segs = segs[len(ready):]
            keep_from = min([segs[0][0] - pad] if segs else [self.samples]) - pad
            keep_from = max(buf_start, min(keep_from, self.samples))
            buf, buf_start = buf[keep_from - buf_start:], keep_from
        if segs:
            yield from self._windows(segs, buf, buf_start, max_len, gap, pad)
        yield from self._flush()

    def _windows(self, segs, buf, buf_start, max_len, gap, pad) -> Iterator[tuple[int, np.ndarray]]:
        padded = [(max(0, s - pad), min(self.samples, e + pad)) for s, e in segs]
        join = int(JOIN_GAP_SECONDS * self.sr)
        for group in _groups(padded, max_len, gap):
            s, e = max(group[0][0], buf_start), max(x for _, x in group)
            audio = buf[s - buf_start : e - buf_start]
            if len(group) > 1:  # the pauses between a window's segments are muted: non-speech never reaches the model
                audio = audio.copy()
                for (_, prev_end), (nxt, _) in zip(group, group[1:]):
                    if nxt > prev_end:
                        audio[prev_end - s : nxt - s] = 0.0
            if len(audio) <= max_len:
                if self._pending and self._joined_len() + join + len(audio) > max_len:
                    yield from self._flush()
                self._pending.append((s, np.array(audio)))  # a copy: not a view holding the whole chunk
                continue
            yield from self._flush()
            o = self.opts
            for b, c in plan_windows(audio, o.max_window_seconds, o.max_window_seconds - o.cut_search_seconds, self.sr):
                self.speech_samples += c - b
                self.maps.append([(0, s + b, c - b)])
                yield s + b, audio[b:c]

    def _joined_len(self) -> int:
        join = int(JOIN_GAP_SECONDS * self.sr)
        return sum(len(a) for _, a in self._pending) + join * (len(self._pending) - 1)

    def _flush(self) -> Iterator[tuple[int, np.ndarray]]:
        """The runs joined so far as one window, JOIN_GAP_SECONDS of silence between them."""
        if not self._pending:
            return
        gap = np.zeros(int(JOIN_GAP_SECONDS * self.sr), np.float32)
        pieces, time_map, at = [], [], 0
        for k, (start, audio) in enumerate(self._pending):
            if k:
                pieces.append(gap)
                at += len(gap)
            time_map.append((at, start, len(audio)))
            pieces.append(audio)
            at += len(audio)
        self._pending = []
        self.speech_samples += at
        self.maps.append(time_map)
        yield time_map[0][1], np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _closed_prefix(ready, nxt, max_len, gap, pad) -> int:
    """How many of ``ready`` segments may be windowed now: all, unless the next (unready) segment could still join
    the span the last ready ones form, in which case that span waits."""
    padded = [(s - pad, e + pad) for s, e in ready]
    spans = group_segments(padded, max_len, gap)
    last_start = spans[-1][0]
    if nxt[0] - pad - spans[-1][1] <= gap and nxt[1] + pad - last_start <= max_len:
        return sum(1 for s, _ in padded if s < last_start)
    return len(ready)
