"""Whisper as stages of a user's own Ray Data pipeline: a dataset whose rows carry audio → a dataset of transcripts.

The composable half of the pipeline (``run`` is the managed half: plan, exactly-once commits, resume). The same
feature actors (:class:`~whisper_batch.pipeline.features.Featurizer`) and model actors
(:class:`~whisper_batch.pipeline.transcriber.Transcriber`) as ``run``'s graph, in the same pools with the same
batching; the user reads, filters and writes the dataset however they like.

A row's audio is its ``manifest.audio_field`` column: a path or URI (read with the config's storage options), raw
bytes, or a Hugging Face ``{bytes, path}`` struct. Every other column is carried through with its Arrow type (one
row's columns travel beside its features as a small Arrow IPC stream); audio bytes are not carried. The transcript
columns are added: ``text``, ``segments``, ``language``, ``duration``, ``error`` (null, or "cause: detail" for a row
whose audio could not be read or decoded), ``model``. A user column named like one of them is kept as
``extra_<name>``, except the reference text (``manifest.text_field``), which becomes ``reference`` as in ``run``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray

from .audio import AudioError
from .calls import FEATURE_CHUNK_CALLS, CallShape, iter_calls, pack_call, unpack_calls
from .cluster import ModelPlan, actor_pool, check_cluster, log_start_errors, model_resources
from .config import RunConfig
from .schema import BASE_FIELDS, FEATURE_SCHEMA

# the features of a user's row: the feature stage's schema plus the row's other columns (``carry``)
CARRY = "carry"
DATASET_FEATURE_SCHEMA = FEATURE_SCHEMA.append(pa.field(CARRY, pa.string()))
# what the model stage adds to a user's row
TRANSCRIPT_FIELDS = [
    next(f for f in BASE_FIELDS if f.name == name)
    for name in ("text", "segments", "language", "duration", "error", "model")
]
TRANSCRIPT_NAMES = frozenset(f.name for f in TRANSCRIPT_FIELDS) | {"reference"}


class AudioColumnError(ValueError):
    """The dataset has no column the config names as its audio."""


def check_audio_column(names: list[str], audio_field: str) -> None:
    """Raises AudioColumnError naming the columns found and the option that picks one."""
    if audio_field not in names:
        raise AudioColumnError(
            f"the dataset has no audio column {audio_field!r} (manifest.audio_field); its columns: "
            f"{', '.join(names) or 'none'}. Name the one holding a path/URI, bytes or a {{bytes, path}} struct with "
            f"audio_field=... (or --set manifest.audio_field=...)"
        )


def carried_name(name: str, text_field: str) -> str:
    """A user column's name in the output: the reference text becomes ``reference``; a clash gets ``extra_``."""
    if name == text_field:
        return "reference"
    return f"extra_{name}" if name in TRANSCRIPT_NAMES or name.startswith("extra_") else name


def encode_row(table: pa.Table) -> str:
    """A one-row table as text (base64 of an Arrow IPC stream): JSON-safe, so it survives packing."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def decode_row(text: str) -> pa.Table:
    return pa.ipc.open_stream(base64.b64decode(text)).read_all()


def audio_of(value: Any, row_index: int, base_dir: str = "") -> tuple[str, bytes | Exception | None]:
    """An audio cell → (the name it goes by, its bytes, an error, or None for a path/URI to open); a relative local
    path is taken from ``base_dir`` (the folder the driver ran in: workers run elsewhere)."""
    if isinstance(value, dict):  # Hugging Face's Audio feature as stored in Parquet: {bytes, path}
        path, data = value.get("path"), value.get("bytes")
        name = path or f"row {row_index} (bytes)"
        if data:
            return name, bytes(data)
        if path:
            return _resolve(path, base_dir), None
        return name, AudioError("empty", "the audio struct holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        name = f"row {row_index} (bytes)"
        return name, (bytes(value) if len(value) else AudioError("empty", "0 bytes"))
    if isinstance(value, str) and value:
        return _resolve(value, base_dir), None
    return f"row {row_index}", AudioError("not found", f"no audio in the row (value {value!r})")


def _resolve(path: str, base_dir: str) -> str:
    return path if "://" in path or os.path.isabs(path) or not base_dir else os.path.join(base_dir, path)


class DatasetFeaturizer:
    """Ray Data callable: a user's rows → feature rows (the features stage of :func:`transcribe_dataset`)."""

    @log_start_errors
    def __init__(self, cfg: RunConfig, n_mels: int, calls: CallShape, base_dir: str = ""):
        from .features import Featurizer

        self.inner = Featurizer(cfg, n_mels)
        self.cfg, self.calls, self.base_dir = cfg, calls, base_dir

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        audio_field = self.cfg.manifest.audio_field
        check_audio_column(batch.column_names, audio_field)
        cells = batch.column(audio_field).to_pylist()
        kind = batch.schema.field(audio_field).type
        # a path column is the user's data too; bytes are not carried (a struct keeps its path)
        keep = (
            batch if pa.types.is_string(kind) or pa.types.is_large_string(kind) else batch.drop_columns([audio_field])
        )
        if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            keep = keep.append_column(audio_field, batch.column(audio_field).combine_chunks().field("path"))
        rows, inline = [], {}
        for i, cell in enumerate(cells):
            name, data = audio_of(cell, i, self.base_dir)
            rows.append({"shard_id": 0, "row_index": i, "id": None, "audio_filepath": name,
                         "uri": name if data is None else "", "offset": 0.0, "duration": None, "reference": None,
                         "language": None, "extra_json": None, CARRY: encode_row(keep.slice(i, 1))})
            inline[i] = data
        for call in iter_calls(self.inner.iter_items(rows, inline), self.calls):  # one row per model call
            yield pack_call(call, DATASET_FEATURE_SCHEMA)


class DatasetTranscriber:
    """Ray Data callable: feature rows → the user's rows with their transcripts (one Whisper replica per actor)."""

    @log_start_errors
    def __init__(self, cfg: RunConfig, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from .transcriber import Transcriber

        self.inner = Transcriber(cfg)
        self.text_field = cfg.manifest.text_field

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.inner.transcribe_rows(unpack_calls(batch))
        carried = pa.concat_tables([decode_row(r[CARRY]) for r in rows], promote_options="permissive")
        carried = carried.rename_columns([carried_name(n, self.text_field) for n in carried.column_names])
        ours = pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in TRANSCRIPT_FIELDS} | {"duration": r.get("duration") or 0.0}
             for r in rows],
            schema=pa.schema(TRANSCRIPT_FIELDS),
        )
        for field in ours.schema:
            carried = carried.append_column(field, ours.column(field.name))
        return carried




def transcribe_dataset(ds: ray.data.Dataset, cfg: RunConfig, n_mels: int) -> ray.data.Dataset:
    """``ds`` (rows with audio in ``cfg.manifest.audio_field``) → a dataset of the same rows with transcripts.

    Lazy, as Ray Data is: nothing runs until the result is consumed (``write_parquet``, ``iter_batches``, ...).

    Raises:
        AudioColumnError: the dataset's schema is known and lacks the audio column (when it is not known without
            running the user's stages, the feature actors raise it on the first batch).
    """
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_audio_column(list(schema.names), cfg.manifest.audio_field)
    plan = model_resources(cfg)
    check_cluster(cfg, plan)
    share = actor_share(plan, cfg.ray.cpu_actors, ray.cluster_resources().get("CPU", 1))
    ds = ds.map_batches(
        DatasetFeaturizer,
        fn_constructor_kwargs={"cfg": cfg, "n_mels": n_mels, "calls": plan.calls(cfg), "base_dir": os.getcwd()},
        compute=actor_pool(cfg.ray.cpu_actors, cfg.ray.max_cpu_actors or cfg.ray.cpu_actors),
        # a few model calls' rows per featurizer call: several feature actors share a user's large block
        batch_size=FEATURE_CHUNK_CALLS * (plan.call_windows or plan.rows_per_call),
        batch_format="pyarrow",
        num_cpus=share,
    )
    return ds.map_batches(
        DatasetTranscriber,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": plan.threads},
        compute=actor_pool(plan.actors, cfg.ray.max_model_actors or None),
        batch_size=1,  # one model call (a row of the featurizer's)
        batch_format="pyarrow",
        num_gpus=plan.gpus,
        num_cpus=plan.cpus * share,
    )


USER_STAGE_CPUS = 1.0  # logical CPUs left to the user's own tasks (read, filter, write) beside our actors


def actor_share(plan: ModelPlan, cpu_actors: int, cluster_cpus: float) -> float:
    """The factor on our actors' logical CPUs that leaves :data:`USER_STAGE_CPUS` to the user's stages.

    ``run``'s graph has no stage but ours, so its actors hold every core; here a user's read or filter task
    waiting for a CPU that our actors hold would wait forever. Logical shares only: torch's threads are set apart.
    """
    ours = cpu_actors + (plan.actors * plan.cpus if plan.gpus == 0 else 0.0)
    room = max(cluster_cpus - USER_STAGE_CPUS, 0.1)
    return min(1.0, room / ours) if ours else 1.0
