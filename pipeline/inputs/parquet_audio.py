"""Parquet files with the audio inside (Hugging Face ``datasets`` layout): one file or a glob.

The audio column is ``manifest.audio_field`` when it holds bytes, else ``audio``: plain binary, or a struct with a
``bytes`` field (and optionally ``path``). ``id`` is the id (default ``<file stem>-<row>``), ``text`` the reference,
every other column is carried. A Parquet file whose ``audio_field`` holds strings is a manifest of paths
(``whisper_batch.pipeline.inputs.manifest_file``).

The plan pass (:func:`iter_parquet_samples`) reads a file by record batches without its audio column; the feature
pass (:func:`read_parquet_cells`) one row group at a time, the audio column only.
"""

from __future__ import annotations

import bisect
import itertools
import posixpath
from collections.abc import Iterator
from typing import Any, BinaryIO

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.base import InputLocation, ManifestError, ManifestRow
from whisper_batch.pipeline.inputs.containers import ContainerFormat, SampleRef, SourceError, sample_row

# the column taken as embedded audio when `manifest.audio_field` does not name a binary column
DEFAULT_AUDIO_COLUMN = "audio"
# Parquet rows read per batch in the plan pass (the audio column is never read there)
PARQUET_BATCH_ROWS = 4096


class ParquetAudio(ContainerFormat):
    """Parquet files with embedded audio (format name "parquet-audio"); a record's audio is
    ``<file uri>#parquet:<row>:<column>``."""

    ref_kind = "parquet"

    def detect(self, loc: InputLocation, cfg: ManifestConfig) -> str | None:
        """A glob or brace pattern of .parquet files; one .parquet file whose footer shows an audio column."""
        if not loc.path.lower().endswith(".parquet"):
            return None
        if loc.is_pattern:
            return "parquet-audio"
        if not loc.fs.exists(loc.path):
            raise loc.missing()
        import pyarrow.parquet as pq

        with loc.fs.open(loc.path, "rb") as f:  # the footer only
            schema = pq.ParquetFile(f).schema_arrow
        return "parquet-audio" if audio_column(schema, cfg.audio_field, loc.uri) else None

    def rows_in(self, fileobj: BinaryIO, container: str, cfg: ManifestConfig, start: int) -> Iterator[ManifestRow]:
        import pyarrow.parquet as pq

        column = audio_column(pq.ParquetFile(fileobj).schema_arrow, cfg.audio_field, container)
        if column is None:
            raise ManifestError(
                f"Parquet file {container} has no embedded audio: no binary column "
                f"{cfg.audio_field!r} or 'audio' (set manifest.audio_field)"
            )
        fileobj.seek(0)
        stem = posixpath.splitext(posixpath.basename(container))[0]
        for row, raw in iter_parquet_samples(fileobj, column):
            row_id = raw.pop(cfg.id_field, None)
            where = f"Parquet file {container} row {row}"
            if row_id is not None and str(row_id).strip() == "":
                raise ManifestError(f"{where}: empty {cfg.id_field!r}")
            ref = SampleRef("parquet", container, row, column)
            row_id = str(row_id) if row_id is not None else f"{stem}-{row:06d}"
            yield sample_row(start + row, row_id, raw, ref, f"{container}#row={row}", None, cfg, where)

    def read_audio(
        self, fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str
    ) -> Iterator[tuple[int, str, bytes | Exception]]:
        return read_parquet_cells(fileobj, wanted, container)


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
        if (pa.types.is_string(schema.field(audio_field).type)
                or pa.types.is_large_string(schema.field(audio_field).type)):
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


def read_parquet_cells(
    fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str
) -> Iterator[tuple[int, str, bytes | Exception]]:
    """The audio bytes of rows ``wanted`` (row, column), ascending: one row group at a time, the audio column only."""
    import pyarrow.parquet as pq

    from whisper_batch.pipeline.audio import AudioError

    pf = pq.ParquetFile(fileobj)
    n_groups = pf.metadata.num_row_groups
    starts = list(itertools.accumulate((pf.metadata.row_group(g).num_rows for g in range(n_groups)), initial=0))
    by_group: dict[tuple[int, str], list[int]] = {}
    for row, column in sorted(wanted):
        g = bisect.bisect_right(starts, row) - 1
        by_group.setdefault((g, column), []).append(row)
    for (g, column), rows in sorted(by_group.items()):
        if not 0 <= g < n_groups:
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
