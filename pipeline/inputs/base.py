"""What every input format shares: the row it yields (`ManifestRow`), where an input is (`InputLocation`), the
interface a format implements (`InputFormat`), and the field rules common to manifests and containers."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.layout import is_local_fs

LANGUAGE_FIELDS = ("language", "lang")
# compressed manifests (.jsonl.gz, ...): the suffix that names the format is the one before these
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


class ManifestError(ValueError):
    """The manifest cannot be read; the message names the manifest and the line/row."""


@dataclass(frozen=True)
class ManifestRow:
    # row number in the manifest, from 0
    index: int
    id: str
    # the path as written in the manifest
    audio_filepath: str
    # the path resolved against the manifest's folder: absolute local path or URI; for a sample inside a
    # container, its `SampleRef` as a URI (``<container uri>#<kind>:...``)
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


def default_id(audio_filepath: str, offset: float) -> str:
    """Readable stable id: file stem + "-" + 8 hex of a hash of the path (as written) and offset."""
    stem = posixpath.splitext(posixpath.basename(audio_filepath.rstrip("/")))[0] or "audio"
    digest = hashlib.sha256(f"{audio_filepath}\0{float(offset)!r}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def pop_span_and_language(raw: dict[str, Any], where: str) -> tuple[float | None, float | None, Any]:
    """Takes `offset`, `duration` and the language out of ``raw`` (checked: offset >= 0, duration > 0)."""
    offset = _number(raw.pop("offset", None), "offset", where)
    if offset is not None and offset < 0:
        raise ManifestError(f"{where}: 'offset' must be >= 0, got {offset}")
    duration = _number(raw.pop("duration", None), "duration", where)
    if duration is not None and duration <= 0:
        raise ManifestError(f"{where}: 'duration' must be > 0, got {duration}")
    language = None
    for name in LANGUAGE_FIELDS:
        language = language or raw.pop(name, None)
    return offset, duration, language


def _number(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {name!r} must be a number of seconds, got {value!r}") from None


# --- where an input is -------------------------------------------------------------------------------------------


def has_braces(path: str) -> bool:
    """Whether ``path`` holds WebDataset brace notation (``{000..009}`` or ``{a,b}``)."""
    return re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path) is not None


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fs path as an absolute local path or a URI with its protocol."""
    return os.path.abspath(path) if is_local_fs(fs) else fs.unstrip_protocol(path)


@dataclass(frozen=True)
class InputLocation:
    """An input as given (``uri``) and where it is: its fsspec filesystem and the path on it."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str
    storage_options: dict[str, Any] | None = None

    @classmethod
    def of(cls, uri: str, storage_options: dict[str, Any] | None = None) -> InputLocation:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        return cls(uri, fs, path, storage_options)

    @property
    def is_pattern(self) -> bool:
        """A glob or a brace pattern, naming several files."""
        return fsspec.core.has_magic(self.path) or has_braces(self.path)

    @property
    def suffix(self) -> str:
        """The path's extension, lower case, under a compression suffix (``m.jsonl.gz`` -> ``.jsonl``)."""
        name = self.path.lower()
        for suffix in COMPRESSION_SUFFIXES:
            if name.endswith(suffix) and not name.endswith(".parquet" + suffix):
                name = name[: -len(suffix)]
        return posixpath.splitext(name)[1]

    def missing(self) -> ManifestError:
        return ManifestError(f"input {self.uri!r} does not exist")


# --- the interface -----------------------------------------------------------------------------------------------


class InputFormat(ABC):
    """One kind of input: which inputs it reads, the rows it yields, how plan shards are cut, where audio lives.

    The formats are asked in the order of ``whisper_batch.pipeline.inputs.INPUT_FORMATS``; the first whose
    :meth:`detect` names an input reads it.
    """

    # plan shards. False: runs of `shard_size` rows in row order. True: they follow the input's files (a shard
    # never spans two files, a file of more than `shard_size` rows is split into consecutive shards), see `file_of`
    shards_follow_files: bool = False
    # the kind of `SampleRef` (``<container uri>#<ref_kind>:<position>:<name>``) that a record's `uri` holds for
    # audio of this format, read by `read_audio`; None: a row's `uri` is an audio file, opened as it is
    ref_kind: str | None = None

    @abstractmethod
    def detect(self, loc: InputLocation, cfg: ManifestConfig) -> str | None:
        """This format's name for the input (the plan's ``manifest_format``), or None to leave it to the formats
        after this one; raises ManifestError for an input this format claims but cannot read (missing, say)."""

    @abstractmethod
    def iter_rows(self, loc: InputLocation, name: str, cfg: ManifestConfig) -> Iterator[ManifestRow]:
        """The input's rows in order, indexed from 0, streamed (never the whole input in memory)."""

    def file_of(self, row: ManifestRow) -> str:
        """The file that holds ``row``'s audio, for formats whose shards follow their files."""
        raise NotImplementedError(f"{type(self).__name__}: plan shards do not follow files")

    def read_audio(
        self, fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str
    ) -> Iterator[tuple[int, str, bytes | Exception]]:
        """The audio of the samples ``wanted`` (position, name of their `SampleRef`) in one open container:
        ``(position, name, bytes)``, or an exception in place of the bytes naming why there are none."""
        raise NotImplementedError(f"{type(self).__name__}: rows name audio files, not samples in containers")
