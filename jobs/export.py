"""`whisper-batch export OUTPUT --format srt|vtt|txt|jsonl DIR`: subtitles/text per row, or one JSON-lines file.

With ``--words`` (srt/vtt) each word of a segment that has word timestamps becomes its own cue.

File names come from row ids made filesystem-safe, so an id such as "../../x" or "a/b" can never escape the
output folder; an id that had to be changed gets 8 hex of its hash appended, so two ids never share a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import fsspec

from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.sink import iter_committed

logger = logging.getLogger(__name__)

FORMATS = ("srt", "vtt", "txt", "jsonl")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 120


def safe_name(row_id: str) -> str:
    """A file stem made from `row_id`: only [A-Za-z0-9._-], no leading dot, bounded length."""
    name = _UNSAFE.sub("_", row_id).lstrip(".")[:_MAX_NAME] or "row"
    if name != row_id:
        name += "-" + hashlib.sha256(row_id.encode()).hexdigest()[:8]
    return name


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    """`HH:MM:SS,mmm` (SRT) or, with decimal_marker=".", `HH:MM:SS.mmm` (WebVTT)."""
    milliseconds = max(0, round(seconds * 1000.0))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _cues(row: dict[str, Any], words: bool = False) -> list[tuple[float, float, str]]:
    """(start, end, text) per segment — or, with ``words``, per word of the segments that have word timestamps;
    a row without segments becomes one cue over its duration."""
    cues = []
    for s in row.get("segments") or []:
        if words and s.get("words"):
            cues += [(w["start"] or 0.0, w["end"] or 0.0, (w["word"] or "").strip()) for w in s["words"]]
        else:
            cues.append((s["start"] or 0.0, s["end"] or 0.0, (s["text"] or "").strip()))
    if not cues and (row.get("text") or "").strip():
        cues = [(0.0, row.get("duration") or 0.0, row["text"].strip())]
    return [c for c in cues if c[2]]


def to_srt(row: dict[str, Any], words: bool = False) -> str:
    blocks = [
        f"{i}\n{format_timestamp(start)} --> {format_timestamp(end)}\n{text.replace('-->', '->')}\n"
        for i, (start, end, text) in enumerate(_cues(row, words), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(row: dict[str, Any], words: bool = False) -> str:
    blocks = [
        f"{format_timestamp(start, '.')} --> {format_timestamp(end, '.')}\n{text.replace('-->', '->')}\n"
        for start, end, text in _cues(row, words)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_txt(row: dict[str, Any]) -> str:
    return (row.get("text") or "").strip() + "\n"


_RENDER = {"srt": to_srt, "vtt": to_vtt, "txt": to_txt}


def _rows(layout: RunLayout) -> Iterator[dict[str, Any]]:
    for _, table in iter_committed(layout):
        yield from table.to_pylist()


def export(
    layout: RunLayout, fmt: str, out_dir: str, storage_options: dict[str, Any] | None = None, words: bool = False
) -> dict[str, Any]:
    """Writes committed rows to `out_dir` (local or any fsspec URI).

    srt/vtt/txt: one `<safe id>.<fmt>` per row that succeeded (failed rows are counted, not written).
    jsonl: one `transcripts.jsonl` holding every row, failed ones included with their `error`.
    words: srt/vtt only — one cue per word where segments have word timestamps (run with decode.word_timestamps).

    Returns:
        {"format", "out_dir", "written", "skipped_failed"}
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if words and fmt not in ("srt", "vtt"):
        raise ValueError(f"word-level cues are for srt and vtt only, not {fmt!r}")
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    written = skipped = 0
    if fmt == "jsonl":
        with fs.open(f"{root}/transcripts.jsonl", "w", encoding="utf-8") as f:
            for row in _rows(layout):
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                written += 1
    else:
        for row in _rows(layout):
            if row.get("error") is not None:
                skipped += 1
                continue
            text = _RENDER[fmt](row, True) if words else _RENDER[fmt](row)
            fs.pipe_file(f"{root}/{safe_name(row['id'])}.{fmt}", text.encode("utf-8"))
            written += 1
    logger.info("exported %d rows as %s to %s (%d failed rows skipped)", written, fmt, out_dir, skipped)
    return {"format": fmt, "out_dir": out_dir, "written": written, "skipped_failed": skipped}
