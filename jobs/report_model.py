"""The report's aggregate: what :mod:`whisper_batch.jobs.report` counts over the committed shards and
:mod:`whisper_batch.jobs.plots` draws (fixed-size histograms and counters, so memory stays flat at a million rows)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# (signal, histogram range, threshold, "below"|"above" drops): what Whisper's fallback and pseudo-labelling
# pipelines filter on (Whisper's logprob_threshold, no_speech_threshold and compression_ratio_threshold)
SIGNALS = (
    ("avg_logprob", (-3.0, 0.0), -1.0, "below"),
    ("no_speech_prob", (0.0, 1.0), 0.6, "above"),
    ("compression_ratio", (0.0, 5.0), 2.4, "above"),
)
BINS = 60
MAX_GROUPS = 10_000  # distinct values counted per field; more go to OTHER
OTHER = "(other values)"


@dataclass
class GroupCounts:
    """Rows, failed rows and audio seconds per value of one field, with WER counts where references exist."""

    rows: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    audio: Counter = field(default_factory=Counter)
    wer: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def key(self, value: Any) -> str:
        key = "(none)" if value is None else str(value)
        return key if key in self.rows or len(self.rows) < MAX_GROUPS else OTHER

    def add(self, value: Any, seconds: float, failed: bool) -> str:
        key = self.key(value)
        self.rows[key] += 1
        self.failed[key] += failed
        self.audio[key] += seconds
        return key


@dataclass
class Histogram:
    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def add(self, values: np.ndarray) -> None:
        # out-of-range values go to the first or last bin, so nothing is lost from the totals
        idx = np.clip(((values - self.lo) / (self.hi - self.lo) * BINS).astype(np.int64), 0, BINS - 1)
        self.counts += np.bincount(idx, minlength=BINS)


@dataclass
class Aggregate:
    """Everything the page shows about the committed rows, built shard by shard."""

    by: list[str]
    rows: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    segments: int = 0
    groups: dict[str, GroupCounts] = field(default_factory=dict)
    causes: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    histograms: dict[str, Histogram] = field(default_factory=dict)
    # per signal: segments, rows and audio seconds that its threshold drops; "any" for all three together
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    temperatures: Counter = field(default_factory=Counter)  # segments per decoding temperature
    mixed_language_rows: int = 0  # rows whose segments hold more than one language
    mixed_language_examples: list[dict[str, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    wer_rows: int = 0
    wer_all: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.groups = {name: GroupCounts() for name in ["language", *self.by]}
        self.histograms = {name: Histogram(*rng) for name, rng, *_ in SIGNALS}


def wer_of(counts: Counter) -> float | None:
    words = counts.get("reference_words", 0)
    return (counts["substitutions"] + counts["deletions"] + counts["insertions"]) / words if words else None
