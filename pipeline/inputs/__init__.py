"""Input formats, one module each, and the list that decides which one reads an input.

- ``manifest_file``: JSON lines, CSV or Parquet manifests of audio paths
- ``audio_files``: a folder, a glob or one audio file
- ``tar_shards``: WebDataset tar shards (a file, a glob or brace notation)
- ``parquet_audio``: Parquet files with the audio bytes in a column

Each is an :class:`~whisper_batch.pipeline.inputs.base.InputFormat`: ``detect`` (does it read this input, and under
which name), ``iter_rows`` (the rows, streamed), ``shards_follow_files``/``file_of`` (how plan shards are cut) and
``ref_kind``/``read_audio`` (where a row's audio lives, when it lives inside a container file). To add a format,
write its module here and add an instance to :data:`INPUT_FORMATS`, before any format that would also claim its
inputs; a format of container files subclasses :class:`~whisper_batch.pipeline.inputs.containers.ContainerFormat`.
"""

from __future__ import annotations

from whisper_batch.pipeline.config import ManifestConfig
from whisper_batch.pipeline.inputs.audio_files import AudioFiles
from whisper_batch.pipeline.inputs.base import InputFormat, InputLocation, ManifestError
from whisper_batch.pipeline.inputs.manifest_file import ManifestFile
from whisper_batch.pipeline.inputs.parquet_audio import ParquetAudio
from whisper_batch.pipeline.inputs.tar_shards import TarShards

# asked in this order; the first whose `detect` names the input reads it. Containers first (a glob of .tar or
# .parquet files is theirs), then manifest files, then loose audio (any other glob, audio file, or folder)
INPUT_FORMATS: tuple[InputFormat, ...] = (TarShards(), ParquetAudio(), ManifestFile(), AudioFiles())


def find_format(loc: InputLocation, cfg: ManifestConfig) -> tuple[InputFormat, str]:
    """The format that reads the input at ``loc``, and its name for it (the plan's ``manifest_format``)."""
    for fmt in INPUT_FORMATS:
        name = fmt.detect(loc, cfg)
        if name is not None:
            return fmt, name
    if not loc.fs.exists(loc.path):
        raise loc.missing()
    raise ManifestError(
        f"cannot tell the format of input {loc.uri!r}: expected a manifest ending in .jsonl/.json, .csv or .parquet, "
        f"a folder of audio files, a glob such as data/*.flac, or an audio file ({', '.join(cfg.audio_extensions)})"
    )


def format_of_ref(kind: str) -> InputFormat | None:
    """The format whose records name their audio with a ``SampleRef`` of ``kind``; None for any other kind."""
    return next((fmt for fmt in INPUT_FORMATS if fmt.ref_kind is not None and fmt.ref_kind == kind), None)
