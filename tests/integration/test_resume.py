"""Resume through the CLI: a driver killed with SIGKILL mid-run, refusals of changed manifests and configs, and a
rerun of a finished run that does nothing.

The kill happens after a random extra delay once the first shard has committed. The delay's seed is printed and
taken from WB_KILL_SEED when set, so a failing case can be replayed: WB_KILL_SEED=1234 pytest ... -k killed.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.integration.conftest import (
    RUN_TIMEOUT_S,
    alive,
    completion_records,
    count_ids,
    descendants,
    mtimes,
    output_of,
    read_rows,
    sigkill,
    start_whisper_batch,
    stop_processes,
    wait_until,
    whisper_batch,
    whisper_batch_ok,
    write_manifest,
)

pytestmark = pytest.mark.integration

KILL_ROWS = 16
KILL_SHARD_SIZE = 2
# small batches spread the commits over the run, so a kill after the first one interrupts real work
# one model actor decoding with beams: the run's commits spread over several seconds after the first, long enough for
# a kill to land among them (with the default layout the pipeline now commits the 8 shards within ~1.5 s)
KILL_SETTINGS = ("manifest.shard_size=2", "ray.model_batch_size=2", "ray.model_actors=1", "decode.beam_size=5")
MAX_EXTRA_DELAY_S = 2.0


def _kill_manifest(librispeech_rows: list[dict[str, Any]], eval_dir: Path, path: Path) -> Path:
    # the shortest utterances: several shards, little compute
    rows = sorted(librispeech_rows, key=lambda r: (r["duration"], r["id"]))[:KILL_ROWS]
    rows = sorted(rows, key=lambda r: r["id"])
    if len(rows) < KILL_ROWS:
        pytest.skip(f"the eval set has only {len(rows)} LibriSpeech rows, {KILL_ROWS} needed")
    return write_manifest(path, rows, base=eval_dir)


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_result(eval_dir, librispeech_rows, tmp_path: Path):
    manifest = _kill_manifest(librispeech_rows, eval_dir, tmp_path / "manifest.jsonl")
    sets = [a for s in KILL_SETTINGS for a in ("--set", s)]
    n_shards = KILL_ROWS // KILL_SHARD_SIZE

    reference = tmp_path / "uninterrupted"
    whisper_batch_ok("run", manifest, "-o", reference, *sets)
    expected = {r["id"]: r["text"] for r in read_rows(reference)}
    assert len(expected) == KILL_ROWS and all(t.strip() for t in expected.values())

    seed = int(os.environ.get("WB_KILL_SEED") or time.time_ns() % 1_000_000)
    delay = random.Random(seed).uniform(0.0, MAX_EXTRA_DELAY_S)
    print(f"kill after the first commit + {delay:.2f} s (WB_KILL_SEED={seed})")
    out = tmp_path / "out"
    proc = start_whisper_batch("run", manifest, "-o", out, *sets, log=tmp_path / "killed.log")
    try:
        if not wait_until(lambda: bool(completion_records(out)), proc, RUN_TIMEOUT_S, poll=0.1):
            pytest.fail(f"no shard committed before the driver {'ended' if proc.poll() is not None else 'timed out'}")
        time.sleep(delay)
        tree = descendants(proc.pid)  # Ray's daemons and workers, some in process groups of their own
    finally:
        running = sigkill(proc, group=True)
    committed_at_kill = completion_records(out)
    assert running, f"the run finished before the kill (seed {seed}, delay {delay:.2f} s): nothing was interrupted"
    assert len(committed_at_kill) < n_shards, f"all shards committed before the kill (seed {seed}); nothing to resume"
    for path in (out / "transcripts").glob("*"):  # whatever the kill left in transcripts/ is complete Parquet
        assert path.name.endswith(".parquet"), f"the kill left {path.name} in transcripts/"
        pq.read_table(path)

    # the rerun starts while the killed run's Ray workers may still be winding down
    proc2 = whisper_batch("run", manifest, "-o", out, *sets)
    t0 = time.monotonic()
    stragglers = stop_processes(tree)
    print(f"{len(committed_at_kill)}/{n_shards} shards committed at the kill; {len(tree)} processes below the "
          f"driver then, {len(alive(tree))} alive after the rerun ({time.monotonic() - t0:.1f} s waited)")
    assert proc2.returncode == 0, f"the rerun after the kill (seed {seed}) failed:\n{output_of(proc2)[-4000:]}"

    rows = read_rows(out)
    assert count_ids(rows) == {row_id: 1 for row_id in expected}, f"seed {seed}"
    assert {r["id"]: r["text"] for r in rows} == expected, f"seed {seed}: the resumed run's text differs"
    records = completion_records(out)
    assert sorted(records) == list(range(n_shards))
    assert sum(rec["rows"] for rec in records.values()) == KILL_ROWS
    for shard_id, rec in committed_at_kill.items():  # shards committed before the kill were not redone
        assert records[shard_id]["finished_at"] == rec["finished_at"], f"shard {shard_id} was redone"
    assert not stragglers, f"processes of the killed run still alive 30 s after the rerun: {sorted(stragglers)}"


@pytest.fixture(scope="module")
def small_run(eval_dir: Path, librispeech_rows: list[dict[str, Any]], tmp_path_factory) -> dict[str, Any]:
    """A finished run of 2 rows whose paths are relative, pointing back from the manifest's folder to eval_dir."""
    base = tmp_path_factory.mktemp("small")
    rows = sorted(librispeech_rows, key=lambda r: (r["duration"], r["id"]))[:2]
    rows = [{**r, "audio_filepath": os.path.relpath(eval_dir / r["audio_filepath"], base)} for r in rows]
    manifest = write_manifest(base / "manifest.jsonl", rows)
    out = base / "out"
    whisper_batch_ok("run", manifest, "-o", out)
    return {"manifest": manifest, "rows": rows, "out": out, "base": base}


@pytest.mark.slow
def test_relative_paths_resolve_against_the_manifest_folder(small_run: dict[str, Any]):
    rows = read_rows(small_run["out"])
    assert [r["id"] for r in rows] == [r["id"] for r in small_run["rows"]]
    for got, want in zip(rows, small_run["rows"]):
        assert got["error"] is None and got["text"].strip(), f"{got['id']}: {got['error']}"
        assert got["audio_filepath"] == want["audio_filepath"]  # kept as written
        assert want["audio_filepath"].startswith("..")


_RECORDS = ("transcripts", "shards", "plan.json", "run.json")


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(small_run: dict[str, Any]):
    out = small_run["out"]
    before = mtimes(out, *_RECORDS)
    proc = whisper_batch_ok("run", small_run["manifest"], "-o", out)
    assert mtimes(out, *_RECORDS) == before, f"a rerun of a finished run rewrote files:\n{output_of(proc)[-2000:]}"
    assert len(read_rows(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("change", ["text", "path"])
def test_resume_refuses_a_changed_manifest(small_run: dict[str, Any], change: str):
    out = small_run["out"]
    rows = [dict(r) for r in small_run["rows"]]
    if change == "text":
        rows[1]["text"] = rows[1]["text"] + " AND SOMETHING ELSE"
    else:
        rows[1]["audio_filepath"] = rows[0]["audio_filepath"]
    changed = write_manifest(small_run["base"] / f"changed-{change}.jsonl", rows)
    before = mtimes(out, *_RECORDS)
    proc = whisper_batch("run", changed, "-o", out)
    message = output_of(proc)
    assert proc.returncode != 0, f"a resume with a changed manifest ({change}) was accepted:\n{message[-2000:]}"
    assert "manifest" in message and "changed" in message, message[-2000:]
    assert "-o" in message and ("start over" in message or "start anew" in message), (
        f"the refusal does not say how to start anew:\n{message[-2000:]}"
    )
    assert "Traceback" not in message, message[-3000:]
    assert mtimes(out, *_RECORDS) == before


@pytest.mark.slow
def test_resume_refuses_a_results_changing_config(small_run: dict[str, Any]):
    proc = whisper_batch("run", small_run["manifest"], "-o", small_run["out"], "--set", "decode.beam_size=5")
    message = output_of(proc)
    assert proc.returncode != 0, f"a resume with another beam size was accepted:\n{message[-2000:]}"
    assert "decode.beam_size" in message and "Traceback" not in message, message[-2000:]


def test_unknown_config_key_is_a_usage_error(tmp_path: Path):
    from whisper_batch.jobs.cli import main

    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": "/nonexistent/a.wav"}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "-o", str(out), "--set", "decode.beam_sze=5"])
    assert result.exit_code == 2, result.output
    assert "decode.beam_sze" in result.output and "beam_size" in result.output  # names the typo and valid keys
    assert not out.exists()


@pytest.mark.slow
def test_verify_names_damage_and_repair_lets_the_same_run_redo_it(small_run: dict[str, Any], tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(small_run["out"], out)  # a copy: the module's other tests keep the finished run
    shard = out / "transcripts" / "shard-00000.parquet"
    shutil.copy(shard, out / "transcripts" / "shard-00000-copy.parquet")
    shard.unlink()
    proc = whisper_batch("verify", out)
    assert proc.returncode == 1, output_of(proc)
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM ")]
    assert [line.split(":")[0] for line in problems] == [
        "PROBLEM missing shard=0 transcripts/shard-00000.parquet",
        "PROBLEM stray transcripts/shard-00000-copy.parquet",
    ], proc.stdout

    whisper_batch_ok("verify", out, "--repair")
    assert not completion_records(out) and not read_rows(out)
    whisper_batch_ok("run", small_run["manifest"], "-o", out)  # the same command resumes: redoes shard 0
    proc = whisper_batch_ok("verify", out)
    assert ": ok; 1/1 shards committed and sound, 0 pending; 2/2 rows, each once" in proc.stdout
    assert count_ids(read_rows(out)) == {r["id"]: 1 for r in small_run["rows"]}
