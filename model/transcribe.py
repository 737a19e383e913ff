"""Windows in, transcripts out: temperature fallback on the rows that fail, the no-speech rule, and segments.

Each 30 s window is decoded independently (as in faster-whisper's batched mode), so windows of many files share one
batch. A window's tokens are split into segments at timestamp pairs, as the reference's ``transcribe`` does: tokens
that end on a lone timestamp close a last segment there; text after a final timestamp pair is not trusted; tokens
without any timestamp pair make one segment, up to the last timestamp or else to the end of the window's audio.

Where a pass ends at a timestamp (a pair, or a lone one) before its window's audio does, the rest is decoded again
from that timestamp in a further pass, so no words are dropped within a window. The reference skips the rest of its
window after a lone timestamp; here a window may end at a file's end or at a cut, and the model, having said that
speech ended, misses speech that starts a few seconds later (a sentence after music, the file's last words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .constants import FRAMES_PER_SECOND, N_FRAMES, TIME_PRECISION
from .decoding import DecodingOptions, DecodingResult, decode
from .kv_cache import every_run
from .results import Segment, WindowResult
from .timing import (
    add_word_timestamps,
    clip_sentence_boundaries,
    find_alignments,
    segment_words,
    speech_end,
    tidy_words,
)
from .tokenizer import REPLACEMENT_CHAR, Tokenizer
from .whisper import Whisper

# a rest of audio shorter than this after a decode that stopped early is not decoded again: too short to hold a
# word, it is where the model hallucinates (it re-reads text from the pass before)
MIN_CONTINUATION_FRAMES = 50
# a probe (TranscribeOptions.probe_logprob_threshold) is kept only at or below this no-speech probability: speech
# after seconds of silence scores up to 0.22, what the model hears in music or noise ("Thank you.") often 0.3-0.7
PROBE_NO_SPEECH = 0.3
FRAMES_PER_TIMESTAMP = 2  # mel frames per timestamp step (the encoder halves the frame rate)
QUIET_LEAD_FRAMES = 100  # a pass starting with more quiet frames than this starts LEAD_FRAMES before its first sound
LEAD_FRAMES = 50
# the skip check (TranscribeOptions.skip_seconds) aligns only passes holding a segment slower than this: speech runs
# at 12-18 characters a second, a segment whose timestamps ran ahead over skipped speech at 6-9
SLOW_CHARS_PER_SECOND = 10.0
SKIPPED_SOUND_FRAMES = 100  # sound (frames above quiet_log_mel) the stretch before such a segment's first word holds


@dataclass(frozen=True)
class TranscribeOptions:
    # options of every decoding pass, except three that each pass sets (options_at): the temperature, from
    # `temperatures`; above 0, best_of candidates instead of beams (beam_size and patience dropped); and with
    # stop_loops, stop_compression_ratio = compression_ratio_threshold
    decoding: DecodingOptions = DecodingOptions()
    # every window is decoded at the first; only the windows that fail the thresholds below, at the next, and so on
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # a decode whose text's gzip compression ratio is above this is too repetitive: decoded again hotter
    compression_ratio_threshold: float | None = 2.4
    # a decode whose average logprob is below this failed: decoded again hotter (unless the no-speech rule holds)
    logprob_threshold: float | None = -1.0
    # the no-speech rule: above this no-speech probability, a decode whose average logprob is below
    # logprob_threshold is silence: no text, and not decoded again (at exactly logprob_threshold, or at any logprob
    # when that is None, the window gets no text too, but only after its fallback has run)
    no_speech_threshold: float | None = 0.6
    # a window that still fails the thresholds at the last temperature is silence (no text) when its no-speech
    # probability is above this (a tone, a hum: the model half thinks it is silence, and what it samples at the
    # hottest temperature is invented)
    failed_no_speech_threshold: float | None = 0.5
    # a window (or the rest of one, to be continued) whose loudest log10 mel power is below this is no speech, and
    # the model does not run on it (digital silence is -10, a -100 dBFS hiss -8.4, speech at -60 dBFS -4.8):
    # Whisper hears "you" in plain silence
    quiet_log_mel: float | None = -6.0
    # candidates sampled per window at temperatures above 0; the best ranked is kept
    best_of: int | None = 5
    # stop a greedy or sampled row (not beam search) as soon as its text is too repetitive to pass
    # compression_ratio_threshold (a loop; checked every 8 tokens from the 32nd) rather than at sample_len: it falls
    # back to the next temperature as it would have, hundreds of steps sooner
    stop_loops: bool = True
    # time each word from the alignment heads' cross-attention: per decoding pass, one extra teacher-forced decoder
    # pass over the pass's timed windows (in chunks of rows when large); a pass that does not end on a lone
    # timestamp is then continued from its last word's end
    word_timestamps: bool = False
    # None: every window is padded to 30 s, as the model was trained. A number: each window's encoder pass is its
    # audio (from where the pass starts) plus at least this many seconds of padding, rounded up to a multiple of
    # padding_step_seconds and at most 30 s (encoder_frames); the length depends on the window alone, never on its
    # batch, and windows of the same length share an encoder pass (and windows of every length one decode, each
    # attending to its own positions). A short window costs a shorter encoder pass and fewer cross-attention
    # positions per decoded token
    padding_seconds: float | None = None
    # with padding_seconds, encoder passes are a multiple of this long (rounded to whole encoder positions, 0.02 s)
    padding_step_seconds: float = 5.0
    # a pass that ends at a lone timestamp before its window's audio does is followed by a probe of the rest: one
    # pass at the first temperature, kept only when this sure of itself (average logprob at least this, no-speech
    # probability at most PROBE_NO_SPEECH), else the rest is silence. None: the rest is skipped, as the reference does
    probe_logprob_threshold: float | None = -0.7
    # decode each file's windows in order, each prompted with the text of the windows before it (the reference's
    # condition_on_previous_text, reset after a window decoded hotter than PROMPT_RESET_TEMPERATURE): windows of many
    # files still share a batch, one window of each file at a time (see prompt_after). Used by the caller that knows
    # which window follows which (whisper_batch.pipeline.transcriber)
    condition_on_previous_text: bool = False
    # a segment (not a pass's first) whose first word, timed by the alignment heads, starts this many seconds or more
    # after the segment's own start timestamp, with a second of sound between them, follows speech the model skipped
    # (its timestamps ran ahead): the pass is cut before that segment and the rest decoded again from the end of the
    # word before it. Only passes with a segment slower than SLOW_CHARS_PER_SECOND are aligned. None: no check
    skip_seconds: float | None = 2.0


PROMPT_RESET_TEMPERATURE = 0.5


def prompt_after(history: list[int], r: WindowResult) -> list[int]:
    """A file's prompt for its next window: the tokens of its windows so far (text and timestamps, as the reference
    feeds them), none again after a window that needed a hot temperature (its text is not to be trusted)."""
    return [] if r.temperature > PROMPT_RESET_TEMPERATURE else history + r.tokens


def doubts_speech(r: DecodingResult, opts: TranscribeOptions) -> bool:
    """Whether the model doubts the pass holds speech: its no-speech probability above the no-speech rule's."""
    return opts.no_speech_threshold is not None and r.no_speech_prob > opts.no_speech_threshold


def is_silence(r: DecodingResult, opts: TranscribeOptions) -> bool:
    if (
        opts.failed_no_speech_threshold is not None
        and r.no_speech_prob > opts.failed_no_speech_threshold
        and r.temperature == opts.temperatures[-1]
        and needs_fallback(r, opts)
    ):
        return True
    if not doubts_speech(r, opts):
        return False
    return opts.logprob_threshold is None or r.avg_logprob <= opts.logprob_threshold


def first_sound(mel: Tensor, opts: TranscribeOptions) -> int | None:
    """The first frame of a log-mel (n_mels, frames) that is not quiet (0 when there is no quiet gate); None when
    every frame is quiet."""
    loud = sounding(mel, opts).nonzero()
    return int(loud[0, 0]) if len(loud) else None


def sounding(mel: Tensor, opts: TranscribeOptions) -> Tensor:
    """Per frame of a log-mel (n_mels, frames), whether it is above the quiet gate (every frame without one)."""
    if opts.quiet_log_mel is None:
        return torch.ones(mel.shape[-1], dtype=torch.bool)
    # undo log_mel_spectrogram's (x + 4) / 4 on each frame's loudest band
    return mel.amax(dim=0) * 4.0 - 4.0 >= opts.quiet_log_mel


def needs_fallback(r: DecodingResult, opts: TranscribeOptions) -> bool:
    cr, lp = opts.compression_ratio_threshold, opts.logprob_threshold
    failed = (cr is not None and r.compression_ratio > cr) or (lp is not None and r.avg_logprob < lp)
    # a silent window (the model doubts speech) with a low logprob is silence, not a failure worth re-decoding
    return failed and not (doubts_speech(r, opts) and lp is not None and r.avg_logprob < lp)


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
    first_only: Sequence[bool] | None = None,
    prompts: Sequence[Sequence[int] | None] | None = None,
    lengths: Sequence[int] | None = None,
) -> list[DecodingResult]:
    """Decode every window at the first temperature, then re-decode only the failing ones at the next (never those
    marked ``first_only``). ``prompts`` and ``lengths``: per window, as :func:`~whisper_batch.model.decoding.decode`
    takes them."""
    n = audio_features.shape[0]
    results: list[DecodingResult | None] = [None] * n
    langs = list(languages) if languages is not None else [None] * n
    todo = list(range(n))
    for temperature in opts.temperatures:
        out = decode(model, tokenizer, audio_features[todo], options_at(opts, temperature), [langs[i] for i in todo],
                     [prompts[i] for i in todo] if prompts is not None else None,
                     [lengths[i] for i in todo] if lengths is not None else None)
        redo = []
        for i, r in zip(todo, out):
            if results[i] is not None and r.language_probs is None:
                r.language_probs = results[i].language_probs
            results[i] = r
            langs[i] = r.language  # detected once, reused by the hotter passes
            if needs_fallback(r, opts) and not (first_only and first_only[i]):
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
        closed timestamp pair the text after it is not trusted (the reference re-decodes from the last timestamp);
        when they end with a lone timestamp, no speech was heard up to it. Either way fewer frames than ``frames``
        are consumed, and the caller decodes the rest, if long enough, as a new window.
    """
    tokens, tb = r.tokens, tokenizer.timestamp_begin

    def segment(start: float, end: float, toks: list[int]) -> Segment:
        # the pieces of a character cut by the window's end decode as U+FFFD: a reader's text never holds them
        text = tokenizer.decode([t for t in toks if t < tokenizer.eot]).replace(REPLACEMENT_CHAR, "")
        return Segment(start, end, text, toks, r.avg_logprob, r.compression_ratio, r.no_speech_prob, r.temperature)

    is_ts = [t >= tb for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-1] and not is_ts[-2]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:  # one segment: to the last timestamp if any, else to the end of the audio
        ts = [t for t in tokens if t >= tb]
        end = (ts[-1] - tb) * TIME_PRECISION if ts and ts[-1] > tb else frames / FRAMES_PER_SECOND
        end = min(end, frames / FRAMES_PER_SECOND)
        seg = segment(0.0, end, tokens)
        # ended at a lone timestamp: speech may start again after it (text with no timestamp after it is all kept)
        consumed = (ts[-1] - tb) * FRAMES_PER_TIMESTAMP if single_ending else frames
        return ([seg] if seg.text.strip() else []), consumed if 0 < consumed < frames else frames
    if single_ending:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        segments.append(segment((piece[0] - tb) * TIME_PRECISION, (piece[-1] - tb) * TIME_PRECISION, piece))
        last = cut
    limit = frames / FRAMES_PER_SECOND
    # a segment that starts at or past the audio's end has no audio to be heard in: the model's text in the padding
    # (at a hot temperature, the last sentence said again); one that only ends past it is clipped to the end
    segments = [s for s in segments if s.start < limit]
    for seg in segments:
        seg.end = min(seg.end, limit)
    segments = [s for s in segments if s.text.strip()]
    consumed = (tokens[last - 1] - tb) * FRAMES_PER_TIMESTAMP  # the pair's, or the lone final timestamp's
    return segments, consumed if 0 < consumed < frames else frames


class Seek(NamedTuple):
    """A window still to decode: its index in the batch, its first mel frame not yet decoded, and whether the pass is
    a probe (the pass before ended at a lone timestamp: the model said speech ended there)."""

    window: int
    frame: int
    probe: bool = False


@dataclass
class Pass:
    """What one decoding pass gives a window.

    ``segments`` are in seconds from the window's start; ``consumed`` counts the mel frames, from the pass's first
    frame, that they account for (a rest long enough is decoded in a further pass); ``silent``: the no-speech rule
    took the pass for silence (no segments, everything consumed).
    """

    segments: list[Segment]
    consumed: int
    silent: bool
    lone_ending: bool = False  # the tokens end at a lone timestamp (a probe follows when the rest is long enough)


@torch.no_grad()
def transcribe_windows(
    model: Whisper,
    tokenizer: Tokenizer,
    mel: Tensor,
    content_frames: Sequence[int] | None = None,
    opts: TranscribeOptions = TranscribeOptions(),
    languages: Sequence[str | None] | None = None,
    timed: Sequence[bool] | None = None,
    prompts: Sequence[Sequence[int] | None] | None = None,
) -> list[WindowResult]:
    """Transcribe a batch of windows, possibly from many files.

    A window whose decode stops at a timestamp well before its audio ends is continued from there (as the
    reference's ``transcribe`` seeks), in further batched passes over just those windows.

    Args:
        mel: log-mel windows (n, n_mels, 3000), padded with zeros past the audio.
        content_frames: mel frames of real audio per window (default: all 3000).
        languages: per-window language codes, None to detect (multilingual models).
        timed: per window, whether to time its words (default: ``opts.word_timestamps`` for every window).
        prompts: per window, the tokens of the text before it (its file's earlier windows, see
            :func:`prompt_after`), in place of ``opts.decoding.prompt``; a window's later passes add its own text.
    """
    if mel.ndim != 3 or mel.shape[1] != model.dims.n_mels or mel.shape[2] != N_FRAMES:
        raise ValueError(f"mel of shape {tuple(mel.shape)}: expected (windows, {model.dims.n_mels}, {N_FRAMES})")
    n = mel.shape[0]
    frames = list(content_frames) if content_frames is not None else [N_FRAMES] * n
    langs = list(languages) if languages is not None else [None] * n
    timed = list(timed) if timed is not None else [opts.word_timestamps] * n
    prompts = list(prompts) if prompts is not None else None
    return WindowBatch(model, tokenizer, opts, mel, frames, langs, timed, prompts).run()


class WindowBatch:
    """The windows of one :func:`transcribe_windows` call, and what its decoding passes learn about them.

    Read only: the model, tokenizer and options; ``mel`` (n, n_mels, 3000); per window ``frames`` (mel frames of
    audio) and ``timed`` (whether to time its words). Per window, updated by every pass over it: ``langs`` (as given,
    or detected by its first pass and reused by the later ones), ``results`` (each pass folded in by :func:`merge`)
    and ``last_speech`` (the end of its last timed word, seconds from the window's start; timed windows only).
    """

    def __init__(
        self,
        model: Whisper,
        tokenizer: Tokenizer,
        opts: TranscribeOptions,
        mel: Tensor,
        frames: list[int],
        langs: list[str | None],
        timed: list[bool],
        prompts: list[Sequence[int] | None] | None = None,
    ):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.mel, self.frames, self.timed, self.prompts = mel, frames, timed, prompts
        self.langs = langs
        self.results: list[WindowResult | None] = [None] * len(frames)
        self.last_speech: dict[int, float] = {}

    def run(self) -> list[WindowResult]:
        """Every window from its first frame, then the windows to continue, pass after pass, until none is left."""
        todo = [Seek(i, 0) for i in range(len(self.frames))]
        while todo:
            heard = self.skip_quiet(todo)
            todo = self.decode_pass(heard) if heard else []
        for r, n, t in zip(self.results, self.frames, self.timed):
            if t:  # the first-word rules of a continued pass may reach into the one before
                tidy_words(r.segments, n / FRAMES_PER_SECOND)
        return self.results

    def skip_quiet(self, todo: list[Seek]) -> list[Seek]:
        """The windows with something to hear from their first frame on; a window quiet from the start is no
        speech, and no model time is spent on it. A pass that starts with more than a second of quiet starts half a
        second before its first sound instead: after seconds of digital silence the model doubts a lone word it
        hears (no-speech probability 0.6 for "Hello" after 12 s), and its first timestamp can be at most 1 s."""
        heard = []
        for s in todo:
            i, seek = s.window, s.frame
            first = first_sound(self.mel[i, :, seek : self.frames[i]], self.opts)
            if first is not None:
                heard.append(s._replace(frame=seek + first - LEAD_FRAMES) if first > QUIET_LEAD_FRAMES else s)
            elif self.results[i] is None:
                self.results[i] = WindowResult("", [], self.langs[i] or "en", [], 0.0, 0.0, 1.0, 0.0, no_speech=True)
        return heard

    def decode_pass(self, todo: list[Seek]) -> list[Seek]:
        """One decoding pass over ``todo``: an encoder pass per length of window (one length unless
        padding_seconds), then one batched decode of them all, each window attending to its own length only; folds
        the results into ``results`` and returns the windows to continue, from their new first frame."""
        lengths = [encoder_frames(self.frames[s.window] - s.frame, self.opts) for s in todo]
        order = sorted(range(len(todo)), key=lambda k: -lengths[k])  # like lengths side by side: one run each
        todo, lengths = [todo[k] for k in order], [lengths[k] // FRAMES_PER_TIMESTAMP for k in order]
        features = self.encode(todo, lengths)
        langs = [self.langs[s.window] for s in todo]
        decoded = decode_with_fallback(self.model, self.tokenizer, features, self.opts, langs, [s.probe for s in todo],
                                       self.prompts_of(todo), lengths)
        passes = []
        for s, r in zip(todo, decoded):
            self.langs[s.window] = r.language
            passes.append(self.cut(s, r))
        sel = [k for k, p in enumerate(passes) if self.slow_segment(p)]
        if sel:
            self.cut_skips(features[sel], *([xs[k] for k in sel] for xs in (todo, decoded, passes, lengths)))
        sel = [k for k, s in enumerate(todo) if self.timed[s.window]]
        if sel:
            self.time_words(features[sel], *([xs[k] for k in sel] for xs in (todo, decoded, passes, lengths)))
        later = []
        for (i, seek, _), r, p in zip(todo, decoded, passes):
            if seek and self.results[i] is not None and rereads(self.results[i].text, p.segments):
                p.segments = []  # the last words before the continuation, heard again: not said twice
            self.results[i] = merge(self.results[i], r, p.segments, p.silent)
            rest = self.frames[i] - seek - p.consumed
            if rest >= MIN_CONTINUATION_FRAMES and (not p.lone_ending or self.opts.probe_logprob_threshold is not None):
                later.append(Seek(i, seek + p.consumed, p.lone_ending))
        return later

    def prompts_of(self, todo: list[Seek]) -> list[list[int] | None] | None:
        """With prompts, each pass's: its window's, then the text of its earlier passes (as the reference's seeks)."""
        if self.prompts is None:
            return None
        out = []
        for i, _, _ in todo:
            base, done = self.prompts[i], self.results[i]
            out.append(None if base is None else list(base) + (done.tokens if done is not None else []))
        return out

    def encode(self, todo: list[Seek], lengths: list[int]) -> Tensor:
        """Encoder output (len(todo), max(lengths), n_audio_state) of each window's audio from its first frame on,
        zero-padded to 2 * its ``lengths`` mel frames (at least the audio's: :func:`encoder_frames`): one encoder
        pass per run of like lengths, its output zero-padded to the longest (positions no decoder reads)."""
        longest = max(lengths)
        outs = []
        for a, b, n in every_run(lengths, len(todo), longest):
            batch = torch.zeros(b - a, self.mel.shape[1], n * FRAMES_PER_TIMESTAMP, dtype=self.mel.dtype)
            for k, (i, seek, _) in enumerate(todo[a:b]):
                batch[k, :, : self.frames[i] - seek] = self.mel[i, :, seek : self.frames[i]]
            outs.append((a, b, n, self.model.embed_audio(batch.to(self.model.device, self.model.dtype))))
        if len(outs) == 1:
            return outs[0][3]
        features = outs[0][3].new_zeros(len(todo), longest, outs[0][3].shape[2])
        for a, b, n, out in outs:
            features[a:b, :n] = out
        return features

    def cut(self, s: Seek, r: DecodingResult) -> Pass:
        """A window's decode as segments on the window's clock (none where the no-speech rule says silence)."""
        size = self.frames[s.window] - s.frame
        if is_silence(r, self.opts) or (s.probe and not self.sure(r)):
            return Pass([], size, True)
        segments, consumed = split_segments(r, self.tokenizer, size)
        if not _words(r.text) and doubts_speech(r, self.opts):
            # no word where the model doubts there is speech ("." over a few seconds of white noise, which a short
            # encoder pass gives at log-prob -0.87): no text; a rest it leaves is still decoded
            segments = []
        failed = r.temperature == self.opts.temperatures[-1] and needs_fallback(r, self.opts)
        for seg in segments:
            seg.start, seg.end = seg.start + s.frame / FRAMES_PER_SECOND, seg.end + s.frame / FRAMES_PER_SECOND
            seg.language, seg.fallback_failed = r.language, failed
        tb = self.tokenizer.timestamp_begin
        lone = len(r.tokens) >= 2 and r.tokens[-1] >= tb and r.tokens[-2] < tb
        return Pass(segments, consumed, False, lone)

    def sure(self, r: DecodingResult) -> bool:
        """Whether a probe's decode is kept (see TranscribeOptions.probe_logprob_threshold)."""
        threshold = self.opts.probe_logprob_threshold
        return (r.temperature == self.opts.temperatures[0] and threshold is not None
                and r.avg_logprob >= threshold and r.no_speech_prob <= PROBE_NO_SPEECH)

    def slow_segment(self, p: Pass) -> bool:
        """Whether a pass has a segment, not its first, that the skip check should look at (see skip_seconds)."""
        if self.opts.skip_seconds is None or p.silent:
            return False
        return any(seg.end - seg.start >= self.opts.skip_seconds + 1 and _words(seg.text)
                   and len(seg.text.strip()) < SLOW_CHARS_PER_SECOND * (seg.end - seg.start) for seg in p.segments[1:])

    def cut_skips(self, features: Tensor, todo: list[Seek], decoded: list[DecodingResult], passes: list[Pass],
                  lengths: list[int]) -> None:
        """The skip check (see TranscribeOptions.skip_seconds) on passes with a slow segment, in place: one batched
        alignment pass; a pass that skipped speech keeps its segments before the skip, and its ``consumed`` ends
        at the last word before it, so the rest is decoded again."""
        alignments = self.align(features, todo, decoded, passes, lengths, probabilities=False)
        for (i, seek, _), alignment, p in zip(todo, alignments, passes):
            clip_sentence_boundaries(alignment)  # the word before a skip absorbs the skipped audio: its full stop
            offset = seek / FRAMES_PER_SECOND  # per segment, (first word's start, last word's end), window's clock
            spans = [(offset + ws[0].start, offset + ws[-1].end) if ws else None
                     for ws in segment_words(p.segments, alignment, self.tokenizer.eot)]
            for j in range(1, len(p.segments)):
                seg, span, before = p.segments[j], spans[j], spans[j - 1]
                if span is None or before is None or span[0] - seg.start < self.opts.skip_seconds:
                    continue
                if not _words(seg.text):  # a segment of symbols (a note over music) starts where the sound does
                    continue
                stretch = self.mel[i, :, round(seg.start * FRAMES_PER_SECOND) : round(span[0] * FRAMES_PER_SECOND)]
                if int(sounding(stretch, self.opts).sum()) < SKIPPED_SOUND_FRAMES:
                    continue  # a real pause the timestamps missed, not skipped speech
                resume = round(before[1] * FRAMES_PER_SECOND) - seek
                if 0 < resume < p.consumed:
                    p.segments, p.consumed, p.lone_ending = p.segments[:j], resume, False
                break

    def align(self, features: Tensor, todo: list[Seek], decoded: list[DecodingResult], passes: list[Pass],
              lengths: list[int], probabilities: bool = True) -> list:
        """The words of each pass's segments as the alignment heads time them (a batched pass per run of like
        encoder lengths; seconds from each pass's first frame; without ``probabilities``, NaN for theirs)."""
        eot = self.tokenizer.eot
        texts = [[t for seg in p.segments for t in seg.tokens if t < eot] for p in passes]
        sizes = [self.frames[i] - seek for i, seek, _ in todo]
        langs = [r.language for r in decoded]
        out = []
        for a, b, n in every_run(lengths, len(todo), features.shape[1]):
            out += find_alignments(self.model, self.tokenizer, features[a:b, :n], texts[a:b], sizes[a:b], langs[a:b],
                                   self.opts.decoding.task, probabilities=probabilities)
        return out

    def time_words(self, features: Tensor, todo: list[Seek], decoded: list[DecodingResult], passes: list[Pass],
                   lengths: list[int]) -> None:
        """Word timestamps for one decoding pass over many windows, in place: one batched alignment pass, then per
        window the words go into its pass's segments.

        As in the reference, a pass that does not end on a lone timestamp resumes at its last word's end (the text
        after the last word is not trusted), so the pass's ``consumed`` may change.

        Args:
            features: (len(todo), S, n_audio_state) encoder output of the windows, each zero-padded past its
                ``lengths`` positions.
        """
        tk, frames = self.tokenizer, self.frames
        alignments = self.align(features, todo, decoded, passes, lengths)
        for (i, seek, _), r, alignment, p in zip(todo, decoded, alignments, passes):
            if not p.segments:
                continue
            offset = seek / FRAMES_PER_SECOND
            add_word_timestamps(p.segments, alignment, tk.eot, offset, self.last_speech.get(i, 0.0))
            tidy_words(p.segments, frames[i] / FRAMES_PER_SECOND)
            end = self.last_speech[i] = speech_end(p.segments)
            tb = tk.timestamp_begin
            single_ending = len(r.tokens) >= 2 and r.tokens[-1] >= tb and r.tokens[-2] < tb
            resume = round(end * FRAMES_PER_SECOND) - seek
            if not single_ending and end > offset and resume > 0:
                p.consumed = min(resume, frames[i] - seek)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w']+", " ", text.lower()).split()


def rereads(before: str, segments: list[Segment]) -> bool:
    """Whether a continuation pass's text only repeats the end of the window's text before it (letters and digits
    compared, case and punctuation ignored): a final timestamp a little early leaves the last word in the rest."""
    words = _words("".join(s.text for s in segments))
    return bool(words) and _words(before)[-len(words) :] == words


def encoder_frames(content: int, opts: TranscribeOptions) -> int:
    """Mel frames the encoder sees for a window that holds ``content`` frames of audio.

    The reference's 30 s, or with ``padding_seconds`` the audio plus at least that much padding, rounded up to a
    multiple of ``padding_step_seconds`` (at most 30 s). The length depends on the window alone, never on the
    windows it is batched with, so its text does not either; windows of one length share an encoder pass.
    """
    if opts.padding_seconds is None:
        return N_FRAMES
    step = max(2, 2 * round(opts.padding_step_seconds * FRAMES_PER_SECOND / 2))  # whole encoder positions
    return min(N_FRAMES, -(-(content + round(opts.padding_seconds * FRAMES_PER_SECOND)) // step) * step)


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
