"""The Python API as its users run it: a script of theirs composes Ray Data stages with ``transcribe_dataset``, calls
``whisper_batch.run`` and ``whisper_batch.transcribe``, in its own process and its own local Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import REPO, cli_env, read_rows

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples"

# A user's script: its own reads, filter and map, then transcribe_dataset, then its own write; run() on the same
# files in the same Ray; an HF-style Parquet with the audio inside; a dataset without an audio column.
USER_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import pyarrow.parquet as pq
    import ray
    import whisper_batch
    from whisper_batch.pipeline.dataset import AudioColumnError

    work = sys.argv[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report = {}

    summary = whisper_batch.run(os.path.join(work, "manifest.jsonl"), os.path.join(work, "run-out"),
                                model__dtype="float32", progress=False)
    report["run"] = {"rows": summary.rows_committed, "failed": summary.rows_failed}
    report["ray_still_up"] = ray.is_initialized()

    paths = ray.data.read_parquet(os.path.join(work, "paths.parquet"))        # the user's own metadata table
    extra = ray.data.from_items([{"key": "dropped", "path": "nowhere.wav", "speaker": 0, "text": "x"}])
    ds = paths.union(extra).filter(lambda r: r["key"] != "dropped")           # the user's own filter
    ds = ds.map(lambda r: {**r, "speaker": int(r["speaker"]) * 10})          # and map
    out = whisper_batch.transcribe_dataset(ds, audio_field="path", model__dtype="float32")
    out.write_parquet(os.path.join(work, "composed"))

    hf = ray.data.read_parquet(os.path.join(work, "hf.parquet"))
    whisper_batch.transcribe_dataset(hf, audio_field="audio", model__dtype="float32").write_parquet(
        os.path.join(work, "hf-out"))

    try:
        whisper_batch.transcribe_dataset(ray.data.from_items([{"file": "a.wav", "lang": "en"}]))
    except AudioColumnError as e:
        report["no_audio_column"] = str(e)
    print("REPORT " + json.dumps(report))
''')


def _run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=cli_env(None), capture_output=True,
                          text=True, timeout=timeout)


def _report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    return json.loads(line[len("REPORT "):])


def test_a_users_ray_data_pipeline_composes_transcribe_dataset(tmp_path: Path):
    files = {"fox": "fox.flac", "anna": "anna.ogg", "coffee": "coffee.ogg", "weather": "weather.flac"}
    for name in files.values():
        shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for key, name in files.items():
            f.write(json.dumps({"id": key, "audio_filepath": name}) + "\n")
    # the user's table: relative paths (taken from the driver's folder), a broken file, a missing one, their columns
    keys = [*files, "broken", "missing"]
    paths = [str(tmp_path / files[k]) if k in files else str(tmp_path / f"{k}.wav") for k in keys]
    pq.write_table(pa.table({"key": keys, "path": paths, "speaker": list(range(len(keys))),
                             "text": [f"reference {k}" for k in keys]}), tmp_path / "paths.parquet")
    # Hugging Face datasets' layout: an `audio` struct of bytes and path; one empty
    audio = [{"bytes": (EXAMPLES / "fox.flac").read_bytes(), "path": "fox.flac"},
             {"bytes": None, "path": None}]
    pq.write_table(pa.table({"audio": audio, "id": ["hf-fox", "hf-empty"]}), tmp_path / "hf.parquet")

    report = _report(_run_script(USER_SCRIPT, str(tmp_path)))

    assert report["run"] == {"rows": 4, "failed": 0} and report["ray_still_up"]  # the user's Ray stays theirs
    by_run = {r["id"]: r["text"] for r in read_rows(tmp_path / "run-out")}
    composed = pq.read_table(tmp_path / "composed").to_pylist()
    assert sorted(r["key"] for r in composed) == sorted(keys)  # every row once; the filtered one gone
    rows = {r["key"]: r for r in composed}
    for key in files:  # the text run gives for the same files
        assert rows[key]["text"] == by_run[key] and rows[key]["error"] is None, key
        assert rows[key]["segments"] and rows[key]["duration"] > 1 and rows[key]["language"] == "en"
    assert rows["broken"]["error"].startswith("decode failed") and rows["broken"]["text"] is None
    assert rows["missing"]["error"].startswith("not found")
    # the user's columns carried with their types; the reference text renamed as run names it
    assert [rows[k]["speaker"] for k in keys] == [10 * i for i in range(len(keys))]
    assert rows["fox"]["reference"] == "reference fox" and rows["fox"]["path"].endswith("fox.flac")
    assert pq.read_schema(next((tmp_path / "composed").glob("*.parquet"))).field("speaker").type == pa.int64()

    hf = {r["id"]: r for r in pq.read_table(tmp_path / "hf-out").to_pylist()}
    assert hf["hf-fox"]["text"] == by_run["fox"] and hf["hf-fox"]["audio"] == "fox.flac"  # bytes not carried
    assert hf["hf-empty"]["error"].startswith("empty") and hf["hf-empty"]["text"] is None

    message = report["no_audio_column"]
    assert "'audio_filepath'" in message and "file, lang" in message and "audio_field" in message


def test_the_readme_example_runs(tmp_path: Path):
    """examples/ray_data_pipeline.py, which the README's API section points to, as a user runs it."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ray_data_pipeline.py"), str(tmp_path / "out")],
                          cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ["anna", "coffee", "fox", "missing", "weather"]
    assert "lazy dog" in rows["fox"]["text"] and rows["fox"]["source"] == "examples"
    assert rows["missing"]["error"].startswith("not found") and "not found" in proc.stdout


def test_transcribe_in_process_returns_a_row_per_file(tmp_path: Path):
    script = textwrap.dedent('''
        import json, sys, whisper_batch
        rows = whisper_batch.transcribe([sys.argv[1], sys.argv[2]], word_timestamps=True)
        again = whisper_batch.transcribe(sys.argv[1], word_timestamps=True)
        print("REPORT " + json.dumps({"rows": rows, "again": again}))
    ''')
    report = _report(_run_script(script, str(EXAMPLES / "fox.flac"), str(tmp_path / "none.wav"), timeout=300))
    fox, missing = report["rows"]
    assert "lazy dog" in fox["text"] and fox["error"] is None and fox["segments"][0]["words"]
    assert missing["error"].startswith("not found") and missing["text"] is None
    assert report["again"] == [fox]  # the model kept loaded gives the same result
