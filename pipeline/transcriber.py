"""The two compute stages of the graph, as plain callables (Ray Data runs them in actor pools; the quick
``whisper-batch transcribe`` path and the tests call them directly):

- :class:`Featurizer` (CPU): bytes → 16 kHz audio → windows of ≤ 30 s cut at quiet points → log-mel per window;
- :class:`Transcriber` (one model replica): windows of many files packed into batches → text → stitched per file.

A row's windows travel as one float32 buffer holding each window's real frames only (no 30 s padding), so a short
utterance costs its length, not a full window, between the stages.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from model.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from model.decoding import DecodingOptions
from model.transcribe import TranscribeOptions, WindowResult, transcribe_windows

from .audio import AudioError, iter_audio_chunks, open_stream
from .config import AudioConfig, DecodeConfig, ModelConfig, RunConfig
from .windows import iter_windows, plan_windows

log = logging.getLogger(__name__)

# names a substring of row ids whose model batch hangs (the reliability tests' fault injection); unset normally
HANG_FAILPOINT = "WHISPER_BATCH_FAILPOINT_MODEL_HANG"


@dataclass
class Windows:
    """The log-mel windows of one file."""

    starts: list[float]  # seconds from the start of the row's audio
    frames: list[int]  # real mel frames per window (≤ 3000)
    mel: np.ndarray  # (n_mels, sum(frames)) float32, windows concatenated along time
    duration: float  # seconds of audio

    def window(self, i: int) -> np.ndarray:
        begin = sum(self.frames[:i])
        return self.mel[:, begin : begin + self.frames[i]]


def featurize_windows(windows: Iterable[tuple[int, np.ndarray]], n_mels: int) -> Windows:
    """``(start_sample, audio)`` windows → the log-mel of each, computed as the reference computes a window."""
    starts, frames, mels, samples = [], [], [], 0
    for begin, audio in windows:
        n = max(1, len(audio) // HOP_LENGTH)
        # zero padding to a full window keeps the reference's STFT edges; only the real frames are kept
        mels.append(log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :n].numpy())
        starts.append(begin / SAMPLE_RATE)
        frames.append(n)
        samples = begin + len(audio)
    mel = np.concatenate(mels, axis=1) if mels else np.zeros((n_mels, 0), np.float32)
    return Windows(starts, frames, mel.astype(np.float32, copy=False), samples / SAMPLE_RATE)


def featurize(audio: np.ndarray, n_mels: int, cfg: AudioConfig) -> Windows:
    """Audio (T,) at 16 kHz → windows at quiet points → log-mel of each."""
    cuts = plan_windows(audio, cfg.max_window_seconds, cfg.max_window_seconds - cfg.cut_search_seconds)
    return featurize_windows(((b, audio[b:e]) for b, e in cuts), n_mels)


def load_features(row: dict[str, Any], n_mels: int, cfg: RunConfig) -> Windows:
    """Stream one manifest row's audio from storage into windows and features; raises AudioError with the cause.

    Decoding is chunked, so at most one chunk plus one window of audio is held however long the file is.
    """
    a = cfg.audio
    duration = row.get("duration")
    duration = None if duration is None or duration != duration else float(duration)
    with open_stream(row["uri"], cfg.storage.storage_options) as f:
        chunks = iter_audio_chunks(
            f, a.streaming_chunk_seconds, offset=float(row.get("offset") or 0.0), duration=duration, name=row["uri"]
        )
        windows = iter_windows(chunks, a.max_window_seconds, a.max_window_seconds - a.cut_search_seconds)
        return featurize_windows(windows, n_mels)


def to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data's columnar batch → row dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def to_batch(rows: list[dict[str, Any]]) -> dict[str, list]:
    keys = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value)
    return value


class Featurizer:
    """CPU stage: manifest rows → rows with ``mel`` (bytes), ``mel_frames``, ``window_starts``, ``audio_seconds``."""

    def __init__(self, cfg: RunConfig, n_mels: int = 80):
        self.cfg, self.n_mels = cfg, n_mels
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
        torch.set_num_threads(1)  # many small STFTs: one thread per actor scales better than contention

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return to_batch([self.featurize_row(r) for r in to_rows(batch)])

    def featurize_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row, mel=b"", mel_frames=[], window_starts=[], audio_seconds=0.0, error=None, decode_s=0.0)
        t0 = time.perf_counter()
        timeout = self.cfg.audio.decode_timeout_seconds
        future = self.pool.submit(self._load, row)
        try:
            w = future.result(timeout=timeout)
        except FutureTimeout:
            # the stuck decode keeps its thread; later rows get a fresh one
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
            out["error"] = f"timeout: fetching and decoding {row.get('uri')} took more than {timeout:g} s"
        except AudioError as e:
            out["error"] = str(e)
        except Exception as e:  # a bad file is a row with its error, never a failed job
            log.exception("decoding %s failed", row.get("uri"))
            out["error"] = f"decode failed: {type(e).__name__}: {e}"
        else:
            out.update(mel=w.mel.tobytes(), mel_frames=w.frames, window_starts=w.starts, audio_seconds=w.duration)
        out["decode_s"] = time.perf_counter() - t0
        return out

    def _load(self, row: dict[str, Any]) -> Windows:
        return load_features(row, self.n_mels, self.cfg)


def transcribe_options(d: DecodeConfig) -> TranscribeOptions:
    return TranscribeOptions(
        decoding=DecodingOptions(
            task=d.task,
            language=d.language,
            beam_size=d.beam_size,
            patience=d.patience,
            length_penalty=d.length_penalty,
            prompt=d.initial_prompt,
            suppress_tokens=d.suppress_tokens,
            suppress_blank=d.suppress_blank,
            without_timestamps=d.without_timestamps,
            max_initial_timestamp=d.max_initial_timestamp,
        ),
        temperatures=tuple(d.temperatures),
        compression_ratio_threshold=d.compression_ratio_threshold,
        logprob_threshold=d.logprob_threshold,
        no_speech_threshold=d.no_speech_threshold,
        best_of=d.best_of,
    )


def pick_device(m: ModelConfig) -> tuple[str, torch.dtype]:
    device = m.device if m.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if m.dtype != "auto":
        return device, getattr(torch, m.dtype)
    return device, torch.float16 if device.startswith("cuda") else torch.float32


def stitch(results: list[WindowResult], starts: list[float]) -> dict[str, Any]:
    """One file's window results → its text, segments with absolute times, and language."""
    segments = []
    for r, start in zip(results, starts):
        for s in r.segments:
            segments.append(
                {
                    "start": round(start + s.start, 3),
                    "end": round(start + s.end, 3),
                    "text": s.text.strip(),
                    "avg_logprob": s.avg_logprob,
                    "compression_ratio": s.compression_ratio,
                    "no_speech_prob": s.no_speech_prob,
                    "temperature": s.temperature,
                }
            )
    spoken = [r.language for r in results if not r.no_speech] or [r.language for r in results]
    return {
        "text": " ".join(s["text"] for s in segments if s["text"]),
        "segments": segments,
        "language": Counter(spoken).most_common(1)[0][0] if spoken else None,
        "window_temperatures": [r.temperature for r in results],
    }


class Transcriber:
    """Model stage: holds one Whisper replica; packs the windows of many rows into batches and stitches them back."""

    def __init__(self, cfg: RunConfig):
        from model.checkpoint import load_model

        self.cfg = cfg
        device, dtype = pick_device(cfg.model)
        t0 = time.perf_counter()
        self.model, self.tokenizer, ckpt = load_model(
            cfg.model.name, device=device, dtype=dtype, storage_options=cfg.storage.storage_options
        )
        if cfg.model.quantize == "int8" and device == "cpu":
            self.model = quantize_int8(self.model)
        self.model_name = ckpt.name
        self.load_s = time.perf_counter() - t0
        self.opts = transcribe_options(cfg.decode)
        self.batch_size = cfg.model.batch_size
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="model")

    @property
    def n_mels(self) -> int:
        return self.model.dims.n_mels

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = to_rows(batch)
        return to_batch(self.transcribe_rows(rows))

    def transcribe_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows carrying ``mel``/``mel_frames``/``window_starts`` (or an ``error``) → rows with transcripts."""
        t0 = time.perf_counter()
        windows = []  # (row index, window index, frames array)
        per_row: list[list[WindowResult | None]] = []
        for i, row in enumerate(rows):
            frames = list(row.get("mel_frames") or [])
            per_row.append([None] * len(frames))
            if row.get("error") or not frames:
                continue
            mel = np.frombuffer(row["mel"], dtype=np.float32).reshape(self.n_mels, -1)
            begin = 0
            for j, n in enumerate(frames):
                windows.append((i, j, mel[:, begin : begin + n]))
                begin += n
        failures = self._run(windows, rows, per_row)
        out = []
        for i, row in enumerate(rows):
            res = {k: v for k, v in row.items() if k not in ("mel", "mel_frames")}
            res.update(text=None, segments=None, language=None, window_temperatures=[], model=self.model_name)
            res["duration"] = row.get("audio_seconds")
            if not row.get("error") and i in failures:
                res["error"] = failures[i]
            elif not row.get("error"):
                res.update(stitch(per_row[i], list(row.get("window_starts") or [])))
            res["model_s"] = time.perf_counter() - t0
            out.append(res)
        return out

    def _run(self, windows, rows, per_row) -> dict[int, str]:
        """Decode the windows in batches; a batch that raises marks its rows failed instead of failing the job."""
        failures: dict[int, str] = {}
        # longest windows first: windows of similar length finish together, so fewer rows idle in a batch
        windows.sort(key=lambda w: -w[2].shape[1])
        for b in range(0, len(windows), self.batch_size):
            chunk = windows[b : b + self.batch_size]
            mel = torch.zeros(len(chunk), self.n_mels, N_FRAMES)
            for k, (_, _, m) in enumerate(chunk):
                mel[k, :, : m.shape[1]] = torch.tensor(m[:, :N_FRAMES])
            langs = [rows[i].get("language") for i, _, _ in chunk]
            frames = [m.shape[1] for _, _, m in chunk]
            hang = os.environ.get(HANG_FAILPOINT)  # fault injection for the reliability tests: a model call that hangs
            if hang and any(hang in str(rows[i].get("id")) for i, _, _ in chunk):
                future = self.pool.submit(time.sleep, 10**9)
            else:
                future = self.pool.submit(transcribe_windows, self.model, self.tokenizer, mel, frames, self.opts, langs)
            timeout = self.cfg.model.timeout_seconds
            try:
                results = future.result(timeout=timeout)
            except FutureTimeout:
                log.error("a batch of %d windows took more than %g s; its rows become errors", len(chunk), timeout)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="model")
                for i, _, _ in chunk:
                    failures[i] = f"timeout: the model took more than {timeout:g} s on a batch of {len(chunk)} windows"
                continue
            except Exception as e:
                log.exception("model failed on a batch of %d windows", len(chunk))
                for i, _, _ in chunk:
                    failures[i] = f"model failed: {type(e).__name__}: {e}"
                continue
            for (i, j, _), r in zip(chunk, results):
                per_row[i][j] = r
        return failures


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of the Linear layers (CPU)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def transcribe_files(
    transcriber: Transcriber, featurizer: Featurizer, paths: Iterable[str]
) -> list[dict[str, Any]]:
    """The quick path: local files or URIs, one process, no Ray."""
    rows = [{"uri": p, "audio_filepath": p, "offset": 0.0, "duration": None, "language": None} for p in paths]
    featured = [featurizer.featurize_row(r) for r in rows]
    return transcriber.transcribe_rows(featured)
