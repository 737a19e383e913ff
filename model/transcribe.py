"""Windows in, transcripts out: temperature fallback on the rows that fail, the no-speech rule, and segments.

Each 30 s window is decoded independently (as in faster-whisper's batched mode), so windows of many files share one
batch. A window's tokens are split into segments at timestamp pairs; text after the last timestamp pair becomes a last
segment that ends where the window's audio ends, so no words are dropped between windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import Tensor

from .constants import FRAMES_PER_SECOND, N_FRAMES, TIME_PRECISION

from .decoding import DecodingOptions, DecodingResult, decode
from .timing import Word, add_word_timestamps, find_alignments, speech_end, tidy_words
from .tokenizer import Tokenizer
from .whisper import Whisper

# a rest of audio shorter than this after a decode that stopped early is not decoded again: too short to hold a
# word, it is where the model hallucinates (it re-reads text from the pass before)
MIN_CONTINUATION_FRAMES = 50
FRAMES_PER_TIMESTAMP = 2  # mel frames per timestamp step (the encoder halves the frame rate)


@dataclass(frozen=True)
class TranscribeOptions:
    # options of every decoding pass; temperature is taken from `temperatures`
    decoding: DecodingOptions = DecodingOptions()
    # tried in order on the windows that fail the thresholds below
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # above this gzip compression ratio the text is too repetitive: decode again hotter
    compression_ratio_threshold: float | None = 2.4
    # below this average logprob the decode failed: decode again hotter
    logprob_threshold: float | None = -1.0
    # above this no-speech probability (and with a failed logprob) the window is silence: empty text, no fallback
    no_speech_threshold: float | None = 0.6
    # a window that failed at every temperature is no speech when its no-speech probability is above this (a tone,
    # a hum: the model half thinks it is silence, and what it samples at the hottest temperature is invented)
    failed_no_speech_threshold: float | None = 0.5
    # a window whose loudest log10 mel power is below this is no speech, without running the model (digital silence
    # is -10, a -100 dBFS hiss -8.4, speech at -60 dBFS -4.8): Whisper hears "you" in plain silence
    quiet_log_mel: float | None = -6.0
    # candidates sampled per window at temperatures above 0
    best_of: int | None = 5
    # stop sampling a row as soon as its text is too repetitive to pass compression_ratio_threshold (a loop) rather
    # than at sample_len: it falls back to the next temperature as it would have, hundreds of steps sooner
    stop_loops: bool = True
    # time each word from the alignment heads' cross-attention (one extra batched decoder pass per decoding pass)
    word_timestamps: bool = False
    # None: every window is padded to 30 s, as the model was trained. A number: the encoder sees a batch's longest
    # window plus at least this many seconds of padding (whole seconds, at most 30 s), so that a short window costs
    # a shorter encoder pass and fewer cross-attention positions per decoded token
    padding_seconds: float | None = None


@dataclass
class Segment:
    start: float  # seconds from the window's start
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    words: list[Word] | None = None  # with word_timestamps; times on the same clock as start/end


@dataclass
class WindowResult:
    text: str
    segments: list[Segment]
    language: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    no_speech: bool = False  # skipped by the no-speech rule
    language_probs: dict[str, float] | None = field(default=None, repr=False)


def is_silence(r: DecodingResult, opts: TranscribeOptions) -> bool:
    if (
        opts.failed_no_speech_threshold is not None
        and r.no_speech_prob > opts.failed_no_speech_threshold
        and r.temperature == opts.temperatures[-1]
        and needs_fallback(r, opts)
    ):
        return True
    if opts.no_speech_threshold is None or r.no_speech_prob <= opts.no_speech_threshold:
        return False
    return opts.logprob_threshold is None or r.avg_logprob <= opts.logprob_threshold


def is_quiet(mel: Tensor, opts: TranscribeOptions) -> bool:
    """Whether a window's log-mel (n_mels, frames of audio) is too quiet to hold speech."""
    if opts.quiet_log_mel is None:
        return False
    # no frames at all is quiet; else undo log_mel_spectrogram's (x + 4) / 4 on the loudest value
    return mel.shape[-1] == 0 or float(mel.max()) * 4.0 - 4.0 < opts.quiet_log_mel


def needs_fallback(r: DecodingResult, opts: TranscribeOptions) -> bool:
    failed = (opts.compression_ratio_threshold is not None and r.compression_ratio > opts.compression_ratio_threshold) or (
        opts.logprob_threshold is not None and r.avg_logprob < opts.logprob_threshold
    )
    # a silent window with a low logprob is silence, not a failure worth re-decoding
    silent = opts.no_speech_threshold is not None and r.no_speech_prob > opts.no_speech_threshold
    return failed and not (silent and opts.logprob_threshold is not None and r.avg_logprob < opts.logprob_threshold)


def options_at(opts: TranscribeOptions, temperature: float) -> DecodingOptions:
    d = opts.decoding
    if opts.stop_loops and opts.compression_ratio_threshold is not None:
        d = replace(d, stop_compression_ratio=opts.compression_ratio_threshold)
    if temperature > 0:  # sampling: best-of candidates instead of beams
        return replace(d, temperature=temperature, beam_size=None, patience=None, best_of=opts.best_of)
    return replace(d, temperature=0.0, best_of=None)


def decode_with_fallback(
    model: Whisper,
    tokenizer: Tokenizer,
    audio_features: Tensor,
    opts: TranscribeOptions,
    languages: Sequence[str | None] | None = None,
) -> list[DecodingResult]:
    """Decode every window at the first temperature, then re-decode only the failing ones at the next."""
    n = audio_features.shape[0]
    results: list[DecodingResult | None] = [None] * n
    langs = list(languages) if languages is not None else [None] * n
    todo = list(range(n))
    for temperature in opts.temperatures:
        out = decode(model, tokenizer, audio_features[todo], options_at(opts, temperature), [langs[i] for i in todo])
        redo = []
        for i, r in zip(todo, out):
            if results[i] is not None and r.language_probs is None:
                r.language_probs = results[i].language_probs
            results[i] = r
            langs[i] = r.language  # detected once, reused by the hotter passes
            if needs_fallback(r, opts):
                redo.append(i)
        todo = redo
        if not todo:
            break
    return results


def split_segments(r: DecodingResult, tokenizer: Tokenizer, frames: int) -> tuple[list[Segment], int]:
    """Cut a window's tokens at timestamp pairs, as the reference's ``transcribe`` does.

    Args:
        frames: mel frames of real audio in the window.

    Returns:
        The segments (seconds from the window's start) and the frames they consumed. When the tokens end with a
        closed timestamp pair the text after it is not trusted (the reference re-decodes from the last timestamp),
        so fewer frames than ``frames`` are consumed and the caller decodes the rest as a new window.
    """
    tokens, tb = r.tokens, tokenizer.timestamp_begin

    def segment(start: float, end: float, toks: list[int]) -> Segment:
        text = tokenizer.decode([t for t in toks if t < tokenizer.eot])
        return Segment(start, end, text, toks, r.avg_logprob, r.compression_ratio, r.no_speech_prob, r.temperature)

    is_ts = [t >= tb for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-1] and not is_ts[-2]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:  # one segment: to the last timestamp if any, else to the end of the audio
        ts = [t for t in tokens if t >= tb]
        end = (ts[-1] - tb) * TIME_PRECISION if ts and ts[-1] > tb else frames / FRAMES_PER_SECOND
        seg = segment(0.0, end, tokens)
        return ([seg] if seg.text.strip() else []), frames
    if single_ending:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        segments.append(segment((piece[0] - tb) * TIME_PRECISION, (piece[-1] - tb) * TIME_PRECISION, piece))
        last = cut
    limit = frames / FRAMES_PER_SECOND  # a timestamp past the window's audio is clipped to its end
    for seg in segments:
        seg.start, seg.end = min(seg.start, limit), min(seg.end, limit)
    segments = [s for s in segments if s.text.strip()]
    if single_ending:
        return segments, frames
    consumed = (tokens[last - 1] - tb) * FRAMES_PER_TIMESTAMP
    return segments, consumed if 0 < consumed < frames else frames


@torch.no_grad()
def transcribe_windows(
    model: Whisper,
    tokenizer: Tokenizer,
    mel: Tensor,
    content_frames: Sequence[int] | None = None,
    opts: TranscribeOptions = TranscribeOptions(),
    languages: Sequence[str | None] | None = None,
    timed: Sequence[bool] | None = None,
) -> list[WindowResult]:
    """Transcribe a batch of windows, possibly from many files.

    A window whose decode stops at a timestamp well before its audio ends is continued from there (as the
    reference's ``transcribe`` seeks), in further batched passes over just those windows.

    Args:
        mel: log-mel windows (n, n_mels, 3000), padded with zeros past the audio.
        content_frames: mel frames of real audio per window (default: all 3000).
        languages: per-window language codes, None to detect (multilingual models).
        timed: per window, whether to time its words (default: ``opts.word_timestamps`` for every window).
    """
    if mel.ndim != 3 or mel.shape[1] != model.dims.n_mels or mel.shape[2] != N_FRAMES:
        raise ValueError(f"mel of shape {tuple(mel.shape)}: expected (windows, {model.dims.n_mels}, {N_FRAMES})")
    n = mel.shape[0]
    frames = list(content_frames) if content_frames is not None else [N_FRAMES] * n
    langs = list(languages) if languages is not None else [None] * n
    timed = list(timed) if timed is not None else [opts.word_timestamps] * n
    out: list[WindowResult | None] = [None] * n
    todo = [(i, 0) for i in range(n)]  # (window, first frame still to decode)
    last_speech: dict[int, float] = {}  # window -> end of its last timed word (word_timestamps only)
    while todo:
        heard = []
        for i, seek in todo:
            if not is_quiet(mel[i, :, seek : frames[i]], opts):
                heard.append((i, seek))
            elif out[i] is None:  # nothing to hear: no speech, and no model time spent on it
                out[i] = WindowResult("", [], langs[i] or "en", [], 0.0, 0.0, 1.0, 0.0, no_speech=True)
        todo = []
        # windows whose encoder passes have the same length share a batch (all of them, unless padding_seconds)
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, seek in heard:
            groups.setdefault(encoder_frames(frames[i] - seek, opts), []).append((i, seek))
        for length, group in sorted(groups.items(), reverse=True):
            todo += decode_pass(model, tokenizer, mel, group, length, frames, langs, timed, out, last_speech, opts)
    for r, n, t in zip(out, frames, timed):  # the first-word rules of a continued pass may reach into the one before
        if t:
            tidy_words(r.segments, n / FRAMES_PER_SECOND)
    return out


def decode_pass(
    model: Whisper,
    tokenizer: Tokenizer,
    mel: Tensor,
    todo: list[tuple[int, int]],
    length: int,
    frames: list[int],
    langs: list[str | None],
    timed: list[bool],
    out: list[WindowResult | None],
    last_speech: dict[int, float],
    opts: TranscribeOptions,
) -> list[tuple[int, int]]:
    """One batched encoder pass and decode over ``todo`` (window, first frame), each encoded at ``length`` frames;
    folds the results into ``out`` and returns the windows to continue (window, new first frame)."""
    batch = torch.zeros(len(todo), mel.shape[1], length, dtype=mel.dtype)
    for k, (i, seek) in enumerate(todo):  # length >= the window's audio (encoder_frames)
        batch[k, :, : frames[i] - seek] = mel[i, :, seek : frames[i]]
    features = model.embed_audio(batch.to(model.device, model.dtype))
    decoded = decode_with_fallback(model, tokenizer, features, opts, [langs[i] for i, _ in todo])
    passes = []  # (segments, frames consumed, silent) per window of this pass
    for (i, seek), r in zip(todo, decoded):
        langs[i] = r.language
        silent = is_silence(r, opts)
        segments, consumed = ([], frames[i] - seek) if silent else split_segments(r, tokenizer, frames[i] - seek)
        for s in segments:
            s.start, s.end = s.start + seek / FRAMES_PER_SECOND, s.end + seek / FRAMES_PER_SECOND
        passes.append((segments, consumed, silent))
    sel = [k for k, (i, _) in enumerate(todo) if timed[i]]
    if sel:
        picked = ([xs[k] for k in sel] for xs in (todo, decoded, passes))
        words = time_words(model, tokenizer, features[sel], *picked, frames, last_speech, opts)
        for k, p in zip(sel, words):
            passes[k] = p
    later = []
    for (i, seek), r, (segments, consumed, silent) in zip(todo, decoded, passes):
        out[i] = merge(out[i], r, segments, silent)
        if frames[i] - seek - consumed >= MIN_CONTINUATION_FRAMES:
            later.append((i, seek + consumed))
    return later


PADDING_STEP_SECONDS = 5  # with padding_seconds, encoder passes are a multiple of this long


def encoder_frames(content: int, opts: TranscribeOptions) -> int:
    """Mel frames the encoder sees for a window that holds ``content`` frames of audio.

    The reference's 30 s, or with ``padding_seconds`` the audio plus at least that much padding, rounded up to a
    multiple of ``PADDING_STEP_SECONDS`` (at most 30 s). The length depends on the window alone, never on the
    windows it is batched with, so its text does not either; the step keeps the lengths few, so windows of like
    length still share a batch.
    """
    if opts.padding_seconds is None:
        return N_FRAMES
    step = PADDING_STEP_SECONDS * FRAMES_PER_SECOND
    return min(N_FRAMES, -(-(content + round(opts.padding_seconds * FRAMES_PER_SECOND)) // step) * step)


def time_words(
    model: Whisper,
    tokenizer: Tokenizer,
    features: Tensor,
    todo: list[tuple[int, int]],
    decoded: list[DecodingResult],
    passes: list[tuple[list[Segment], int, bool]],
    frames: list[int],
    last_speech: dict[int, float],
    opts: TranscribeOptions,
) -> list[tuple[list[Segment], int, bool]]:
    """Word timestamps for one decoding pass over many windows: one batched alignment pass, then per window the
    words go into its segments (in place).

    As in the reference, a pass that does not end on a lone timestamp resumes at its last word's end (the text
    after the last word is not trusted), so the frames consumed may change.

    Args:
        features: (len(todo), n_audio_ctx, n_audio_state) encoder output of the pass.
        todo: (window, first frame) of each row of ``features``.
        last_speech: per window, the end of its last word so far (seconds from the window's start); updated.
    """
    texts = [[t for s in segments for t in s.tokens if t < tokenizer.eot] for segments, _, _ in passes]
    sizes = [frames[i] - seek for i, seek in todo]
    langs = [r.language for r in decoded]
    alignments = find_alignments(model, tokenizer, features, texts, sizes, langs, opts.decoding.task)
    tb, out = tokenizer.timestamp_begin, []
    for (i, seek), r, alignment, (segments, consumed, silent) in zip(todo, decoded, alignments, passes):
        if segments:
            offset = seek / FRAMES_PER_SECOND
            add_word_timestamps(segments, alignment, tokenizer.eot, offset, last_speech.get(i, 0.0))
            tidy_words(segments, frames[i] / FRAMES_PER_SECOND)
            end = last_speech[i] = speech_end(segments)
            single_ending = len(r.tokens) >= 2 and r.tokens[-1] >= tb and r.tokens[-2] < tb
            resume = round(end * FRAMES_PER_SECOND) - seek
            if not single_ending and end > offset and resume > 0:
                consumed = min(resume, frames[i] - seek)
        out.append((segments, consumed, silent))
    return out


def merge(prev: WindowResult | None, r: DecodingResult, segments: list[Segment], silent: bool) -> WindowResult:
    """Fold one decoding pass of a window into its result (the first pass's scores describe the window)."""
    if prev is None:
        prev = WindowResult(
            text="",
            segments=[],
            language=r.language,
            tokens=[],
            avg_logprob=r.avg_logprob,
            compression_ratio=r.compression_ratio,
            no_speech_prob=r.no_speech_prob,
            temperature=r.temperature,
            no_speech=silent,
            language_probs=r.language_probs,
        )
    else:
        prev.no_speech = prev.no_speech and silent
        prev.temperature = max(prev.temperature, r.temperature)
    prev.segments.extend(segments)
    for s in segments:
        prev.tokens.extend(s.tokens)
    prev.text = "".join(s.text for s in prev.segments).strip()
    return prev
