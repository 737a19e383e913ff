"""The memory benchmark's pure helpers: which kind a process is, and the quarter peaks and their ratio, on small
sample series whose answers can be read off by hand."""

import json

import pytest

from benchmarks.memory_bench import build_corpus, classify, quarter_peaks, steady_window, tenth_peaks

DRIVER = 100


@pytest.mark.parametrize(
    "cmdline, pid, kind",
    [
        ("/venv/bin/python -m whisper_batch.jobs.cli run m.jsonl -o out", DRIVER, "driver"),
        ("ray::MapWorker(MapBatches(ArrowFeaturizer))", 7, "featurizer"),
        ("ray::MapWorker(MapBatches(ArrowFeaturizer)).submit", 7, "featurizer"),
        ("ray::MapWorker(MapBatches(ArrowTranscriber)).__init__", 8, "model"),
        ("ray::IDLE", 9, "idle"),
        ("/venv/bin/python /venv/lib/ray/_private/workers/default_worker.py --node-ip-address=1", 9, "idle"),
        ("ray::_StatsActor.register_dataset", 10, "ray-data"),
        ("ray::_AutoscalingCoordinatorActor", 10, "ray-data"),
        ("ray::DashboardAgent", 11, "ray-system"),
        ("ray::RuntimeEnvAgent", 11, "ray-system"),
        ("/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s", 12, "ray-system"),
        ("/venv/lib/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", 13, "ray-system"),
        ("/venv/bin/python -u /venv/lib/ray/_private/log_monitor.py --session-dir=x", 14, "ray-system"),
        ("/venv/bin/python -u /venv/lib/ray/autoscaler/_private/monitor.py --logs-dir=x", 15, "ray-system"),
        ("/bin/sh -c something", 16, "other"),
    ],
)
def test_classify(cmdline, pid, kind):
    assert classify(cmdline, pid, DRIVER) == kind


def test_quarter_peaks_and_ratio():
    # window 0-100 s: the first quarter is 0-25 s, the last 75-100 s
    samples = [
        (0.0, {"model": 100.0, "driver": 50.0}),
        (20.0, {"model": 120.0, "driver": 50.0}),
        (50.0, {"model": 500.0, "driver": 60.0}),  # the middle counts in neither quarter
        (80.0, {"model": 130.0, "driver": 40.0, "featurizer": 10.0}),
        (100.0, {"model": 110.0}),  # a kind absent from a sample counts as 0 there
    ]
    peaks = quarter_peaks(samples, 0.0, 100.0)
    assert peaks["model"] == (120.0, 130.0, pytest.approx(130 / 120))
    assert peaks["driver"] == (50.0, 40.0, pytest.approx(0.8))
    assert peaks["featurizer"] == (0.0, 10.0, None)  # nothing to compare with


def test_quarter_peaks_from_a_later_start():
    samples = [(t, {"model": float(t)}) for t in range(0, 101, 5)]
    first, last, ratio = quarter_peaks(samples, 20.0, 100.0)["model"]  # quarters 20-40 and 80-100
    assert (first, last) == (40.0, 100.0) and ratio == pytest.approx(2.5)


def test_tenth_peaks():
    samples = [(t, {"driver": float(t)}) for t in range(0, 100)]
    tenths = tenth_peaks(samples, 100.0)
    assert [d["driver"] for d in tenths] == [9.0, 19.0, 29.0, 39.0, 49.0, 59.0, 69.0, 79.0, 89.0, 99.0]


def test_steady_window():
    # the first commit in the first half of the run starts the window; the last commit ends it
    assert steady_window(200.0, 30.0, 190.0)[:2] == (30.0, 190.0)
    # one shard, committed at the end: the window starts at 10 % and ends with the run
    start, end, how = steady_window(200.0, 195.0, 195.0)
    assert (start, end) == (20.0, 195.0) and "10 %" in how
    assert steady_window(200.0, None, None)[:2] == (20.0, 200.0)


def test_build_corpus_spreads_the_long_files(tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"id": f"s{i}", "audio_filepath": f"s{i}.wav", "duration": 1.0}) + "\n"
                             for i in range(10)))
    (tmp_path / "long").mkdir()
    long = tmp_path / "long" / "manifest.jsonl"
    long.write_text("".join(json.dumps({"id": f"L{i}", "audio_filepath": f"L{i}.flac", "duration": 300.0,
                                        "parts": [{"start": 0}]}) + "\n" for i in range(2)))
    path, rows, audio = build_corpus([str(short)], 2, [long], str(tmp_path))
    got = [json.loads(line) for line in open(path)]
    assert rows == 22 and audio == pytest.approx(620.0)
    ids = [r["id"] for r in got]
    assert ids.index("L0") < 11 < ids.index("L1")  # one in each half
    assert all(r["audio_filepath"].startswith("/") for r in got) and "parts" not in got[ids.index("L0")]


def test_trim_heap_calls_glibc_where_there_is_one():
    import platform

    from whisper_batch.pipeline.device import trim_heap

    assert trim_heap() is (platform.libc_ver()[0] == "glibc")
