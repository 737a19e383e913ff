"""The row contract end to end: the manifest's own fields, of every awkward kind, reach the committed shard
unchanged — named by the one documented rule — and stay unchanged through --retry-failed.

A real local Ray and the real tiny.en on the example speech; one row's file is missing at first (an error row), then
turns up for --retry-failed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import count_ids, read_rows, whisper_batch_ok, write_manifest
from whisper_batch.pipeline.schema import BASE_NAMES, extra_column_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# per row: manifest fields that collide with output columns, start with extra_, nest, are null, or are numbers
AWKWARD = [
    {"speaker": "ann", "model": "user-model-1", "error": "none-here", "shard_id": "abc", "extra_note": "n1",
     "score": 0.5, "count": 3, "flag": True, "nested": {"a": [1, 2], "b": None}, "maybe": None,
     "reference": "the user's reference column", "row_index": 70, "segments": "user segments"},
    {"speaker": "bob", "model": "user-model-2", "error": "none-here-either", "shard_id": "def", "extra_note": None,
     "score": 2, "count": -4, "flag": False, "nested": [{"k": "v"}], "maybe": "now a string",
     "reference": None, "row_index": 71, "segments": None},
    {"speaker": None, "model": None, "error": None, "shard_id": "ghi", "extra_note": "n3",
     "score": None, "count": 0, "flag": None, "nested": {}, "maybe": None,
     "reference": "r3", "row_index": 72, "segments": "s3"},
]


def _expected(value: Any) -> Any:
    """A field's value in its output column: strings, numbers and booleans as they are, nested values as JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _check_fields(rows: dict[str, dict[str, Any]], ids: list[str], model: str) -> None:
    for row_id, fields in zip(ids, AWKWARD):
        row = rows[row_id]
        for name, value in fields.items():
            column = extra_column_name(name)
            assert column != name or name not in BASE_NAMES
            got = row[column]
            if name == "score" and value is not None:  # a field with ints and floats is a float column
                assert got == float(value), (row_id, name, got)
            else:
                assert got == _expected(value), (row_id, name, got, value)
        # ours are ours: the fixed columns hold what the pipeline wrote, not the user's fields of the same name
        assert row["model"] == model and row["shard_id"] in (0, 1) and row["row_index"] in (0, 1, 2)


def test_manifest_fields_of_every_kind_survive_commit_and_retry_failed(tmp_path: Path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("fox.flac", "weather.flac"):
        shutil.copy(EXAMPLES / name, audio / name)
    names = ["fox.flac", "weather.flac", "late.flac"]  # late.flac turns up only before the retry
    ids = ["fox", "weather", "late"]
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [{"id": i, "audio_filepath": str(audio / n), **f} for i, n, f in zip(ids, names, AWKWARD)],
    )
    out = tmp_path / "out"
    args = ("run", manifest, "-o", out, "--set", "manifest.shard_size=2")
    whisper_batch_ok(*args)

    rows = {r["id"]: r for r in read_rows(out)}
    model = rows["fox"]["model"]
    assert model and rows["late"]["error"].startswith("not found"), rows["late"]["error"]
    assert rows["fox"]["text"] and rows["fox"]["error"] is None
    _check_fields(rows, ids, model)
    # the user's own `reference` field is carried as extra_reference, apart from the reference text (`text`): none
    assert rows["fox"]["reference"] is None and rows["fox"]["extra_reference"] == "the user's reference column"

    shutil.copy(EXAMPLES / "fox.flac", audio / "late.flac")
    whisper_batch_ok(*args, "--retry-failed")
    after_rows = read_rows(out)
    assert count_ids(after_rows) == {i: 1 for i in ids}
    after = {r["id"]: r for r in after_rows}
    assert after["late"]["error"] is None and after["late"]["text"] == rows["fox"]["text"]
    _check_fields(after, ids, model)
    for row_id in ("fox", "weather"):  # rows that did not fail are kept, every column as it was
        assert after[row_id] == rows[row_id]
