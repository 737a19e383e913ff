"""WebDataset tar shards: one ``.tar`` (or ``.tar.gz``, ...), a glob, or brace notation (``shard-{000..009}.tar``).

Members sharing a key (the name up to its first dot) are one sample: the member with an audio extension is the
audio, a ``.json`` member's fields are manifest fields, a ``.txt`` member is the reference; the id is the key.

The plan pass (:func:`iter_tar_samples`) streams each tar once (python ``tarfile`` in stream mode over an fsspec
file with a large read-ahead buffer: a few big ranged GETs, never a GET per member, nothing extracted to disk) and
notes every sample's key, its fields and where its audio member's header starts. The feature pass
(:func:`read_tar_members`) reads a shard's members from the shard's first header onwards: a shard is a consecutive
run of one tar's samples, so each byte of its span is fetched once.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.base import InputLocation, ManifestRow
from whisper_batch.pipeline.inputs.containers import ContainerFormat, SampleRef, SourceError, sample_row

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

_TRUNCATED = (tarfile.TarError, EOFError, zlib.error, OSError)


class TarShards(ContainerFormat):
    """Tar files of WebDataset samples (format name "tar"); a record's audio is ``<tar uri>#tar:<offset>:<member>``."""

    ref_kind = "tar"

    def detect(self, loc: InputLocation, cfg: ManifestConfig) -> str | None:
        return "tar" if loc.path.lower().endswith(TAR_SUFFIXES) else None

    def rows_in(self, fileobj: BinaryIO, container: str, cfg: ManifestConfig, start: int) -> Iterator[ManifestRow]:
        for i, sample in enumerate(iter_tar_samples(fileobj, container, cfg.audio_extensions)):
            if sample.error is None:
                member = sample.audio[0][0]
                ref = SampleRef("tar", container, sample.audio[0][1], member)
            else:
                member = sample.audio[0][0] if sample.audio else sample.key
                ref = SampleRef("error", container, 0, sample.error)
            # the output's audio_filepath: fsspec's chained form for a tar member
            display = f"tar://{member}::{container}"
            where = f"tar {container} sample {sample.key!r}"
            yield sample_row(start + i, sample.key, sample.fields, ref, display, sample.text, cfg, where)

    def read_audio(
        self, fileobj: BinaryIO, wanted: list[tuple[int, str]], container: str
    ) -> Iterator[tuple[int, str, bytes | Exception]]:
        return read_tar_members(fileobj, wanted, container, compressed=not container.lower().endswith(".tar"))


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
            self.error = (
                f"not found: sample {self.key!r} in {container} has no audio member ({', '.join(self.members)})"
            )
        elif self.error is None and len(self.audio) > 1:
            names = ", ".join(n for n, _ in self.audio)
            self.error = (
                f"decode failed: sample {self.key!r} in {container} has {len(self.audio)} audio members ({names})"
            )


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name: (folder + basename up to its first dot, the rest); None without a dot."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return posixpath.join(folder, stem) if folder else stem, ext


def is_audio_member(ext: str, audio_extensions: Iterable[str]) -> bool:
    return ("." + ext.rsplit(".", 1)[-1].lower()) in {e.lower() for e in audio_extensions}


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
