"""The feature stage (CPU): a manifest row's bytes → 16 kHz audio → windows of ≤ 30 s cut at quiet points →
log-mel per window; short rows of a shard packed into shared windows (:mod:`whisper_batch.pipeline.packing`).

A row's windows travel as one fp16 buffer holding each window's real frames only (no 30 s padding), so a short
utterance costs its length, not a full window, between the stages.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from whisper_batch.model.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, log_mel_spectrogram

from .audio import AudioError, iter_audio_chunks, open_stream
from .config import AudioConfig, RunConfig
from .packing import member_record, pack_audio, plan_packs
from .sources import audio_source, iter_sample_audio
from .windows import iter_windows

logger = logging.getLogger(__name__)


# features travel as fp16: half the bytes of fp32 through the object store and in memory (log-mel values lie in
# [-1.5, 2.5], where fp16 keeps about 3 decimal digits — finer than the bf16 a CPU model computes in)
MEL_DTYPE = np.float16


@dataclass
class Windows:
    """The log-mel windows of one file."""

    starts: list[float]  # seconds from the start of the row's audio
    frames: list[int]  # real mel frames per window (≤ 3000)
    mel: bytearray  # window after window, each (n_mels, frames[i]) MEL_DTYPE in C order
    duration: float  # seconds of audio
    # audio.vad's time maps: per window, [window second, file second, seconds] of each run of speech joined into it
    maps: list[list[list[float]]] | None = None


def mel_windows(blob: bytes | bytearray, frames: Iterable[int], n_mels: int) -> list[np.ndarray]:
    """The windows of a features blob (see :class:`Windows`), as read-only views."""
    out, offset = [], 0
    for n in frames:
        out.append(np.frombuffer(blob, dtype=MEL_DTYPE, count=n_mels * n, offset=offset).reshape(n_mels, n))
        offset += n_mels * n * np.dtype(MEL_DTYPE).itemsize
    return out


def featurize_windows(windows: Iterable[tuple[int, np.ndarray]], n_mels: int) -> Windows:
    """``(start_sample, audio)`` windows → the log-mel of each, computed as the reference computes a window.

    The features are appended to one buffer window by window, so a long file's features are held once (about
    30 MB per hour of audio), never as a list of windows plus their concatenation.
    """
    starts, frames, blob, samples = [], [], bytearray(), 0
    for begin, audio in windows:
        n = max(1, len(audio) // HOP_LENGTH)
        # zeros after the audio, as the reference's 30 s of padding puts them: a frame reaches N_FFT / 2 samples
        # past its centre, so N_FFT of them give the real frames the reference's values (the 30 s took 5x the STFT
        # work of a 6 s row; on the eval set's 53 windows the stored float16 features are the same)
        mel = log_mel_spectrogram(audio, n_mels, padding=N_FFT)[:, :n].numpy()
        blob += np.ascontiguousarray(mel, dtype=MEL_DTYPE).data
        starts.append(begin / SAMPLE_RATE)
        frames.append(n)
        samples = begin + len(audio)
    return Windows(starts, frames, blob, samples / SAMPLE_RATE)


def load_features(
    row: dict[str, Any], n_mels: int, cfg: RunConfig, data: bytes | Exception | None = None
) -> Windows | np.ndarray:
    """Stream one manifest row's audio from storage into windows and features; raises AudioError with the cause.

    ``data`` is the audio of a sample read from its container (tar member, Parquet cell: see
    :func:`whisper_batch.pipeline.sources.iter_sample_audio`), or the error that stopped reading it; None opens
    ``row["uri"]``.

    Decoding is chunked, so at most one chunk plus one window of audio is held however long the file is. A row
    short enough to share a window with others (``audio.pack_max_seconds``) comes back as its raw audio instead,
    for :func:`plan_packs`.
    """
    a = cfg.audio
    duration = row.get("duration")
    duration = None if duration is None or duration != duration else float(duration)
    name = row["uri"] if data is None else row.get("audio_filepath") or row["uri"]
    source = open_stream(row["uri"], cfg.storage.storage_options) if data is None else nullcontext(audio_source(data))
    with source as f:
        chunks = iter_audio_chunks(
            f, a.streaming_chunk_seconds, offset=float(row.get("offset") or 0.0), duration=duration, name=name
        )
        # windows around speech only (whisper_batch.pipeline.vad); not packed: a window's start is not the row's
        if a.vad:
            windows = speech_windows(chunks, a)
            w = featurize_windows(windows, n_mels)
            w.duration = windows.samples / SAMPLE_RATE
            w.maps = [[[x / SAMPLE_RATE for x in run] for run in m] for m in windows.maps]
            return w
        windows = iter_windows(chunks, a.max_window_seconds, a.max_window_seconds - a.cut_search_seconds)
        head = list(itertools.islice(windows, 2))
        if len(head) == 1 and len(head[0][1]) <= a.pack_max_seconds * SAMPLE_RATE:
            return head[0][1]
        return featurize_windows(itertools.chain(head, windows), n_mels)


def speech_windows(chunks: Iterable[np.ndarray], a: AudioConfig):
    """``audio.vad``: windows of ≤ ``max_window_seconds`` around the speech Silero VAD finds
    (:mod:`whisper_batch.pipeline.vad`)."""
    from .vad import VadOptions, VadWindows

    opts = VadOptions(
        threshold=a.vad_threshold,
        pad_seconds=a.vad_pad_seconds,
        merge_gap_seconds=a.vad_merge_gap_seconds,
        max_window_seconds=a.max_window_seconds,
        cut_search_seconds=a.cut_search_seconds,
    )
    return VadWindows(chunks, opts)


def decode_pool() -> ThreadPoolExecutor:
    """The thread a featurizer decodes and computes log-mel in: one torch thread (many small STFTs: one thread per
    actor scales better than contention), set in that thread only — a model in the same process keeps its own."""
    return ThreadPoolExecutor(1, thread_name_prefix="decode", initializer=torch.set_num_threads, initargs=(1,))


class Featurizer:
    """CPU stage: manifest rows → work items for the model stage.

    An item is one row with its windows (``mel`` bytes, ``mel_frames``, ``window_starts``), or — for short rows —
    a *pack*: several rows' audio laid into one 30 s window with silence between them (``members_json`` lists the
    rows and where each starts), so a 5 s utterance does not cost a whole 30 s window of encoder work.
    """

    def __init__(self, cfg: RunConfig, n_mels: int = 80):
        self.cfg, self.n_mels = cfg, n_mels
        self.pool = decode_pool()
        n = cfg.audio.prefetch
        self.fetch_pool = ThreadPoolExecutor(n, thread_name_prefix="fetch") if n > 0 else None

    def iter_audio(
        self, rows: list[dict[str, Any]], inline: dict[int, bytes | Exception | None] | None = None
    ) -> Iterable[tuple[dict[str, Any], bytes | Exception | None]]:
        """``(row, data)`` in row order (see :func:`load_features`): samples inside tar shards / Parquet files come
        with their bytes, each container read once; ``inline`` gives rows' audio (or its error) by ``row_index``
        (a user's dataset holding bytes); loose files are fetched ``audio.prefetch`` ahead of the decoder
        (:mod:`whisper_batch.pipeline.prefetch`), each kept only when at most ``audio.prefetch_max_mb`` (else
        streamed)."""
        from .prefetch import fetch_small, prefetch

        a, so = self.cfg.audio, self.cfg.storage.storage_options
        pairs = iter_sample_audio(rows, so)
        if inline:
            pairs = ((row, inline.get(row["row_index"]) if data is None else data) for row, data in pairs)
        if self.fetch_pool is None:
            yield from pairs
            return
        limit = int(a.prefetch_max_mb * 2**20)

        def fetch(pair: tuple[dict[str, Any], bytes | Exception | None]) -> bytes | Exception | None:
            row, data = pair
            return data if data is not None else fetch_small(row["uri"], so, limit)

        for (row, _), got in prefetch(pairs, fetch, a.prefetch, self.fetch_pool, a.decode_timeout_seconds):
            if isinstance(got, BaseException) and not isinstance(got, AudioError):
                # a fetch that failed otherwise (or hung) gets the decoder's own try: streamed, under its timeout
                logger.warning("prefetching %s failed (%s: %s); streaming it", row.get("uri"), type(got).__name__, got)
                got = None
            yield row, got

    def featurize_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.iter_items(rows))

    def iter_items(
        self, rows: list[dict[str, Any]], inline: dict[int, bytes | Exception | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The rows' work items, each as soon as its row is read; packs of short rows at the end."""
        short = []
        for row, data in self.iter_audio(rows, inline):
            out, audio = self.featurize_row(row, data)
            if audio is None:
                yield out
            else:
                short.append((out, audio))
        a = self.cfg.audio
        by_shard: dict[Any, list] = {}
        for out, audio in short:  # packs stay inside a shard, so a shard's text never depends on other shards
            by_shard.setdefault(out.get("shard_id"), []).append((out, audio))
        for group in by_shard.values():
            durations = [len(au) / SAMPLE_RATE for _, au in group]
            for pack in plan_packs(durations, a.max_window_seconds, a.pack_gap_seconds):
                yield self.pack_item([group[i] for i in pack])

    def pack_item(self, members: list[tuple[dict[str, Any], np.ndarray]]) -> dict[str, Any]:
        gap = self.cfg.audio.pack_gap_seconds
        audio, starts = pack_audio([au for _, au in members], gap)
        w = featurize_windows([(0, audio)], self.n_mels)
        item = dict(members[0][0], mel=w.mel, mel_frames=w.frames, window_starts=[0.0])
        if len(members) > 1:
            item["members_json"] = json.dumps(
                [dict(member_record(m), window_start=start) for (m, _), start in zip(members, starts)]
            )
        return item

    def featurize_row(
        self, row: dict[str, Any], data: bytes | Exception | None = None
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """One row → (item without features yet if short, its audio) or (item with features, None).

        ``data``: the row's audio bytes when its container was already read (see :func:`load_features`)."""
        out = dict(row, mel=b"", mel_frames=[], window_starts=[], audio_seconds=0.0, error=None, decode_s=0.0,
                   window_maps=None)
        out["members_json"] = None
        t0 = time.perf_counter()
        timeout = self.cfg.audio.decode_timeout_seconds
        future = self.pool.submit(load_features, row, self.n_mels, self.cfg, data)
        audio = None
        try:
            w = future.result(timeout=timeout)
        except FutureTimeout:
            # the stuck decode keeps its thread; later rows get a fresh one
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = decode_pool()
            out["error"] = f"timeout: fetching and decoding {row.get('uri')} took more than {timeout:g} s"
        except AudioError as e:
            out["error"] = str(e)
        except Exception as e:  # a bad file is a row with its error, never a failed job
            logger.exception("decoding %s failed", row.get("uri"))
            out["error"] = f"decode failed: {type(e).__name__}: {e}"
        else:
            if isinstance(w, np.ndarray):
                audio = w
                out["audio_seconds"] = len(w) / SAMPLE_RATE
            else:
                out.update(mel=w.mel, mel_frames=w.frames, window_starts=w.starts, audio_seconds=w.duration,
                           window_maps=json.dumps(w.maps) if w.maps else None)
        out["decode_s"] = time.perf_counter() - t0
        return out, audio
