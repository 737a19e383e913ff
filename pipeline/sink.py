"""Shard commit: one complete Parquet file per shard at its final name, then its completion record.

The data file has a deterministic name and is written atomically, so each row appears at most once in
transcripts/ and a rerun of a shard overwrites it with the same rows. The completion record, written after the
file, is the commit: readers (`iter_committed`, status, evaluate, export) trust only shards that have one. It holds
the file's row count, size and sha256, so that `whisper-batch verify` can tell a damaged file.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.schema import error_cause, merge_output

logger = logging.getLogger(__name__)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def commit_shard_table(
    layout: RunLayout,
    shard_id: int,
    table: pa.Table,
    extra_types: dict[str, str],
    model_name: str | None,
    stats: dict[str, Any] | None = None,
    replace_failed: bool = False,
) -> dict[str, Any]:
    """Commits one shard: writes transcripts/shard-NNNNN.parquet atomically, then shards/NNNNN.json.

    Args:
        table: the shard's rows, already in the output form (each row index once).
        stats: timing etc. from the workers (e.g. decode_seconds, model_seconds), copied into the record.
        replace_failed: merge into the committed file instead: rows with the same `row_index` are replaced by
            `table`'s, the others kept, and the whole file rewritten (still one atomic write).

    Returns:
        The completion record.
    """
    previous = None
    tables = [table]
    if replace_failed and layout.exists(layout.shard_file(shard_id)):
        tables.insert(0, read_shard(layout, shard_id))
        if layout.exists(layout.record_file(shard_id)):
            previous = layout.read_json(layout.record_file(shard_id))
    table = merge_output(tables, extra_types)
    data = table_to_parquet_bytes(table)
    layout.write_bytes(layout.shard_file(shard_id), data)
    record = completion_record(layout, shard_id, table, model_name, stats, previous, data)
    layout.write_json(layout.record_file(shard_id), record)
    logger.info("committed shard %d: %d rows, %d errors", shard_id, record["rows"], record["errors"])
    return record


def completion_record(
    layout: RunLayout,
    shard_id: int,
    table: pa.Table,
    model_name: str,
    stats: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    data: bytes | None = None,
) -> dict[str, Any]:
    """Counts from the shard's table: rows, errors by cause, audio seconds, fallbacks per temperature; with `data`
    (the file's bytes as written) its size and sha256.

    `previous` (a record being replaced by --retry-failed) has its timing stats added to the new ones.
    """
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    fallbacks: Counter[str] = Counter()
    n_segments = 0
    for segments in table.column("segments").to_pylist():
        for seg in segments or []:
            n_segments += 1
            if (seg.get("temperature") or 0.0) > 0.0:
                fallbacks[f"{seg['temperature']:g}"] += 1
    record: dict[str, Any] = {
        "shard_id": shard_id,
        "file": layout.shard_file_name(shard_id),
        "rows": table.num_rows,
        "bytes": None if data is None else len(data),
        "sha256": None if data is None else hashlib.sha256(data).hexdigest(),
        "errors": len(errors),
        "errors_by_cause": dict(Counter(error_cause(e) for e in errors)),
        "audio_seconds": float(sum(d for d in table.column("duration").to_pylist() if d is not None)),
        "segments": n_segments,
        "fallbacks": dict(sorted(fallbacks.items())),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "model": model_name,
    }
    for key, value in (stats or {}).items():
        if key in record:
            continue
        if previous and _is_number(value) and _is_number(previous.get(key)):
            value = previous[key] + value
        record[key] = value
    if previous:
        record["retries"] = previous.get("retries", 0) + 1
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parquet_source(data: bytes) -> pa.BufferReader:
    """A Parquet file's bytes as a reader over an Arrow-owned copy. Arrow's I/O threads can drop the last reference
    to a file's reader after the read has returned; over Python bytes that release needs the GIL, and once the
    interpreter is exiting it aborts the process ("terminate called without an active exception", exit 134) after the
    command's output (apache/arrow#34314; `use_threads=False` does not prevent it). A copy Arrow owns is freed
    without Python."""
    buf = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(buf).write(data)
    return pa.BufferReader(buf)


def read_shard(layout: RunLayout, shard_id: int, columns: list[str] | None = None) -> pa.Table:
    """A committed shard's rows (status, eval, export, run's summary, verify)."""
    data = layout.read_bytes(layout.shard_file(shard_id))
    return pq.read_table(parquet_source(data), columns=columns, use_threads=False)


def iter_committed(layout: RunLayout, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(shard_id, table) for each committed shard, ascending; files without a completion record are ignored."""
    for shard_id in sorted(layout.list_done_shards()):
        yield shard_id, read_shard(layout, shard_id, columns)


def failed_rows(layout: RunLayout) -> dict[int, list[int]]:
    """shard_id -> row indices whose `error` is set, over committed shards (for --retry-failed)."""
    out = {}
    for shard_id, table in iter_committed(layout, ["row_index", "error"]):
        failed = [i for i, e in zip(table.column("row_index").to_pylist(), table.column("error").to_pylist()) if e]
        if failed:
            out[shard_id] = failed
    return out


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def wall_seconds(invocations: list[dict[str, Any]], commit_times: list[datetime]) -> float:
    """Sum of invocation wall times.

    An invocation without `finished_at` (crashed, or still running) ends at its last shard commit before the next
    invocation started, so neither a crash nor a live run inflates the total.
    """
    starts = sorted((_parse_time(inv["started_at"]), _parse_time(inv.get("finished_at"))) for inv in invocations)
    total = 0.0
    for i, (start, end) in enumerate(starts):
        if end is None:
            next_start = starts[i + 1][0] if i + 1 < len(starts) else None
            inside = [t for t in commit_times if t >= start and (next_start is None or t < next_start)]
            end = max(inside, default=start)
        total += max(0.0, (end - start).total_seconds())
    return total


def collect_stats(layout: RunLayout, chunk: int = 512) -> dict[str, Any]:
    """Run statistics from plan.json, the completion records and the invocation records (no credentials).

    The records are read ``chunk`` at a time and folded into counters, so memory stays flat however many shards
    the run has (only each record's commit time is kept, for the wall time)."""
    plan = layout.read_json(layout.plan_json) if layout.exists(layout.plan_json) else {}
    done = sorted(layout.list_done_shards())
    invocations = read_invocations(layout)
    causes: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    rows_done = rows_failed = 0
    models: set[str] = set()
    commit_times = []
    for start in range(0, len(done), chunk):
        for rec in layout.read_json_many([layout.record_file(s) for s in done[start : start + chunk]]):
            causes.update(rec.get("errors_by_cause", {}))
            fallbacks.update(rec.get("fallbacks", {}))
            timings.update({k: v for k, v in rec.items() if k.endswith("_seconds") and _is_number(v)})
            rows_done += rec.get("rows", 0)
            rows_failed += rec.get("errors", 0)
            if rec.get("model"):
                models.add(rec["model"])
            if t := _parse_time(rec.get("finished_at")):
                commit_times.append(t)
    audio = float(timings.pop("audio_seconds", 0.0))
    wall = wall_seconds(invocations, commit_times)
    return {
        "input_uri": plan.get("input_uri"),
        "n_shards": plan.get("n_shards"),
        "n_rows": plan.get("n_rows"),
        "shards_done": len(done),
        "rows_done": rows_done,
        "rows_failed": rows_failed,
        "failures_by_cause": dict(causes.most_common()),
        "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: float(kv[0]))),
        "audio_seconds": audio,
        "wall_seconds": wall,
        "rtfx": audio / wall if wall > 0 else None,
        "timings": dict(sorted(timings.items())),
        "invocations": len(invocations),
        "models": sorted(models),
    }


def read_invocations(layout: RunLayout) -> list[dict[str, Any]]:
    """The run's invocation records (OUTPUT/invocations/*.json), oldest first."""
    paths = [p for p in _list(layout, layout.invocations_dir) if p.endswith(".json")]
    return sorted(layout.read_json_many(paths), key=lambda inv: inv.get("started_at") or "")


def _list(layout: RunLayout, folder: str) -> list[str]:
    try:
        return sorted(layout.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
