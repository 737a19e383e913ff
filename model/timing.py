"""Word-level timestamps from the alignment heads' cross-attention, aligned by dynamic time warping.

A window's text tokens are re-run teacher-forced (``sot_sequence, <|notimestamps|>, text, <|endoftext|>``) in one
batched decoder pass that returns the cross-attention scores of :attr:`Whisper.alignment_heads`. Per window the
scores become a (token, audio frame) matrix — softmax over the frames, normalised over the tokens, median-filtered
along time, averaged over the heads — and the cheapest monotonic path through its negative gives each token the frame
where it starts. Words are formed the way the tokenizer splits them. The semantics follow the reference's
``whisper/timing.py`` (filter width, normalisation, punctuation merging, and its duration heuristics) so that times
agree with it; DTW is plain numpy, vectorised along anti-diagonals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import TOKENS_PER_SECOND
from .results import Segment, Word
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .whisper import Whisper


MEDFILT_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
# bound on the attention scores held at once by the alignment pass; larger batches run in chunks of rows
ALIGN_BATCH_BYTES = 512 * 2**20


@dataclass
class WordTiming:
    """A word as aligned, with its tokens (times in seconds from the aligned audio's start)."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding window of odd ``width`` along the last axis, reflect-padded at both ends."""
    if width <= 0 or width % 2 == 0:
        raise ValueError(f"median filter width must be a positive odd number, got {width}")
    pad = width // 2
    if x.shape[-1] <= pad:  # too short to reflect-pad: left as is (as the reference does)
        return x
    flat = F.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect")[:, 0]
    if width != SORT7_WIDTH:  # sorting the windows is faster than torch.median on unfolded windows
        return flat.unfold(-1, width, 1).sort(dim=-1).values[..., pad].reshape(x.shape)
    # the filter's own width: element-wise min/max over shifted views, as a sorting network's compare-exchanges
    # (only those the middle output depends on), in cache-sized runs of rows: the element a sort would pick, in a
    # sixteenth of its time (the sort was 40 % of an alignment pass)
    n = x.shape[-1]
    out = flat.new_empty(flat.shape[0], n)
    for r in range(0, flat.shape[0], MEDIAN_ROWS):
        lanes: list[Tensor | None] = [flat[r : r + MEDIAN_ROWS, k : k + n] for k in range(width)]
        for a, b, low, high in MEDIAN7:
            lanes[a], lanes[b] = (torch.minimum(lanes[a], lanes[b]) if low else None,
                                  torch.maximum(lanes[a], lanes[b]) if high else None)
        out[r : r + MEDIAN_ROWS] = lanes[pad]
    return out.reshape(x.shape)


def median_exchanges(network: Sequence[tuple[int, int]], middle: int) -> list[tuple[int, int, bool, bool]]:
    """The compare-exchanges ``(a, b)`` of a sorting network (``a`` gets the smaller value) that output ``middle``
    depends on, each with whether its smaller and its larger output are read later."""
    needed, out = {middle}, []
    for a, b in reversed(network):
        low, high = a in needed, b in needed
        if low or high:
            out.append((a, b, low, high))
            needed |= {a, b}
    return out[::-1]


# a sorting network for 7 values (16 compare-exchanges; Knuth, TAOCP 5.3.4), of which the median needs 14
SORT7 = ((0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5), (3, 4), (1, 2), (4, 6), (2, 3), (4, 5),
         (1, 2), (3, 4), (5, 6))
SORT7_WIDTH = 1 + max(b for _, b in SORT7)  # the inputs it sorts
MEDIAN7 = median_exchanges(SORT7, SORT7_WIDTH // 2)
MEDIAN_ROWS = 64  # rows of 1,500 frames per run: the lanes stay in the core's L2 cache


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through a cost matrix (N, M): moves down, right or diagonally.

    Costs accumulate in float32 and ties break as in the reference (the diagonal only when strictly cheapest, then
    down, else right), so the path is the same. The recurrence runs one anti-diagonal at a time: every cell of
    diagonal ``i + j = d`` depends only on diagonals ``d - 1`` and ``d - 2``. Storage is skewed — row ``d``, column
    ``i`` holds cell ``(i, d - i)`` of the (N+1, M+1) cost matrix — so each diagonal is a contiguous slice.

    Returns:
        (token indices, frame indices) of the path from (0, 0) to (N - 1, M - 1).
    """
    n, m = x.shape
    i_grid, j_grid = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    xs = np.zeros((n + m + 1, n + 1))
    xs[i_grid + j_grid, i_grid] = x
    cost = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((n + m + 1, n + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1) + 1  # cells (i, d - i) with 1 <= i <= n and 1 <= d - i <= m
        diag, up, left = cost[d - 2, lo - 1 : hi - 1], cost[d - 1, lo - 1 : hi - 1], cost[d - 1, lo:hi]
        take_diag = (diag < up) & (diag < left)
        take_up = (up < diag) & (up < left)
        cost[d, lo:hi] = xs[d, lo:hi] + np.where(take_diag, diag, np.where(take_up, up, left))
        trace[d, lo:hi] = np.where(take_diag, 0, np.where(take_up, 1, 2))
    path = []
    i, j = n, m
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return np.array(path[::-1]).T.reshape(2, -1)


def alignment_matrix(qk: Tensor, n_prefix: int, medfilt_width: int = MEDFILT_WIDTH, qk_scale: float = 1.0) -> Tensor:
    """One window's alignment heads' scores (H, T, F) -> the (token, frame) matrix for DTW, (T - n_prefix - 1, F).

    ``T`` covers the real tokens only (sot sequence, <|notimestamps|>, text, eot) and ``F`` the frames of real audio:
    both the softmax and the normalisation must not see padding. The rows kept are those of <|notimestamps|> and the
    text tokens, each of which predicts the next token.
    """
    weights = (qk.float() * qk_scale).softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, medfilt_width)
    return weights.mean(dim=0)[n_prefix:-1]


def word_timings(
    tokenizer: Tokenizer,
    text_tokens: list[int],
    language: str | None,
    path: tuple[np.ndarray, np.ndarray],
    token_probs: list[float],
) -> list[WordTiming]:
    """Words of ``text_tokens`` with the times at which the DTW path first reaches each word's first token."""
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot], language)
    if len(word_tokens) <= 1:  # only <|endoftext|>
        return []
    # token index where each word starts; the last boundary is <|endoftext|>, where the last word ends
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    text_idx, time_idx = path
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    return [
        WordTiming(word, toks, float(jump_times[a]), float(jump_times[b]), float(np.mean(token_probs[a:b])))
        for word, toks, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:])
    ]


@torch.no_grad()
def find_alignments(
    model: Whisper,
    tokenizer: Tokenizer,
    audio_features: Tensor,
    text_tokens: Sequence[list[int]],
    num_frames: Sequence[int],
    languages: Sequence[str | None],
    task: str = "transcribe",
    medfilt_width: int = MEDFILT_WIDTH,
    qk_scale: float = 1.0,
    probabilities: bool = True,
) -> list[list[WordTiming]]:
    """Word timings of many windows from one batched teacher-forced pass.

    Args:
        audio_features: (n, n_audio_ctx, n_audio_state) encoder output of the windows.
        text_tokens: per window, its text tokens (no timestamps or specials); empty lists are skipped.
        num_frames: per window, the mel frames of real audio (the encoder sees 2 per position).
        languages: per window, its language (the sot sequence and the word splitting depend on it).
        probabilities: whether to compute each word's probability (NaN without: the projection onto the
            vocabulary of every text token is a third of the pass, and timing alone needs none of it).

    Returns:
        Per window, its words with times in seconds from the window's start.
    """
    out: list[list[WordTiming]] = [[] for _ in text_tokens]
    rows = [k for k, toks in enumerate(text_tokens) if toks]
    if not rows:
        return out
    prefixes = {k: [*tokenizer.sot_sequence(languages[k], task), tokenizer.no_timestamps] for k in rows}
    width = max(len(prefixes[k]) + len(text_tokens[k]) + 1 for k in rows)
    n_heads = int(model.alignment_heads.sum()) + model.dims.n_text_head
    per_row = 4 * n_heads * width * audio_features.shape[1]  # fp32 scores of one row: a full layer + the kept heads
    chunk = max(1, ALIGN_BATCH_BYTES // per_row)
    for begin in range(0, len(rows), chunk):
        part = rows[begin : begin + chunk]
        # right padding needs no attention mask: causal self-attention keeps it out of the real positions
        tokens = torch.full((len(part), width), tokenizer.eot, dtype=torch.long)
        for r, k in enumerate(part):
            seq = [*prefixes[k], *text_tokens[k], tokenizer.eot]
            tokens[r, : len(seq)] = torch.tensor(seq)
        hidden, qk = model.alignment_weights(tokens.to(audio_features.device), audio_features[part], project=False)
        # the logits of the rows that predict a text token only: the rest of the (rows, width) grid is padding
        spans = [(len(prefixes[k]) - 1, len(text_tokens[k])) for k in part]
        if probabilities:
            logits = model.decoder.project(torch.cat([hidden[r, a : a + n] for r, (a, n) in enumerate(spans)]))
            chosen = torch.tensor([t for k in part for t in text_tokens[k]], device=logits.device)
            logits = logits[:, : tokenizer.eot]
            token_probs = (logits[torch.arange(len(chosen)), chosen] - logits.logsumexp(dim=-1)).exp().tolist()
        else:
            token_probs = [float("nan")] * sum(n for _, n in spans)
        start = 0
        for r, (k, (n_prefix, n_text)) in enumerate(zip(part, spans)):
            probs, start = token_probs[start : start + n_text], start + n_text
            scores = qk[r, :, : n_prefix + n_text + 2, : num_frames[k] // 2]
            matrix = alignment_matrix(scores, n_prefix, medfilt_width, qk_scale)
            path = dtw(-matrix.double().cpu().numpy())
            out[k] = word_timings(tokenizer, list(text_tokens[k]), languages[k], path, probs)
    return out


def merge_punctuations(
    alignment: list[WordTiming], prepended: str = PREPEND_PUNCTUATIONS, appended: str = APPEND_PUNCTUATIONS
) -> None:
    """Folds punctuation into its word, in place: opening marks onto the next word, closing marks onto the previous.

    A folded entry keeps its place with an empty word and no tokens; the receiving word keeps its own times.
    """
    target = len(alignment) - 1  # right to left: a run of opening marks attaches to the word after the run
    for i in range(len(alignment) - 2, -1, -1):
        mark, word = alignment[i], alignment[target]
        if mark.word.startswith(" ") and mark.word.strip() in prepended:
            word.word, word.tokens = mark.word + word.word, mark.tokens + word.tokens
            mark.word, mark.tokens = "", []
        else:
            target = i
    target = 0  # left to right: a run of closing marks attaches to the word before the run
    for j in range(1, len(alignment)):
        word, mark = alignment[target], alignment[j]
        if not word.word.endswith(" ") and mark.word in appended:
            word.word, word.tokens = word.word + mark.word, word.tokens + mark.tokens
            mark.word, mark.tokens = "", []
        else:
            target = j


def clip_sentence_boundaries(alignment: list[WordTiming]) -> tuple[float, float]:
    """Shortens words that straddle a sentence end to twice the median word duration, in place.

    DTW tends to stretch the word after a pause over the silence (and a full stop over the pause after it).

    Returns:
        (median word duration, capped at 0.7 s; the longest duration allowed, twice that).
    """
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for prev, w in zip(alignment, alignment[1:]):
            if w.end - w.start > longest:
                if w.word in SENTENCE_END_MARKS:
                    w.end = w.start + longest
                elif prev.word in SENTENCE_END_MARKS:
                    w.start = w.end - longest
    return median, longest


def fit_segment_edges(seg: Segment, words: list[Word], last_speech: float, median: float, longest: float) -> None:
    """Reconciles a segment's first/last words with its timestamps, in place (the reference's heuristics).

    After a pause the first word (and the second) are cut to plausible lengths; a first or last word that runs more
    than 0.5 s past the segment's timestamp is cut back to it, otherwise the segment takes the word's time.
    """
    first, last = words[0], words[-1]
    long_first = first.end - first.start > longest
    long_pair = len(words) > 1 and words[1].end - first.start > longest * 2
    if first.end - last_speech > median * 4 and (long_first or long_pair):
        if len(words) > 1 and words[1].end - words[1].start > longest:
            boundary = max(words[1].end / 2, words[1].end - longest)
            first.end = words[1].start = boundary
        first.start = max(0.0, first.end - longest)
    if seg.start < first.end and seg.start - 0.5 > first.start:
        first.start = max(0.0, min(first.end - median, seg.start))
    else:
        seg.start = first.start
    if seg.end > last.start and seg.end + 0.5 < last.end:
        last.end = max(last.start + median, seg.end)
    else:
        seg.end = last.end


def add_word_timestamps(
    segments: Sequence[Segment],
    alignment: list[WordTiming],
    eot: int,
    time_offset: float,
    last_speech: float,
) -> None:
    """Gives each segment of one decoding pass its ``words`` (times on the segments' clock), in place.

    Args:
        segments: the pass's segments, in order; their text tokens are, concatenated, the aligned tokens.
        alignment: the pass's words as :func:`find_alignments` timed them (seconds from the pass's audio start).
        eot: ``<|endoftext|>``; tokens from it up are not text.
        time_offset: seconds from the segments' clock origin to the pass's audio start.
        last_speech: end of the last speech before this pass (on the segments' clock).
    """
    median, longest = clip_sentence_boundaries(alignment)
    merge_punctuations(alignment)
    for seg, timed in zip(segments, segment_words(segments, alignment, eot)):
        words = [Word(w.word, round(time_offset + w.start, 2), round(time_offset + w.end, 2), w.probability,
                      list(w.tokens)) for w in timed if w.word]
        if words:
            fit_segment_edges(seg, words, last_speech, median, longest)
            last_speech = seg.end
        seg.words = words


def segment_words(segments: Sequence[Segment], alignment: list[WordTiming], eot: int) -> list[list[WordTiming]]:
    """The aligned words of each segment of one pass: each takes words until it has all its text tokens."""
    out, k = [], 0
    for seg in segments:
        n_text, taken, words = sum(t < eot for t in seg.tokens), 0, []
        while k < len(alignment) and taken < n_text:
            taken += len(alignment[k].tokens)
            words.append(alignment[k])
            k += 1
        out.append(words)
    return out


def tidy_words(segments: Sequence[Segment], limit: float | None = None) -> None:
    """Settles the rare conflicts the heuristics leave between neighbouring words, in place.

    Afterwards no word passes ``limit`` (the end of the audio, where segment times are clipped too), starts never
    decrease, a word ends at or after its start and no later than the next word's start (the earlier word is cut),
    and each segment spans its words (it grows to hold them).
    """
    words = [w for seg in segments for w in seg.words or []]
    if limit is not None:  # the last-word rule may stretch a word past the audio
        for w in words:
            w.start, w.end = min(w.start, limit), min(w.end, limit)
    for prev, w in zip(words, words[1:]):
        w.start = max(w.start, prev.start)
        prev.end = min(prev.end, w.start)
        w.end = max(w.end, w.start)
    if words:
        words[0].end = max(words[0].end, words[0].start)
    for seg in segments:
        if seg.words:
            seg.start, seg.end = min(seg.start, seg.words[0].start), max(seg.end, seg.words[-1].end)


def speech_end(segments: Sequence[Segment]) -> float | None:
    """End of the last word, or of the last segment when none has words; None without segments."""
    ends = [w.end for seg in segments for w in seg.words or []]
    return ends[-1] if ends else (segments[-1].end if segments else None)
