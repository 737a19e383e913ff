"""Short rows packed into one window, and a packed window's result split back among its rows.

The feature stage lays several short utterances of a shard into one 30 s window with silence between them
(:func:`plan_packs`, :func:`pack_audio`), so a 5 s utterance does not cost a whole window of encoder work. The model
stage gives each member the words that fall in its part of the window (:func:`member_share`), unless the pack's
decode cannot be trusted (:func:`pack_ok`), when the members are decoded one by one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from whisper_batch.model.constants import SAMPLE_RATE
from whisper_batch.model.transcribe import WindowResult

# keys of a featurized item that are features, not the row's record
FEATURE_KEYS = ("mel", "mel_frames", "window_starts", "members_json", "window_maps")


def member_record(item: dict[str, Any]) -> dict[str, Any]:
    """A featurized item without its features: what a pack carries of each member."""
    return {k: v for k, v in item.items() if k not in FEATURE_KEYS}


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
