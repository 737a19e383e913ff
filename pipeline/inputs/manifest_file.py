"""Manifest files: JSON lines (``.jsonl``, ``.json``, ``.ndjson``), CSV and Parquet, optionally compressed
(``.gz``, ``.bz2``, ``.xz``, ``.zst``; not Parquet).

Rows are streamed one at a time (Parquet by record batches), so a manifest of any size is never held whole. The
audio path is ``manifest.audio_field``; relative paths resolve against the manifest's own folder, on the
manifest's filesystem. Every field other than the id, path, offset, duration, text and language is kept in `extra`.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.base import (
    InputFormat,
    InputLocation,
    ManifestError,
    ManifestRow,
    default_id,
    full_uri,
    pop_span_and_language,
)

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class ManifestFile(InputFormat):
    """One manifest file (format names "jsonl", "csv", "parquet"); a row's `uri` is its audio file."""

    def detect(self, loc: InputLocation, cfg: ManifestConfig) -> str | None:
        return None if loc.is_pattern else SUFFIXES.get(loc.suffix)

    def iter_rows(self, loc: InputLocation, name: str, cfg: ManifestConfig) -> Iterator[ManifestRow]:
        base = full_uri(loc.fs, posixpath.dirname(loc.path))  # the manifest's folder
        raw_rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[name](loc.fs, loc.path, loc.uri)
        for index, (where, raw) in enumerate(raw_rows):
            yield _make_row(index, raw, base, cfg, f"manifest {loc.uri!r} {where}")


def resolve_path(audio_filepath: str, base: str) -> str:
    """Joins a relative path onto the manifest folder `base`; absolute paths and URIs are kept as written."""
    if "://" in audio_filepath or audio_filepath.startswith("/"):
        return audio_filepath
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, audio_filepath))}"
    return os.path.normpath(os.path.join(base, audio_filepath))


def _jsonl_rows(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[tuple[str, dict]]:
    with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? the manifest must hold one JSON object per line)" if line_no == 1 else ""
                raise ManifestError(f"manifest {uri!r} line {line_no}: bad JSON: {e}{hint}") from e
            if not isinstance(raw, dict):
                raise ManifestError(f"manifest {uri!r} line {line_no}: expected a JSON object, got {line.strip()[:80]}")
            yield f"line {line_no}", raw


def _csv_rows(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[tuple[str, dict]]:
    with fs.open(path, "rt", encoding="utf-8", newline="", compression="infer") as f:
        reader = csv.DictReader(f)
        for raw in reader:
            if None in raw:
                raise ManifestError(f"manifest {uri!r} line {reader.line_num}: more cells than header columns")
            # CSV cannot tell an empty cell from a missing value: both become None
            yield f"line {reader.line_num}", {k: (v if v != "" else None) for k, v in raw.items()}


def _parquet_rows(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
            for raw in batch.to_pylist():
                yield f"row {row}", raw
                row += 1


def _make_row(index: int, raw: dict[str, Any], base: str, cfg: ManifestConfig, where: str) -> ManifestRow:
    raw = dict(raw)
    audio = raw.pop(cfg.audio_field, None)
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(f"{where}: missing or empty {cfg.audio_field!r} (got {audio!r})")
    offset, duration, language = pop_span_and_language(raw, where)
    row_id = raw.pop(cfg.id_field, None)
    if row_id is not None and str(row_id).strip() == "":
        raise ManifestError(f"{where}: empty {cfg.id_field!r}")
    offset = offset or 0.0
    reference = raw.pop(cfg.text_field, None)
    return ManifestRow(
        index=index,
        id=str(row_id) if row_id is not None else default_id(audio, offset),
        audio_filepath=audio,
        uri=resolve_path(audio, base),
        offset=offset,
        duration=duration,
        reference=None if reference is None else str(reference),
        language=None if language is None else str(language),
        extra=raw,
    )
