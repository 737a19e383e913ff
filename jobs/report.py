"""``whisper-batch report OUTPUT``: one self-contained HTML page about a run, with plots, from its committed shards.

The page (drawn by :mod:`whisper_batch.jobs.plots`) shows rows and audio hours by language and by manifest fields,
failures by cause with example rows, per-segment distributions of the confidence signals with the share of rows and
hours that common pseudo-labelling filters would drop, WER by group where references exist, fallback temperatures,
throughput over the run's invocations and the run's identity.

It streams: one shard at a time, reading only the leaf columns it needs (the segments' numbers, not their text or
words), into fixed-size histograms and counters, so memory stays flat at a million rows. Groups of a manifest field
are counted exactly up to ``report_model.MAX_GROUPS`` values, the rest together as "(other values)".
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from whisper_batch.jobs.report_model import SIGNALS, Aggregate
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.schema import error_cause, extra_column_name
from whisper_batch.pipeline.secrets import redact_uri
from whisper_batch.pipeline.sink import parquet_source

SEGMENT_COLUMNS = [f"segments.list.element.{name}" for name, *_ in SIGNALS] + [
    f"segments.list.element.{name}" for name in ("temperature", "language", "fallback_failed")]
MIXED_EXAMPLES = 10  # rows listed whose segments hold more than one language
EXAMPLES_PER_CAUSE = 3


class ReportError(ValueError):
    """OUTPUT holds no run, or a field named with --by is not in its manifest; the message says what is missing."""


def read_shard_columns(layout: RunLayout, shard_id: int, wanted: list[str]) -> pa.Table:
    """The shard's columns among ``wanted`` (leaf paths such as ``segments.list.element.avg_logprob`` read only
    that number of each segment)."""
    f = pq.ParquetFile(parquet_source(layout.read_bytes(layout.shard_file(shard_id))))
    paths = {c.path for c in f.schema}
    top = {p.split(".")[0] for p in paths}
    return f.read(columns=[c for c in wanted if c in paths or c in top])


def aggregate(layout: RunLayout, shard_ids: list[int], by: list[str], extra_types: dict[str, str]) -> Aggregate:
    """One pass over the committed shards."""
    from whisper_batch.jobs.evaluate import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    agg = Aggregate(by)
    by_columns = {name: extra_column_name(name) for name in by}
    wanted = ["id", "audio_filepath", "language", "duration", "error", "reference", "text", *SEGMENT_COLUMNS,
              *by_columns.values()]
    for shard_id in shard_ids:
        try:
            table = read_shard_columns(layout, shard_id, wanted)
        except Exception as e:  # noqa: BLE001 - one unreadable file is reported on the page, not a traceback
            agg.unreadable.append(f"shard {shard_id}: {type(e).__name__}: {e}"[:300])
            continue
        _add_shard(agg, table, by_columns, normalize)
    return agg


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _add_shard(agg: Aggregate, table: pa.Table, by_columns: dict[str, str], normalize) -> None:
    n = table.num_rows
    durations = np.array([d or 0.0 for d in _column(table, "duration")], dtype=np.float64)
    errors = _column(table, "error")
    failed = np.array([e is not None for e in errors], dtype=bool)
    agg.rows += n
    agg.failed += int(failed.sum())
    agg.audio_seconds += float(durations.sum())
    keys: dict[str, list[str]] = {}
    for name in agg.groups:
        values = _column(table, by_columns.get(name, name))
        keys[name] = [agg.groups[name].add(v, float(d), bool(f)) for v, d, f in zip(values, durations, failed)]
    ids, paths = _column(table, "id"), _column(table, "audio_filepath")
    for i, error in enumerate(errors):
        if error is not None:
            cause = error_cause(error)
            agg.causes[cause] += 1
            if len(agg.examples[cause]) < EXAMPLES_PER_CAUSE:
                agg.examples[cause].append({"id": ids[i], "audio_filepath": paths[i], "error": error[:300]})
    _add_segments(agg, table, durations)
    _add_wer(agg, table, keys, failed, normalize)


def _add_segments(agg: Aggregate, table: pa.Table, durations: np.ndarray) -> None:
    if "segments" not in table.column_names or table.num_rows == 0:
        return
    segments = table.column("segments").combine_chunks()
    flat = pc.list_flatten(segments)
    if len(flat) == 0:
        return
    parent = pc.list_parent_indices(segments).to_numpy()
    agg.segments += len(flat)
    any_bad = np.zeros(len(flat), dtype=bool)
    names = {f.name for f in flat.type}
    for name, _, threshold, direction in SIGNALS:
        if name not in names:
            continue
        values = flat.field(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls are NaN
        ok = ~np.isnan(values)
        agg.histograms[name].add(values[ok])
        bad = ok & ((values < threshold) if direction == "below" else (values > threshold))
        any_bad |= bad
        _count_drops(agg.dropped[name], bad, parent, durations)
    if "fallback_failed" in names:
        failed = flat.field("fallback_failed").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        _count_drops(agg.dropped["fallback_failed"], failed, parent, durations)
        any_bad |= failed
    _count_drops(agg.dropped["any"], any_bad, parent, durations)
    if "language" in names:
        _add_languages(agg, table, flat.field("language").to_pylist(), parent)
    if "temperature" in names:
        temps = flat.field("temperature").to_numpy(zero_copy_only=False).astype(np.float64)
        values, counts = np.unique(temps[~np.isnan(temps)], return_counts=True)
        agg.temperatures.update({f"{v:g}": int(c) for v, c in zip(values, counts)})


def _add_languages(agg: Aggregate, table: pa.Table, languages: list, parent: np.ndarray) -> None:
    """Rows whose segments were decoded in more than one language (a language per window)."""
    per_row: dict[int, set] = defaultdict(set)
    for row, language in zip(parent.tolist(), languages):
        if language is not None:
            per_row[row].add(language)
    ids = _column(table, "id")
    for row, langs in sorted(per_row.items()):
        if len(langs) > 1:
            agg.mixed_language_rows += 1
            if len(agg.mixed_language_examples) < MIXED_EXAMPLES:
                agg.mixed_language_examples.append({"id": ids[row], "languages": ", ".join(sorted(langs))})


def _count_drops(acc: Counter, bad: np.ndarray, parent: np.ndarray, durations: np.ndarray) -> None:
    """A row is dropped when any of its segments fails the filter (the utterance is not kept in part)."""
    rows = np.unique(parent[bad])
    acc["segments"] += int(bad.sum())
    acc["rows"] += len(rows)
    acc["audio_seconds"] += float(durations[rows].sum())


def _add_wer(agg: Aggregate, table: pa.Table, keys: dict[str, list[str]], failed: np.ndarray, normalize) -> None:
    from whisper_batch.jobs.evaluate import word_errors

    refs, texts = _column(table, "reference"), _column(table, "text")
    per_group: dict[tuple[str, str], tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for i, ref in enumerate(refs):
        if ref is None or failed[i]:
            continue
        ref = normalize(ref)
        if not ref.strip():
            continue
        hyp = normalize(texts[i] or "")
        agg.wer_rows += 1
        for name, values in [("all", None), *keys.items()]:
            r, h = per_group[(name, values[i] if values else "all")]
            r.append(ref)
            h.append(hyp)
    for (name, key), (r, h) in per_group.items():
        counts = word_errors(r, h)  # counts add up across shards; the rate is taken at the end
        target = agg.groups[name].wer[key] if name != "all" else agg.wer_all
        target.update({k: counts[k] for k in ("substitutions", "deletions", "insertions", "reference_words",
                                             "rows_scored")})


def invocation_throughput(layout: RunLayout, done: list[int]) -> list[dict[str, Any]]:
    """Per invocation: start, status, wall seconds, and the rows/audio of the shards it committed (by commit time)."""
    from whisper_batch.pipeline.sink import read_invocations, wall_seconds

    invocations = read_invocations(layout)
    records = layout.read_json_many([layout.record_file(s) for s in done])
    starts = [_time(inv.get("started_at")) for inv in invocations]
    out = [{"id": inv.get("id"), "started_at": inv.get("started_at"), "finished_at": inv.get("finished_at"),
            "status": inv.get("status"), "host": inv.get("host"), "rows": 0, "audio_seconds": 0.0, "shards": 0,
            "commits": []} for inv in invocations]
    for rec in records:
        t = _time(rec.get("finished_at"))
        owner = max((i for i, s in enumerate(starts) if s and t and s <= t), default=None)
        if owner is None:
            continue
        out[owner]["rows"] += rec.get("rows", 0)
        out[owner]["audio_seconds"] += rec.get("audio_seconds", 0.0)
        out[owner]["shards"] += 1
        out[owner]["commits"].append(t)
    for inv, item in zip(invocations, out):
        commits = item.pop("commits")
        item["wall_seconds"] = wall_seconds([inv], commits) if inv.get("started_at") else 0.0
        item["rtfx"] = item["audio_seconds"] / item["wall_seconds"] if item["wall_seconds"] > 0 else None
        item["rows_per_s"] = item["rows"] / item["wall_seconds"] if item["wall_seconds"] > 0 else None
    return out


def _time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def identity(layout: RunLayout, plan: dict[str, Any]) -> dict[str, Any]:
    """Input, output, model, fingerprints and versions from run.json (what is there; a missing file is said)."""
    run = layout.read_json(layout.run_json) if layout.exists(layout.run_json) else {}
    results = run.get("results_config")
    return {
        "output": layout.display_uri,
        "input": run.get("input_uri") or plan.get("input_uri"),
        "model": run.get("model"),
        "created_at": run.get("created_at"),
        "manifest_fingerprint": (run.get("manifest_fingerprint") or plan.get("fingerprint") or "")[:16] or None,
        "config_fingerprint": hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()[:16]
        if results else None,
        "results_config": results or {},
        "versions": run.get("versions") or {},
        "n_rows": plan.get("n_rows"),
        "n_shards": plan.get("n_shards"),
        "shard_size": plan.get("shard_size"),
        "run_json_missing": not run,
    }


def build_report(layout: RunLayout, by: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything the page shows, as plain data (see :func:`whisper_batch.jobs.plots.render_page`).

    Raises:
        ReportError: OUTPUT holds no run (no plan.json), or a ``by`` field is not one of the manifest's fields.
    """
    if not layout.exists(layout.plan_json):
        raise ReportError(f"{layout.display_uri} holds no whisper-batch run (no plan.json there); `whisper-batch run "
                          f"INPUT -o {layout.display_uri}` starts one")
    plan = layout.read_json(layout.plan_json)
    extra_types = plan.get("extra_types") or {}
    if missing := [name for name in by if name not in extra_types and name != "language"]:
        fields = ", ".join(sorted(extra_types)) or "none"
        raise ReportError(f"--by {missing[0]}: not a field of this run's manifest (its extra fields: {fields})")
    by = [name for name in dict.fromkeys(by) if name != "language"]
    done = sorted(layout.list_done_shards())
    agg = aggregate(layout, done, by, extra_types)
    invocations = invocation_throughput(layout, done)
    n_shards = plan.get("n_shards") or 0
    return {
        "identity": identity(layout, plan),
        "by": by,
        "shards_done": len(done),
        "shards_total": n_shards,
        "complete": n_shards > 0 and len(done) >= n_shards,
        "running": [inv for inv in invocations if inv["status"] == "running"],
        "agg": agg,
        "invocations": invocations,
    }


def write_report(layout: RunLayout, target: str, by: list[str] | tuple[str, ...] = (),
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds the report and writes the page to ``target`` (a local path or a URI); returns the report's data."""
    import fsspec

    from whisper_batch.jobs.plots import render_page

    data = build_report(layout, by)
    page = render_page(data)
    try:
        with fsspec.open(target, "w", encoding="utf-8", **(storage_options or {})) as f:
            f.write(page)
    except OSError as e:
        raise ReportError(f"cannot write {redact_uri(target)}: {e} (-o names another place)") from e
    return data
