"""The two compute stages of the graph, as plain callables (Ray Data runs them in actor pools; the quick
``whisper-batch transcribe`` path and the tests call them directly):

- :class:`Featurizer` (CPU): bytes → 16 kHz audio → windows of ≤ 30 s cut at quiet points → log-mel per window;
- :class:`Transcriber` (one model replica): windows of many files packed into batches → text → stitched per file.

A row's windows travel as one float32 buffer holding each window's real frames only (no 30 s padding), so a short
utterance costs its length, not a full window, between the stages.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections import Counter
from dataclasses import dataclass, replace
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
OOM_FAILPOINT = "WHISPER_BATCH_FAILPOINT_OOM_ABOVE"


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
        # zero padding to a full window keeps the reference's STFT edges; only the real frames are kept
        mel = log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :n].numpy()
        blob += np.ascontiguousarray(mel, dtype=MEL_DTYPE).data
        starts.append(begin / SAMPLE_RATE)
        frames.append(n)
        samples = begin + len(audio)
    return Windows(starts, frames, blob, samples / SAMPLE_RATE)


def featurize(audio: np.ndarray, n_mels: int, cfg: AudioConfig) -> Windows:
    """Audio (T,) at 16 kHz → windows at quiet points → log-mel of each."""
    cuts = plan_windows(audio, cfg.max_window_seconds, cfg.max_window_seconds - cfg.cut_search_seconds)
    return featurize_windows(((b, audio[b:e]) for b, e in cuts), n_mels)


def load_features(row: dict[str, Any], n_mels: int, cfg: RunConfig) -> Windows | np.ndarray:
    """Stream one manifest row's audio from storage into windows and features; raises AudioError with the cause.

    Decoding is chunked, so at most one chunk plus one window of audio is held however long the file is. A row
    short enough to share a window with others (``audio.pack_max_seconds``) comes back as its raw audio instead,
    for :func:`plan_packs`.
    """
    a = cfg.audio
    duration = row.get("duration")
    duration = None if duration is None or duration != duration else float(duration)
    with open_stream(row["uri"], cfg.storage.storage_options) as f:
        chunks = iter_audio_chunks(
            f, a.streaming_chunk_seconds, offset=float(row.get("offset") or 0.0), duration=duration, name=row["uri"]
        )
        windows = iter_windows(chunks, a.max_window_seconds, a.max_window_seconds - a.cut_search_seconds)
        head = list(itertools.islice(windows, 2))
        if len(head) == 1 and len(head[0][1]) <= a.pack_max_seconds * SAMPLE_RATE:
            return head[0][1]
        return featurize_windows(itertools.chain(head, windows), n_mels)


def plan_packs(durations: list[float], capacity: float, gap: float) -> list[list[int]]:
    """First-fit decreasing: group short items into windows of ``capacity`` seconds, ``gap`` seconds apart."""
    packs: list[list[int]] = []
    room: list[float] = []
    for i in sorted(range(len(durations)), key=lambda i: -durations[i]):
        for p, free in enumerate(room):
            if durations[i] + gap <= free:
                packs[p].append(i)
                room[p] = free - durations[i] - gap
                break
        else:
            packs.append([i])
            room.append(capacity - durations[i])
    return [sorted(p) for p in packs]


def pack_audio(audios: list[np.ndarray], gap: float) -> tuple[np.ndarray, list[float]]:
    """Concatenate utterances with ``gap`` seconds of silence between them; return the audio and each start (s)."""
    silence = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    parts, starts, pos = [], [], 0
    for k, audio in enumerate(audios):
        if k:
            parts.append(silence)
            pos += len(silence)
        starts.append(pos / SAMPLE_RATE)
        parts.append(audio.astype(np.float32, copy=False))
        pos += len(audio)
    return np.concatenate(parts), starts


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

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return to_batch(self.featurize_rows(to_rows(batch)))

    def featurize_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items, short = [], []
        for row in rows:
            out, audio = self.featurize_row(row)
            if audio is None:
                items.append(out)
            else:
                short.append((out, audio))
        a = self.cfg.audio
        by_shard: dict[Any, list] = {}
        for out, audio in short:  # packs stay inside a shard, so a shard's text never depends on other shards
            by_shard.setdefault(out.get("shard_id"), []).append((out, audio))
        for group in by_shard.values():
            durations = [len(au) / SAMPLE_RATE for _, au in group]
            for pack in plan_packs(durations, a.max_window_seconds, a.pack_gap_seconds):
                items.append(self.pack_item([group[i] for i in pack]))
        return items

    def pack_item(self, members: list[tuple[dict[str, Any], np.ndarray]]) -> dict[str, Any]:
        gap = self.cfg.audio.pack_gap_seconds
        audio, starts = pack_audio([au for _, au in members], gap)
        w = featurize_windows([(0, audio)], self.n_mels)
        item = dict(members[0][0], mel=w.mel, mel_frames=w.frames, window_starts=[0.0])
        if len(members) > 1:
            item["members_json"] = json.dumps(
                [dict(_record(m), window_start=start) for (m, _), start in zip(members, starts)]
            )
        return item

    def featurize_row(self, row: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
        """One row → (item without features yet if short, its audio) or (item with features, None)."""
        out = dict(row, mel=b"", mel_frames=[], window_starts=[], audio_seconds=0.0, error=None, decode_s=0.0)
        out["members_json"] = None
        t0 = time.perf_counter()
        timeout = self.cfg.audio.decode_timeout_seconds
        future = self.pool.submit(load_features, row, self.n_mels, self.cfg)
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
            log.exception("decoding %s failed", row.get("uri"))
            out["error"] = f"decode failed: {type(e).__name__}: {e}"
        else:
            if isinstance(w, np.ndarray):
                audio = w
                out["audio_seconds"] = len(w) / SAMPLE_RATE
            else:
                out.update(mel=w.mel, mel_frames=w.frames, window_starts=w.starts, audio_seconds=w.duration)
        out["decode_s"] = time.perf_counter() - t0
        return out, audio


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
        failed_no_speech_threshold=d.failed_no_speech_threshold,
        quiet_log_mel=d.quiet_log_mel,
        stop_loops=d.stop_loops,
        padding_seconds=d.padding_seconds,
        best_of=d.best_of,
        word_timestamps=d.word_timestamps,
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(m: ModelConfig) -> tuple[str, torch.dtype]:
    """``auto``: fp16 on a GPU; on a CPU bf16 where it is native (half the memory traffic of fp32 per decoding step,
    the same WER on the eval set), else fp32 — and fp32 for int8 quantisation, which starts from fp32 weights."""
    device = m.device if m.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if m.dtype != "auto":
        return device, getattr(torch, m.dtype)
    if device.startswith("cuda"):
        return device, torch.float16
    return device, torch.bfloat16 if m.quantize == "none" and cpu_has_bf16() else torch.float32


def stitch(results: list[WindowResult], starts: list[float]) -> dict[str, Any]:
    """One file's window results → its text, segments with absolute times, and language."""

    def words(s, start: float) -> list[dict[str, Any]] | None:  # None when word timestamps were not requested
        if s.words is None:
            return None
        return [
            {"word": w.word, "start": round(start + w.start, 3), "end": round(start + w.end, 3),
             "probability": w.probability}
            for w in s.words
        ]

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
                    "words": words(s, start),
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
            from model.quantize import quantize_int8

            self.model = quantize_int8(self.model)
        elif device == "cpu":
            self.model.pack_cpu_weights()
        self.model_name = ckpt.name
        self.load_s = time.perf_counter() - t0
        self.opts = transcribe_options(cfg.decode)
        # 0: as many windows as the device's free memory holds (cuda), else 16
        self.batch_size = cfg.model.batch_size or auto_batch_size(self.model, self.model.device)
        self.threads = torch.get_num_threads()  # as the actor set them; a new thread would start from its own
        self.pool = self._model_pool()

    @property
    def n_mels(self) -> int:
        return self.model.dims.n_mels

    def _model_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(
            1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(self.threads,)
        )

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
            for j, m in enumerate(mel_windows(row["mel"], frames, self.n_mels)):
                windows.append((i, j, m))
        t_model = time.perf_counter()
        failures = self._run(windows, rows, per_row)
        log.info("%d rows, %d windows: model %.2f s (%d torch threads)", len(rows), len(windows),
                 time.perf_counter() - t_model, torch.get_num_threads())
        out = []
        for i, row in enumerate(rows):
            members = json.loads(row["members_json"]) if row.get("members_json") else None
            if members is None:
                out.append(self._finish(row, per_row[i], list(row.get("window_starts") or []), failures.get(i), t0))
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
        log.info("a pack of %d rows decoded badly; decoding them one by one", len(members))
        [mel] = mel_windows(item["mel"], item["mel_frames"], self.n_mels)
        windows = []
        for k, m in enumerate(members):
            begin = round(m["window_start"] * FRAMES_PER_SECOND)
            end = begin + max(1, round(m["audio_seconds"] * FRAMES_PER_SECOND))
            windows.append((k, 0, mel[:, begin:end]))
        per_member: list[list[WindowResult | None]] = [[None] for _ in members]
        failures = self._run(windows, members, per_member)
        return [None if k in failures else per_member[k][0] for k in range(len(members))], failures

    def _finish(self, row, results, starts, failure, t0) -> dict[str, Any]:
        res = {k: v for k, v in row.items() if k not in ("mel", "mel_frames", "members_json", "window_start")}
        res.update(text=None, segments=None, language=None, window_temperatures=[], model=self.model_name)
        res["duration"] = row.get("audio_seconds")
        if not row.get("error") and failure:
            res["error"] = failure
        elif not row.get("error"):
            res.update(stitch(results, starts))
        res["model_s"] = time.perf_counter() - t0
        return res

    def _run(self, windows, rows, per_row) -> dict[int, str]:
        """Decode the windows in batches; a batch that raises marks its rows failed instead of failing the job.

        A batch that runs out of memory is split in half and tried again, and the smaller batch size is kept for
        the rest of the actor's life; only a single window that does not fit becomes an error row.
        """
        failures: dict[int, str] = {}
        # longest windows first: windows of similar length finish together, so fewer rows idle in a batch
        windows.sort(key=lambda w: -w[2].shape[1])
        b = 0
        while b < len(windows):
            chunk = windows[b : b + self.batch_size]
            try:
                results = self._call_model(chunk, rows)
            except FutureTimeout:
                timeout = self.cfg.model.timeout_seconds
                log.error("a batch of %d windows took more than %g s; its rows become errors", len(chunk), timeout)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._model_pool()
                for i, _, _ in chunk:
                    failures[i] = f"timeout: the model took more than {timeout:g} s on a batch of {len(chunk)} windows"
            except Exception as e:
                if is_out_of_memory(e) and len(chunk) > 1:
                    self.batch_size = max(1, len(chunk) // 2)
                    log.warning("out of memory on a batch of %d windows: batch size now %d", len(chunk),
                                self.batch_size)
                    free_cached_memory(self.model.device)
                    continue  # the same windows again, fewer at a time
                log.exception("model failed on a batch of %d windows", len(chunk))
                for i, _, _ in chunk:
                    failures[i] = f"model failed: {type(e).__name__}: {e}"
            else:
                for (i, j, _), r in zip(chunk, results):
                    per_row[i][j] = r
            b += len(chunk)
        return failures

    def _call_model(self, chunk, rows) -> list[WindowResult]:
        """One batch through the model on the model thread, bounded by ``model.timeout_seconds``."""
        mel = torch.zeros(len(chunk), self.n_mels, N_FRAMES)
        for k, (_, _, m) in enumerate(chunk):
            mel[k, :, : m.shape[1]] = torch.from_numpy(np.array(m[:, :N_FRAMES], dtype=np.float32))
        langs = [rows[i].get("language") for i, _, _ in chunk]
        frames = [m.shape[1] for _, _, m in chunk]
        ids = [str(rows[i].get("id")) for i, _, _ in chunk]
        hang = os.environ.get(HANG_FAILPOINT)  # fault injection for the reliability tests: a model call that hangs
        oom = os.environ.get(OOM_FAILPOINT)  # ... and batches larger than this many windows run out of memory
        if hang and any(hang in row_id for row_id in ids):
            future = self.pool.submit(time.sleep, 10**9)
        elif oom and len(chunk) > int(oom):
            raise MemoryError(f"out of memory (failpoint {OOM_FAILPOINT}={oom}: batch of {len(chunk)} windows)")
        else:
            # a pack's words are timed whatever the options: they say which member each word belongs to
            timed = [self.opts.word_timestamps or bool(rows[i].get("members_json")) for i, _, _ in chunk]
            future = self.pool.submit(
                transcribe_windows, self.model, self.tokenizer, mel, frames, self.opts, langs, timed
            )
        return future.result(timeout=self.cfg.model.timeout_seconds)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's out-of-memory RuntimeError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_batch_size(model, device: torch.device, limit: int = 256) -> int:
    """Windows per batch that fit in the free memory of ``device`` (CUDA), else 16.

    Per window: the encoder's activations (about 8 tensors of n_audio_ctx x n_audio_state live at its peak, plus the
    MLP's 4x-wide one), the cross-attention K/V of every decoder layer, a full-length self-attention cache for five
    rows (beams or best-of samples), and the logits of five rows; half of the free memory is used, for the rest.
    """
    if device.type != "cuda":
        return 16
    d = model.dims
    size = torch.tensor([], dtype=model.dtype).element_size()
    encoder = d.n_audio_ctx * d.n_audio_state * 12
    cross = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state
    self_kv = 5 * 2 * d.n_text_layer * d.n_text_ctx * d.n_text_state
    logits = 5 * d.n_vocab * 4 // size
    per_window = (encoder + cross + self_kv + logits) * size
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(limit, int(free * 0.5 // per_window)))


def _record(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("mel", "mel_frames", "window_starts", "members_json")}


def pack_ok(result: WindowResult, shares: list[WindowResult | None]) -> bool:
    """Whether a pack's decode can be split among its members as it is.

    Whisper sometimes skips the first utterances of a pack, or re-reads one (the repeat gets words of no duration,
    squeezed where alignment found no audio for them). Then the members are decoded alone instead.
    """
    if result.temperature > 0:  # needed a sampled fallback: not trusted across several utterances
        return False
    if any(share is None or not share.segments for share in shares):
        return False
    return not any(seg.words and all(w.end - w.start <= 0 for w in seg.words) for seg in result.segments)


def member_share(
    result: WindowResult, members: list[dict[str, Any]], member: dict[str, Any], keep_words: bool = True
) -> WindowResult:
    """The part of a packed window's result that belongs to ``member``, with times made relative to its start.

    Words go to the member whose span (widened to the middle of the silence between members) holds their middle,
    so a segment that runs across the silence between two members is split between them. Segments without timed
    words (none spoken) go whole by their middle.
    """
    spans = [(m["window_start"], m["window_start"] + m["audio_seconds"]) for m in members]
    k = members.index(member)
    lo = (spans[k - 1][1] + spans[k][0]) / 2 if k else float("-inf")
    hi = (spans[k][1] + spans[k + 1][0]) / 2 if k + 1 < len(spans) else float("inf")
    start, length = spans[k][0], member["audio_seconds"]

    def shift(t: float) -> float:  # window time -> member time, inside the member's audio
        return min(max(t - start, 0.0), length)

    def inside(a: float, b: float) -> bool:
        return lo <= (a + b) / 2 < hi

    mine = []
    for seg in result.segments:
        if not seg.words:
            if inside(seg.start, seg.end):
                mine.append(replace(seg, start=shift(seg.start), end=shift(seg.end), words=seg.words))
            continue
        words = [w for w in seg.words if inside(w.start, w.end)]
        if not words:
            continue
        whole = len(words) == len(seg.words)
        part = replace(
            seg,
            start=shift(seg.start if words[0] is seg.words[0] else words[0].start),
            end=shift(seg.end if words[-1] is seg.words[-1] else words[-1].end),
            text=seg.text if whole else "".join(w.word for w in words),
            tokens=seg.tokens if whole else [t for w in words for t in w.tokens],
            words=[replace(w, start=shift(w.start), end=shift(w.end)) for w in words] if keep_words else None,
        )
        mine.append(part)
    return replace(
        result,
        segments=mine,
        text="".join(s.text for s in mine).strip(),
        tokens=[t for s in mine for t in s.tokens],
        no_speech=result.no_speech or not mine,
    )


def transcribe_files(
    transcriber: Transcriber, featurizer: Featurizer, paths: Iterable[str]
) -> list[dict[str, Any]]:
    """The quick path: local files or URIs, one process, no Ray."""
    rows = [{"uri": p, "audio_filepath": p, "offset": 0.0, "duration": None, "language": None} for p in paths]
    for i, row in enumerate(rows):
        row["row_index"] = i
    out = transcriber.transcribe_rows(featurizer.featurize_rows(rows))
    return sorted(out, key=lambda r: r["row_index"])
