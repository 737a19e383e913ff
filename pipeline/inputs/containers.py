"""Inputs whose samples live inside container files (WebDataset tars, Parquet files with the audio in a column).

Large corpora ship as containers, not as millions of loose files. They are read in two passes, each touching a
container once: the plan pass (driver, :meth:`ContainerFormat.iter_rows`) streams every container once, noting each
sample's fields and where its audio is; the feature pass (CPU actors, ``whisper_batch.pipeline.sources``) gets a
shard's records, opens each container once and reads the audio of exactly those samples
(:meth:`InputFormat.read_audio`).

A record names its audio with a :class:`SampleRef`, carried as the record's ``uri``
(``<container uri>#tar:<header offset>:<member>`` or ``<container uri>#parquet:<row>:<column>``); a sample found
broken at plan time carries its error instead (``<container uri>#error:<cause: detail>``) and becomes an error row.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
import tempfile
import threading
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

import fsspec

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.base import (
    InputFormat,
    InputLocation,
    ManifestError,
    ManifestRow,
    full_uri,
    has_braces,
    pop_span_and_language,
)
from whisper_batch.pipeline.layout import is_local_fs

# bytes fetched per read from object storage: a tar is streamed in ranged GETs of this size (plus the tail)
READ_BLOCK = 16 * 2**20

_REF = re.compile(r"^(?P<container>.*)#(?P<kind>[a-z][a-z0-9_-]*):(?P<rest>[^#]*)$")


class SourceError(ValueError):
    """An input container that cannot be read as a whole (names the file and the key or column)."""


@dataclass(frozen=True)
class SampleRef:
    """Where a sample's audio lives: a member or cell of a container (``kind`` is its format's ``ref_kind``), or
    an error found at plan time (``kind`` "error")."""

    kind: str
    container: str  # URI of the container file
    # tar: byte offset of the member's header in the (uncompressed) stream; parquet: row number in the file
    position: int = 0
    # tar: member name; parquet: audio column; error: "cause: detail"
    name: str = ""

    def to_uri(self) -> str:
        if self.kind == "error":
            return f"{self.container}#error:{quote(self.name, safe=' :')}"
        return f"{self.container}#{self.kind}:{self.position}:{quote(self.name, safe='')}"


def parse_ref(uri: str) -> SampleRef | None:
    """The :class:`SampleRef` a record's ``uri`` holds, or None for a plain URI (a loose audio file)."""
    m = _REF.match(uri)
    if m is None:
        return None
    kind, rest = m["kind"], m["rest"]
    if kind == "error":
        return SampleRef("error", m["container"], 0, unquote(rest))
    position, sep, name = rest.partition(":")
    if not sep or not position.isdigit():
        return None
    return SampleRef(kind, m["container"], int(position), unquote(name))


# --- which files an input names ----------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """WebDataset brace notation: ``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` lists.

    Ranges keep the zero padding of their first bound; several groups expand as a product, left to right.
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m[1]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng[1]), int(rng[2])
        width = len(rng[1])
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise SourceError(f"cannot expand {{{body}}} in {pattern!r}: expected {{000..999}} or {{a,b}}")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def container_paths(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The container files an input names (one file, a glob or brace pattern), sorted, as fs paths."""
    if has_braces(path):
        paths = []
        for p in expand_braces(path):
            paths.extend(sorted(fs.glob(p)) if fsspec.core.has_magic(p) else [p])
    elif fsspec.core.has_magic(path):
        paths = sorted(fs.glob(path))
    else:
        paths = [path]
    if not paths:
        raise SourceError(f"input {uri!r} matches no file")
    return paths


def open_container(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    """Open a container for streaming: one read-ahead buffer of READ_BLOCK, so reads become few large ranged GETs."""
    if is_local_fs(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


# --- the plan pass -----------------------------------------------------------------------------------------------


class ContainerFormat(InputFormat):
    """A format whose samples live in container files: plan shards follow the files, and a complete pass over the
    input's rows is replayed once from a local spool (see :meth:`iter_rows`)."""

    shards_follow_files = True

    @abstractmethod
    def rows_in(self, fileobj: BinaryIO, container: str, cfg: ManifestConfig, start: int) -> Iterator[ManifestRow]:
        """The rows of the samples in one open container (URI ``container``), indexed from ``start``."""

    def file_of(self, row: ManifestRow) -> str:
        ref = parse_ref(row.uri)
        return ref.container if ref is not None else row.uri

    def iter_rows(self, loc: InputLocation, name: str, cfg: ManifestConfig) -> Iterator[ManifestRow]:
        """The containers' rows. A complete pass also writes them (metadata, never audio) to a local spool that the
        next pass over the same input replays once and deletes: the plan pass streams each container and the
        staging pass that follows it reads the spool, so the driver reads each container once per run; the pass
        after that reads the containers again. A pass stopped early leaves no spool."""
        key = (loc.uri, name, json.dumps(loc.storage_options or {}, sort_keys=True, default=str), cfg)
        with _SPOOLS_LOCK:
            spool = _SPOOLS.pop(key, None)
        if spool is not None:
            yield from _replay(spool)
            return
        fd, tmp = tempfile.mkstemp(prefix="whisper-batch-rows-", suffix=".pickle")
        complete = False
        try:
            with os.fdopen(fd, "wb") as out:
                for row in self._read_containers(loc, cfg):
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

    def _read_containers(self, loc: InputLocation, cfg: ManifestConfig) -> Iterator[ManifestRow]:
        """Rows of every sample in the input's containers, container after container (sorted), each read once."""
        index = 0
        for p in container_paths(loc.uri, loc.fs, loc.path):
            container = full_uri(loc.fs, p)
            try:
                with open_container(loc.fs, p) as f:
                    for row in self.rows_in(f, container, cfg, index):
                        yield row
                        index += 1
            except FileNotFoundError as e:
                raise ManifestError(f"input {loc.uri!r}: {container} does not exist") from e
            except SourceError as e:
                raise ManifestError(str(e)) from e


def sample_row(index: int, row_id: str, raw: dict[str, Any], ref: SampleRef, display: str, reference: Any,
               cfg: ManifestConfig, where: str) -> ManifestRow:
    """A container sample's row: offset/duration/language honoured, the reference from `text`, the rest carried."""
    raw = dict(raw)
    offset, duration, language = pop_span_and_language(raw, where)
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


# (input, format name, storage options, config) -> a local file of the rows a complete pass over the containers
# read (this process)
_SPOOLS: dict[tuple, str] = {}
_SPOOLS_LOCK = threading.Lock()


def _replay(spool: str) -> Iterator[ManifestRow]:
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


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
