"""Loose audio files: a folder (searched recursively), a glob (``data/*.flac``) or one audio file.

The input is a manifest of its files with ``manifest.audio_extensions``, sorted for determinism: a row per file,
its path (absolute, or a URI) both as written and as resolved, its id derived from that path.
"""

from __future__ import annotations

from collections.abc import Iterator

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.base import InputFormat, InputLocation, ManifestRow, default_id, full_uri


class AudioFiles(InputFormat):
    """A folder, glob or audio file (format names "audio-folder", "audio-glob", "audio-file")."""

    def detect(self, loc: InputLocation, cfg: ManifestConfig) -> str | None:
        if loc.is_pattern:
            return "audio-glob"
        if loc.suffix in cfg.audio_extensions:
            return "audio-file"
        if loc.fs.isdir(loc.path):
            return "audio-folder"
        return None

    def iter_rows(self, loc: InputLocation, name: str, cfg: ManifestConfig) -> Iterator[ManifestRow]:
        fs, path = loc.fs, loc.path
        if name == "audio-glob":
            paths = fs.glob(path)
        elif name == "audio-folder":
            paths = fs.find(path)
        else:
            if not fs.exists(path):
                raise loc.missing()
            paths = [path]
        extensions = tuple(e.lower() for e in cfg.audio_extensions)
        for index, p in enumerate(sorted(p for p in paths if p.lower().endswith(extensions))):
            full = full_uri(fs, p)
            yield ManifestRow(index=index, id=default_id(full, 0.0), audio_filepath=full, uri=full)
