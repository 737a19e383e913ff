"""Streaming manifest readers: JSON lines, CSV, Parquet, a folder / glob of audio files, or containers of samples
(WebDataset tar shards, Parquet files with embedded audio: see ``whisper_batch.pipeline.sources``).

Rows are yielded one at a time (Parquet by record batches), so a manifest of any size is never held whole. Each row
becomes a `ManifestRow` with its row number, id, the audio path as written and as resolved (relative paths resolve
against the manifest's own folder, on the manifest's filesystem), and every other field kept in `extra`.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import pickle
import posixpath
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.layout import is_local_fs
from whisper_batch.pipeline.sources import (
    SampleRef,
    SourceError,
    audio_column,
    container_kind,
    container_paths,
    full_uri,
    has_braces,
    iter_parquet_samples,
    iter_tar_samples,
    open_container,
)


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_LANGUAGE_FIELDS = ("language", "lang")
# inputs whose samples live inside container files: plan shards follow the containers
CONTAINER_FORMATS = ("tar", "parquet-audio")


class ManifestError(ValueError):
    """The manifest cannot be read; the message names the manifest and the line/row."""


@dataclass(frozen=True)
class ManifestRow:
    # row number in the manifest, from 0
    index: int
    id: str
    # the path as written in the manifest
    audio_filepath: str
    # the path resolved against the manifest's folder: absolute local path or URI
    uri: str
    # seconds into the file where this row's audio starts
    offset: float = 0.0
    # seconds of audio from `offset`; None reads to the end
    duration: float | None = None
    # reference transcript (manifest `text`)
    reference: str | None = None
    language: str | None = None
    # every other manifest field, carried through to the output
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self, shard_id: int) -> dict[str, Any]:
        """Flat dict of plain types for Ray Data (`extra` as the JSON string `extra_json`)."""
        return {
            "shard_id": shard_id,
            "row_index": self.index,
            "id": self.id,
            "audio_filepath": self.audio_filepath,
            "uri": self.uri,
            "offset": self.offset,
            "duration": self.duration,
            "reference": self.reference,
            "language": self.language,
            "extra_json": json.dumps(self.extra, ensure_ascii=False, default=str),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ManifestRow:
        duration = record.get("duration")
        return cls(
            index=int(record["row_index"]),
            id=str(record["id"]),
            audio_filepath=str(record["audio_filepath"]),
            uri=str(record["uri"]),
            offset=float(record.get("offset") or 0.0),
            duration=None if duration is None or duration != duration else float(duration),  # NaN from pandas
            reference=record.get("reference"),
            language=record.get("language"),
            extra=json.loads(record.get("extra_json") or "{}"),
        )


def default_id(audio_filepath: str, offset: float) -> str:
    """Readable stable id: file stem + "-" + 8 hex of a hash of the path (as written) and offset."""
    stem = posixpath.splitext(posixpath.basename(audio_filepath.rstrip("/")))[0] or "audio"
    digest = hashlib.sha256(f"{audio_filepath}\0{float(offset)!r}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def manifest_format(
    uri: str,
    fs: fsspec.AbstractFileSystem,
    path: str,
    audio_extensions: tuple[str, ...],
    audio_field: str = ManifestConfig.audio_field,
) -> str:
    """One of "jsonl", "csv", "parquet", "audio-glob", "audio-folder", "audio-file", "tar" (tar shards: one file, a
    glob or brace pattern) or "parquet-audio" (Parquet files with the audio bytes in a column)."""
    kind = container_kind(path)
    pattern = fsspec.core.has_magic(path) or has_braces(path)
    if kind == "tar":
        return "tar"
    if kind == "parquet" and pattern:
        return "parquet-audio"
    if pattern:
        return "audio-glob"
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix) and not name.endswith(".parquet" + suffix):
            name = name[: -len(suffix)]
    ext = posixpath.splitext(name)[1]
    if ext == ".parquet" and name == path.lower():
        if not fs.exists(path):
            raise ManifestError(f"input {uri!r} does not exist")
        return "parquet-audio" if _parquet_audio_column(fs, path, uri, audio_field) else "parquet"
    if ext in FORMATS:
        return FORMATS[ext]
    if ext in audio_extensions:
        return "audio-file"
    if fs.isdir(path):
        return "audio-folder"
    if not fs.exists(path):
        raise ManifestError(f"input {uri!r} does not exist")
    raise ManifestError(
        f"cannot tell the format of input {uri!r}: expected a manifest ending in .jsonl/.json, .csv or .parquet, "
        f"a folder of audio files, a glob such as data/*.flac, or an audio file ({', '.join(audio_extensions)})"
    )


def read_manifest(
    uri: str, storage_options: dict[str, Any] | None = None, cfg: ManifestConfig | None = None
) -> Iterator[ManifestRow]:
    """Streams the rows of the manifest (or audio folder/glob) at `uri` in order."""
    cfg = cfg or ManifestConfig()
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fmt = manifest_format(uri, fs, path, cfg.audio_extensions, cfg.audio_field)
    if fmt in CONTAINER_FORMATS:
        yield from _spooled_rows(uri, fs, path, fmt, cfg, storage_options)
        return
    if fmt.startswith("audio-"):
        yield from _audio_rows(uri, fs, path, fmt, cfg)
        return
    base = _parent_uri(fs, path)
    raw_rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](fs, path, uri)
    for index, (where, raw) in enumerate(raw_rows):
        yield _make_row(index, raw, base, cfg, f"manifest {uri!r} {where}")


def _parent_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The manifest's folder as an absolute local path or a URI."""
    parent = posixpath.dirname(path)
    return os.path.abspath(parent) if is_local_fs(fs) else fs.unstrip_protocol(parent)


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


def _pop_span_and_language(raw: dict[str, Any], where: str) -> tuple[float | None, float | None, Any]:
    """Takes `offset`, `duration` and the language out of ``raw`` (checked: offset >= 0, duration > 0)."""
    offset = _number(raw.pop("offset", None), "offset", where)
    if offset is not None and offset < 0:
        raise ManifestError(f"{where}: 'offset' must be >= 0, got {offset}")
    duration = _number(raw.pop("duration", None), "duration", where)
    if duration is not None and duration <= 0:
        raise ManifestError(f"{where}: 'duration' must be > 0, got {duration}")
    language = None
    for name in _LANGUAGE_FIELDS:
        language = language or raw.pop(name, None)
    return offset, duration, language


def _make_row(index: int, raw: dict[str, Any], base: str, cfg: ManifestConfig, where: str) -> ManifestRow:
    raw = dict(raw)
    audio = raw.pop(cfg.audio_field, None)
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(f"{where}: missing or empty {cfg.audio_field!r} (got {audio!r})")
    offset, duration, language = _pop_span_and_language(raw, where)
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


def _number(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {name!r} must be a number of seconds, got {value!r}") from None


def _audio_rows(uri: str, fs: fsspec.AbstractFileSystem, path: str, fmt: str, cfg: ManifestConfig) -> Iterator[ManifestRow]:
    """Rows for a folder (recursive), a glob or a single audio file, sorted for determinism."""
    if fmt == "audio-glob":
        paths = fs.glob(path)
    elif fmt == "audio-folder":
        paths = fs.find(path)
    else:
        if not fs.exists(path):
            raise ManifestError(f"input {uri!r} does not exist")
        paths = [path]
    extensions = tuple(e.lower() for e in cfg.audio_extensions)
    audio = sorted(p for p in paths if p.lower().endswith(extensions))
    local = is_local_fs(fs)
    for index, p in enumerate(audio):
        full = os.path.abspath(p) if local else fs.unstrip_protocol(p)
        yield ManifestRow(index=index, id=default_id(full, 0.0), audio_filepath=full, uri=full)


# --- containers of samples (whisper_batch.pipeline.sources) ------------------------------------------------------------------


def _parquet_audio_column(fs: fsspec.AbstractFileSystem, path: str, uri: str, audio_field: str) -> str | None:
    """The embedded-audio column of a Parquet file (reads its footer only), None for a manifest of paths."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
    return audio_column(schema, audio_field, uri)


# (input, storage options, config) -> a local file of the rows a complete pass over the containers read (this process)
_SPOOLS: dict[tuple, str] = {}
_SPOOLS_LOCK = threading.Lock()


def _spooled_rows(uri, fs, path, fmt, cfg: ManifestConfig, storage_options) -> Iterator[ManifestRow]:
    """The containers' rows. A complete pass also writes them (metadata, never audio) to a local spool that the next
    pass over the same input replays once and deletes: the plan pass streams each tar and the staging pass that
    follows it reads the spool, so the driver reads each tar once per run; the pass after that reads the tars again.
    A pass stopped early leaves no spool."""
    key = (uri, fmt, json.dumps(storage_options or {}, sort_keys=True, default=str), cfg)
    with _SPOOLS_LOCK:
        spool = _SPOOLS.pop(key, None)
    if spool is not None:
        try:
            with open(spool, "rb") as f:
                while True:
                    try:
                        row = pickle.load(f)
                    except EOFError:
                        return
                    yield row
        finally:
            _remove(spool)
    fd, tmp = tempfile.mkstemp(prefix="whisper-batch-rows-", suffix=".pickle")
    complete = False
    try:
        with os.fdopen(fd, "wb") as out:
            for row in _container_rows(uri, fs, path, fmt, cfg):
                pickle.dump(row, out, protocol=pickle.HIGHEST_PROTOCOL)
                yield row
        complete = True
    finally:
        if complete:
            with _SPOOLS_LOCK:
                _SPOOLS[key] = tmp
            atexit.register(_remove, tmp)
        else:
            _remove(tmp)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _container_rows(
    uri: str, fs: fsspec.AbstractFileSystem, path: str, fmt: str, cfg: ManifestConfig
) -> Iterator[ManifestRow]:
    """Rows of every sample in the input's containers, container after container (sorted), each read once."""
    index = 0
    for p in container_paths(uri, fs, path):
        container = full_uri(fs, p)
        try:
            with open_container(fs, p) as f:
                if fmt == "tar":
                    rows = _tar_rows(f, container, cfg, index)
                else:
                    import pyarrow.parquet as pq

                    column = audio_column(pq.ParquetFile(f).schema_arrow, cfg.audio_field, container)
                    if column is None:
                        raise ManifestError(
                            f"Parquet file {container} has no embedded audio: no binary column "
                            f"{cfg.audio_field!r} or 'audio' (set manifest.audio_field)"
                        )
                    f.seek(0)
                    rows = _parquet_audio_rows(f, container, column, cfg, index)
                for row in rows:
                    yield row
                    index += 1
        except FileNotFoundError as e:
            raise ManifestError(f"input {uri!r}: {container} does not exist") from e
        except SourceError as e:
            raise ManifestError(str(e)) from e


def _fields_row(index: int, row_id: str, raw: dict[str, Any], ref: SampleRef, display: str, reference: Any,
                cfg: ManifestConfig, where: str) -> ManifestRow:
    """A container sample's row: offset/duration/language honoured, the reference from `text`, the rest carried."""
    raw = dict(raw)
    offset, duration, language = _pop_span_and_language(raw, where)
    text = raw.pop(cfg.text_field, None)
    reference = text if text is not None else reference
    return ManifestRow(
        index=index,
        id=row_id,
        audio_filepath=display,
        uri=ref.to_uri(),
        offset=offset or 0.0,
        duration=duration,
        reference=None if reference is None else str(reference),
        language=None if language is None else str(language),
        extra=raw,
    )


def _tar_rows(f, container: str, cfg: ManifestConfig, start: int) -> Iterator[ManifestRow]:
    for i, sample in enumerate(iter_tar_samples(f, container, cfg.audio_extensions)):
        if sample.error is None:
            ref = SampleRef("tar", container, sample.audio[0][1], sample.audio[0][0])
            display = ref.display
        else:
            ref = SampleRef("error", container, 0, sample.error)
            display = f"tar://{sample.audio[0][0] if sample.audio else sample.key}::{container}"
        where = f"tar {container} sample {sample.key!r}"
        yield _fields_row(start + i, sample.key, sample.fields, ref, display, sample.text, cfg, where)


def _parquet_audio_rows(f, container: str, column: str, cfg: ManifestConfig, start: int) -> Iterator[ManifestRow]:
    stem = posixpath.splitext(posixpath.basename(container))[0]
    for row, raw in iter_parquet_samples(f, column):
        row_id = raw.pop(cfg.id_field, None)
        where = f"Parquet file {container} row {row}"
        if row_id is not None and str(row_id).strip() == "":
            raise ManifestError(f"{where}: empty {cfg.id_field!r}")
        ref = SampleRef("parquet", container, row, column)
        row_id = str(row_id) if row_id is not None else f"{stem}-{row:06d}"
        yield _fields_row(start + row, row_id, raw, ref, ref.display, None, cfg, where)
