"""The model stage: one Whisper replica per actor; the windows of many rows packed into batches, decoded, and
stitched back into one transcript per row (:class:`Transcriber`), and the quick one-process path
(:func:`transcribe_files`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch

from whisper_batch.model.constants import FRAMES_PER_SECOND, N_FRAMES
from whisper_batch.model.decoding import DecodingOptions, prompt_tokens
from whisper_batch.model.results import WindowResult
from whisper_batch.model.transcribe import TranscribeOptions, prompt_after, transcribe_windows

from . import faults
from .config import DecodeConfig, RunConfig
from .device import auto_batch_size, free_cached_memory, is_out_of_memory, pick_device, quantize_mode
from .features import Featurizer, mel_windows
from .packing import FEATURE_KEYS, member_share, pack_ok

logger = logging.getLogger(__name__)

# DecodeConfig fields named differently in the model's options
_RENAMED = {"initial_prompt": "prompt"}


def transcribe_options(d: DecodeConfig) -> TranscribeOptions:
    """The model's options from the decode config: each field goes, by name, to :class:`TranscribeOptions` or else
    to its :class:`DecodingOptions` (a field that matches neither is a bug, and raises)."""
    outer = {f.name for f in dataclasses.fields(TranscribeOptions)} - {"decoding"}
    inner = {f.name for f in dataclasses.fields(DecodingOptions)}
    top, decoding = {}, {}
    for f in dataclasses.fields(d):
        name, value = _RENAMED.get(f.name, f.name), getattr(d, f.name)
        if name in outer:
            top[name] = tuple(value) if isinstance(value, list) else value
        elif name in inner:
            decoding[name] = value
        else:
            raise TypeError(f"decode.{f.name} has no counterpart in the model's options")
    return TranscribeOptions(decoding=DecodingOptions(**decoding), **top)


def file_clock(start: float, time_map: list[list[float]] | None):
    """Seconds on a window's clock → seconds on the file's: ``start`` plus, or with audio.vad's time map
    ([window second, file second, seconds] of each run of speech joined into the window), from the run a time falls
    in; a time in the silence put between two runs is the end of the earlier run."""
    if not time_map:
        return lambda t: round(start + t, 3)
    anchors = [w for w, _, _ in time_map]

    def to_file(t: float) -> float:
        window_s, file_s, seconds = time_map[max(bisect.bisect_right(anchors, t) - 1, 0)]
        return round(file_s + min(max(t - window_s, 0.0), seconds), 3)

    return to_file


def stitch(results: list[WindowResult], starts: list[float], maps: list | None = None) -> dict[str, Any]:
    """One file's window results → its text, segments with absolute times, and language.

    Segments come out in time order and never overlap (a segment whose end reaches past the next one's start ends
    there); each carries its window's language, and the row's is the language of most of its segments' seconds.
    ``maps``: audio.vad's time map per window (see :func:`file_clock`)."""

    def words(s, clock) -> list[dict[str, Any]] | None:  # None when word timestamps were not requested
        if s.words is None:
            return None
        return [
            {"word": w.word.replace("\ufffd", ""), "start": clock(w.start), "end": clock(w.end),
             "probability": w.probability}
            for w in s.words
        ]

    segments = []
    for k, (r, start) in enumerate(zip(results, starts)):
        clock = file_clock(start, maps[k] if maps else None)
        for s in r.segments:
            segments.append(
                {
                    "start": clock(s.start),
                    "end": clock(s.end),
                    "text": s.text.strip(),
                    "avg_logprob": s.avg_logprob,
                    "compression_ratio": s.compression_ratio,
                    "no_speech_prob": s.no_speech_prob,
                    "temperature": s.temperature,
                    "words": words(s, clock),
                    "language": s.language or r.language,
                    "fallback_failed": s.fallback_failed,
                }
            )
    segments.sort(key=lambda s: s["start"])  # stable: a window's segments keep their order
    for seg, after in zip(segments, segments[1:]):
        seg["end"] = max(seg["start"], min(seg["end"], after["start"]))
    return {
        "text": " ".join(s["text"] for s in segments if s["text"]),
        "segments": segments,
        "language": main_language(results, segments),
        "window_temperatures": [r.temperature for r in results],
    }


def main_language(results: list[WindowResult], segments: list[dict[str, Any]]) -> str | None:
    """The language of most of the row's speech: segment seconds per language; with no segments, the language of
    most windows that were not silence."""
    seconds: Counter = Counter()
    for s in segments:
        seconds[s["language"]] += max(s["end"] - s["start"], 0.01)
    if seconds:
        return seconds.most_common(1)[0][0]
    spoken = [r.language for r in results if not r.no_speech] or [r.language for r in results]
    return Counter(spoken).most_common(1)[0][0] if spoken else None


class Transcriber:
    """Model stage: holds one Whisper replica; packs the windows of many rows into batches and stitches them back."""

    def __init__(self, cfg: RunConfig):
        from whisper_batch.model.checkpoint import load_model

        from .model_store import fetcher

        self.cfg = cfg
        device, dtype = pick_device(cfg.model)
        t0 = time.perf_counter()
        self.model, self.tokenizer, ckpt = load_model(
            cfg.model.name, device=device, dtype=dtype, fetch=fetcher(cfg.storage.storage_options)
        )
        mode = quantize_mode(cfg.model, device)
        if mode != "none":
            from whisper_batch.model.quantize import quantize_int8

            # a bf16 model keeps its bf16 projection onto the vocabulary (packed below)
            projection = "int8" if dtype == torch.float32 else "float"
            self.model = quantize_int8(self.model, projection=projection, fused=cfg.model.compile,
                                       decoder=mode == "int8")
        if device == "cpu":
            self.model.pack_cpu_weights()
        elif cfg.model.quantize.startswith("int8"):  # int8 kernels are the CPU's: say what runs instead
            logger.warning("model.quantize=%s is for CPUs: on %s the model runs unquantised in %s", cfg.model.quantize,
                           device, str(dtype).replace("torch.", ""))
        layers = {"int8": ", int8 linear layers", "int8-encoder": ", the encoder's linear layers int8"}
        logger.info("model %s on %s in %s%s", ckpt.name, device, str(dtype).replace("torch.", ""), layers.get(mode, ""))
        self.model_name = ckpt.name
        self.load_s = time.perf_counter() - t0
        self.opts = transcribe_options(cfg.decode)
        # 0: as many windows as the device's free memory holds (cuda), else 16
        self.batch_size = cfg.model.batch_size or auto_batch_size(self.model, self.model.device)
        self.threads = torch.get_num_threads()  # as the actor set them; a new thread would start from its own
        self.pool = self._model_pool()

    def _decode(self, ids, mel, frames, langs, timed, prompts=None) -> list[WindowResult]:
        faults.before_model_call(ids, len(frames))
        return transcribe_windows(self.model, self.tokenizer, mel, frames, self.opts, langs, timed, prompts)

    @property
    def n_mels(self) -> int:
        return self.model.dims.n_mels

    def _model_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(
            1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(self.threads,)
        )

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
            for j, m in enumerate(mel_windows(row["mel"], frames, self.n_mels)):
                windows.append((i, j, m))
        t_model = time.perf_counter()
        failures = self._run(windows, rows, per_row)
        logger.info("%d rows, %d windows: model %.2f s (%d torch threads)", len(rows), len(windows),
                 time.perf_counter() - t_model, torch.get_num_threads())
        out = []
        for i, row in enumerate(rows):
            members = json.loads(row["members_json"]) if row.get("members_json") else None
            if members is None:
                starts = list(row.get("window_starts") or [])
                maps = json.loads(row["window_maps"]) if row.get("window_maps") else None
                out.append(self._finish(row, per_row[i], starts, failures.get(i), t0, maps))
                continue
            result = per_row[i][0] if per_row[i] else None
            shares = [None if result is None else member_share(result, members, m, self.opts.word_timestamps)
                      for m in members]  # a pack: each member takes the words that fall in its part of the window
            lost: dict[int, str] = {}
            if result is not None and not pack_ok(result, shares):
                shares, lost = self._unpack(row, members)
            for k, (m, share) in enumerate(zip(members, shares)):
                out.append(self._finish(m, [share] if share else [], [0.0], failures.get(i) or lost.get(k), t0))
        return out

    def _unpack(
        self, item: dict[str, Any], members: list[dict[str, Any]]
    ) -> tuple[list[WindowResult | None], dict[int, str]]:
        """Decode a pack's members one window each — when the pack's own decode cannot be trusted.

        Returns each member's result and the failures by member."""
        logger.info("a pack of %d rows decoded badly; decoding them one by one", len(members))
        [mel] = mel_windows(item["mel"], item["mel_frames"], self.n_mels)
        windows = []
        for k, m in enumerate(members):
            begin = round(m["window_start"] * FRAMES_PER_SECOND)
            end = begin + max(1, round(m["audio_seconds"] * FRAMES_PER_SECOND))
            windows.append((k, 0, mel[:, begin:end]))
        per_member: list[list[WindowResult | None]] = [[None] for _ in members]
        failures = self._run(windows, members, per_member)
        return [None if k in failures else per_member[k][0] for k in range(len(members))], failures

    def _finish(self, row, results, starts, failure, t0, maps=None) -> dict[str, Any]:
        res = {k: v for k, v in row.items() if k not in (*FEATURE_KEYS, "window_start")}
        res.update(text=None, segments=None, language=None, window_temperatures=[], model=self.model_name)
        res["duration"] = row.get("audio_seconds")
        if not row.get("error") and failure:
            res["error"] = failure
        elif not row.get("error"):
            res.update(stitch(results, starts, maps))
        res["model_s"] = time.perf_counter() - t0
        return res

    def _run(self, windows, rows, per_row) -> dict[int, str]:
        """Decode the windows in batches; a batch that raises marks its rows failed instead of failing the job.

        A batch that runs out of memory is split in half and tried again, and the smaller batch size is kept for
        the rest of the actor's life; only a single window that does not fit becomes an error row.
        """
        failures: dict[int, str] = {}
        if not self.opts.condition_on_previous_text:
            # longest windows first: windows of similar length finish together, so fewer rows idle in a batch
            windows.sort(key=lambda w: -w[2].shape[1])
            self._run_batches(windows, rows, per_row, failures)
            return failures
        # each row's windows in order, each prompted with the row's text so far: the k-th windows of all rows share
        # batches, round after round
        first = prompt_tokens(self.tokenizer, self.opts.decoding.prompt)
        history = {i: first for i in {w[0] for w in windows}}
        for k in range(1 + max((w[1] for w in windows), default=-1)):
            todo = [w for w in windows if w[1] == k and w[0] not in failures]
            self._run_batches(todo, rows, per_row, failures, history)
            for i, j, _ in todo:
                if per_row[i][j] is not None:
                    history[i] = prompt_after(history[i], per_row[i][j])
        return failures

    def _run_batches(self, windows, rows, per_row, failures, history=None) -> None:
        """``windows`` in batches of ``batch_size``, each window prompted with ``history[row]`` when given."""
        b = 0
        while b < len(windows):
            chunk = windows[b : b + self.batch_size]
            prompts = [history[i] for i, _, _ in chunk] if history is not None else None
            try:
                results = self._call_model(chunk, rows, prompts)
            except FutureTimeout:
                timeout = self.cfg.model.timeout_seconds
                logger.error("a batch of %d windows took more than %g s; its rows become errors", len(chunk), timeout)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._model_pool()
                for i, _, _ in chunk:
                    failures[i] = f"timeout: the model took more than {timeout:g} s on a batch of {len(chunk)} windows"
            except Exception as e:
                if is_out_of_memory(e) and len(chunk) > 1:
                    self.batch_size = max(1, len(chunk) // 2)
                    logger.warning("out of memory on a batch of %d windows: batch size now %d", len(chunk),
                                self.batch_size)
                    free_cached_memory(self.model.device)
                    continue  # the same windows again, fewer at a time
                logger.exception("model failed on a batch of %d windows", len(chunk))
                for i, _, _ in chunk:
                    failures[i] = f"model failed: {type(e).__name__}: {e}"
            else:
                for (i, j, _), r in zip(chunk, results):
                    per_row[i][j] = r
            b += len(chunk)

    def _call_model(self, chunk, rows, prompts=None) -> list[WindowResult]:
        """One batch through the model on the model thread, bounded by ``model.timeout_seconds``."""
        mel = torch.zeros(len(chunk), self.n_mels, N_FRAMES)
        for k, (_, _, m) in enumerate(chunk):
            mel[k, :, : m.shape[1]] = torch.from_numpy(np.array(m[:, :N_FRAMES], dtype=np.float32))
        langs = [rows[i].get("language") for i, _, _ in chunk]
        frames = [m.shape[1] for _, _, m in chunk]
        ids = [str(rows[i].get("id")) for i, _, _ in chunk]
        # a pack's words are timed whatever the options: they say which member each word belongs to
        timed = [self.opts.word_timestamps or bool(rows[i].get("members_json")) for i, _, _ in chunk]
        future = self.pool.submit(self._decode, ids, mel, frames, langs, timed, prompts)
        return future.result(timeout=self.cfg.model.timeout_seconds)


# what the quick path gives of each file (the CLI's --json lines, whisper_batch.transcribe's dicts)
RESULT_KEYS = ("audio_filepath", "text", "segments", "language", "duration", "error", "model")


def transcribe_files(
    transcriber: Transcriber, featurizer: Featurizer, paths: Iterable[str]
) -> list[dict[str, Any]]:
    """The quick path: local files or URIs, one process, no Ray."""
    rows = [{"uri": p, "audio_filepath": p, "offset": 0.0, "duration": None, "language": None} for p in paths]
    for i, row in enumerate(rows):
        row["row_index"] = i
    out = transcriber.transcribe_rows(featurizer.featurize_rows(rows))
    return sorted(out, key=lambda r: r["row_index"])
