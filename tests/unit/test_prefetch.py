"""Bounded prefetch: order kept, failures handed back with their item, never more than ``depth`` fetches ahead; the
featurizer with prefetch gives the same items as without, and a missing file is still a "not found" row."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import write_wav
from whisper_batch.pipeline.audio import AudioError
from whisper_batch.pipeline.config import RunConfig
from whisper_batch.pipeline.features import Featurizer
from whisper_batch.pipeline.prefetch import fetch_small, prefetch


class Tracker:
    """A fetch that sleeps a little, fails on item 3 and records how many fetches ran or waited unconsumed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = 0
        self.consumed = 0
        self.most_ahead = 0

    def fetch(self, i: int) -> int:
        with self.lock:
            self.started += 1
            self.most_ahead = max(self.most_ahead, self.started - self.consumed)
        time.sleep(0.01 * (i % 3))  # later items often finish first: order must still hold
        if i == 3:
            raise OSError("connection reset")
        return i * i


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_order_kept_errors_returned_and_in_flight_bounded(depth: int):
    t = Tracker()
    out = []
    with ThreadPoolExecutor(8) as pool:
        for item, got in prefetch(range(20), t.fetch, depth, pool):
            out.append((item, got))
            with t.lock:
                t.consumed += 1
            time.sleep(0.005)
    assert [i for i, _ in out] == list(range(20))
    assert [g for i, g in out if i != 3] == [i * i for i in range(20) if i != 3]
    assert isinstance(out[3][1], OSError)
    assert t.most_ahead <= max(1, depth), t.most_ahead  # never more than depth fetched and not yet consumed
    if depth > 1:
        assert t.most_ahead > 1  # it did fetch ahead


def test_prefetch_overlaps_latency():
    with ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        assert [g for _, g in prefetch(range(16), lambda i: time.sleep(0.05) or i, 8, pool)] == list(range(16))
        elapsed = time.monotonic() - t0
    assert elapsed < 16 * 0.05 / 2, elapsed  # serial would be 0.8 s


def test_prefetch_timeout_is_an_error_for_that_item():
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        got = list(prefetch([1, 2], lambda i: release.wait(5) if i == 1 else i, 2, pool, timeout=0.1))
        release.set()
    assert isinstance(got[0][1], TimeoutError) and got[1] == (2, 2)


def test_fetch_small_whole_file_large_file_none_missing_not_found(tmp_path: Path):
    small, big = tmp_path / "s.bin", tmp_path / "b.bin"
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"y" * 101)
    assert fetch_small(str(small), None, 100) == b"x" * 100
    assert fetch_small(str(big), None, 100) is None  # streamed instead: memory stays bounded
    with pytest.raises(AudioError, match="not found"):
        fetch_small(str(tmp_path / "missing.wav"), None, 100)


def test_featurizer_with_prefetch_matches_without(tmp_path: Path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        path = write_wav(tmp_path / f"{i}.wav", 0.1 * rng.standard_normal(8000 * (i + 1)).astype(np.float32))
        rows.append({"shard_id": 0, "row_index": i, "id": str(i), "uri": str(path), "offset": 0.0, "duration": None})
    rows.insert(2, {"shard_id": 0, "row_index": 9, "id": "gone", "uri": str(tmp_path / "gone.wav"), "offset": 0.0,
                    "duration": None})
    base = RunConfig()
    plain = Featurizer(replace(base, audio=replace(base.audio, prefetch=0))).featurize_rows(rows)
    # a 20 KB limit: the smallest file is prefetched whole, the larger ones streamed
    ahead = Featurizer(replace(base, audio=replace(base.audio, prefetch=3, prefetch_max_mb=0.02))).featurize_rows(rows)
    assert [r["id"] for r in ahead] == [r["id"] for r in plain] == [r["id"] for r in rows]
    for a, p in zip(ahead, plain):
        assert a["error"] == p["error"] and a["mel_frames"] == p["mel_frames"] and bytes(a["mel"]) == bytes(p["mel"])
    assert ahead[2]["error"].startswith("not found")
