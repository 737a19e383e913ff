"""The feature pass's side of the inputs: each record paired with its audio.

A record whose ``uri`` holds a ``SampleRef`` (``whisper_batch.pipeline.inputs.containers``) has its audio inside a
container file: the records' containers are each opened once and read forward once by their format's
``read_audio`` (a tar from the shard's first member onwards, a Parquet file one row group at a time with only the
audio column). A sample found broken at plan time carries its error, which is raised for that row alone. Plain
URIs (loose files) are left to ``whisper_batch.pipeline.audio.open_stream``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import fsspec

from whisper_batch.pipeline.inputs import format_of_ref
from whisper_batch.pipeline.inputs.base import InputFormat, has_braces
from whisper_batch.pipeline.inputs.containers import SampleRef, open_container, parse_ref

# has_braces: storage.py's preflight imports it from here
__all__ = ["audio_source", "has_braces", "iter_sample_audio"]

logger = logging.getLogger(__name__)


def iter_sample_audio(
    rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], bytes | Exception | None]]:
    """Pair each record with its audio: bytes read from its container, an exception naming why there are none, or
    None for a loose file (the caller opens ``row["uri"]`` itself).

    Each container named by the rows is opened once and read forward once; a container's rows come out in its own
    order (tar offset, Parquet row), containers in order of first appearance. One sample's bytes are held at a time.
    """
    from whisper_batch.pipeline.audio import AudioError

    groups: dict[tuple[InputFormat, str], list[tuple[SampleRef, dict[str, Any]]]] = {}
    for row in rows:
        ref = parse_ref(str(row.get("uri") or ""))
        fmt = None if ref is None or ref.kind == "error" else format_of_ref(ref.kind)
        if ref is not None and ref.kind == "error":
            cause, _, detail = ref.name.partition(": ")
            yield row, AudioError(cause if cause in AudioError.CAUSES else "decode failed", detail or ref.name)
        elif fmt is None:
            yield row, None
        else:
            groups.setdefault((fmt, ref.container), []).append((ref, row))
    for (fmt, container), members in groups.items():
        yield from _read_container(fmt, container, members, storage_options)


def _read_container(
    fmt: InputFormat, container: str, members: list[tuple[SampleRef, dict[str, Any]]], storage_options
) -> Iterator[tuple[dict[str, Any], bytes | Exception]]:
    """The audio of one container's records, read in one pass; a container that cannot be read is error rows."""
    from whisper_batch.pipeline.audio import AudioError

    by_pos: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for ref, row in members:
        by_pos.setdefault((ref.position, ref.name), []).append(row)
    try:
        fs, path = fsspec.core.url_to_fs(container, **(storage_options or {}))
        with open_container(fs, path) as f:
            for position, name, data in fmt.read_audio(f, list(by_pos), container):
                for row in by_pos.pop((position, name)):
                    yield row, data
    except FileNotFoundError as e:
        failure: Exception = AudioError("not found", f"{container} ({e})")
    except Exception as e:  # noqa: BLE001 - a broken container is error rows, never a failed task
        logger.exception("reading %s failed", container)
        failure = AudioError("decode failed", f"reading {container}: {type(e).__name__}: {e}")
    else:
        return
    for rows_left in by_pos.values():
        for row in rows_left:
            yield row, failure


def audio_source(data: bytes | Exception | None) -> io.BytesIO | None:
    """What ``load_features`` reads for a sample's audio: bytes as a file; an exception is raised."""
    if isinstance(data, Exception):
        raise data
    return None if data is None else io.BytesIO(data)
