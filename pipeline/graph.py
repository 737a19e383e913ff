"""The Ray Data graph of one wave of shards.

manifest records → ``Featurizer`` (CPU actor pool: fetch, decode, windows, log-mel) → ``Transcriber`` (model actor
pool, one Whisper replica each, a GPU each when the cluster has GPUs) → group by shard → ``ShardWriter`` (a worker
writes the shard's Parquet file and completion record). Only the small completion records come back to the driver.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow as pa
import ray

from .config import RunConfig
from .layout import RunLayout
from .schema import SEGMENT_TYPE
from .sink import write_shard

log = logging.getLogger(__name__)

RECORD_FIELDS = [
    ("shard_id", pa.int32()),
    ("row_index", pa.int64()),
    ("id", pa.string()),
    ("audio_filepath", pa.string()),
    ("uri", pa.string()),
    ("offset", pa.float64()),
    ("duration", pa.float64()),
    ("reference", pa.string()),
    ("language", pa.string()),
    ("extra_json", pa.string()),
]
RECORD_SCHEMA = pa.schema(RECORD_FIELDS)
FEATURE_SCHEMA = pa.schema(
    RECORD_FIELDS
    + [
        ("mel", pa.large_binary()),
        ("mel_frames", pa.list_(pa.int64())),
        ("window_starts", pa.list_(pa.float64())),
        ("audio_seconds", pa.float64()),
        ("error", pa.string()),
        ("decode_s", pa.float64()),
    ]
)
TRANSCRIPT_SCHEMA = pa.schema(
    [f for f in RECORD_FIELDS if f[0] != "language"]
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


class ArrowFeaturizer:
    """Ray Data callable around :class:`~pipeline.transcriber.Featurizer` with a fixed output schema."""

    def __init__(self, cfg: RunConfig, n_mels: int):
        from .transcriber import Featurizer

        self.inner = Featurizer(cfg, n_mels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.inner.featurize_row(r) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA)


class ArrowTranscriber:
    """Ray Data callable around :class:`~pipeline.transcriber.Transcriber` (loads the model once per actor)."""

    def __init__(self, cfg: RunConfig, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from .transcriber import Transcriber

        self.inner = Transcriber(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.inner.transcribe_rows(batch.to_pylist())
        for r in rows:
            r["duration"] = r.get("duration") or 0.0
        return pa.Table.from_pylist(rows, schema=TRANSCRIPT_SCHEMA)


def write_group(group: pa.Table, layout: RunLayout, extra_types: dict[str, str], replace_failed: bool) -> pa.Table:
    """Write one shard (one group of rows) and return its completion record as a one-row table."""
    rows = group.to_pylist()
    shard_id = int(rows[0]["shard_id"])
    model = next((r["model"] for r in rows if r.get("model")), None)
    stats = {
        "decode_seconds": sum(r.get("decode_s") or 0.0 for r in rows),
        "windows": sum(len(r.get("window_temperatures") or []) for r in rows),
        "window_fallbacks": sum(sum(t > 0 for t in r.get("window_temperatures") or []) for r in rows),
    }
    record = write_shard(layout, shard_id, rows, extra_types, model, stats, replace_failed)
    return pa.table({"shard_id": [shard_id], "record": [json.dumps(record)]})


def model_resources(cfg: RunConfig) -> tuple[float, float, int | None]:
    """(num_gpus, num_cpus, torch threads) per model actor, from the config and the cluster."""
    cluster = ray.cluster_resources()
    gpus = cfg.ray.gpus_per_model_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if gpus > 0:
        return gpus, 1.0, None
    # CPU inference: give each model actor the cores the feature actors leave free
    cpus = max(1.0, (cluster.get("CPU", os.cpu_count() or 1) - cfg.ray.cpu_actors) / cfg.ray.model_actors)
    return 0.0, float(int(cpus)), int(cpus)


def run_wave(
    records: list[dict[str, Any]],
    cfg: RunConfig,
    layout: RunLayout,
    extra_types: dict[str, str],
    n_mels: int,
    replace_failed: bool = False,
) -> list[dict[str, Any]]:
    """Transcribe and commit the shards of ``records``; returns their completion records."""
    gpus, cpus, threads = model_resources(cfg)
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    step = max(1, cfg.ray.feature_batch_size)
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]  # many blocks: many actors busy
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        ArrowFeaturizer,
        fn_constructor_kwargs={"cfg": cfg, "n_mels": n_mels},
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.cpu_actors),
        batch_size=cfg.ray.feature_batch_size,
        batch_format="pyarrow",
        num_cpus=1,
    )
    ds = ds.map_batches(
        ArrowTranscriber,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": threads},
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.model_actors),
        batch_size=cfg.ray.model_batch_size,
        batch_format="pyarrow",
        num_gpus=gpus,
        num_cpus=cpus,
    )
    ds = ds.groupby("shard_id").map_groups(
        write_group, batch_format="pyarrow", fn_args=(layout, extra_types, replace_failed)
    )
    return [json.loads(r["record"]) for r in ds.take_all()]
