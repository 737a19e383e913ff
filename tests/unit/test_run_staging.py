"""Staging left by earlier invocations goes when a run ends; what is not an earlier invocation's stays."""

from __future__ import annotations

from pathlib import Path

from whisper_batch.jobs.run import remove_staging
from whisper_batch.pipeline.layout import RunLayout


def test_remove_staging_takes_this_and_earlier_invocations_only(tmp_path: Path):
    layout = RunLayout(str(tmp_path / "out"))
    staging = Path(layout.path("_staging"))
    earlier, mine, later = (f"2024010{d}T000000000000Z-{c * 6}" for d, c in ((1, "a"), (2, "b"), (3, "c")))
    for name in (earlier, mine, later):
        (staging / name / "parts" / "00000").mkdir(parents=True)
        (staging / name / "parts" / "00000" / "x.parquet").write_bytes(b"x")
    (staging / ".preflight-0123").write_bytes(b"")  # another driver's storage probe
    remove_staging(layout, mine)
    assert sorted(p.name for p in staging.iterdir()) == [".preflight-0123", later]


def test_remove_staging_without_staging_is_a_no_op(tmp_path: Path):
    remove_staging(RunLayout(str(tmp_path / "out")), "20240102T000000000000Z-bbbbbb")
    assert not (tmp_path / "out" / "_staging").exists()
