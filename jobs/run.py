"""The driver of ``whisper-batch run``: plan, resume, feed waves of shards to the graph, record stats.

The driver reads the manifest (streaming) and handles small commit records; audio, features and transcripts stay on
the workers, which write the shard files themselves.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config import RunConfig
from pipeline.layout import RunLayout
from pipeline.plan import build_plan, check_resume, finish_run, iter_waves, start_run
from pipeline.sink import failed_rows

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_done_before: int
    shards_committed: int
    rows_committed: int
    rows_failed: int
    stats: dict[str, Any]


def model_label(cfg: RunConfig) -> tuple[str, int]:
    """The model's display name and its mel bins, from the checkpoint's metadata (no weights loaded)."""
    from model import checkpoint

    if hasattr(checkpoint, "describe_model"):
        return checkpoint.describe_model(cfg.model.name, cfg.storage.storage_options)
    ckpt = checkpoint.load_checkpoint(cfg.model.name, cfg.storage.storage_options)
    return ckpt.name, ckpt.dims.n_mels


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False)
    else:
        # a local Ray: this machine's cores; the dashboard is not needed for a batch job
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def run(
    input_uri: str,
    output_uri: str,
    cfg: RunConfig,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
) -> RunSummary:
    """Transcribe ``input_uri`` into ``output_uri``, skipping shards already committed there."""
    so = cfg.storage.storage_options
    layout = RunLayout(output_uri, so)
    plan = build_plan(input_uri, cfg, so)
    name, n_mels = model_label(cfg)
    state = check_resume(layout, plan, cfg, name)  # raises PlanMismatch before any work
    invocation = start_run(layout, plan, cfg, name)
    only_rows = None
    pending = list(state.pending)
    if retry_failed:
        failed = failed_rows(layout)
        only_rows = sorted(i for rows in failed.values() for i in rows)
        pending = sorted(set(pending) | set(failed))
        echo(f"retrying {len(only_rows)} failed rows in {len(failed)} shards")
    echo(
        f"{plan.n_rows} rows in {plan.n_shards} shards; {len(state.done)} already committed, "
        f"{len(pending)} to do → {layout.display_uri}"
    )
    committed, rows, failed_count, status = 0, 0, 0, "ok"
    t0 = time.time()
    try:
        if pending:
            init_ray(cfg)
            from pipeline.graph import run_wave

            retry_rows = set(only_rows) if only_rows is not None else None
            never_committed = set(state.pending)
            for shard_ids, records in iter_waves(input_uri, plan, pending, cfg.ray.shards_per_wave, so):
                if retry_rows is not None:
                    # a committed shard redoes only its failed rows; a never-committed shard runs whole
                    records = [r for r in records if r["shard_id"] in never_committed or r["row_index"] in retry_rows]
                if not records:
                    continue
                for rec in run_wave(records, cfg, layout, plan.extra_types, n_mels, replace_failed=retry_failed):
                    committed += 1
                    rows += rec["rows"]
                    failed_count += rec["errors"]
                echo(
                    f"  committed shards {shard_ids[0]}–{shard_ids[-1]} "
                    f"({committed}/{len(pending)} this run, {time.time() - t0:.0f}s)"
                )
    except BaseException:
        status = "failed"
        raise
    finally:
        stats = finish_run(layout, invocation, status=status, shards_committed=committed)
    return RunSummary(layout.display_uri, plan.n_shards, len(state.done), committed, rows, failed_count, stats)
