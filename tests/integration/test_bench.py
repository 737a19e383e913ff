"""`python -m benchmarks.bench`: our whole pipeline and openai-whisper on the same real speech, in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, cli_env, write_manifest
from whisper_batch.pipeline.config import load_config

pytestmark = pytest.mark.integration


def bench(*args) -> subprocess.CompletedProcess:
    """``python -m benchmarks.bench ARGS`` from the checkout (the lab is not part of the installed package)."""
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *map(str, args)], cwd=REPO, env=cli_env(None),
                          capture_output=True, text=True, timeout=1200)


def test_bench_runs_every_engine_on_the_same_audio(tmp_path: Path, eval_dir: Path, librispeech_rows):
    pytest.importorskip("whisper", reason="the openai-whisper peer is a test dependency")
    rows = librispeech_rows[:3]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=eval_dir)
    out = tmp_path / "bench.json"
    proc = bench(manifest, "--engines", "whisper-batch,openai", "--times", "2", "--json", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scores = {s["engine"]: s for s in json.loads(out.read_text())}
    assert set(scores) == {"whisper-batch", "openai"}
    audio = 2 * sum(r["duration"] for r in rows)  # --times 2: the rows twice over
    for s in scores.values():
        assert s["audio_s"] == pytest.approx(audio, abs=0.1)  # every engine heard all of the same audio
        assert s["wall_s"] > 0 and s["rtfx"] == pytest.approx(s["audio_s"] / s["wall_s"])
        assert s["process_s"] > s["wall_s"] + s["load_s"]  # the whole process: imports, load, work, exit
        assert s["wer"] is not None and s["wer"] < 0.15  # real transcripts, scored against the references
        assert s["peak_rss_mb"] > 100  # a process running a model was sampled
        # the steady rate leaves out the start-up: the imports and model load at least, more than Ray's start for ours
        assert 0 < s["startup_s"] < s["process_s"] and s["steady_rtfx"] > s["process_rtfx"]
    table = proc.stdout
    assert "| whisper-batch |" in table and "| openai |" in table and "cores" in table
    ours, peer = scores["whisper-batch"], scores["openai"]
    ratio = ours["rtfx"] / peer["rtfx"]
    assert f"whisper-batch: {ratio:.2f}x the fastest peer (openai) on the wall clock" in table
    # ours starts Ray, then its actors before the first model call: all of that is start-up, not steady work
    assert ours["startup_s"] > ours["load_s"] + 1.0
    steady = ours["steady_rtfx"] / peer["steady_rtfx"]
    assert f"{steady:.2f}x (openai) at steady state" in table


def test_bench_refuses_an_unknown_engine(tmp_path: Path):
    proc = bench(tmp_path / "m.jsonl", "--engines", "whisper-batch,nemo")
    assert proc.returncode == 2 and "unknown engine(s) ['nemo']" in proc.stderr and "faster-int8" in proc.stderr


def test_time_split_accounts_for_the_model_stage(capsys):
    """`python -m benchmarks.time_split`: the encoder, the decoding passes and the rest add up to the model's
    seconds."""
    from benchmarks.time_split import main, model_split

    examples = str(Path(__file__).resolve().parents[2] / "examples" / "manifest.jsonl")
    m = model_split(examples, [])
    assert m["rows"] == 4 and m["encoder_windows"] >= 4 and m["features_s"] > 0
    decode_s = sum(s for s, _ in m["decode"].values())
    steps_s, steps = m["decoder_steps"]
    assert "decode at T=0" in m["decode"] and steps > 0
    assert 0 < steps_s <= decode_s  # the decoder steps happen inside the decoding passes
    assert m["encoder_s"] > 0 and m["encoder_s"] + decode_s <= m["model_s"]  # parts of the model's time, not beside it
    assert 0 <= m["other_s"] < 0.5 * m["model_s"]
    # the bounds' numerators: a 30 s window of tiny.en is 37 GFLOP in the encoder (fewer when cut short); a step
    # reads the decoder's weights (59 MB in bf16 with the tied projection) at least once
    assert 5e9 * m["encoder_windows"] < m["encoder_flops"] <= 37.1e9 * m["encoder_windows"]
    assert m["step_bytes"] > 20e6 * steps
    first = m["passes"]["first pass"]  # every window's first pass; the example speech is short: passes of whole steps
    assert first[0] > 0 and sum(p[0] for p in m["passes"].values()) == m["encoder_windows"]
    step = load_config(None).decode.padding_step_seconds
    assert all(0 < audio <= encoded <= 30 * n and encoded % step == 0 for n, audio, encoded in m["passes"].values())
    main([examples, "--skip-pipeline"])
    out = capsys.readouterr().out
    assert "% of the core's matmul peak" in out and "% of the core's read bandwidth" in out
