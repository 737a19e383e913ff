"""``whisper-batch verify``: an output's shards checked against its plan and completion records (checksums, row
counts, rows once), stray and half-committed files and leftover staging named, ``--repair`` un-committing exactly
what the same ``run`` then redoes. Outputs are made through the production commit path (no Ray)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner

from tests.shards import read_committed, write_shard
from tests.unit.test_sink import EXTRA, make_rows
from whisper_batch.jobs.cli import main
from whisper_batch.jobs.lock import RunLock
from whisper_batch.jobs.run import remove_staging
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import Plan, check_resume
from whisper_batch.pipeline.verify import verify_output

N_ROWS, SHARD_SIZE = 8, 2  # shards 0-3
INVOCATION = "20260101T000000000000Z-abcdef"  # the form of plan.start_run's ids


def make_output(root: str, shards=range(N_ROWS // SHARD_SIZE)) -> tuple[RunLayout, Plan]:
    """plan.json and the given shards committed, as a run leaves them."""
    layout = RunLayout(root)
    plan = Plan("manifest.jsonl", "jsonl", N_ROWS, SHARD_SIZE, "f" * 64, EXTRA)
    layout.write_json(layout.plan_json, plan.to_dict())
    for shard in shards:
        commit(layout, plan, shard)
    return layout, plan


def commit(layout: RunLayout, plan: Plan, shard: int) -> dict:
    return write_shard(layout, shard, make_rows(shard, plan.shard_rows(shard)), EXTRA, "tiny.en")


def verify(out, *args: str):
    return CliRunner().invoke(main, ["verify", str(out), *args])


def problems(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("PROBLEM ")]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_a_complete_output_is_clean(out: Path):
    make_output(str(out))
    result = verify(out)
    assert result.exit_code == 0, result.output
    assert problems(result) == []
    assert f"verify {out}: ok; 4/4 shards committed and sound, 0 pending; 8/8 rows, each once" in result.output


def test_records_hold_size_and_checksum(out: Path):
    import hashlib

    layout, plan = make_output(str(out), shards=[0])
    record = json.loads((out / "shards" / "00000.json").read_text())
    data = (out / "transcripts" / "shard-00000.parquet").read_bytes()
    assert record["rows"] == 2 and record["bytes"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()


def test_missing_truncated_and_copied_shards_are_named_and_repaired_for_the_resume(out: Path):
    layout, plan = make_output(str(out))
    transcripts = out / "transcripts"
    (transcripts / "shard-00001.parquet").unlink()
    data = (transcripts / "shard-00002.parquet").read_bytes()
    (transcripts / "shard-00002.parquet").write_bytes(data[: len(data) // 2])
    shutil.copy(transcripts / "shard-00003.parquet", transcripts / "shard-00003 (1).parquet")

    result = verify(out)
    assert result.exit_code == 1, result.output
    found = problems(result)
    assert len(found) == 3, result.output
    assert found[0].startswith("PROBLEM missing shard=1 transcripts/shard-00001.parquet: ")
    assert found[1].startswith("PROBLEM corrupt shard=2 transcripts/shard-00002.parquet: ")
    assert "truncated" in found[1]
    assert found[2].startswith("PROBLEM stray transcripts/shard-00003 (1).parquet: ")
    summary = "3 problem(s) (corrupt 1, missing 1, stray 1); 2/4 shards committed and sound, 0 pending; 4/8 rows\n"
    assert summary in result.output

    result = verify(out, "--repair")
    assert result.exit_code == 0, result.output
    assert "REPAIRED missing shard=1" in result.output and "REPAIRED stray" in result.output
    assert "the same `whisper-batch run` command now does 2 shard(s) (1, 2)" in result.output
    assert sorted(os.listdir(transcripts)) == ["shard-00000.parquet", "shard-00003.parquet"]
    assert sorted(os.listdir(out / "shards")) == ["00000.json", "00003.json"]

    # the resume (what `run` does): the shards without a completion record, and exactly them
    pending = check_resume(layout, plan, load_config(None)).pending
    assert pending == [1, 2]
    for shard in pending:
        commit(layout, plan, shard)
    result = verify(out)
    assert result.exit_code == 0, result.output
    rows = pads.dataset(str(transcripts), format="parquet").to_table(columns=["id", "row_index"])  # what readers see
    assert sorted(rows.column("row_index").to_pylist()) == list(range(N_ROWS))
    assert sorted(read_committed(layout, ["id"]).column("id").to_pylist()) == sorted(f"u{i}" for i in range(N_ROWS))


def test_a_changed_byte_fails_the_checksum(out: Path):
    make_output(str(out), shards=[0, 1])
    path = out / "transcripts" / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    path.write_bytes(bytes(data))
    result = verify(out)
    assert result.exit_code == 1
    assert problems(result) == [
        "PROBLEM corrupt shard=1 transcripts/shard-00001.parquet: its sha256 differs from its completion record's "
        "(the file changed after its commit)"
    ]
    assert "INFO 2 shard(s) pending (2-3)" in result.output


def test_records_without_a_checksum_are_accepted(out: Path):
    make_output(str(out), shards=[0, 1])
    for name in ("00000.json", "00001.json"):  # as an older version wrote them
        path = out / "shards" / name
        record = json.loads(path.read_text())
        del record["sha256"], record["bytes"]
        path.write_text(json.dumps(record))
    result = verify(out)
    assert result.exit_code == 0, result.output
    assert "INFO 2 shard(s) have no checksum recorded" in result.output
    path = out / "transcripts" / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[:100])
    result = verify(out)
    assert result.exit_code == 1
    assert problems(result)[0].startswith("PROBLEM corrupt shard=1 transcripts/shard-00001.parquet: not readable as ")


def test_rows_that_differ_from_the_plan_and_duplicate_ids(out: Path):
    layout, plan = make_output(str(out), shards=[0])
    write_shard(layout, 1, make_rows(1, [2, 2, 4]), EXTRA, "tiny.en")  # row 3 missing, 2 twice, 4 is shard 2's
    rows = make_rows(2, [4, 5])
    rows[1]["id"] = "u0"  # shard 0's id
    write_shard(layout, 2, rows, EXTRA, "tiny.en")
    result = verify(out)
    assert result.exit_code == 1
    found = problems(result)
    assert found[0] == (
        "PROBLEM corrupt shard=1 transcripts/shard-00001.parquet: rows differ from the plan's rows 2-3: 1 missing "
        "(e.g. row 3), 1 not of this shard (e.g. row 4)"
    )  # the two rows 2 were one row once committed (a commit keeps a row index once)
    assert found[1].startswith("PROBLEM duplicate-id shard=0 transcripts/shard-00000.parquet: 1 id(s) that other ")
    assert found[2].startswith("PROBLEM duplicate-id shard=2 ") and "'u0', in shards 0, 2" in found[2]
    assert verify(out, "--repair").exit_code == 0
    assert check_resume(layout, plan, load_config(None)).pending == [0, 1, 2, 3]


def test_uncommitted_files_and_leftover_staging(out: Path):
    layout, plan = make_output(str(out), shards=[0])
    (out / "shards" / "00000.json").rename(out / "00000.json")  # a commit that never wrote its record
    staging = Path(layout.staging_dir(INVOCATION), "input")
    staging.mkdir(parents=True)
    (staging / "block-000000.parquet").write_bytes(b"x")
    layout.write_json(
        layout.invocation_file(INVOCATION),
        {"id": INVOCATION, "started_at": "2026-01-01T00:00:00", "finished_at": None, "host": "h", "pid": 1},
    )
    (Path(layout.tmp_dir) / "x.tmp").write_bytes(b"half")  # _tmp/ is there: the local writes made it
    result = verify(out)
    assert result.exit_code == 1
    assert [line.split(":")[0] for line in problems(result)] == [
        "PROBLEM uncommitted shard=0 transcripts/shard-00000.parquet",
        f"PROBLEM staging _staging/{INVOCATION}",
        "PROBLEM staging _tmp",
    ]
    assert "never finished (killed)" in problems(result)[1]
    assert verify(out, "--repair").exit_code == 0
    assert not os.listdir(out / "transcripts") and not (out / "_staging" / INVOCATION).exists()
    assert verify(out).exit_code == 0


def test_a_live_run_is_not_judged_and_refuses_repair(out: Path):
    import socket

    layout, plan = make_output(str(out), shards=[0])
    lock = RunLock(layout, "live-run", heartbeat=3600)
    lock.acquire()  # this process is the live driver
    try:
        layout.write_json(
            layout.invocation_file(INVOCATION),
            {"id": INVOCATION, "finished_at": None, "host": socket.gethostname(), "pid": os.getpid()},
        )
        Path(layout.staging_dir(INVOCATION)).mkdir(parents=True)
        commit(layout, plan, 1)
        (out / "shards" / "00001.json").unlink()  # shard 1 is being committed: file written, record not yet
        result = verify(out)
        assert result.exit_code == 0, result.output
        assert f"INFO a run is live on {out}" in result.output
        result = verify(out, "--repair")
        assert result.exit_code == 1
        assert "--repair refused: another whisper-batch run is active" in result.output
        assert (out / "transcripts" / "shard-00001.parquet").exists()
    finally:
        lock.release()
    remove_staging(layout, INVOCATION)  # the run's end
    assert [line.split(":")[0] for line in problems(verify(out))] == [
        "PROBLEM uncommitted shard=1 transcripts/shard-00001.parquet"
    ]


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    result = verify(tmp_path)
    assert result.exit_code == 1
    assert f"Error: {tmp_path} is not a whisper-batch output: no plan.json" in result.output
    assert "Traceback" not in result.output


def test_object_store_output():
    # memory:// goes through the object-store paths (single PUTs, listings), as s3:// does
    root = f"memory://verify-{uuid.uuid4().hex[:8]}"
    try:
        layout, plan = make_output(root)
        assert verify_output(layout).ok
        layout.fs.rm(layout.shard_file(3))
        v = verify_output(layout)
        assert [p.line() for p in v.problems] == [
            "PROBLEM missing shard=3 transcripts/shard-00003.parquet: committed (shards/00003.json) but not there"
        ]
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
