"""Word timestamps of the real tiny.en on real speech, against openai-whisper's ``word_timestamps=True``.

Uses ../shared/data/eval (the JFK clip and LibriSpeech test-clean utterances, each ≤ 30 s: one window each);
skips when it is absent. The reference runs with the same weights and the same alignment heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_batch.jobs.export import to_srt
from whisper_batch.model.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper_batch.model.transcribe import TranscribeOptions, transcribe_windows
from whisper_batch.pipeline.audio import decode_audio
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.schema import output_table

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")

pytestmark = pytest.mark.integration

TOLERANCE_S = 0.1
OPTIONS = TranscribeOptions(temperatures=(0.0,), word_timestamps=True)


def librispeech_paths(eval_dir: Path) -> list[Path]:
    rows = [json.loads(line) for line in (eval_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [eval_dir / r["audio_filepath"] for r in rows if r["dataset"].startswith("librispeech")]


def load_window(path: Path) -> tuple[np.ndarray, torch.Tensor, int]:
    """Audio, its 30 s log-mel window (80, 3000) and the frames of real audio."""
    audio = decode_audio(path.read_bytes(), name=str(path))
    frames = len(audio) // HOP_LENGTH
    return audio, pad_or_trim(log_mel_spectrogram(audio, padding=N_SAMPLES)[:, :frames], N_FRAMES), frames


@pytest.fixture(scope="module")
def reference(real_model):
    """The reference network with the checkpoint's weights (fp32) and tiny.en's alignment heads."""
    _, _, ckpt = real_model
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt.dims.to_dict()))
    ref.load_state_dict(ckpt.state_dict, strict=True)
    ref.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    return ref.float().eval()


@pytest.fixture(scope="module")
def windows(eval_dir) -> dict:
    """8 windows: 7 LibriSpeech utterances of varied length and the JFK clip (last)."""
    paths = librispeech_paths(eval_dir)[::6][:7] + [eval_dir / "longform" / "jfk.flac"]
    loaded = [load_window(p) for p in paths]
    return {
        "paths": paths,
        "audio": [a for a, _, _ in loaded],
        "mel": torch.stack([m for _, m, _ in loaded]),
        "frames": [f for _, _, f in loaded],
    }


@pytest.fixture(scope="module")
def ours(real_model, windows) -> list:
    """Our results for the 8 windows, decoded and aligned as one batch."""
    model, tokenizer, _ = real_model
    return transcribe_windows(model, tokenizer, windows["mel"], windows["frames"], OPTIONS)


def test_real_model_uses_the_checkpoint_alignment_heads(real_model, reference):
    model, _, ckpt = real_model
    assert ckpt.alignment_heads == [tuple(p) for p in model.alignment_heads.nonzero().tolist()]
    assert torch.equal(model.alignment_heads.cpu(), reference.alignment_heads.to_dense())
    assert not model.alignment_heads[0].any()  # not the default "last half of the layers"


@pytest.mark.slow
def test_word_times_agree_with_reference(ours, reference, windows):
    agree = total = 0
    for path, audio, result in zip(windows["paths"], windows["audio"], ours):
        ref = whisper.transcribe(reference, audio, word_timestamps=True, temperature=0, fp16=False, language="en",
                                 condition_on_previous_text=False)
        want = [w for s in ref["segments"] for w in s["words"]]
        got = [w for s in result.segments for w in s.words]
        assert [w.word for w in got] == [w["word"] for w in want], path.name
        total += len(want)
        agree += sum(
            abs(g.start - w["start"]) <= TOLERANCE_S and abs(g.end - w["end"]) <= TOLERANCE_S for g, w in zip(got, want)
        )
    print(f"\nword times within {TOLERANCE_S} s of openai-whisper: {agree}/{total} words ({agree / total:.1%})")
    assert total > 150 and agree >= 0.95 * total


def test_words_are_ordered_and_inside_their_segment(ours, windows):
    everything = []
    for path, result, frames in zip(windows["paths"], ours, windows["frames"]):
        words = [w for s in result.segments for w in s.words]
        everything += [w.word.strip() for w in words]
        assert words, path.name
        assert "".join(w.word for w in words).strip() == result.text
        assert all(a.start <= b.start and a.end <= b.start for a, b in zip(words, words[1:])), path.name
        for s in result.segments:
            assert all(s.start <= w.start <= w.end <= s.end for w in s.words), (path.name, s)
        assert words[-1].end <= frames / 100 + 0.02
        assert all(0.0 < w.probability <= 1.0 for w in words)
    jfk = [w.word.strip() for s in ours[-1].segments for w in s.words]
    assert jfk[:4] == ["And", "so", "my", "fellow"], jfk
    # punctuation rides on its word: never a word of its own
    assert any(w[-1] in ",.?!" for w in everything) and not any(w.strip(",.?!") == "" for w in everything)


def test_batched_pass_equals_one_window_alone(real_model, ours, windows):
    model, tokenizer, _ = real_model
    for k in (0, len(ours) - 1):
        (alone,) = transcribe_windows(
            model, tokenizer, windows["mel"][k : k + 1], windows["frames"][k : k + 1], OPTIONS
        )
        assert alone.text == ours[k].text
        times = lambda r: [(w.word, w.start, w.end) for s in r.segments for w in s.words]  # noqa: E731
        assert times(alone) == times(ours[k])


@pytest.mark.slow
def test_pipeline_rows_carry_absolute_word_times(eval_dir, ours):
    """Through the Transcriber: short files share one packed window; each row's words come back on its own clock."""
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.transcriber import Transcriber, transcribe_files

    overrides = ["decode.word_timestamps=true", "decode.temperatures=[0.0]", "audio.pack_max_seconds=20"]  # packing on
    cfg = load_config(None, overrides)
    transcriber = Transcriber(cfg)
    short = [p for p in librispeech_paths(eval_dir) if p.stat().st_size < 80_000][:1]
    paths = [*short, eval_dir / "longform" / "jfk.flac"]  # JFK sits after the first file in the packed window
    rows = transcribe_files(transcriber, Featurizer(cfg, transcriber.n_mels), [str(p) for p in paths])
    for row in rows:
        assert row["error"] is None and row["segments"], row
        words = [w for s in row["segments"] for w in s["words"]]
        assert "".join(w["word"] for w in words).strip() == row["text"].strip()
        assert 0.0 <= words[0]["start"] and words[-1]["end"] <= row["duration"] + 0.02
        for s in row["segments"]:
            assert all(s["start"] <= w["start"] <= w["end"] <= s["end"] for w in s["words"])
    # the packed JFK is shifted back to its own clock: its words sit where the JFK window alone puts them
    packed = [w for s in rows[1]["segments"] for w in s["words"]]
    alone = [w for s in ours[-1].segments for w in s.words]
    assert packed[0]["start"] < 1.5 and packed[-1]["end"] <= rows[1]["duration"] + 0.02  # not on the pack's clock
    if [w["word"] for w in packed] == [w.word for w in alone]:
        diffs = [abs(p["start"] - a.start) for p, a in zip(packed, alone)]
        assert np.median(diffs) <= 0.1, diffs
    table = output_table([{**r, "id": str(i), "shard_id": 0} for i, r in enumerate(rows)], {})
    assert table.column("segments").to_pylist()[1][0]["words"][0]["word"].strip() == "And"
    srt = to_srt(rows[1], words=True)
    assert srt.startswith("1\n00:00:00,") and "\nfellow\n" in srt
