"""An input's rows: :func:`read_manifest` asks the input formats (``whisper_batch.pipeline.inputs``) which one reads
the input at a URI, and streams that format's rows.

An input is a manifest (JSON lines, CSV, Parquet), a folder / glob / file of audio, or containers of samples
(WebDataset tar shards, Parquet files with embedded audio). Rows are yielded one at a time, so an input of any size
is never held whole. Each row is a `ManifestRow` with its row number, id, the audio path as written and as resolved
(relative paths resolve against the manifest's own folder, on the manifest's filesystem), and every other field
kept in `extra`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs import InputFormat, find_format
from whisper_batch.pipeline.inputs.base import InputLocation, ManifestError, ManifestRow, default_id

__all__ = ["ManifestError", "ManifestRow", "default_id", "input_format", "read_manifest"]


def input_format(
    uri: str, storage_options: dict[str, Any] | None = None, cfg: ManifestConfig | None = None
) -> tuple[InputFormat, str]:
    """The format that reads the input at `uri`, and its name: "jsonl", "csv", "parquet", "audio-glob",
    "audio-folder", "audio-file", "tar" (tar shards: one file, a glob or brace pattern) or "parquet-audio" (Parquet
    files with the audio bytes in a column)."""
    cfg = cfg or ManifestConfig()
    return find_format(InputLocation.of(uri, storage_options), cfg)


def read_manifest(
    uri: str, storage_options: dict[str, Any] | None = None, cfg: ManifestConfig | None = None
) -> Iterator[ManifestRow]:
    """Streams the rows of the manifest (or audio folder/glob, or containers of samples) at `uri` in order."""
    cfg = cfg or ManifestConfig()
    loc = InputLocation.of(uri, storage_options)
    fmt, name = find_format(loc, cfg)
    yield from fmt.iter_rows(loc, name, cfg)
