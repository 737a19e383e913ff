"""`whisper-batch report` on synthetic committed runs (written with the real commit path, no Ray), and the progress
display's counters and lines."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.report_data import make_run
from tests.servers import moto_s3
from whisper_batch.jobs.cli import main
from whisper_batch.jobs.plots import PLOT_IDS
from whisper_batch.jobs.progress import Counts, Progress, Screen
from whisper_batch.jobs.report import build_report


def _report(tmp_path, *args):
    result = CliRunner().invoke(main, ["report", *map(str, args)])
    return result, result.output


def _plot_ids(page: str) -> list[str]:
    return re.findall(r'<figure class="plot" id="plot-([^"]+)">', page)


def test_report_page_counts_and_plots(tmp_path):
    layout = make_run(str(tmp_path / "run"), n_rows=60, shard_size=10)
    result, out = _report(tmp_path, tmp_path / "run", "--by", "dataset", "-o", tmp_path / "r.html")
    assert result.exit_code == 0, out + repr(result.exception)
    assert "60 rows, 6 failed (complete)" in out
    page = (tmp_path / "r.html").read_text()
    assert _plot_ids(page) == ["language-rows", "language-hours", "by-dataset-rows", "by-dataset-hours",
                               *PLOT_IDS[2:]]
    # every plot drew bars (none fell back to a "missing" note)
    for plot in re.findall(r'<figure class="plot".*?</figure>', page):
        assert 'class="bar"' in plot, plot[:200]
    # self-contained: nothing that would make a browser fetch anything
    assert not re.search(r"(src|href)\s*=|url\(|@import|<script|<link|<img|<iframe|https?://", page, re.I)

    data = build_report(layout, ["dataset"])
    agg = data["agg"]
    assert (agg.rows, agg.failed) == (60, 6)
    assert agg.causes == {"not found": 2, "decode failed": 2, "timeout": 2}
    assert all(len(v) == 2 for v in agg.examples.values())
    assert agg.groups["dataset"].rows == {"librispeech": 20, "podcasts": 20, "meetings": 20}
    # rows 0, 10, ..., 50 have one segment below/above every threshold; row 53 failed, so 6 rows are dropped
    signals = ("avg_logprob", "no_speech_prob", "compression_ratio", "fallback_failed", "any")
    assert all(agg.dropped[name]["rows"] == 6 for name in signals)
    # rows 3, 10, ..., 59 end with a French segment; row 17 failed
    mixed = [f"utt-{i:07d}" for i in range(3, 60, 7) if i != 17]
    assert agg.mixed_language_rows == 8 and [e["id"] for e in agg.mixed_language_examples] == mixed
    assert "8 rows hold segments in more than one language" in page and "fallback_failed" in page
    assert agg.temperatures["0.2"] == 6
    assert sum(h.counts.sum() for h in agg.histograms.values()) == 3 * agg.segments
    # WER: "brown" -> "crown" in rows 5, 15, ... that have a reference and did not fail
    assert agg.wer_all["substitutions"] == sum(1 for i in range(0, 60, 5) if i % 4 and i % 9 != 8)
    assert agg.wer_all["rows_scored"] == sum(1 for i in range(60) if i % 4 and i % 9 != 8)
    assert data["invocations"][0]["rows"] == 60 and data["invocations"][0]["status"] == "ok"
    assert data["identity"]["model"] == "tiny.en (synthetic)" and data["identity"]["config_fingerprint"]


def test_report_of_a_run_in_progress_says_so(tmp_path):
    make_run(str(tmp_path / "run"), n_rows=60, shard_size=10, shards_done=2)
    result, out = _report(tmp_path, tmp_path / "run")
    assert result.exit_code == 0, out
    assert "20 rows, 2 failed (in progress: 2/6 shards committed)" in out
    page = (tmp_path / "run" / "report.html").read_text()  # the default target: OUTPUT/report.html
    assert "This run is not complete: 2 of 6 shards are committed" in page
    assert "1 invocation(s) have no finish time" in page


def test_report_of_failed_rows_only(tmp_path):
    make_run(str(tmp_path / "run"), n_rows=20, shard_size=10, all_failed=True)
    result, out = _report(tmp_path, tmp_path / "run", "-o", tmp_path / "r.html")
    assert result.exit_code == 0, out
    page = (tmp_path / "r.html").read_text()
    assert "Every committed row failed (20)" in page
    assert "no segments: every committed row failed" in page
    assert "no references: the manifest has no text field, or every row with one failed" in page
    assert set(_plot_ids(page)) == set(PLOT_IDS)


def test_report_before_any_commit(tmp_path):
    make_run(str(tmp_path / "run"), n_rows=20, shard_size=10, shards_done=0)
    result, out = _report(tmp_path, tmp_path / "run", "-o", tmp_path / "r.html")
    assert result.exit_code == 0, out
    page = (tmp_path / "r.html").read_text()
    assert "Nothing is committed yet" in page and set(_plot_ids(page)) == set(PLOT_IDS)


def test_report_bad_input_is_a_message(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    result, out = _report(tmp_path, tmp_path / "not-a-run")
    assert result.exit_code == 1 and "holds no whisper-batch run (no plan.json)" in out
    assert "Traceback" not in out

    make_run(str(tmp_path / "run"), n_rows=20, shard_size=10)
    result, out = _report(tmp_path, tmp_path / "run", "--by", "datset")
    assert result.exit_code == 1 and "--by datset: not a field of this run's manifest" in out, out
    assert "dataset, speaker" in out

    (tmp_path / "run" / "transcripts" / "shard-00001.parquet").write_bytes(b"not parquet")
    result, out = _report(tmp_path, tmp_path / "run", "-o", tmp_path / "r.html")
    assert result.exit_code == 0, out
    assert "Unreadable shard files (left out): shard 1" in (tmp_path / "r.html").read_text()

    (tmp_path / "file").write_text("x")  # a target inside a file cannot be written
    result, out = _report(tmp_path, tmp_path / "run", "-o", tmp_path / "file" / "r.html")
    assert result.exit_code == 1 and "cannot write" in out and "-o names another place" in out, out

    (tmp_path / "run" / "plan.json").write_text("{not json")
    result, out = _report(tmp_path, tmp_path / "run", "-o", tmp_path / "r.html")
    assert result.exit_code == 1 and "cannot read the run in" in out and "JSONDecodeError" in out, out
    assert "Traceback" not in out


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


def test_report_on_s3(s3_endpoint, tmp_path):
    import s3fs

    options = {"endpoint_url": s3_endpoint, "key": "testing-key", "secret": "testing-secret"}
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("reports")
    make_run("s3://reports/run", n_rows=30, shard_size=10, storage_options=options)
    setting = f"storage.storage_options={{endpoint_url: '{s3_endpoint}', key: testing-key, secret: testing-secret}}"
    result, out = _report(tmp_path, "s3://reports/run", "--by", "dataset", "--set", setting)
    assert result.exit_code == 0, out + repr(result.exception)
    assert "wrote s3://reports/run/report.html: 30 rows, 3 failed (complete)" in out
    page = s3fs.S3FileSystem(**options, skip_instance_cache=True).cat_file("reports/run/report.html").decode()
    assert "by-dataset-rows" in page and "testing-secret" not in page


# --- the progress display ---


def _counts(**kw):
    base = dict(rows_total=100, run_rows_total=300, run_rows_before=200, shards_total=4, run_shards_total=12,
                run_shards_before=8)
    return Counts(**{**base, **kw})


def test_progress_lines_in_user_units():
    stream = io.StringIO()
    progress = Progress(_counts(), Screen(stream), interval=0.5, bar=False)
    with progress:
        progress.counts.started -= 100  # 100 s of wall time so far
        progress.on_part({"audio_seconds": 1800.0, "error_causes": ["not found", "not found", "timeout"]}, 40)
        progress.counts.first_rows_at -= 10  # 40 rows in the last 10 s after the first part
        progress.on_part({"audio_seconds": 1800.0, "error_causes": []}, 20)
        progress.on_commit({"shard_id": 3, "rows": 25, "errors": 3})
        time.sleep(1.3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3  # the first line, at least one at the interval, the last
    last = lines[-1]
    assert "done: rows 60/100 (60%)" in last and "run 260/300" in last and "audio 1.00 h" in last
    assert "shards 9/12" in last and "failed 3 (not found 2, timeout 1)" in last
    assert re.search(r"RTFx 3\d\.\d", last)  # 3600 s of audio in ~101 s
    middle = progress.counts.summary(progress.counts.first_rows_at + 10)
    assert "0m20s left" in middle  # 40 rows to go at 2 rows/s (20 rows in the 10 s since the first part)


def test_progress_work_per_part_is_constant():
    progress = Progress(_counts(rows_total=10**6), Screen(io.StringIO()), interval=60, bar=False)
    part = {"audio_seconds": 4.0, "error_causes": []}
    t0 = time.perf_counter()
    for _ in range(20_000):
        progress.on_part(part, 4)
    assert time.perf_counter() - t0 < 2.0  # a million rows in 250k parts: seconds at most
    assert progress.counts.rows == 80_000


def test_progress_says_stopped_when_the_graph_fails():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(_counts(), Screen(stream), interval=60, bar=False):
            raise RuntimeError("graph failed")
    assert stream.getvalue().splitlines()[-1].split("] ", 1)[1].startswith("stopped: rows 0/100")


def test_quiet_screen_sends_stderr_to_the_log_and_errors_to_the_screen(tmp_path):
    code = """
import logging, os, sys, warnings
from whisper_batch.jobs.logs import configure_logging
from whisper_batch.jobs.progress import quiet_screen
configure_logging(0)
with quiet_screen() as screen:
    os.write(2, b"[E core_worker.cc] noise from C++\\n")
    warnings.warn("a warning that means nothing to the user")
    logging.getLogger("ray.data").warning("operator chatter")
    logging.getLogger("whisper_batch.jobs.run").error("the upload failed")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("ray.data").exception("a task failed")
    print("bar", file=screen.stream)
    print(screen.log_path)
print("after", file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "the upload failed" in proc.stderr and "bar" in proc.stderr and "after" in proc.stderr
    assert "ERROR ray.data: a task failed" in proc.stderr and "Traceback" not in proc.stderr  # it is in the log
    for noise in ("noise from C++", "means nothing", "operator chatter"):
        assert noise not in proc.stderr
    log_text = Path(proc.stdout.strip()).read_text()
    assert all(s in log_text for s in ("noise from C++", "means nothing", "operator chatter", "the upload failed",
                                       "ZeroDivisionError"))
