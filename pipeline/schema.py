"""The row, from manifest to committed shard: every stage's schema and the conversions between them live here.

A row goes through four forms:

- **record** (``RECORD_SCHEMA``): a manifest row as planned — where its audio is, its id, and the manifest's other
  fields kept verbatim as one JSON string, ``extra_json``, so no field name of the user's can collide with ours;
- **features** (``FEATURE_SCHEMA``): the record plus its log-mel windows (the feature stage's output);
- **transcript** (``TRANSCRIPT_SCHEMA``): the record plus text and segments (the model stage's output);
- **output** (:func:`output_schema`): the committed columns — the fixed ones, then one column per extra manifest
  field with the plan's Arrow type. :func:`output_table` is the one conversion into it (from records or
  transcripts); part files are written in it, and a commit only concatenates, de-duplicates and sorts output tables
  (:func:`merge_output`), never converts them again.

An extra field whose name is a fixed column's, or starts with ``extra_``, becomes the column ``extra_<name>``
(``model`` → ``extra_model``, ``extra_note`` → ``extra_extra_note``); every other field keeps its name. Every shard
file of a run has exactly the output schema (the extra-field types are inferred once, at plan time), so the shards
of a run concatenate without promotion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

WORD_TYPE = pa.struct(
    [("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()), ("probability", pa.float64())]
)
WORD_KEYS = tuple(f.name for f in WORD_TYPE)

SEGMENT_TYPE = pa.struct(
    [
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("avg_logprob", pa.float64()),
        ("compression_ratio", pa.float64()),
        ("no_speech_prob", pa.float64()),
        ("temperature", pa.float64()),
        # word-level timestamps (decode.word_timestamps); null when not requested
        ("words", pa.list_(WORD_TYPE)),
        # the language the segment's window was decoded in (the row's `language` is that of most of its speech)
        ("language", pa.string()),
        # its window still failed the compression-ratio or log-probability check at the last temperature
        ("fallback_failed", pa.bool_()),
    ]
)
SEGMENT_KEYS = tuple(f.name for f in SEGMENT_TYPE)

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    # the audio path as written in the manifest
    pa.field("audio_filepath", pa.string()),
    pa.field("text", pa.string()),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("language", pa.string()),
    # decoded audio seconds
    pa.field("duration", pa.float64()),
    # null when ok, else "cause: detail"
    pa.field("error", pa.string()),
    # the manifest's reference text, null if none
    pa.field("reference", pa.string()),
    pa.field("model", pa.string()),
    pa.field("shard_id", pa.int32(), nullable=False),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("offset", pa.float64()),
]
BASE_NAMES = frozenset(f.name for f in BASE_FIELDS)

# the causes an `error` value may start with
# the causes of a row that could not be read or decoded (whisper_batch.pipeline.audio.AudioError), then those of the
# model stage
DECODE_CAUSES = ("not found", "empty", "no audio stream", "decode failed")
ERROR_CAUSES = DECODE_CAUSES + ("timeout", "model failed")
EXTRA_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}


# --- the forms before the output -----------------------------------------------------------------------------------

RECORD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.int32()),
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("audio_filepath", pa.string()),
        ("uri", pa.string()),
        ("offset", pa.float64()),
        ("duration", pa.float64()),
        ("reference", pa.string()),
        ("language", pa.string()),
        # the manifest's other fields, verbatim, as a JSON object
        ("extra_json", pa.string()),
    ]
)
FEATURE_SCHEMA = pa.schema(
    list(RECORD_SCHEMA)
    + [
        ("mel", pa.large_binary()),
        ("mel_frames", pa.list_(pa.int64())),
        ("window_starts", pa.list_(pa.float64())),
        ("audio_seconds", pa.float64()),
        ("error", pa.string()),
        ("decode_s", pa.float64()),
        ("members_json", pa.string()),
        # audio.vad: per window, where each run of speech joined into it lies in the file (JSON; see Windows.maps)
        ("window_maps", pa.string()),
    ]
)
TRANSCRIPT_SCHEMA = pa.schema(
    [f for f in RECORD_SCHEMA if f.name != "language"]
    + [
        ("text", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("language", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("window_temperatures", pa.list_(pa.float64())),
        ("decode_s", pa.float64()),
        ("model_s", pa.float64()),
    ]
)


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def transcripts_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRANSCRIPT_SCHEMA)


# --- the output -----------------------------------------------------------------------------------------------------


def extra_column_name(field_name: str) -> str:
    """Column of an extra manifest field; prefixed when it would clash with a fixed column (e.g. "model")."""
    return f"extra_{field_name}" if field_name in BASE_NAMES or field_name.startswith("extra_") else field_name


def output_schema(extra_types: dict[str, str]) -> pa.Schema:
    """Fixed columns then the extra fields (`extra_types`: field -> "int64"|"float64"|"bool"|"string")."""
    extras = [pa.field(extra_column_name(name), EXTRA_TYPES[kind]) for name, kind in extra_types.items()]
    return pa.schema(BASE_FIELDS + extras)


def error_cause(error: str) -> str:
    """The cause part of "cause: detail"."""
    return error.split(":", 1)[0].strip()


def extra_value(value: Any, kind: str) -> Any:
    """Converts one extra-field value to the column type `kind` (non-strings in string columns are JSON)."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if kind == "float64":
        return float(value)
    return value


def _segments(value: Any) -> list[dict] | None:
    """Normalises segments (dicts, possibly with more keys, or Ray's numpy arrays of dicts) to the struct keys."""
    if value is None:
        return None
    out = []
    for seg in list(value):
        item = {}
        for key in SEGMENT_KEYS:
            v = seg.get(key) if hasattr(seg, "get") else None
            if key == "words":
                item[key] = _words(v)
            elif key == "fallback_failed":
                item[key] = None if v is None else bool(v)
            else:
                item[key] = v if key in ("text", "language") or v is None else float(v)
        out.append(item)
    return out


def _words(value: Any) -> list[dict] | None:
    """Normalises a segment's words (dicts, or Ray's numpy arrays of dicts) to the word struct keys."""
    if value is None:
        return None
    return [
        {k: (w.get(k) if k == "word" or w.get(k) is None else float(w.get(k))) for k in WORD_KEYS} for w in list(value)
    ]


def _clean(value: Any) -> Any:
    """Maps NaN (pandas' missing value) and numpy scalars to plain Python."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def output_table(
    rows: Iterable[dict[str, Any]], extra_types: dict[str, str], model_name: str | None = None
) -> pa.Table:
    """Records or transcripts → the output table: the one conversion into the output form.

    A row holds the fixed columns by name (missing ones are null; `model` falls back to `model_name`) and the
    manifest's other fields only in `extra_json` — never by name, so a manifest field called `model` or `error`
    cannot be mistaken for ours. Keys that are not output columns (`uri`, timings, ...) are dropped.
    """
    schema = output_schema(extra_types)
    columns: dict[str, list] = {f.name: [] for f in schema}
    for row in rows:
        for name in BASE_NAMES:
            value = row.get(name)
            columns[name].append(_segments(value) if name == "segments" else _clean(value))
        if columns["model"][-1] is None:
            columns["model"][-1] = model_name
        extras = json.loads(row.get("extra_json") or "{}")
        for name, kind in extra_types.items():
            columns[extra_column_name(name)].append(extra_value(_clean(extras.get(name)), kind))
    return pa.Table.from_pydict(columns, schema=schema)


def merge_output(tables: list[pa.Table], extra_types: dict[str, str]) -> pa.Table:
    """Output tables → one, sorted by `row_index`; a row index given more than once keeps its last version (a part
    re-written by a retried task, or a committed row replaced by --retry-failed).

    The tables are already in the output form: rows are selected, never converted.
    """
    schema = output_schema(extra_types)
    tables = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    last = {i: k for k, i in enumerate(table.column("row_index").to_pylist())}
    keep = sorted(last.items())
    return table.take(pa.array([k for _, k in keep], pa.int64()))
