"""What transcription returns: per window its result, its segments and, with word timestamps, their words.

One module that both :mod:`~whisper_batch.model.transcribe` (which cuts segments) and
:mod:`~whisper_batch.model.timing` (which times their words) import, so neither depends on the other for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Word:
    """A word of a segment's output (times in seconds, on the same clock as the segment)."""

    word: str
    start: float
    end: float
    probability: float
    tokens: list[int] = field(default_factory=list, repr=False)  # its text tokens (punctuation merged in)


@dataclass
class Segment:
    """A stretch of a window's text between two timestamps (times in seconds from the window's start)."""

    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    words: list[Word] | None = None  # with word_timestamps; times on the same clock as start/end
    language: str | None = None  # the language its pass decoded in
    # its pass still failed the compression-ratio or log-probability check at the last temperature: a loop, or text
    # the model itself doubts; kept (as the reference keeps it), marked so that filters can drop it
    fallback_failed: bool = False


@dataclass
class WindowResult:
    """One window's transcript, from all the decoding passes over it (its scores are those of the first)."""

    text: str
    segments: list[Segment]
    language: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float  # the highest temperature any of its passes needed
    no_speech: bool = False  # every pass was silence by the no-speech rules, or the window was quiet
    language_probs: dict[str, float] | None = field(default=None, repr=False)
