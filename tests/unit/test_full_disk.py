"""A full disk under OUTPUT: a write that fails with ENOSPC half way leaves nothing that counts (no half file at a
final name, no completion record before its file), the error names OUTPUT and says how to resume, and once space is
back the resume commits exactly what is missing. At the commit level (no Ray), and through `whisper-batch run`."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.shards import read_committed
from tests.unit.test_input_stager import _setup as stager_setup
from tests.unit.test_sink import EXTRA, make_rows
from tests.unit.test_verify import INVOCATION, N_ROWS, make_output
from whisper_batch.jobs.cli import main
from whisper_batch.jobs.run import remove_staging
from whisper_batch.pipeline import layout as layout_module
from whisper_batch.pipeline.committer import ShardCommitter
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import NoSpace, RunLayout, is_no_space
from whisper_batch.pipeline.plan import check_resume
from whisper_batch.pipeline.schema import output_table
from whisper_batch.pipeline.sink import table_to_parquet_bytes
from whisper_batch.pipeline.stager import InputStager
from whisper_batch.pipeline.verify import verify_output


class FullDisk:
    """``open`` for pipeline/layout.py on a disk with room for ``room`` more files: the next file written gets half
    its bytes, then ENOSPC (or ``code``: EDQUOT, a quota reached)."""

    def __init__(self, room: int, code: int = errno.ENOSPC):
        self.room, self.code = room, code

    def __call__(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        if self.room > 0:
            self.room -= 1
            return f
        return _HalfWriter(f, self.code)


class _HalfWriter:
    def __init__(self, f, code: int):
        self.f, self.code = f, code

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def committer(layout: RunLayout, shards: list[int]) -> ShardCommitter:
    return ShardCommitter(layout, {s: 2 for s in shards}, EXTRA, on_commit=lambda record: None, threads=1)


def write_parts(layout: RunLayout, shards: list[int]) -> list[dict]:
    """Each shard's rows as one part file, as a model call writes them; their part records."""
    parts = []
    for shard in shards:
        rows = make_rows(shard, [2 * shard, 2 * shard + 1])
        path = layout.new_part_file(INVOCATION, shard)
        layout.write_bytes(path, table_to_parquet_bytes(output_table(rows, EXTRA)))
        parts.append(
            {
                "shard_id": shard,
                "path": path,
                "row_indices": [r["row_index"] for r in rows],
                "decode_s": 0.1,
                "windows": 1,
                "window_fallbacks": 0,
            }
        )
    return parts


@pytest.mark.parametrize("room", [1, 2])  # full at shard 0's record, or at shard 1's file
def test_a_full_disk_commits_nothing_half_and_the_resume_completes(tmp_path: Path, monkeypatch, room: int):
    out = tmp_path / "out"
    layout, plan = make_output(str(out), shards=[])
    pending = list(range(plan.n_shards))
    parts = write_parts(layout, [0, 1])
    monkeypatch.setattr(layout_module, "open", FullDisk(room), raising=False)  # fills up: shard 0's file, record, ...
    with committer(layout, pending) as c, pytest.raises(NoSpace) as info:
        for part in parts:
            c.add_part(part)
        c.drain()
    # the first failed commit collected: a write of either shard once the disk is full
    written = r"(shards/0000[01]\.json|transcripts/shard-0000[01]\.parquet)"
    assert re.match(
        rf"no space left on {re.escape(str(out))} \(writing {written}\): free space there and run the same command "
        "again to resume",
        str(info.value),
    ), str(info.value)
    monkeypatch.undo()  # space is back

    done = sorted(layout.list_done_shards())
    assert done == ([] if room == 1 else [0])  # a file without its record does not count
    assert not os.listdir(out / "_tmp"), "a half-written temporary was left"
    assert os.listdir(out / "transcripts") == ["shard-00000.parquet"]  # shard 1's half file is nowhere
    kinds = [p.kind for p in verify_output(layout).problems]
    assert kinds == (["uncommitted", "staging"] if room == 1 else ["staging"])

    resume = check_resume(layout, plan, load_config(None)).pending
    assert resume == [s for s in pending if s not in done]
    with committer(layout, resume) as c:
        for part in write_parts(layout, resume):
            c.add_part(part)
        c.drain()
    remove_staging(layout, INVOCATION)  # the run's end
    v = verify_output(layout)
    assert v.ok and v.rows == N_ROWS, [p.line() for p in v.problems]
    assert sorted(read_committed(layout, ["row_index"]).column("row_index").to_pylist()) == list(range(N_ROWS))


def test_a_full_disk_fails_run_with_a_message_naming_the_output(tmp_path: Path, monkeypatch):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav"}) + "\n")
    out = tmp_path / "out"
    monkeypatch.setattr(layout_module, "open", FullDisk(0), raising=False)
    result = CliRunner().invoke(main, ["run", str(manifest), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert (
        f"Error: no space left on {out} (writing lock.json): free space there and run the same command again"
        in result.output
    )
    assert "Traceback" not in result.output
    assert not (out / "lock.json").exists() and not (out / "plan.json").exists()


def test_no_space_is_found_through_what_wraps_it(tmp_path: Path, monkeypatch):
    error = RunLayout("/tmp/out").no_space("/tmp/out/transcripts/shard-00001.parquet")
    assert is_no_space(error)
    try:
        try:
            raise error
        except NoSpace as e:
            raise RuntimeError("a commit failed") from e
    except RuntimeError as wrapped:
        assert is_no_space(wrapped)
    # a worker's error as Ray relays it: its text, the class gone
    assert is_no_space(RuntimeError("ray::ArrowTranscriber() ... NoSpace: no space left on s3://b/out (writing x)"))
    # another disk's (Ray's spill folder, a log file): not OUTPUT's, not named as OUTPUT's
    assert not is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    again = pickle.loads(pickle.dumps(error))  # as Ray sends it from a worker
    assert type(again) is NoSpace and str(again) == str(error) and again.errno == errno.ENOSPC
    layout = RunLayout(str(tmp_path / "out"))
    monkeypatch.setattr(layout_module, "open", FullDisk(0, errno.EDQUOT), raising=False)
    with pytest.raises(NoSpace, match=re.escape(f"no space left on {layout.display_uri} (writing stats.json)")):
        layout.write_bytes(layout.stats_json, b"{}")  # a quota reached is a full disk too


def test_a_full_disk_while_staging_is_raised_as_the_graph_waits(tmp_path: Path, monkeypatch):
    # the ABORT file that ends the feature actors' waits cannot be written either: the driver's graph loop asks the
    # stager (run_graph's check) instead of waiting for the stall timeout
    manifest, cfg, plan, layout = stager_setup(tmp_path)
    pending = list(range(plan.n_shards))
    stager = InputStager(layout, "x", str(manifest), plan, pending, cfg, None, pending)
    monkeypatch.setattr(layout_module, "open", FullDisk(0), raising=False)
    expected = re.escape(f"no space left on {layout.display_uri} (writing _staging/x/input/block-000000.parquet)")
    with pytest.raises(NoSpace, match=expected), stager.running(ahead_blocks=3):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the graph's loop, yielding nothing
            stager.check()
            time.sleep(0.01)
    assert not Path(layout.staging_abort("x")).exists()


def test_a_model_actor_s_full_disk_relayed_by_ray_fails_run_with_one_message(tmp_path: Path, monkeypatch):
    import ray.exceptions

    from whisper_batch.jobs import run as run_module

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav"}) + "\n")
    out = tmp_path / "out"
    cause = RunLayout(str(out)).no_space(str(out / "_staging" / INVOCATION / "parts" / "00000" / "a.parquet"))

    def graph_fails(self, retry_failed: bool = False):  # as the graph's iterator raises a model actor's error
        raise ray.exceptions.RayTaskError("ArrowTranscriber.__call__", f"NoSpace: {cause}", cause).as_instanceof_cause()

    monkeypatch.setattr(run_module.RunDriver, "run", graph_fails)
    with pytest.raises(NoSpace) as info:
        run_module.run(str(manifest), str(out), load_config(None))
    assert type(info.value) is NoSpace  # not Ray's subclass, whose text is a worker's traceback
    assert str(info.value).startswith(f"no space left on {out}: free space there and run the same command again")
    assert not (out / "lock.json").exists()
