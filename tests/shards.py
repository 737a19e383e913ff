"""Shards for tests: rows committed through the production commit path (:func:`sink.commit_shard_table`), and a
run's committed rows read back as one table."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.schema import output_table
from whisper_batch.pipeline.sink import commit_shard_table, iter_committed


def write_shard(
    layout: RunLayout,
    shard_id: int,
    rows: list[dict[str, Any]],
    extra_types: dict[str, str],
    model_name: str,
    stats: dict[str, Any] | None = None,
    replace_failed: bool = False,
) -> dict[str, Any]:
    """Commits one shard from records or transcripts (see `schema.output_table`), as the graph's commit does; a
    row's `shard_id` defaults to ``shard_id``. Returns the completion record."""
    rows = [{**r, "shard_id": r.get("shard_id", shard_id)} for r in rows]
    table = output_table(rows, extra_types, model_name)
    return commit_shard_table(layout, shard_id, table, extra_types, model_name, stats, replace_failed)


def read_committed(layout: RunLayout, columns: list[str] | None = None) -> pa.Table:
    """Every committed row as one table, shard by shard (at least one shard must be committed)."""
    return pa.concat_tables([table for _, table in iter_committed(layout, columns)], promote_options="default")
