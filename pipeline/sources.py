"""Samples stored inside containers: WebDataset tar shards and Parquet files with embedded audio.

Large corpora ship as tar shards (WebDataset) or as Parquet files with the audio bytes in a column (Hugging Face
``datasets``), not as millions of loose files. Both are read in two passes, each touching a container once:

- the plan pass (driver, :func:`iter_tar_samples` / :func:`iter_parquet_samples`) streams each tar once (python
  ``tarfile`` in stream mode over an fsspec file with a large read-ahead buffer: a few big ranged GETs, never a GET
  per member, nothing extracted to disk) and notes every sample's key, its ``.json``/``.txt`` fields and where its
  audio member's header starts; a Parquet file is read by row groups without its audio column;
- the feature pass (CPU actors, :func:`iter_sample_audio`) gets a shard's records, opens each container once and
  reads the audio of exactly those samples in container order: a tar from the shard's first member onwards (a shard
  is a consecutive run of one tar's samples, so each byte of its span is fetched once), a Parquet file one row group
  at a time with only the audio column.

A record names its audio with :class:`SampleRef`, carried as the record's ``uri``
(``<container uri>#tar:<header offset>:<member>`` or ``<container uri>#parquet:<row>:<column>``); a sample found
broken at plan time carries its error instead (``<container uri>#error:<cause: detail>``) and becomes an error row.
Plain URIs (loose files) are left to ``whisper_batch.pipeline.audio.open_stream``.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

import fsspec

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIXES = (".parquet",)
# bytes fetched per read from object storage: a tar is streamed in ranged GETs of this size (plus the tail)
READ_BLOCK = 16 * 2**20
# the column taken as embedded audio when `manifest.audio_field` does not name a binary column
DEFAULT_AUDIO_COLUMN = "audio"
# Parquet rows read per batch in the plan pass (the audio column is never read there)
PARQUET_BATCH_ROWS = 4096

_REF = re.compile(r"^(?P<container>.*)#(?P<kind>tar|parquet|error):(?P<rest>[^#]*)$")


class SourceError(ValueError):
    """An input container that cannot be read as a whole (names the file and the key or column)."""


# --- how a record names its audio ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    """Where a sample's audio lives: a tar member, a Parquet cell, or an error found at plan time."""

    kind: str  # "tar", "parquet" or "error"
    container: str  # URI of the tar / Parquet file
    # tar: byte offset of the member's header in the (uncompressed) stream; parquet: row number in the file
    position: int = 0
    # tar: member name; parquet: audio column; error: "cause: detail"
    name: str = ""

    def to_uri(self) -> str:
        if self.kind == "error":
            return f"{self.container}#error:{quote(self.name, safe=' :')}"
        return f"{self.container}#{self.kind}:{self.position}:{quote(self.name, safe='')}"

    @property
    def display(self) -> str:
        """The sample as users see it (the output's ``audio_filepath``): fsspec's chained form for a tar member."""
        if self.kind == "tar":
            return f"tar://{self.name}::{self.container}"
        return f"{self.container}#row={self.position}" if self.kind == "parquet" else self.container


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


# --- which inputs are containers ---------------------------------------------------------------------------------


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


def container_kind(path: str) -> str | None:
    """"tar" or "parquet" from a path's or pattern's suffix, else None."""
    name = path.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def has_braces(path: str) -> bool:
    return re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path) is not None


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


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fs path as an absolute local path or a URI with its protocol."""
    from whisper_batch.pipeline.layout import is_local_fs

    import os

    return os.path.abspath(path) if is_local_fs(fs) else fs.unstrip_protocol(path)


def open_container(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    """Open a container for streaming: one read-ahead buffer of READ_BLOCK, so reads become few large ranged GETs."""
    from whisper_batch.pipeline.layout import is_local_fs

    if is_local_fs(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


# --- tar shards ------------------------------------------------------------------------------------------------


@dataclass
class TarSample:
    """One WebDataset sample: the members sharing a key."""

    key: str
    members: list[str] = field(default_factory=list)
    audio: list[tuple[str, int]] = field(default_factory=list)  # (member name, header offset)
    fields: dict[str, Any] = field(default_factory=dict)  # from the .json member
    text: str | None = None  # from the .txt member
    error: str | None = None  # "cause: detail" when the sample is unusable

    def check(self, container: str) -> None:
        """Set ``error`` for a sample without exactly one audio member."""
        if self.error is None and not self.audio:
            self.error = f"not found: sample {self.key!r} in {container} has no audio member ({', '.join(self.members)})"
        elif self.error is None and len(self.audio) > 1:
            names = ", ".join(n for n, _ in self.audio)
            self.error = f"decode failed: sample {self.key!r} in {container} has {len(self.audio)} audio members ({names})"


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name: (folder + basename up to its first dot, the rest); None without a dot."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return posixpath.join(folder, stem) if folder else stem, ext


def is_audio_member(ext: str, audio_extensions: Iterable[str]) -> bool:
    return ("." + ext.rsplit(".", 1)[-1].lower()) in {e.lower() for e in audio_extensions}


_TRUNCATED = (tarfile.TarError, EOFError, zlib.error, OSError)


def iter_tar_samples(fileobj: BinaryIO, container: str, audio_extensions: Iterable[str]) -> Iterator[TarSample]:
    """Stream a tar once and yield its samples in order (members grouped by consecutive key, as WebDataset does).

    Audio members are read through (not kept): their data is checked for truncation and their header offset kept.
    A tar cut short makes the sample being read an error sample, and ends the tar; members before it are kept.
    """
    current: TarSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                split = split_key(m.name)
                if split is None:
                    continue
                key, ext = split
                if current is None or key != current.key:
                    if current is not None:
                        current.check(container)
                        yield current
                    current = TarSample(key)
                current.members.append(m.name)
                f = tar.extractfile(m)
                if is_audio_member(ext, audio_extensions):
                    current.audio.append((m.name, m.offset))
                    while f.read(1 << 20):  # read through: tarfile raises if the data is cut short
                        pass
                elif ext.lower() == "json":
                    current.fields.update(_json_fields(f.read(), m.name, container))
                elif ext.lower() == "txt":
                    current.text = f.read().decode("utf-8", errors="replace").strip()
    except _TRUNCATED as e:
        where = f"in sample {current.key!r}" if current is not None else "at its start"
        logger.warning("tar %s is truncated or corrupt %s: %s", container, where, e)
        if current is None:
            raise SourceError(f"cannot read tar {container}: {type(e).__name__}: {e}") from e
        current.error = f"decode failed: tar {container} is truncated or corrupt in sample {current.key!r}: {e}"
    if current is not None:
        current.check(container)
        yield current


def _json_fields(data: bytes, member: str, container: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"tar {container}: member {member!r} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise SourceError(f"tar {container}: member {member!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_tar_members(
    fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str, compressed: bool
) -> Iterator[tuple[int, str, bytes | Exception]]:
    """The data of the members at ``wanted`` (header offset, name), ascending, streamed in one forward pass.

    An uncompressed tar is read from the first wanted header on (a shard in the middle of a tar costs its own span
    only); a compressed one from its start. Yields ``(offset, name, data)``, or an exception in place of data for a
    member that is missing (the tar changed since the plan) or cut short.
    """
    from whisper_batch.pipeline.audio import AudioError

    wanted = sorted(wanted)
    start = 0 if compressed else wanted[0][0]
    fileobj.seek(start)
    todo = iter(wanted)
    nxt = next(todo, None)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*" if compressed else "r|") as tar:
            for m in tar:
                offset = start + m.offset
                while nxt is not None and nxt[0] < offset:  # passed without a match
                    yield nxt[0], nxt[1], AudioError("not found", f"{nxt[1]} is not at byte {nxt[0]} of {container}")
                    nxt = next(todo, None)
                if nxt is None:
                    return
                if offset == nxt[0]:
                    if m.name != nxt[1]:
                        err = AudioError("not found", f"{container} has {m.name!r} at byte {offset}, not {nxt[1]!r}")
                        yield nxt[0], nxt[1], err
                    else:
                        yield nxt[0], nxt[1], tar.extractfile(m).read()
                    nxt = next(todo, None)
    except _TRUNCATED as e:
        if nxt is not None:
            yield nxt[0], nxt[1], AudioError("decode failed", f"tar {container} is truncated or corrupt: {e}")
            nxt = next(todo, None)
    while nxt is not None:
        yield nxt[0], nxt[1], AudioError("not found", f"{nxt[1]} is missing from {container} (truncated?)")
        nxt = next(todo, None)


# --- Parquet with embedded audio ---------------------------------------------------------------------------------


def audio_column(schema, audio_field: str, container: str) -> str | None:
    """The column holding embedded audio, or None when the file is a manifest of paths.

    ``audio_field`` is taken when it holds bytes (binary, or a struct with ``bytes``); otherwise a column named
    ``audio`` is. A candidate of any other type is an error naming the column and its type.
    """
    import pyarrow as pa

    names = schema.names
    if audio_field in names:
        kind = _audio_type(schema.field(audio_field).type)
        if kind is not None:
            return audio_field
        if pa.types.is_string(schema.field(audio_field).type) or pa.types.is_large_string(schema.field(audio_field).type):
            return None  # a manifest: the column holds paths
        raise SourceError(_wrong_type(audio_field, schema.field(audio_field).type, container))
    if DEFAULT_AUDIO_COLUMN in names:
        if _audio_type(schema.field(DEFAULT_AUDIO_COLUMN).type) is None:
            raise SourceError(_wrong_type(DEFAULT_AUDIO_COLUMN, schema.field(DEFAULT_AUDIO_COLUMN).type, container))
        return DEFAULT_AUDIO_COLUMN
    return None


def _wrong_type(column: str, type_, container: str) -> str:
    return (
        f"Parquet file {container}: audio column {column!r} has type {type_}; expected binary or a struct with a "
        f"'bytes' binary field (and optionally 'path'), as Hugging Face datasets writes it"
    )


def _audio_type(type_) -> str | None:
    """"binary" or "struct" for a column that can hold embedded audio, else None."""
    import pyarrow as pa

    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return "binary"
    if pa.types.is_struct(type_):
        idx = type_.get_field_index("bytes")
        if idx >= 0 and _audio_type(type_.field(idx).type) == "binary":
            return "struct"
    return None


def iter_parquet_samples(fileobj: BinaryIO, column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row number in the file, the row without its audio column)``, by record batches; the audio column is
    never read here."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fileobj)
    others = [n for n in pf.schema_arrow.names if n != column]
    row = 0
    if not others:  # the audio column alone: rows are only counted
        for g in range(pf.metadata.num_row_groups):
            for _ in range(pf.metadata.row_group(g).num_rows):
                yield row, {}
                row += 1
        return
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=others):
        for raw in batch.to_pylist():
            yield row, raw
            row += 1


def read_parquet_cells(fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str) -> Iterator[tuple[int, str, bytes | Exception]]:
    """The audio bytes of rows ``wanted`` (row, column), ascending: one row group at a time, the audio column only."""
    import bisect

    import pyarrow.parquet as pq

    from whisper_batch.pipeline.audio import AudioError

    pf = pq.ParquetFile(fileobj)
    starts = list(itertools.accumulate((pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)), initial=0))
    by_group: dict[tuple[int, str], list[int]] = {}
    for row, column in sorted(wanted):
        g = bisect.bisect_right(starts, row) - 1
        by_group.setdefault((g, column), []).append(row)
    for (g, column), rows in sorted(by_group.items()):
        if not 0 <= g < pf.metadata.num_row_groups:
            for row in rows:
                yield row, column, AudioError("not found", f"row {row} is not in {container}")
            continue
        values = pf.read_row_group(g, columns=[column]).column(0)
        for row in rows:
            if row - starts[g] >= len(values):
                yield row, column, AudioError("not found", f"row {row} is not in {container}")
                continue
            value = values[row - starts[g]].as_py()
            if isinstance(value, dict):
                value = value.get("bytes")
            if not value:
                yield row, column, AudioError("empty", f"row {row} of {container} has no audio bytes in {column!r}")
            else:
                yield row, column, value
        del values


# --- the feature pass --------------------------------------------------------------------------------------------


def iter_sample_audio(
    rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], bytes | Exception | None]]:
    """Pair each record with its audio: bytes read from its container, an exception naming why there are none, or
    None for a loose file (the caller opens ``row["uri"]`` itself).

    Each container named by the rows is opened once and read forward once; a container's rows come out in its own
    order (tar offset, Parquet row), containers in order of first appearance. One sample's bytes are held at a time.
    """
    from whisper_batch.pipeline.audio import AudioError

    groups: dict[tuple[str, str], list[tuple[SampleRef, dict[str, Any]]]] = {}
    for row in rows:
        ref = parse_ref(str(row.get("uri") or ""))
        if ref is None:
            yield row, None
        elif ref.kind == "error":
            cause, _, detail = ref.name.partition(": ")
            yield row, AudioError(cause if cause in AudioError.CAUSES else "decode failed", detail or ref.name)
        else:
            groups.setdefault((ref.kind, ref.container), []).append((ref, row))
    for (kind, container), members in groups.items():
        by_pos: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for ref, row in members:
            by_pos.setdefault((ref.position, ref.name), []).append(row)
        try:
            fs, path = fsspec.core.url_to_fs(container, **(storage_options or {}))
            with open_container(fs, path) as f:
                if kind == "tar":
                    items = read_tar_members(f, list(by_pos), container, compressed=not container.lower().endswith(".tar"))
                else:
                    items = read_parquet_cells(f, list(by_pos), container)
                for position, name, data in items:
                    for row in by_pos.pop((position, name)):
                        yield row, data
        except FileNotFoundError as e:
            failure: Exception = AudioError("not found", f"{container} ({e})")
        except Exception as e:  # noqa: BLE001 - a broken container is error rows, never a failed task
            logger.exception("reading %s failed", container)
            failure = AudioError("decode failed", f"reading {container}: {type(e).__name__}: {e}")
        else:
            continue
        for rows_left in by_pos.values():
            for row in rows_left:
                yield row, failure


def audio_source(data: bytes | Exception | None) -> io.BytesIO | None:
    """What ``load_features`` reads for a sample's audio: bytes as a file; an exception is raised."""
    if isinstance(data, Exception):
        raise data
    return None if data is None else io.BytesIO(data)
