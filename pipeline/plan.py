"""The plan (row count, fixed-size shards, manifest fingerprint, extra-field types), blocks, resume and run records.

Shard k is rows [k * shard_size, (k + 1) * shard_size) of the manifest, so the assignment of rows to shards depends
only on the manifest and the shard size, never on the cluster. A resume re-derives the plan, refuses it when the
manifest or a results-changing config value differs, and lists `shards/` once to find what is left.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import uuid
from array import array
from bisect import bisect_right
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from whisper_batch.pipeline.config import (
    RESULT_KEYS_ADDED,
    ManifestConfig,
    RunConfig,
    config_fingerprint_fields,
    redacted,
)
from whisper_batch.pipeline.inputs import InputFormat
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.manifest import ManifestError, ManifestRow, input_format, read_manifest
from whisper_batch.pipeline.secrets import redact_uri
from whisper_batch.pipeline.sink import collect_stats

logger = logging.getLogger(__name__)

_INT64 = (-(2**63), 2**63 - 1)
_PACKAGES = ("whisper-batch", "torch", "ray", "pyarrow", "fsspec", "s3fs", "numpy", "av", "tokenizers")


class PlanMismatch(RuntimeError):
    """OUTPUT holds a run of a different manifest, shard size or results-changing config."""


@dataclass(frozen=True)
class Plan:
    input_uri: str
    # the input format's name for the input: "jsonl", "csv", "parquet", "audio-folder", "audio-glob", "audio-file",
    # "tar" or "parquet-audio" (see whisper_batch.pipeline.inputs)
    manifest_format: str
    n_rows: int
    shard_size: int
    # sha256 over the normalised rows: any change to ids, paths, offsets, durations, texts or extras changes it
    fingerprint: str
    # extra manifest field -> Arrow type name ("int64", "float64", "bool", "string"), in order of first appearance
    extra_types: dict[str, str] = field(default_factory=dict)
    # the ManifestConfig field names used to read the manifest (so later passes read it the same way)
    manifest_fields: dict[str, Any] = field(default_factory=dict)
    # first row of each shard, for inputs whose shards follow their container files (tar shards, Parquet files
    # with embedded audio: a shard never spans two files, a file of more than shard_size samples is split into
    # consecutive shards); None: fixed shards of shard_size rows
    shard_starts: list[int] | None = None

    @property
    def n_shards(self) -> int:
        if self.shard_starts is not None:
            return len(self.shard_starts)
        return -(-self.n_rows // self.shard_size)

    def shard_of(self, index: int) -> int:
        if self.shard_starts is not None:
            return bisect_right(self.shard_starts, index) - 1
        return index // self.shard_size

    def shard_rows(self, shard_id: int) -> range:
        if self.shard_starts is not None:  # shards that follow container files
            starts = self.shard_starts
            return range(starts[shard_id], starts[shard_id + 1] if shard_id + 1 < len(starts) else self.n_rows)
        return range(shard_id * self.shard_size, min((shard_id + 1) * self.shard_size, self.n_rows))

    def manifest_config(self) -> ManifestConfig:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.manifest_fields.items()}
        return ManifestConfig(**{**values, "shard_size": self.shard_size})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_uri": redact_uri(self.input_uri), "n_shards": self.n_shards}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(**{k: v for k, v in d.items() if k != "n_shards"})


@dataclass(frozen=True)
class ResumeState:
    # shards with a completion record and a data file
    done: list[int]
    # shards still to run, ascending
    pending: list[int]
    # True when OUTPUT held no plan yet
    fresh: bool


def _row_key(row: ManifestRow) -> bytes:
    fields = [row.id, row.uri, row.offset, row.duration, row.reference, row.language, row.extra]
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n"


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if _INT64[0] <= value <= _INT64[1] else "string"
    if isinstance(value, float):
        return "float64"
    return "string"


def merge_kinds(kinds: set[str]) -> str:
    """One stable Arrow type for the kinds seen in a field (numbers widen to float64, anything mixed is string)."""
    if kinds == {"int64"}:
        return "int64"
    if kinds and kinds <= {"int64", "float64"}:
        return "float64"
    if kinds == {"bool"}:
        return "bool"
    return "string"


def build_plan(input_uri: str, cfg: RunConfig, storage_options: dict[str, Any] | None = None) -> Plan:
    """One streaming pass over the manifest: count, fingerprint, duplicate ids, extra-field types."""
    mcfg = cfg.manifest
    hasher = hashlib.sha256()
    digests = array("Q")  # 8 bytes per row, so a manifest of 10M rows costs 80 MB
    kinds: dict[str, set[str]] = {}
    n_rows = 0
    fmt, fmt_name = input_format(input_uri, storage_options, mcfg)
    starts: list[int] | None = [] if fmt.shards_follow_files else None
    container, in_shard = None, 0
    for row in read_manifest(input_uri, storage_options, mcfg):
        if starts is not None:  # a new shard at each file and every shard_size samples within one
            here = fmt.file_of(row)
            if here != container or in_shard == mcfg.shard_size:
                starts.append(n_rows)
                container, in_shard = here, 0
            in_shard += 1
        hasher.update(_row_key(row))
        digests.append(int.from_bytes(hashlib.blake2b(row.id.encode(), digest_size=8).digest(), "little"))
        for name, value in row.extra.items():
            seen = kinds.setdefault(name, set())
            if (kind := _kind(value)) is not None:
                seen.add(kind)
        n_rows += 1
    if n_rows == 0:
        raise ManifestError(
            f"input {redact_uri(input_uri)!r} has no rows (for a folder or glob: no files ending in "
            f"{', '.join(mcfg.audio_extensions)})"
        )
    _check_duplicates(digests, input_uri, storage_options, mcfg, fmt)
    manifest_fields = {k: v for k, v in asdict(mcfg).items() if k != "shard_size"}
    manifest_fields["audio_extensions"] = list(manifest_fields["audio_extensions"])
    extra_types = {name: merge_kinds(seen) for name, seen in kinds.items()}
    plan = Plan(input_uri, fmt_name, n_rows, mcfg.shard_size, hasher.hexdigest(), extra_types, manifest_fields, starts)
    logger.info("plan: %d rows in %d shards of %d", n_rows, plan.n_shards, plan.shard_size)
    return plan


def _check_duplicates(
    digests: array, input_uri: str, storage_options: dict | None, mcfg: ManifestConfig, fmt: InputFormat
) -> None:
    ordered = np.sort(np.frombuffer(digests, dtype=np.uint64))
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    # rare error path: a second pass names the duplicated ids and their rows
    rows_by_id: dict[str, list[int]] = {}
    files_by_id: dict[str, list[str]] = {}  # for tar / Parquet inputs: the container files holding each id
    for row in read_manifest(input_uri, storage_options, mcfg):
        digest = int.from_bytes(hashlib.blake2b(row.id.encode(), digest_size=8).digest(), "little")
        if digest in repeated:
            rows_by_id.setdefault(row.id, []).append(row.index)
            if fmt.shards_follow_files:
                files_by_id.setdefault(row.id, []).append(fmt.file_of(row))
    dups = {k: v for k, v in rows_by_id.items() if len(v) > 1}
    if not dups:
        return  # 64-bit digest collision between distinct ids
    shown = "; ".join(
        f"{k!r} (rows {', '.join(map(str, v[:3]))}"
        + (f" in {', '.join(redact_uri(c) for c in files_by_id[k][:3])}" if k in files_by_id else "")
        + ")"
        for k, v in list(dups.items())[:5]
    )
    raise ManifestError(
        f"manifest {redact_uri(input_uri)!r} has {len(dups)} duplicated id(s): {shown}"
        f"{' ...' if len(dups) > 5 else ''}; ids must be unique "
        + ("(a sample's id is its key: keys must be unique across the input's files)" if files_by_id else
           "(drop the id field to derive ids from path + offset)")
    )


def iter_blocks(
    input_uri: str,
    plan: Plan,
    pending_shards: Collection[int],
    shards_per_block: int,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """Yields `(shard_ids, records)` per block of up to `shards_per_block` pending shards, ascending.

    Streams the manifest again, holding at most one block of rows.
    """
    pending = sorted(set(pending_shards))
    if bad := [s for s in pending if not 0 <= s < plan.n_shards]:
        raise ValueError(f"shards {bad[:5]} are outside the plan's {plan.n_shards} shards")
    blocks = [pending[i : i + shards_per_block] for i in range(0, len(pending), shards_per_block)]
    if not blocks:
        return
    block_no, current, records = 0, set(blocks[0]), []
    for row in read_manifest(input_uri, storage_options, plan.manifest_config()):
        shard = plan.shard_of(row.index)
        while shard > blocks[block_no][-1]:
            if records:
                yield _block_shards(records), records
            block_no, records = block_no + 1, []
            if block_no == len(blocks):
                return  # past the last pending shard: stop reading
            current = set(blocks[block_no])
        if shard in current:
            records.append(row.to_record(shard))
    if records:
        yield _block_shards(records), records


def _block_shards(records: list[dict[str, Any]]) -> list[int]:
    return sorted({r["shard_id"] for r in records})


def check_resume(layout: RunLayout, plan: Plan, cfg: RunConfig, model_name: str | None = None) -> ResumeState:
    """Compares `plan`/`cfg` with what OUTPUT already holds; returns done and pending shards.

    With `model_name` (the resolved model), the stored model name is compared instead of `model.name`, so
    `--model tiny.en` may resume a run started with the default (null) model.

    Raises:
        PlanMismatch: OUTPUT holds a run of a different manifest, shard size or results-changing config.
    """
    all_shards = range(plan.n_shards)
    if not layout.exists(layout.plan_json):
        return ResumeState(done=[], pending=list(all_shards), fresh=True)
    old = Plan.from_dict(layout.read_json(layout.plan_json))
    start_over = f"use a new -o OUTPUT, or delete {layout.display_uri} to start over"
    if old.fingerprint != plan.fingerprint or old.n_rows != plan.n_rows:
        raise PlanMismatch(
            f"the manifest changed since {layout.display_uri} was started ({old.n_rows} rows, fingerprint "
            f"{old.fingerprint[:12]}; now {plan.n_rows} rows, {plan.fingerprint[:12]}): {start_over}"
        )
    if old.shard_size != plan.shard_size:
        raise PlanMismatch(
            f"manifest.shard_size is {plan.shard_size} but {layout.display_uri} was started with {old.shard_size}: "
            f"run with --set manifest.shard_size={old.shard_size}, or {start_over}"
        )
    if layout.exists(layout.run_json):
        run = layout.read_json(layout.run_json)
        before = dict(run.get("results_config", {}))
        now = json.loads(json.dumps(config_fingerprint_fields(cfg)))  # same JSON types as the stored values
        if before:  # what a run stored before a key existed ran with
            before = {**{k: v for k, v in RESULT_KEYS_ADDED.items() if k in now}, **before}
        if model_name is not None:
            before["model.name"], now["model.name"] = run.get("model"), model_name
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            earlier = ("decode.padding_seconds" in changed and before.get("decode.padding_seconds") is None
                       and "decode.padding_seconds" in before)
            hint = (" (a run started with the defaults before 2026-12-06, when every encoder pass was 30 s, resumes "
                    "with --config configs/reference.yaml, or with `whisper-batch resume`, which reads its config)"
                    if earlier else "")
            raise PlanMismatch(
                f"config values that change results differ from the run in {layout.display_uri} ({diffs}): "
                f"use the same values to resume{hint}, or {start_over}"
            )
    done = sorted(s for s in layout.list_done_shards() if s < plan.n_shards)
    done_set = set(done)
    return ResumeState(done=done, pending=[s for s in all_shards if s not in done_set], fresh=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def package_versions() -> dict[str, str | None]:
    """Installed versions (read from metadata, so ray/torch are not imported here)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def start_run(layout: RunLayout, plan: Plan, cfg: RunConfig, model_name: str) -> dict[str, Any]:
    """Writes plan.json and run.json on the first start (exclusive create) and records this invocation.

    Returns the invocation record; pass it to `finish_run` at the end.
    """
    created_at = _now()
    if not layout.write_json(layout.plan_json, plan.to_dict(), exclusive=True):
        stored = Plan.from_dict(layout.read_json(layout.plan_json))
        if stored.fingerprint != plan.fingerprint:  # another driver raced us with another manifest
            raise PlanMismatch(f"{layout.display_uri} was just started with a different manifest")
    run = {
        "created_at": created_at,
        "input_uri": redact_uri(plan.input_uri),
        "output_uri": layout.display_uri,
        "manifest_fingerprint": plan.fingerprint,
        "plan": plan.to_dict(),
        "model": model_name,
        "results_config": config_fingerprint_fields(cfg),
        "config": redacted(cfg),
        "versions": package_versions(),
    }
    layout.write_json(layout.run_json, run, exclusive=True)
    started = datetime.now(timezone.utc)
    invocation = {
        "id": f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}",
        "started_at": started.isoformat(timespec="milliseconds"),
        "finished_at": None,
        "status": "running",
        "host": socket.gethostname(),
        "user": _user(),
        "pid": os.getpid(),
        "model": model_name,
        # throughput settings may change between invocations; run.json keeps the first one's
        "config": redacted(cfg),
    }
    layout.write_json(layout.invocation_file(invocation["id"]), invocation)
    return invocation


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def finish_run(layout: RunLayout, invocation: dict[str, Any], status: str = "ok", **info: Any) -> dict[str, Any]:
    """Marks the invocation finished and rewrites stats.json from all completion records; returns the stats."""
    invocation = {**invocation, **info, "finished_at": _now(), "status": status}
    layout.write_json(layout.invocation_file(invocation["id"]), invocation)
    stats = collect_stats(layout)
    layout.write_json(layout.stats_json, stats)
    return stats
