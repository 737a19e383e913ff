"""Resume through the CLI: refusals of changed manifests and configs, a rerun of a finished run that does nothing,
relative paths, and damage found by verify and repaired.

A driver killed with SIGKILL mid-run is resumed in test_tar_parquet.py (a local Ray's whole process group, at a
random moment after the first commit) and in test_faults.py (at ten moments of a run on a cluster).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.integration.conftest import (
    completion_records,
    count_ids,
    mtimes,
    output_of,
    read_rows,
    whisper_batch,
    whisper_batch_ok,
    write_manifest,
)

pytestmark = pytest.mark.integration
JOINS_SHARED_RAY = True  # its runs are about the output: they join one shared Ray head (conftest._shared_ray)


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
