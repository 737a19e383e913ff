"""The driver stages input blocks as the graph consumes them: a few blocks ahead of the commits, every row once, and a
failed staging ends the graph's waits (ABORT) and surfaces its error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import build_plan
from whisper_batch.pipeline.stager import InputStager, read_inputs


def _setup(tmp_path: Path, rows: int = 50, shard_size: int = 4):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "audio_filepath": f"/a/{i}.wav"}) + "\n"
                                for i in range(rows)))
    cfg = load_config(None, [f"manifest.shard_size={shard_size}"])
    plan = build_plan(str(manifest), cfg)
    layout = RunLayout(str(tmp_path / "out"))
    return manifest, cfg, plan, layout


def _staged(layout: RunLayout, stager: InputStager) -> list[str]:  # noqa: ARG001
    return [p for p in stager.files if Path(p).exists()]


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_stages_ahead_of_commits_only_and_every_row_once(tmp_path: Path):
    manifest, cfg, plan, layout = _setup(tmp_path)
    pending = list(range(plan.n_shards))  # 13 shards, one per block
    stager = InputStager(layout, "x", str(manifest), plan, pending, cfg, None, pending)
    assert len(stager.files) == 13 and sum(stager.expected.values()) == 50 and stager.expected[12] == 2
    assert stager.files[0] == layout.input_block("x", 0)
    assert not _staged(layout, stager)  # nothing written before the graph starts
    with stager.running(ahead_blocks=3):
        assert _wait(lambda: len(_staged(layout, stager)) == 3)
        time.sleep(0.3)
        assert len(_staged(layout, stager)) == 3  # no commit yet: it waits
        stager.committed(2)
        assert _wait(lambda: len(_staged(layout, stager)) == 5)
        stager.committed(100)
    assert len(_staged(layout, stager)) == 13  # leaving the block waited for the last one
    rows = read_inputs(pa.table({"path": stager.files}), layout, "x").to_pylist()
    assert [r["row_index"] for r in rows] == list(range(50))
    assert [r["shard_id"] for r in rows] == [i // 4 for i in range(50)]


def test_retry_failed_stages_only_those_rows(tmp_path: Path):
    manifest, cfg, plan, layout = _setup(tmp_path)
    # shard 1 committed with rows 5 and 6 failed; shard 3 never committed
    stager = InputStager(layout, "x", str(manifest), plan, [1, 3], cfg, [5, 6], {3})
    assert stager.expected == {1: 2, 3: 4}
    with stager.running(ahead_blocks=8):
        pass
    rows = [r["row_index"] for p in stager.files for r in pq.read_table(p).to_pylist()]
    assert rows == [5, 6, 12, 13, 14, 15]


def test_a_failed_staging_aborts_the_waiting_reads(tmp_path: Path):
    manifest, cfg, plan, layout = _setup(tmp_path)
    pending = list(range(plan.n_shards))
    stager = InputStager(layout, "x", str(manifest), plan, pending, cfg, None, pending)
    manifest.write_text("")  # the manifest emptied between planning and staging
    with pytest.raises(ValueError, match="the manifest changed while the run was reading it: shard 0 has 0 rows"):
        with stager.running(ahead_blocks=3):  # the graph's read fails; leaving the block raises the cause
            t0 = time.monotonic()
            with pytest.raises(RuntimeError, match="staging the input blocks failed"):
                read_inputs(pa.table({"path": [stager.files[0]]}), layout, "x", wait_seconds=30)
            assert time.monotonic() - t0 < 5  # the read gave up at once instead of waiting 30 s
            raise RuntimeError("the graph failed")
    assert Path(layout.staging_abort("x")).exists()
    assert not Path(stager.files[0]).exists()  # no empty block passed for the shards' rows


def test_rows_of_a_shard_are_staged_longest_first(tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    durations = [3.0, None, 100.0, 7.5, 60.0, 2.0, 89.0, 1.0]  # one row without a duration
    manifest.write_text(
        "".join(json.dumps({"id": f"r{i}", "audio_filepath": f"/a/{i}.wav", **({"duration": d} if d else {})}) + "\n"
                for i, d in enumerate(durations))
    )
    cfg = load_config(None, ["manifest.shard_size=4", "ray.shards_per_block=2"])
    plan = build_plan(str(manifest), cfg)
    layout = RunLayout(str(tmp_path / "out"))
    stager = InputStager(layout, "x", str(manifest), plan, [0, 1], cfg, None, {0, 1})
    with stager.running(ahead_blocks=8):
        pass
    [block] = stager.files
    rows = pq.read_table(block).to_pylist()
    # shard by shard; within a shard the longest first, a row without a duration after those with one
    assert [r["row_index"] for r in rows] == [2, 3, 0, 1, 6, 4, 5, 7]
    assert [r["shard_id"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
