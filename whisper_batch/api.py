"""The Python API: what the command line does, for programs and for Ray Data pipelines.

``config`` is a YAML file's path, a mapping of sections (``{"decode": {"beam_size": 5}}``) or a loaded
:class:`~whisper_batch.pipeline.config.RunConfig`; ``**options`` set single keys on top of it, by the names the
command line's flags use (``model``, ``language``, ``task``, ``beam_size``, ``word_timestamps``, ``vad``), by a field
name only one section has (``cpu_actors``, ``audio_field``, ``padding_seconds``) or as ``section__field``
(``decode__beam_size``). An unknown name is a :class:`~whisper_batch.pipeline.config.ConfigError` listing the valid
ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from whisper_batch.pipeline.config import RunConfig, config_to_dict
from whisper_batch.pipeline.config import load_config as _load_config

if TYPE_CHECKING:
    import ray.data

    from whisper_batch.jobs.run import RunSummary

Config = str | Mapping[str, Any] | RunConfig | None


def load_config(config: Config = None, **options: Any) -> RunConfig:
    """The run configuration: defaults, then ``config``, then ``options`` (see the module's docs)."""
    if isinstance(config, RunConfig):
        config = config_to_dict(config)
    return _load_config(config, (), options)


def run(input: str, output: str, config: Config = None, *, retry_failed: bool = False, progress: bool = True,
        **options: Any) -> RunSummary:
    """Transcribe ``input`` (a manifest, a folder or glob of audio, tar shards, Parquet with audio; local or a URI)
    into Parquet shards under ``output``, as ``whisper-batch run`` does: every row committed exactly once; calling it
    again with the same arguments resumes.

    Joins the Ray the process is connected to, else ``ray.address``, else the cluster in ``RAY_ADDRESS``, else starts
    a local Ray (and stops it at the end). ``progress`` prints a line per committed shard. Returns the run's summary
    (shards and rows committed, rows failed); ``whisper-batch status OUTPUT`` tells the same later.
    """
    import ray

    from whisper_batch.jobs.run import run as run_job
    from whisper_batch.jobs.run import stop_ray

    cfg = load_config(config, **options)
    started = not ray.is_initialized()
    try:
        return run_job(input, output, cfg, retry_failed=retry_failed, echo=print if progress else _quiet)
    finally:
        if started:  # a Ray of the caller's stays up
            stop_ray()


def transcribe(files: str | Iterable[str], config: Config = None, **options: Any) -> list[dict[str, Any]]:
    """Transcribe audio files (paths or URIs, any container) in this process, without Ray.

    Returns one dict per file, in order: ``audio_filepath``, ``text``, ``segments`` (``start``, ``end``, ``text``,
    ``words`` when ``word_timestamps``, ...), ``language``, ``duration``, ``error`` (None, or "cause: detail" for a
    file that could not be read; it never raises for one). The model stays loaded for the next call with the same
    model and decoding settings.
    """
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.transcriber import RESULT_KEYS, transcribe_files

    paths = [files] if isinstance(files, str) else list(files)
    cfg = load_config(config, **options)
    transcriber = _transcriber(cfg)
    rows = transcribe_files(transcriber, Featurizer(cfg, transcriber.n_mels), paths)
    return [{k: r.get(k) for k in RESULT_KEYS} for r in rows]


def transcribe_dataset(ds: ray.data.Dataset, config: Config = None, **options: Any) -> ray.data.Dataset:
    """Whisper as stages of a Ray Data pipeline: ``ds``'s rows with their transcripts, as a new (lazy) dataset.

    The audio of a row is its ``audio_field`` column (default ``audio_filepath``): a path or URI, bytes, or a
    Hugging Face ``{bytes, path}`` struct. The same feature and model actor pools as :func:`run` (``cpu_actors``,
    ``model_actors``, one GPU per model actor where the cluster has GPUs); a row whose audio cannot be read comes out
    with its ``error`` set; every other column is carried through. Adds ``text``, ``segments``, ``language``,
    ``duration``, ``error`` and ``model``; a column of the user's with one of those names becomes ``extra_<name>``,
    and the reference text column (``text_field``, default ``text``) becomes ``reference``. Write the result
    wherever you like (``write_parquet``, ``write_iceberg``, ...); exactly-once commits and resume are :func:`run`'s.

    Raises:
        ConfigError: an unknown option.
        AudioColumnError: ``ds`` has no ``audio_field`` column (the message lists its columns).
    """
    from whisper_batch.jobs.run import init_ray, model_label
    from whisper_batch.pipeline.dataset import transcribe_dataset as build

    cfg = load_config(config, **options)
    init_ray(cfg)  # the pools are sized from the cluster's resources
    _, n_mels = model_label(cfg)
    return build(ds, cfg, n_mels)


def _quiet(*_: Any, **__: Any) -> None:
    pass


_loaded: dict[str, Any] = {}  # the last Transcriber, by the config that made it


def _transcriber(cfg: RunConfig):
    from whisper_batch.pipeline.transcriber import Transcriber

    key = repr((cfg.model, cfg.decode, cfg.storage))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = Transcriber(cfg)
    return _loaded[key]
