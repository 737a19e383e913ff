"""A manifest of thousands of short silent rows in small shards: Ray's worker processes stay bounded, and every row
is committed exactly once.

The graph's zero-CPU tasks (input reads, the split into model calls, part writes and shard commits, all gone now)
used to be unbounded:
Ray started a worker process for every block waiting to be read or written (125 on this 2-core machine for
200k rows). The clips are silent, so the model stage skips them (quiet windows, a real code path) and the run
measures the graph, not the model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import (
    RUN_TIMEOUT_S,
    completion_records,
    count_ids,
    descendants,
    read_rows,
    start_whisper_batch,
    stop_processes,
    write_manifest,
    write_wav,
)
from whisper_batch.jobs.procs import ray_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_ROWS = 1000
SHARD_SIZE = 8  # 125 shards: as many blocks as the 200k-row run (shards of 256) that started 125 workers had
CORES = os.cpu_count() or 1
# actors on this node: the feature actors (ray.cpu_actors: 1) and one model actor per core
ACTORS = 1 + CORES
# Ray Data's own actors (stats, autoscaling coordinator, actor location tracker), and as many idle or starting
# workers as Ray's worker pool keeps or is starting (two per core)
BOUND = ACTORS + 3 + 2 * CORES


def test_thousands_of_rows_keep_worker_processes_bounded(tmp_path: Path):
    clip = write_wav(tmp_path / "quiet.wav", np.zeros(3200, np.float32))  # 0.2 s of silence
    manifest = write_manifest(
        tmp_path / "big.jsonl", ({"id": f"q{i:05d}", "audio_filepath": str(clip)} for i in range(N_ROWS))
    )
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start_whisper_batch("run", manifest, "-o", out, "--set", f"manifest.shard_size={SHARD_SIZE}", log=log)
    most, seen, at_most = 0, set(), []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            below = descendants(proc.pid)
            seen |= below
            workers = ray_workers(below)
            if len(workers) > most:
                most, at_most = len(workers), sorted(workers)
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        stop_processes(seen, timeout=30)
    text = log.read_text()
    assert proc.returncode == 0, f"run exited {proc.returncode}:\n{text[-4000:]}"
    assert 0 < most <= BOUND, f"{most} Ray worker processes at once (bound {BOUND}): {at_most}"
    rows = read_rows(out)
    counts = count_ids(rows)
    assert len(rows) == N_ROWS and set(counts.values()) == {1}, f"{len(rows)} rows for {N_ROWS}"
    assert all(r["error"] is None and not (r["text"] or "").strip() for r in rows)  # silence: no text, no error
    assert len(completion_records(out)) == -(-N_ROWS // SHARD_SIZE)
    assert "staged " in text
    print(f"{N_ROWS} rows in {len(completion_records(out))} shards: at most {most} Ray worker processes")
