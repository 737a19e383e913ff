"""The output row schema: fixed columns, then one column per extra manifest field with the plan's Arrow type.

Every shard file of a run has exactly this schema (the extra-field types are inferred once, at plan time), so the
shards of a run concatenate without promotion.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable

import pyarrow as pa

logger = logging.getLogger(__name__)

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
ERROR_CAUSES = ("not found", "empty", "no audio stream", "decode failed", "timeout", "model failed")
EXTRA_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}


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
            else:
                item[key] = v if key == "text" or v is None else float(v)
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


def rows_to_table(rows: Iterable[dict[str, Any]], extra_types: dict[str, str], model_name: str | None = None) -> pa.Table:
    """Builds the output table from row dicts.

    A row holds the fixed columns by name (missing ones are null; `model` falls back to `model_name`) and its extra
    fields either as `extra_json` (the manifest record's JSON string) or directly by field name.
    """
    schema = output_schema(extra_types)
    columns: dict[str, list] = {f.name: [] for f in schema}
    for row in rows:
        for name in BASE_NAMES:
            value = row.get(name)
            columns[name].append(_segments(value) if name == "segments" else _clean(value))
        if columns["model"][-1] is None:
            columns["model"][-1] = model_name
        extras = json.loads(row["extra_json"] or "{}") if "extra_json" in row else row
        for name, kind in extra_types.items():
            columns[extra_column_name(name)].append(extra_value(_clean(extras.get(name)), kind))
    return pa.Table.from_pydict(columns, schema=schema)
