"""status / evaluate / export on a small hand-built OUTPUT."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.shards import write_shard
from whisper_batch.jobs.evaluate import evaluate, format_evaluation
from whisper_batch.jobs.export import export, format_timestamp, safe_name, to_srt, to_vtt
from whisper_batch.jobs.status import format_status, run_status
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import build_plan, finish_run, iter_blocks, start_run
from whisper_batch.pipeline.sink import wall_seconds

# id, reference, hypothesis, error, dataset
ROWS = [
    ("a", "Hello world", "hello word", None, "clean"),               # 1 substitution / 2 words
    ("b", "Mr. Smith paid ten dollars.", "Mister Smith paid $10", None, "clean"),  # equal after normalising
    ("c", "good morning", None, "timeout: decode took > 300 s", "other"),  # failed: not scored
    ("../../x", "the cat sat down", "the cat sat down now", None, "other"),  # 1 insertion / 4 words
    ("a/b", None, "no reference here", None, "other"),
]


@pytest.fixture
def run_dir(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({"id": i, "audio_filepath": f"{n}.wav", "dataset": d, **({"text": r} if r else {})}) + "\n"
        for n, (i, r, _, _, d) in enumerate(ROWS)
    ))
    cfg = load_config(None, ["manifest.shard_size=2", "storage.storage_options={secret: hunter2}"])
    plan = build_plan(str(manifest), cfg)
    layout = RunLayout(str(tmp_path / "out"), cfg.storage.storage_options)
    invocation = start_run(layout, plan, cfg, "tiny.en")
    for shards, records in iter_blocks(str(manifest), plan, [0, 1], 2):  # shard 2 stays pending
        for shard in shards:
            rows = [_output_row(r) for r in records if r["shard_id"] == shard]
            write_shard(layout, shard, rows, plan.extra_types, "tiny.en", stats={"model_seconds": 1.0})
    finish_run(layout, invocation)
    return layout


def _output_row(record):
    _, _, hyp, error, _ = ROWS[record["row_index"]]
    segments = None if error else [
        {"start": 0.0, "end": 1.5, "text": " " + " ".join(hyp.split()[:2]), "temperature": 0.0},
        {"start": 1.5, "end": 62.345, "text": " " + " ".join(hyp.split()[2:]) or "-", "temperature": 0.2},
    ]
    return {**record, "text": hyp, "segments": segments, "error": error, "duration": None if error else 90.0}


def test_status(run_dir):
    status = run_status(run_dir)
    assert (status["shards_total"], status["shards_done"], status["rows_total"], status["rows_done"]) == (3, 2, 5, 4)
    assert status["rows_failed"] == 1 and status["failures_by_cause"] == {"timeout": 1}
    assert status["fallbacks"] == {"0.2": 3} and status["audio_hours"] == pytest.approx(270 / 3600)
    assert status["rtfx"] > 0 and status["model"] == "tiny.en" and not status["complete"]
    text = format_status(status)
    assert "shards   2/3 done" in text and "rows     4/5 done, 1 failed" in text and "timeout: 1" in text
    assert "hunter2" not in text and "hunter2" not in json.dumps(status)


def test_status_without_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run at"):
        run_status(RunLayout(str(tmp_path / "nothing")))


def test_wall_seconds_counts_crashed_invocations_to_last_commit():
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    at = lambda s: (t0 + timedelta(seconds=s)).isoformat()  # noqa: E731
    invocations = [
        {"started_at": at(0), "finished_at": None},       # crashed; its last commit was at 40 s
        {"started_at": at(100), "finished_at": at(160)},  # finished normally
    ]
    commits = [t0 + timedelta(seconds=s) for s in (10, 40, 120)]
    assert wall_seconds(invocations, commits) == 40 + 60


def test_evaluate(run_dir):
    result = evaluate(run_dir)
    # a: 1 sub of 2 words; b: 0 of 4 ("mister smith paid $10"); ../../x: 1 insertion over 4 words
    assert result["reference_words"] == 2 + 4 + 4
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 0, 1)
    assert result["wer"] == pytest.approx(2 / 10)
    assert result["rows_scored"] == 3 and result["rows_failed_with_reference"] == 1
    assert result["rows_total"] == 4 and result["rows_with_reference"] == 4
    by = result["by_dataset"]
    assert by["clean"]["wer"] == pytest.approx(1 / 6) and by["other"]["wer"] == pytest.approx(1 / 4)
    assert "WER 20.00%" in format_evaluation(result)


def test_timestamps():
    assert format_timestamp(62.345) == "00:01:02,345"
    assert format_timestamp(62.345, ".") == "00:01:02.345"
    assert format_timestamp(3723.5) == "01:02:03,500"
    assert format_timestamp(0.9996) == "00:00:01,000"
    assert format_timestamp(-0.1) == "00:00:00,000"


def test_srt_and_vtt_text():
    row = {"text": "hi there", "segments": [
        {"start": 0.0, "end": 1.5, "text": " hi"}, {"start": 1.5, "end": 62.345, "text": " there"}]}
    assert to_srt(row) == "1\n00:00:00,000 --> 00:00:01,500\nhi\n\n2\n00:00:01,500 --> 00:01:02,345\nthere\n"
    assert to_vtt(row) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhi\n\n"
                           "00:00:01.500 --> 00:01:02.345\nthere\n")
    assert to_srt({"text": "only text", "segments": [], "duration": 2.0}) == (
        "1\n00:00:00,000 --> 00:00:02,000\nonly text\n")


def test_safe_names():
    assert safe_name("utt-1_a.b") == "utt-1_a.b"
    for bad in ["../../x", "a/b", "..", "/etc/passwd", "a\\b", "ü b"]:
        name = safe_name(bad)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name
    assert safe_name("a/b") != safe_name("a_b")  # changed names get a hash suffix, so they cannot collide


@pytest.mark.parametrize("fmt", ["srt", "vtt", "txt"])
def test_export_per_row_files_stay_inside(run_dir, tmp_path, fmt):
    out = tmp_path / "export" / "inner"
    result = export(run_dir, fmt, str(out))
    assert result["written"] == 3 and result["skipped_failed"] == 1
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and all(f.endswith(f".{fmt}") for f in files)
    assert f"a.{fmt}" in files
    assert not (tmp_path / "x.srt").exists() and sorted(p.name for p in (tmp_path / "export").iterdir()) == ["inner"]
    text = (out / f"a.{fmt}").read_text()
    assert text == {"srt": "1\n00:00:00,000 --> 00:00:01,500\nhello word\n",
                    "vtt": "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello word\n",
                    "txt": "hello word\n"}[fmt]


def test_export_jsonl(run_dir, tmp_path):
    result = export(run_dir, "jsonl", str(tmp_path / "j"))
    lines = (tmp_path / "j" / "transcripts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert result["written"] == 4 and [r["id"] for r in rows] == ["a", "b", "c", "../../x"]
    assert rows[2]["error"].startswith("timeout") and rows[0]["dataset"] == "clean"
    with pytest.raises(ValueError, match="unknown export format"):
        export(run_dir, "docx", str(tmp_path / "j"))


def test_stats_read_record_by_record_match_one_read(run_dir):
    from whisper_batch.pipeline.sink import collect_stats

    assert collect_stats(run_dir, chunk=1) == collect_stats(run_dir)  # status streams the records in chunks
