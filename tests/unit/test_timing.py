"""Word timestamps (model/timing.py and where they flow: transcribe_windows, stitch, member_share, schema, export).

The pieces are checked against the reference ``whisper.timing`` (DTW, median filter, punctuation merging, the
duration heuristics, and ``find_alignment`` with the same random weights), the batched alignment pass against
windows aligned one at a time, and the output invariants (words ordered and inside their segment).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

import whisper_batch.model.transcribe as transcribe_module
from whisper_batch.jobs.export import export, to_srt, to_vtt
from whisper_batch.model.decoding import DecodingOptions, DecodingResult
from whisper_batch.model.results import Segment, WindowResult, Word
from whisper_batch.model.timing import (
    MEDIAN7,
    SORT7,
    SORT7_WIDTH,
    WordTiming,
    add_word_timestamps,
    dtw,
    find_alignments,
    median_filter,
    merge_punctuations,
    speech_end,
    tidy_words,
)
from whisper_batch.model.transcribe import TranscribeOptions, transcribe_windows
from whisper_batch.pipeline.packing import member_share
from whisper_batch.pipeline.schema import output_table
from whisper_batch.pipeline.transcriber import stitch

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")
ref_timing = pytest.importorskip("whisper.timing", reason="the reference's timing module needs numba (test-only)")


@pytest.fixture
def reference_dtw(monkeypatch):
    """The reference DTW as plain Python (numba's compile takes longer than this whole module)."""
    monkeypatch.setattr(ref_timing, "backtrace", ref_timing.backtrace.py_func)
    return ref_timing.dtw_cpu.py_func

EOT = 50256  # tiny.en's <|endoftext|>; timestamps come after it
SENTENCE = " And so, my fellow Americans: ask not (what) your country can do for you!"


def random_mel(n: int, frames: list[int] | None = None, seed: int = 1) -> torch.Tensor:
    """Random windows, zero after each one's ``frames`` (as windows are padded)."""
    mel = torch.randn(n, 80, 3000, generator=torch.Generator().manual_seed(seed)) * 0.5
    for i, f in enumerate(frames or []):
        mel[i, :, f:] = 0
    return mel


# --------------------------------------------------------------------------- DTW and the median filter


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (4, 9), (30, 200), (25, 25)])
@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_dtw_matches_reference(shape, kind, reference_dtw):
    rng = np.random.default_rng(sum(shape))
    # integer costs make many ties: the tie-breaking order must be the reference's
    x = rng.random(shape) if kind == "uniform" else rng.integers(0, 3, shape).astype(np.float64)
    ours = dtw(x)
    np.testing.assert_array_equal(ours, reference_dtw(x))
    steps = np.diff(ours, axis=1).T
    assert tuple(ours[:, 0]) == (0, 0) and tuple(ours[:, -1]) == (shape[0] - 1, shape[1] - 1)
    assert {tuple(s) for s in steps} <= {(0, 1), (1, 0), (1, 1)}


def test_dtw_follows_the_cheap_cells():
    x = np.ones((3, 6))
    x[0, :2] = x[1, 2:4] = x[2, 4:] = 0  # token 0 on frames 0-1, token 1 on 2-3, token 2 on 4-5
    tokens, frames = dtw(x)
    first = [int(frames[tokens == t].min()) for t in range(3)]
    assert first == [0, 2, 4]


@pytest.mark.parametrize("frames", [40, 4, 3, 1])
def test_median_filter_matches_reference(frames):
    x = torch.randn(3, 5, frames, generator=torch.Generator().manual_seed(frames))
    assert torch.equal(median_filter(x, 7), ref_timing.median_filter(x, 7))
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)


def test_median_network_sorts_every_input_and_filters_as_the_reference_at_any_size():
    # the 0-1 principle: a network that sorts every 0/1 input sorts every input
    for bits in itertools.product([0, 1], repeat=SORT7_WIDTH):
        lanes = list(bits)
        for a, b in SORT7:
            lanes[a], lanes[b] = min(lanes[a], lanes[b]), max(lanes[a], lanes[b])
        assert lanes == sorted(bits)
    assert len(MEDIAN7) < len(SORT7)
    # more rows than one run of the network (MEDIAN_ROWS), ties (rounded values), and the other widths' sort
    x = torch.randn(6, 50, 1500, generator=torch.Generator().manual_seed(0)).mul(4).round()
    assert torch.equal(median_filter(x, 7), ref_timing.median_filter(x, 7))
    for width in (3, 5, 9):
        assert torch.equal(median_filter(x[:1], width), ref_timing.median_filter(x[:1], width))


# --------------------------------------------------------------------------- punctuation and duration heuristics

POOL = [" the", " cat", ",", ".", ' "', "Hi", "?", " (", "so", ")", " end", "!", " -", "'s", " ", "。", " Yes"]


def random_alignment(rng: np.random.Generator, n: int) -> list[tuple[str, list[int], float, float, float]]:
    """Words on a 0.02 s grid, some of zero length and some long (after "pauses"), as DTW produces them."""
    out, t, token = [], 0.02 * int(rng.integers(0, 100)), 100
    for _ in range(n):
        word = POOL[int(rng.integers(len(POOL)))]
        tokens = list(range(token, token + int(rng.integers(1, 3))))
        token += len(tokens)
        steps = [0, int(rng.integers(1, 15)), int(rng.integers(40, 150))][int(rng.choice(3, p=[0.15, 0.7, 0.15]))]
        out.append((word, tokens, round(t, 2), round(t + 0.02 * steps, 2), float(rng.random())))
        t += 0.02 * steps
    return out


def test_merge_punctuations_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        items = random_alignment(rng, int(rng.integers(1, 12)))
        ours = [WordTiming(*it) for it in items]
        ref = [ref_timing.WordTiming(*it) for it in items]
        merge_punctuations(ours)
        ref_timing.merge_punctuations(ref, ref_timing.add_word_timestamps.__kwdefaults__["prepend_punctuations"],
                                      ref_timing.add_word_timestamps.__kwdefaults__["append_punctuations"])
        assert [(w.word, w.tokens) for w in ours] == [(w.word, w.tokens) for w in ref]


def split_segments(rng, items, seek: int) -> tuple[list[dict], list[Segment]]:
    """Cuts the words into 1-3 segments with timestamp tokens around them; the same segments for both sides."""
    n = len(items)
    cuts = sorted({0, n, *map(int, rng.integers(1, max(n, 2), size=int(rng.integers(0, 3))))})
    ref, ours, offset = [], [], seek / 100
    for a, b in zip(cuts, cuts[1:]):
        if a >= b:
            continue
        tokens = [EOT + 108, *(t for it in items[a:b] for t in it[1]), EOT + 109]  # timestamps are >= eot
        start = max(0.0, round(offset + items[a][2] + 0.02 * int(rng.integers(-40, 40)), 2))
        end = max(start, round(offset + items[b - 1][3] + 0.02 * int(rng.integers(-40, 40)), 2))
        ref.append({"seek": seek, "start": start, "end": end, "tokens": tokens})
        ours.append(Segment(start, end, "x", tokens, 0.0, 1.0, 0.0, 0.0))
    return ref, ours


def test_word_heuristics_match_reference(monkeypatch):
    """Sentence-boundary clipping, punctuation merging, segment assignment and the first/last-word rules."""
    rng = np.random.default_rng(1)
    tokenizer = type("Tok", (), {"eot": EOT})()
    for trial in range(300):
        items = random_alignment(rng, int(rng.integers(1, 14)))
        seek = int(rng.choice([0, 0, 1234]))
        ref_segments, segments = split_segments(rng, items, seek)
        last_speech = float(rng.uniform(0, segments[0].start + 0.01))
        monkeypatch.setattr(ref_timing, "find_alignment",
                            lambda *a, _items=items, **k: [ref_timing.WordTiming(*it) for it in _items])
        ref_timing.add_word_timestamps(segments=ref_segments, model=None, tokenizer=tokenizer, mel=None,
                                       num_frames=0, last_speech_timestamp=last_speech)
        add_word_timestamps(segments, [WordTiming(*copy.deepcopy(it)) for it in items], EOT, seek / 100, last_speech)
        for ref, seg in zip(ref_segments, segments, strict=True):
            assert (seg.start, seg.end) == pytest.approx((ref["start"], ref["end"]), abs=1e-9), trial
            assert [w.word for w in seg.words] == [w["word"] for w in ref["words"]], trial
            got = [t for w in seg.words for t in (w.start, w.end, w.probability)]
            assert got == pytest.approx([w[k] for w in ref["words"] for k in ("start", "end", "probability")]), trial


def test_tidy_words_orders_words_and_grows_segments():
    a = Segment(0.0, 1.0, " a b", [1, 2], 0, 0, 0, 0, words=[Word(" a", 0.1, 0.5, 1), Word(" b", 0.5, 1.4, 1)])
    b = Segment(1.2, 2.0, " c", [3], 0, 0, 0, 0, words=[Word(" c", 1.1, 1.6, 1), Word(" d", 1.0, 0.9, 1)])
    tidy_words([a, b])
    words = [w for s in (a, b) for w in s.words]
    assert [(w.start, w.end) for w in words] == [(0.1, 0.5), (0.5, 1.1), (1.1, 1.1), (1.1, 1.1)]
    assert (a.start, a.end) == (0.0, 1.1) and (b.start, b.end) == (1.1, 2.0)
    late = Segment(2.0, 3.0, " e", [4], 0, 0, 0, 0, words=[Word(" e", 2.5, 3.4, 1)])
    tidy_words([late], limit=3.0)  # nothing past the end of the audio
    assert (late.words[0].start, late.words[0].end, late.end) == (2.5, 3.0, 3.0)
    assert speech_end([a, b]) == 1.1 and speech_end([replace(a, words=[])]) == 1.1 and speech_end([]) is None


# --------------------------------------------------------------------------- the alignment pass


@pytest.mark.parametrize("language", ["en", "ja"])
@torch.no_grad()
def test_find_alignments_matches_reference(language, random_setup, reference_of, monkeypatch):
    model, tokenizer = random_setup  # Japanese text in the English-only (byte-level) vocabulary too
    ref = reference_of(model)
    monkeypatch.setattr(ref_timing, "dtw", lambda x: ref_timing.dtw_cpu.py_func(x.double().numpy()))
    monkeypatch.setattr(ref_timing, "backtrace", ref_timing.backtrace.py_func)
    ref_tokenizer = whisper.tokenizer.get_tokenizer(tokenizer.multilingual, language=language)
    text = tokenizer.encode(SENTENCE if language == "en" else "こんにちは、世界。元気ですか")
    mel, frames = random_mel(1, [2345])[0], 2345
    want = ref_timing.find_alignment(ref, ref_tokenizer, text, mel, frames)
    spoken = language if tokenizer.multilingual else "en"  # an English-only tokenizer knows no other language
    (got,) = find_alignments(model, tokenizer, model.embed_audio(mel[None]), [text], [frames], [spoken])
    assert [(w.word, w.tokens) for w in got] == [(w.word, w.tokens) for w in want]
    assert [(w.start, w.end) for w in got] == [(float(w.start), float(w.end)) for w in want]
    assert [w.probability for w in got] == pytest.approx([float(w.probability) for w in want], abs=1e-5)
    assert all(0 <= w.start <= w.end <= frames / 100 for w in got)


@torch.no_grad()
def test_alignment_weights_are_the_plain_forward_and_the_reference_scores(random_model, tiny_en_tokenizer,
                                                                          reference_of):
    model, ref = random_model, reference_of(random_model)
    features = model.embed_audio(random_mel(2))
    tokens = torch.tensor([[tiny_en_tokenizer.sot, *tiny_en_tokenizer.encode(SENTENCE)]] * 2)
    logits, qk = model.alignment_weights(tokens, features)
    torch.testing.assert_close(logits, model.logits(tokens, features), atol=1e-4, rtol=0)
    heads = model.alignment_heads.nonzero().tolist()
    assert qk.shape == (2, len(heads), tokens.shape[1], 1500) and qk.dtype == torch.float32
    scores = {}
    hooks = [b.cross_attn.register_forward_hook(lambda _, i, o, k=k: scores.__setitem__(k, o[1]))
             for k, b in enumerate(ref.decoder.blocks)]
    with whisper.model.disable_sdpa():
        ref.logits(tokens, features)
    for h in hooks:
        h.remove()
    want = torch.stack([scores[layer][:, head] for layer, head in heads], dim=1)
    torch.testing.assert_close(qk, want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_batched_alignment_equals_each_window_alone(random_model, tiny_en_tokenizer):
    tk = tiny_en_tokenizer
    frames = [3000, 1700, 2222, 640]
    features = random_model.embed_audio(random_mel(4, frames, seed=7))
    texts = [tk.encode(SENTENCE), tk.encode(" Hello there."), [], tk.encode(" one two three four five six")]
    batched = find_alignments(random_model, tk, features, texts, frames, ["en"] * 4)
    assert batched[2] == [] and all(batched[k] for k in (0, 1, 3))
    for k in range(4):
        alone = find_alignments(random_model, tk, features[k : k + 1], texts[k : k + 1], frames[k : k + 1], ["en"])
        assert [(w.word, w.start, w.end) for w in batched[k]] == [(w.word, w.start, w.end) for w in alone[0]]
        assert [w.probability for w in batched[k]] == pytest.approx([w.probability for w in alone[0]], abs=1e-5)
    # timing alone (the skip check): the same words and times, no probabilities
    untimed = find_alignments(random_model, tk, features, texts, frames, ["en"] * 4, probabilities=False)
    assert [[(w.word, w.start, w.end) for w in ws] for ws in untimed] == [
        [(w.word, w.start, w.end) for w in ws] for ws in batched]
    assert all(np.isnan(w.probability) for ws in untimed for w in ws)


def test_transcribe_windows_word_timestamps(random_model, tiny_en_tokenizer):
    frames = [3000, 1500]
    mel = random_mel(2, frames, seed=3)
    opts = TranscribeOptions(DecodingOptions(sample_len=24), temperatures=(0.0,), logprob_threshold=None,
                             compression_ratio_threshold=None, no_speech_threshold=None)
    plain = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, opts)
    assert all(s.words is None for r in plain for s in r.segments)
    timed = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, replace(opts, word_timestamps=True))
    n_words = 0
    for r, n in zip(timed, frames):
        words = [w for s in r.segments for w in s.words]
        assert all(w.end <= n / 100 for w in words)
        n_words += len(words)
        assert "".join(w.word for w in words).strip() == r.text
        for s in r.segments:
            assert all(s.start <= w.start <= w.end <= s.end for w in s.words)
        assert all(a.end <= b.start for a, b in zip(words, words[1:]))
    assert n_words >= 5


def test_word_timestamps_resume_after_the_last_word(random_model, tiny_en_tokenizer, monkeypatch):
    """As in the reference: a pass not ending on a lone timestamp continues from its last word's end."""
    tk = tiny_en_tokenizer
    ts = lambda s: tk.timestamp_begin + round(s / 0.02)  # noqa: E731
    hello, world = tk.encode(" Hello there"), tk.encode(" world")
    scripted = iter([
        [[ts(0), *hello, ts(4.0), ts(4.0), *world], [ts(0), *world, ts(2.0)]],  # window 1 ends on a lone timestamp
        [[ts(0), *world, ts(0.5)]],
    ])
    seen = []

    def fake_decode(model, tokenizer, audio_features, options, languages=None, prompts=None, lengths=None):
        seen.append(audio_features.clone())
        return [DecodingResult(t, "", "en", -0.2, 0.01, 0.0, 1.5) for t in next(scripted)]

    monkeypatch.setattr(transcribe_module, "decode", fake_decode)
    frames = [2000, 800]
    mel = random_mel(2, frames, seed=4)
    opts = TranscribeOptions(temperatures=(0.0,), logprob_threshold=None, compression_ratio_threshold=None,
                             word_timestamps=True, probe_logprob_threshold=None)
    out = transcribe_windows(random_model, tk, mel, frames, opts)
    assert [len(f) for f in seen] == [2, 1]  # window 1 is not continued (no probe: the reference's rule)
    first = out[0].segments[0]
    seek = round(first.words[-1].end * 100)  # the last word's end, not the 4.0 s timestamp
    rest = torch.zeros(1, 80, 3000)
    rest[0, :, : 2000 - seek] = mel[0, :, seek:2000]
    torch.testing.assert_close(seen[1], random_model.embed_audio(rest), atol=1e-5, rtol=0)
    assert out[0].segments[1].start >= seek / 100 and out[0].segments[1].words


# --------------------------------------------------------------------------- output: stitch, packs, schema, export


def timed_result() -> WindowResult:
    words = [Word(" Hi", 0.5, 0.9, 0.9), Word(" there.", 0.9, 1.6, 0.8), Word(" Bye", 3.1, 3.6, 0.7)]
    segments = [Segment(0.4, 1.7, " Hi there.", [1, 2], -0.1, 1.0, 0.0, 0.0, words=words[:2]),
                Segment(3.0, 3.8, " Bye", [3], -0.1, 1.0, 0.0, 0.0, words=words[2:])]
    return WindowResult("Hi there. Bye", segments, "en", [1, 2, 3], -0.1, 1.0, 0.0, 0.0)


def test_stitch_gives_absolute_word_times():
    row = stitch([timed_result()], [30.0])
    assert row["segments"][1]["words"] == [{"word": " Bye", "start": 33.1, "end": 33.6, "probability": 0.7}]
    assert [w["start"] for w in row["segments"][0]["words"]] == [30.5, 30.9]
    plain = timed_result()
    for s in plain.segments:
        s.words = None
    assert all(s["words"] is None for s in stitch([plain], [0.0])["segments"])


def test_member_share_shifts_and_clips_words():
    members = [{"window_start": 0.0, "audio_seconds": 1.5}, {"window_start": 2.8, "audio_seconds": 1.0}]
    first, second = (member_share(timed_result(), members, m) for m in members)
    assert [(w.word, w.start, w.end) for s in first.segments for w in s.words] == [(" Hi", 0.5, 0.9),
                                                                                 (" there.", 0.9, 1.5)]
    assert [(w.start, w.end) for w in second.segments[0].words] == [pytest.approx((0.3, 0.8))]


def test_schema_holds_words_or_null():
    timed = stitch([timed_result()], [0.0])
    plain = {**timed, "segments": [{**s, "words": None} for s in timed["segments"]]}
    rows = [{"id": i, "shard_id": 0, "row_index": i, **r} for i, r in enumerate([timed, plain])]
    table = output_table([{**r, "id": str(r["id"])} for r in rows], {})
    segs = table.column("segments").to_pylist()
    assert segs[0][0]["words"][1] == {"word": " there.", "start": 0.9, "end": 1.6, "probability": 0.8}
    assert segs[1][0]["words"] is None


def test_word_level_cues():
    row = stitch([timed_result()], [0.0])
    assert to_srt(row, words=True).split("\n\n")[1] == "2\n00:00:00,900 --> 00:00:01,600\nthere."
    assert to_vtt(row, words=True).startswith("WEBVTT\n\n00:00:00.500 --> 00:00:00.900\nHi\n")
    assert to_srt(row).startswith("1\n00:00:00,400 --> 00:00:01,700\nHi there.\n")  # segment cues by default
    row["segments"][1]["words"] = None  # a segment without words keeps its segment cue
    assert to_vtt(row, words=True).endswith("00:00:03.000 --> 00:00:03.800\nBye\n")


def test_export_words_only_for_subtitles(tmp_path):
    with pytest.raises(ValueError, match="srt and vtt only"):
        export(None, "txt", str(tmp_path), words=True)
