"""The graph's own rules (pipeline/graph.py): the order of rows over model calls, the model stage's plan, the
featurizer's output tables, part files; and the driver's shard commits (pipeline/committer.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from whisper_batch.pipeline.config import load_config

# --- the model stage: its plan and the order of rows over its calls ------------------------------------------------


@pytest.fixture
def plan(monkeypatch):
    """plan(resources, *sets, rows=None): the model stage's plan on a cluster of ``resources`` for a run of ``rows``."""
    import whisper_batch.pipeline.cluster as cluster

    def plan(resources, *sets, rows=None):
        monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: resources)
        return cluster.model_resources(load_config(None, list(sets)), rows)

    return plan


def test_model_stage_plan_from_the_cluster(plan):
    import whisper_batch.pipeline.cluster as cluster

    # CPUs: one single-threaded actor per core, sharing the cores the feature actor leaves; calls of one decoding
    # batch of windows (model.batch_size), the first of 4 rows
    assert plan({"CPU": 2.0, "memory": 16e9}) == cluster.ModelPlan(2, 0.0, 0.5, 1, 4, 16)
    assert plan({"CPU": 16.0, "memory": 64e9}) == cluster.ModelPlan(16, 0.0, 15 / 16, 1, 4, 16)
    assert plan({"CPU": 2.0, "memory": 16e9}, "model.batch_size=8").call_windows == 8
    # windows go one per file at a time: calls of rows
    assert plan({"CPU": 2.0, "memory": 16e9}, "decode.condition_on_previous_text=true").call_windows is None
    # one core, held by the feature actor: the model actor still gets a (small) logical share, so it is scheduled
    assert plan({"CPU": 1.0, "memory": 16e9}) == cluster.ModelPlan(1, 0.0, 0.01, 1, 4, 16)
    # ... as many as half the memory holds
    small = plan({"CPU": 16.0, "memory": 4 * 2**30})
    assert 1 <= small.actors < 16 and small.actors * cluster.actor_memory(load_config(None, [])) <= 2 * 2**30
    # the config wins
    assert plan({"CPU": 2.0, "memory": 16e9}, "ray.model_actors=1", "ray.model_batch_size=16") == cluster.ModelPlan(
        1, 0.0, 1.0, 2, 16
    )
    # GPUs: one actor per GPU, calls that fill it
    assert plan({"CPU": 16.0, "GPU": 4.0, "memory": 64e9}) == cluster.ModelPlan(4, 1.0, 1.0, None, 64)
    assert plan({"CPU": 16.0, "GPU": 4.0}, "ray.gpus_per_model_actor=0.5").actors == 8


def test_no_more_model_actors_than_the_run_has_model_calls(plan):
    """A run of a few rows (a small job, a retry of failed rows) starts only the actors its model calls can keep
    busy; on a CPU node the fewer actors get more of its cores. A count the config gives is kept."""
    import whisper_batch.pipeline.cluster as cluster

    cpu2, cpu16, gpu4 = {"CPU": 2.0, "memory": 16e9}, {"CPU": 16.0, "memory": 64e9}, {"CPU": 16.0, "GPU": 4.0}
    assert plan(cpu2, rows=4) == cluster.ModelPlan(1, 0.0, 1.0, 2, 4, 16)  # one call of 4 rows: one actor, both cores
    assert plan(cpu2, rows=5) == plan(cpu2) == cluster.ModelPlan(2, 0.0, 0.5, 1, 4, 16)
    assert plan(cpu16, rows=9) == cluster.ModelPlan(3, 0.0, 1.0, 5, 4, 16)  # 3 calls
    assert plan(cpu16, rows=1000) == plan(cpu16)
    assert plan(gpu4, rows=100) == cluster.ModelPlan(2, 1.0, 1.0, None, 64)  # 2 calls of 64 rows
    assert plan(gpu4, "ray.model_batch_size=1", rows=3).actors == 3
    assert plan(cpu2, "ray.model_actors=2", rows=1).actors == 2  # the config wins
    assert plan(cpu2, rows=0).actors == 1


# --- the featurizer -----------------------------------------------------------------------------------------------


def test_the_featurizer_yields_a_block_one_model_call_at_a_time(tmp_path):
    """The model stage starts on a block's first rows: each table the featurizer yields is one row holding one model
    call, the first of the plan's first rows, the last ones spread over the model actors; every row once."""
    import wave

    import pyarrow as pa

    from whisper_batch.pipeline.calls import CallShape, unpack_calls
    from whisper_batch.pipeline.graph import ArrowFeaturizer
    from whisper_batch.pipeline.schema import RECORD_SCHEMA

    rows = []
    for i in range(11):
        path = tmp_path / f"{i}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
            t = np.arange(int(16000 * (0.5 + 0.1 * i))) / 16000
            f.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
        rows.append({"shard_id": 0, "row_index": i, "id": f"r{i}", "audio_filepath": str(path), "uri": str(path),
                     "offset": 0.0, "duration": None, "reference": None, "language": None, "extra_json": "{}"})
    featurizer = ArrowFeaturizer(load_config(None, []), 80, CallShape(rows=2, windows=16, actors=2))
    tables = list(featurizer(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)))
    assert [t.num_rows for t in tables] == [1, 1, 1]
    calls = [unpack_calls(t) for t in tables]
    assert [len(c) for c in calls] == [2, 5, 4]  # 9 one-window rows left at the end: over 2 actors
    assert sorted(r["row_index"] for c in calls for r in c) == list(range(11))
    assert all(len(r["mel_frames"]) == 1 and len(r["mel"]) > 0 for c in calls for r in c)


# --- part files and shard commits --------------------------------------------------------------------------------


def _layout(tmp_path: Path):
    from whisper_batch.pipeline.layout import RunLayout

    return RunLayout(str(tmp_path / "out"))


def _part(layout, shard: int, rows: list[int]) -> dict:
    """A model call's part record for ``rows`` of ``shard``, its part file written as a model actor writes it."""
    from whisper_batch.pipeline.graph import write_parts
    from whisper_batch.pipeline.schema import transcripts_table

    table = transcripts_table([
        {"shard_id": shard, "row_index": i, "id": f"r{i}", "text": f"text {i}", "model": "tiny.en", "duration": 1.5,
         "window_temperatures": [0.0], "decode_s": 0.25}
        for i in rows
    ])
    [part] = write_parts(table, layout, "inv", {}).to_pylist()
    return part


def _committer(layout, expected: dict[int, int], records: list, parts: list | None = None):
    from whisper_batch.pipeline.committer import ShardCommitter

    on_part = (lambda part, new: parts.append((part["shard_id"], new))) if parts is not None else None
    return ShardCommitter(layout, expected, {}, records.append, on_part=on_part)


def test_a_model_call_writes_a_part_file_per_shard_under_the_invocations_staging(tmp_path):
    import pyarrow.parquet as pq

    from whisper_batch.pipeline.graph import write_parts
    from whisper_batch.pipeline.schema import transcripts_table

    layout = _layout(tmp_path)
    rows = [{"shard_id": s, "row_index": i, "id": f"r{i}", "duration": 2.0,
             "error": "timeout: 60 s" if i == 3 else None} for s, i in ((1, 3), (0, 0), (1, 2))]
    parts = write_parts(transcripts_table(rows), layout, "inv", {}).to_pylist()
    assert [(p["shard_id"], p["row_indices"], p["audio_seconds"], p["error_causes"]) for p in parts] == [
        (0, [0], 2.0, []), (1, [3, 2], 4.0, ["timeout"])]
    for p in parts:
        assert p["path"].startswith(f"{layout.staging_dir('inv')}/parts/{p['shard_id']:05d}/")
        assert pq.read_table(p["path"]).column("row_index").to_pylist() == p["row_indices"]


def test_a_shard_commits_once_its_expected_rows_are_all_written(tmp_path):
    import pyarrow.parquet as pq

    layout = _layout(tmp_path)
    records, seen = [], []
    first, second = _part(layout, 0, [0, 1]), _part(layout, 0, [1, 2])  # row 1 again: a retried task's part
    with _committer(layout, {0: 3, 1: 1}, records, seen) as committer:
        committer.add_part(first)
        committer.drain()
        assert not records and not Path(layout.shard_file(0)).exists()  # 2 of 3 rows: not yet
        committer.add_part(_part(layout, 1, [7]))
        committer.add_part(second)
        committer.drain()
    assert sorted(r["shard_id"] for r in records) == [0, 1]
    assert seen == [(0, 2), (1, 1), (0, 1)]  # each part's rows not seen before
    assert pq.read_table(layout.shard_file(0)).column("row_index").to_pylist() == [0, 1, 2]  # each row once
    assert Path(layout.record_file(0)).exists() and Path(layout.record_file(1)).exists()
    assert not Path(first["path"]).exists() and not Path(second["path"]).exists()  # parts gone at the commit
    assert committer.progress() == (2, 2)
    committer.check_complete()


def test_a_part_re_sent_after_its_shard_committed_is_ignored(tmp_path):
    layout = _layout(tmp_path)
    records, seen = [], []
    part = _part(layout, 0, [0])
    with _committer(layout, {0: 1}, records, seen) as committer:
        committer.add_part(part)
        committer.drain()
        committer.add_part(_part(layout, 0, [0]))  # a retried task's copy, after the commit
        committer.drain()
    assert len(records) == 1 and seen == [(0, 1)]


def test_a_failed_commit_fails_the_run(tmp_path, monkeypatch):
    from whisper_batch.pipeline import committer as committer_module

    def fail(*args, **kwargs):
        raise OSError("the store refused the write")

    monkeypatch.setattr(committer_module, "commit_shard_table", fail)
    layout = _layout(tmp_path)
    records: list = []
    with _committer(layout, {0: 1}, records) as committer:
        committer.add_part(_part(layout, 0, [0]))
        with pytest.raises(OSError, match="the store refused the write"):
            committer.drain()
    assert not records and not Path(layout.record_file(0)).exists()


def test_a_shard_not_all_written_when_the_graph_ends_is_reported(tmp_path):
    from whisper_batch.pipeline.committer import Incomplete

    layout = _layout(tmp_path)
    with _committer(layout, {0: 3, 1: 1}, []) as committer:
        committer.add_part(_part(layout, 0, [0]))
        committer.add_part(_part(layout, 1, [5]))
        committer.drain()
    with pytest.raises(Incomplete, match=r"1 shard\(s\) not committed \(e.g. shard 0: 1 of 3 rows written\)"):
        committer.check_complete()
