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

from .audio import N_FRAMES, FRAMES_PER_SECOND
from .decoding import DecodingOptions, DecodingResult, decode
from .tokenizer import Tokenizer
from .whisper import Whisper


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
    # candidates sampled per window at temperatures above 0
    best_of: int | None = 5


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
    if opts.no_speech_threshold is None or r.no_speech_prob <= opts.no_speech_threshold:
        return False
    return opts.logprob_threshold is None or r.avg_logprob <= opts.logprob_threshold


def needs_fallback(r: DecodingResult, opts: TranscribeOptions) -> bool:
    failed = (opts.compression_ratio_threshold is not None and r.compression_ratio > opts.compression_ratio_threshold) or (
        opts.logprob_threshold is not None and r.avg_logprob < opts.logprob_threshold
    )
    # a silent window with a low logprob is silence, not a failure worth re-decoding
    silent = opts.no_speech_threshold is not None and r.no_speech_prob > opts.no_speech_threshold
    return failed and not (silent and opts.logprob_threshold is not None and r.avg_logprob < opts.logprob_threshold)


def options_at(opts: TranscribeOptions, temperature: float) -> DecodingOptions:
    d = opts.decoding
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


def split_segments(r: DecodingResult, tokenizer: Tokenizer, seconds: float) -> list[Segment]:
    """Cut a window's tokens at timestamp pairs. ``seconds``: how much real audio the window holds."""
    tokens, tb = r.tokens, tokenizer.timestamp_begin
    precision = 0.02  # seconds per timestamp token

    def segment(start: float, end: float, toks: list[int]) -> Segment:
        text = tokenizer.decode([t for t in toks if t < tokenizer.eot])
        return Segment(start, end, text, toks, r.avg_logprob, r.compression_ratio, r.no_speech_prob, r.temperature)

    is_ts = [t >= tb for t in tokens]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segments, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        segments.append(segment((piece[0] - tb) * precision, (piece[-1] - tb) * precision, piece))
        last = cut
    rest = tokens[last:]
    if any(t < tokenizer.eot for t in rest):  # text not closed by a timestamp pair
        start = (rest[0] - tb) * precision if rest[0] >= tb else (segments[-1].end if segments else 0.0)
        end = (rest[-1] - tb) * precision if is_ts[-1] and rest[-1] - tb > 0 else seconds
        segments.append(segment(start, max(end, start), rest))
    return [s for s in segments if s.text.strip()]


@torch.no_grad()
def transcribe_windows(
    model: Whisper,
    tokenizer: Tokenizer,
    mel: Tensor,
    content_frames: Sequence[int] | None = None,
    opts: TranscribeOptions = TranscribeOptions(),
    languages: Sequence[str | None] | None = None,
) -> list[WindowResult]:
    """Transcribe a batch of windows, possibly from many files.

    Args:
        mel: log-mel windows (n, n_mels, 3000), padded with zeros past the audio.
        content_frames: mel frames of real audio per window (default: all 3000).
        languages: per-window language codes, None to detect (multilingual models).
    """
    if mel.ndim != 3 or mel.shape[1] != model.dims.n_mels:
        raise ValueError(f"mel of shape {tuple(mel.shape)}: expected (windows, {model.dims.n_mels}, {N_FRAMES})")
    frames = list(content_frames) if content_frames is not None else [N_FRAMES] * mel.shape[0]
    audio_features = model.embed_audio(mel.to(model.device, model.dtype))
    decoded = decode_with_fallback(model, tokenizer, audio_features, opts, languages)
    out = []
    for r, n_frames in zip(decoded, frames):
        silent = is_silence(r, opts)
        segments = [] if silent else split_segments(r, tokenizer, n_frames / FRAMES_PER_SECOND)
        out.append(
            WindowResult(
                text="".join(s.text for s in segments).strip(),
                segments=segments,
                language=r.language,
                tokens=[] if silent else r.tokens,
                avg_logprob=r.avg_logprob,
                compression_ratio=r.compression_ratio,
                no_speech_prob=r.no_speech_prob,
                temperature=r.temperature,
                no_speech=silent,
                language_probs=r.language_probs,
            )
        )
    return out
