"""Batched decoding (model/decoding.py, model/transcribe.py) against the reference ``whisper.decode``: options,
prompts, logit rules, languages, ranking, segments, fallback and the no-speech rule. The token search itself (greedy,
sampling, beam search, rows leaving the batch) is stated in test_search.py, which shares this file's helpers.

Everything runs on tiny random models (see ``tests/conftest.py``) whose decodes end at very different steps, so rows
leave the batch early; the same weights are loaded into the reference implementation.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import whisper_batch.model.transcribe as transcribe_module
from whisper_batch.model.decoding import (
    DecodingOptions,
    DecodingResult,
    LogitRules,
    compression_ratio,
    decode,
    detect_language,
    initial_tokens,
    rank,
    suppressed_tokens,
)
from whisper_batch.model.results import Segment
from whisper_batch.model.transcribe import (
    TranscribeOptions,
    decode_with_fallback,
    encoder_frames,
    rereads,
    split_segments,
    transcribe_windows,
)

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")

# the reference's ranker calls np.argmax on a list, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SAMPLE_LEN = 30  # enough for EOTs to happen at different steps, short enough to stay fast


def random_mel(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 80, 3000, generator=g) * 0.5


_FEATURES: dict[tuple[int, int, int], torch.Tensor] = {}


def features(model, n: int = 4, seed: int = 1) -> torch.Tensor:
    """Encoder output (n, 1500, 64) of ``n`` random windows, cached per model."""
    key = (id(model), n, seed)
    if key not in _FEATURES:
        with torch.no_grad():
            _FEATURES[key] = model.embed_audio(random_mel(n, seed))
    return _FEATURES[key]


def reference_task(ref, **options):
    return whisper.decoding.DecodingTask(ref, whisper.DecodingOptions(fp16=False, **options))


def reference_decode(ref, audio_features: torch.Tensor, **options) -> list:
    """The reference's results; one window per call for beam search (its batched beam search is broken)."""
    opts = whisper.DecodingOptions(fp16=False, **options)
    if options.get("beam_size"):
        return [whisper.decode(ref, audio_features[i : i + 1], opts)[0] for i in range(len(audio_features))]
    return whisper.decode(ref, audio_features, opts)


def assert_same_mask(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Both logits (rows, V) have -inf at the same places; on failure, say which (row, token) pairs differ."""
    differ = (ours.isneginf() != ref.isneginf()).nonzero().tolist()
    assert differ == [], f"{what}: {len(differ)} (row, token) masked by only one side, e.g. {differ[:5]}"


def assert_same_results(ours: list[DecodingResult], ref: list) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.tokens == list(b.tokens), f"window {i}"
        assert a.text == b.text, f"window {i}"
        assert a.language == b.language, f"window {i}"
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4), f"window {i}"
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-6), f"window {i}"
        assert a.compression_ratio == pytest.approx(b.compression_ratio), f"window {i}"
        assert a.temperature == b.temperature


# --------------------------------------------------------------------------- options, prompt, suppressed ids


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(task="summarize"), "task must be one of"),
        (dict(beam_size=2, best_of=2, temperature=0.5), "beam_size and best_of can't be given together"),
        (dict(best_of=3), "best_of with greedy sampling"),
        (dict(patience=2.0), "patience requires beam_size"),
        (dict(length_penalty=1.5), "length_penalty"),
        (dict(length_penalty=-0.1), "length_penalty"),
    ],
)
def test_validate_rejects_bad_options(options, message, random_model, tiny_en_tokenizer):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**options).validate()
    with pytest.raises(ValueError, match=message):  # decode validates before any work
        decode(random_model, tiny_en_tokenizer, features(random_model, 1), DecodingOptions(**options))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(beam_size=5, patience=1.5, length_penalty=0.0),
        dict(temperature=0.7, best_of=5),
        dict(length_penalty=1),
    ],
)
def test_validate_accepts_good_options(options):
    DecodingOptions(**options).validate()


@pytest.mark.parametrize(
    "options",
    [
        dict(language="en"),
        dict(language="en", without_timestamps=True),
        dict(language="de", task="translate"),
        dict(language="en", prompt="the previous window said this"),
        dict(language="en", prompt=list(range(100, 500)), without_timestamps=True),  # cut to n_text_ctx // 2 - 1
    ],
)
def test_initial_tokens_match_reference(options, random_setup, reference_of):
    model, tokenizer = random_setup  # an English-only model takes no language or task token, as the reference
    task = reference_task(reference_of(model), **options)
    ours = initial_tokens(tokenizer, DecodingOptions(**options), options["language"], model.dims.n_text_ctx)
    assert tuple(ours) == task.initial_tokens


@pytest.mark.parametrize("spec", ["-1", "-1,7,220", "1,2,3", [5, 6, -1], [9]])
def test_suppressed_tokens_match_reference(spec, random_setup, reference_of):
    model, tokenizer = random_setup
    task = reference_task(reference_of(model), language="en", suppress_tokens=spec)
    assert suppressed_tokens(tokenizer, spec) == list(task._get_suppress_tokens())


# --------------------------------------------------------------------------- logit rules vs the reference filters


def random_histories(g: torch.Generator, rows: int, n: int, tokenizer) -> torch.Tensor:
    """(rows, n) sampled tokens as decoding makes them: text mixed with non-decreasing timestamps, pairs and singles."""
    tb, out = tokenizer.timestamp_begin, torch.empty(rows, n, dtype=torch.long)
    for r in range(rows):
        ts = int(torch.randint(0, 60, (1,), generator=g))
        p_ts = float(torch.rand(1, generator=g))  # rows range from mostly text to mostly timestamps
        for j in range(n):
            u = float(torch.rand(1, generator=g))
            if u < p_ts:
                ts = min(ts + int(torch.randint(0, 3, (1,), generator=g)), 1500)  # equal timestamps happen
                out[r, j] = tb + ts
            elif u < p_ts + 0.02:
                out[r, j] = tokenizer.eot
            else:
                out[r, j] = int(torch.randint(0, tokenizer.eot, (1,), generator=g))
    return out


def random_logits(g: torch.Generator, rows: int, n_vocab: int, tb: int) -> torch.Tensor:
    """Random logits; some rows favour the timestamps enough to trigger the 'sum of timestamps' rule."""
    logits = torch.randn(rows, n_vocab, generator=g) * (1 + 3 * torch.rand(rows, 1, generator=g))
    logits[:, tb:] += 4 * torch.rand(rows, 1, generator=g)
    return logits


RULE_OPTIONS = [
    dict(),
    dict(without_timestamps=True),
    dict(max_initial_timestamp=None),
    dict(max_initial_timestamp=0.5),
    dict(suppress_blank=False),
    dict(suppress_tokens="1,2,220"),
    dict(prompt="some earlier words", task="translate"),
]


@pytest.mark.parametrize("options", RULE_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_logit_rules_mask_like_reference_filters(options, random_setup, reference_of):
    model, tokenizer = random_setup
    task = reference_task(reference_of(model), language="en", **options)
    ours_options = DecodingOptions(language="en", **options)
    begin = len(initial_tokens(tokenizer, ours_options, "en", model.dims.n_text_ctx))
    assert begin == task.sample_begin
    rules = LogitRules(tokenizer, ours_options, begin, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    g = torch.Generator().manual_seed(len(str(options)))
    timestamp_rule_fired = []
    for n in (0, 1, 2, 3, 4, 7, 12):  # at sample_begin and later
        rows = 48
        prefix = torch.tensor([task.initial_tokens] * rows)
        tokens = torch.cat([prefix, random_histories(g, rows, n, tokenizer)], dim=1)
        logits = random_logits(g, rows, model.dims.n_vocab, tokenizer.timestamp_begin)
        ref_logits, ours = logits.clone(), logits.clone()
        for logit_filter in task.logit_filters:
            logit_filter.apply(ref_logits, tokens)
        logprobs = rules.apply(ours, tokens)
        assert_same_mask(ours, ref_logits, f"{n} sampled tokens")
        assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])  # what is not masked is untouched
        if options.get("without_timestamps"):
            assert logprobs is None
        else:  # the log-softmax the search reuses: that of the masked logits, bit for bit
            assert torch.equal(logprobs, torch.log_softmax(ours, dim=-1))
        timestamp_rule_fired += ours[:, : tokenizer.timestamp_begin].isneginf().all(dim=1).tolist()
    if not options.get("without_timestamps"):
        assert any(timestamp_rule_fired) and not all(timestamp_rule_fired)  # both branches were exercised


@pytest.mark.parametrize("spec", [None, ""])
def test_logit_rules_without_suppress_tokens_match_reference(spec, random_model, tiny_en_tokenizer, reference_of):
    task = reference_task(reference_of(random_model), language="en", suppress_tokens=spec)
    rules = LogitRules(tiny_en_tokenizer, DecodingOptions(suppress_tokens=spec), 1, 51864, 1500, "cpu")
    logits = torch.randn(4, 51864, generator=torch.Generator().manual_seed(0))
    logits[:, tiny_en_tokenizer.timestamp_begin :] -= 10  # text is likelier: the timestamp-sum rule stays quiet
    tokens = torch.tensor([[tiny_en_tokenizer.sot, 100, 200]] * 4)
    ref_logits, ours = logits.clone(), logits.clone()
    for logit_filter in task.logit_filters:
        logit_filter.apply(ref_logits, tokens)
    rules.apply(ours, tokens)
    assert_same_mask(ours, ref_logits, f"suppress_tokens={spec!r}")


# --------------------------------------------------------------------------- whole decodes vs the reference


# the search strategies alone (greedy, beam, patience) are in test_search.py
DECODE_OPTIONS = [
    dict(without_timestamps=True),
    dict(beam_size=3, length_penalty=0.5),
    dict(length_penalty=1.0, max_initial_timestamp=None),
    dict(prompt="hello there, general kenobi"),
    dict(prompt=list(range(200, 240)), beam_size=2, without_timestamps=True),
    dict(sample_len=5),
    dict(suppress_tokens="1,2,3,220", suppress_blank=False),
    dict(task="translate", max_initial_timestamp=5.0),
]


@pytest.mark.parametrize("options", DECODE_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_decode_matches_reference(options, random_setup, reference_of):
    model, tokenizer = random_setup
    options = {"sample_len": SAMPLE_LEN, **options}
    af = features(model)
    ours = decode(model, tokenizer, af, DecodingOptions(language="en", **options))
    assert_same_results(ours, reference_decode(reference_of(model), af, language="en", **options))


@pytest.mark.parametrize("options", [dict(), dict(beam_size=2)], ids=["greedy", "beam"])
def test_per_window_prompts_in_one_batch_match_each_window_decoded_alone(options, random_setup, reference_of):
    """Windows of several files decoded together, each with its own file's previous text as a prompt (of different
    lengths, one none): the left padding changes nothing a window sees."""
    model, tokenizer = random_setup
    options = {"sample_len": SAMPLE_LEN, **options}
    af = features(model)
    prompts = [list(range(300, 400)), None, [1000, 1001, 1002], list(range(50, 500))]  # the last one over 223
    ours = decode(model, tokenizer, af, DecodingOptions(language="en", **options), prompts=prompts)
    ref = reference_of(model)
    for i, prompt in enumerate(prompts):
        extra = {"prompt": prompt} if prompt else {}
        [alone] = reference_decode(ref, af[i : i + 1], language="en", **options, **extra)
        assert_same_results([ours[i]], [alone])


def test_detected_languages_match_reference(random_multilingual_model, multilingual_tokenizer, reference_of):
    model, tokenizer = random_multilingual_model, multilingual_tokenizer
    af = features(model)
    ref = reference_of(model)
    codes, probs = detect_language(model, tokenizer, af)
    ref_tokens, ref_probs = whisper.decoding.detect_language(ref, af)
    ref_tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages)
    assert codes == [ref_tokenizer.decode([t]).strip("<|>") for t in ref_tokens.tolist()]
    for ours_p, ref_p in zip(probs, ref_probs):
        assert ours_p.keys() == ref_p.keys()
        assert max(abs(ours_p[k] - ref_p[k]) for k in ours_p) < 1e-5
    # decode detects the language of each window when none is given, like the reference
    ours = decode(model, tokenizer, af, DecodingOptions(sample_len=10))
    assert_same_results(ours, reference_decode(ref, af, sample_len=10))


def test_per_window_languages_match_reference(random_multilingual_model, multilingual_tokenizer, reference_of):
    model, ref = random_multilingual_model, reference_of(random_multilingual_model)
    af, langs = features(model), ["en", "de", None, "fr"]
    ours = decode(model, multilingual_tokenizer, af, DecodingOptions(sample_len=10), languages=langs)
    for i, lang in enumerate(langs):
        assert_same_results(ours[i : i + 1], reference_decode(ref, af[i : i + 1], language=lang, sample_len=10))
    assert ours[0].language == "en" and ours[1].language == "de" and ours[2].language_probs is not None


def test_detect_language_needs_a_multilingual_model(random_model, tiny_en_tokenizer):
    with pytest.raises(ValueError, match="English-only"):
        detect_language(random_model, tiny_en_tokenizer, features(random_model, 1))


# --------------------------------------------------------------------------- ranking and scores


def test_rank_with_length_penalty():
    candidates, scores = [[1, 2], list(range(10))], [-2.0, -6.0]
    assert rank(candidates, scores, None) == 1  # -2/2 = -1.0 < -6/10 = -0.6
    assert rank(candidates, scores, 0.0) == 0  # no length normalisation at all
    assert rank(candidates, scores, 1.0) == 0  # Google NMT: -2/(7/6) = -1.71 > -6/(15/6) = -2.4
    g = torch.Generator().manual_seed(0)
    ranker = {alpha: whisper.decoding.MaximumLikelihoodRanker(alpha) for alpha in (None, 0.0, 0.3, 1.0)}
    for _ in range(50):
        n = int(torch.randint(1, 6, (1,), generator=g))
        cands = [[0] * int(torch.randint(1, 30, (1,), generator=g)) for _ in range(n)]
        lps = (-torch.rand(n, generator=g) * 20).tolist()
        for alpha, ref in ranker.items():
            assert rank(cands, lps, alpha) == ref.rank([cands], [lps])[0]


def test_rank_survives_an_empty_candidate():
    assert rank([[], [1, 2, 3]], [0.0, -3.0], None) == 1


@pytest.mark.parametrize("text", ["", "hello", "the the the the the the the the the the the the", "Ünïcödé ♪"])
def test_compression_ratio_matches_reference(text):
    if text:
        assert compression_ratio(text) == pytest.approx(whisper.utils.compression_ratio(text))
    else:
        assert compression_ratio(text) == 0.0


# --------------------------------------------------------------------------- segments


def make_result(tokens: list[int]) -> DecodingResult:
    return DecodingResult(tokens, "", "en", -0.25, 0.01, 0.2, 1.5)


def timestamp(tokenizer, seconds: float) -> int:
    return tokenizer.timestamp_begin + round(seconds / 0.02)


def test_split_segments_at_timestamp_pairs(tiny_en_tokenizer):
    tk = tiny_en_tokenizer
    ts = lambda s: timestamp(tk, s)  # noqa: E731
    hello, world = tk.encode(" Hello"), tk.encode(" world")
    frames = 750  # 7.5 s of audio in the window
    cases = {  # tokens -> (start, end, text) per segment, mel frames consumed
        # pairs, then a single timestamp before EOT: everything is trusted, and the rest after it is probed
        "pairs": ([ts(0), *hello, ts(1.0), ts(1.2), *world, ts(2.5)], [(0, 1.0, " Hello"), (1.2, 2.5, " world")], 250),
        # ends with a closed pair: the window is consumed up to the last timestamp only
        "final pair": ([ts(0), *hello, ts(1), ts(1), *world, ts(2), ts(2)], [(0, 1, " Hello"), (1, 2, " world")], 200),
        # text after the last pair is not trusted: dropped, and decoded again from the last timestamp
        "trailing text": ([ts(0), *hello, ts(1.0), ts(1.0), *world], [(0, 1.0, " Hello")], 100),
        # no timestamps at all: one segment over the window's audio
        "no timestamps": ([*hello, *world], [(0, 7.5, " Hello world")], 750),
        # no pair: one segment up to the last timestamp, the rest probed
        "single ending": ([*hello, ts(1.5)], [(0, 1.5, " Hello")], 150),
        # no pair and text after the last timestamp: all of it kept, nothing left to probe
        "text after": ([ts(0), *hello, ts(1.5), *world], [(0, 1.5, " Hello world")], 750),
        # an empty piece (two timestamps, no text) is dropped
        "empty piece": ([ts(0), ts(0), *hello, ts(3.0)], [(0, 3.0, " Hello")], 300),
        "nothing": ([], [], 750),
        # a segment past the audio's end (the padding's text) is dropped; one running past it is clipped to it
        "past the end": ([ts(6.0), *hello, ts(8.0), ts(7.5), *world, ts(9.0)], [(6.0, 7.5, " Hello")], 750),
    }
    for name, (tokens, expected, consumed) in cases.items():
        segments, used = split_segments(make_result(tokens), tk, frames)
        assert [(pytest.approx(s.start), pytest.approx(s.end), s.text) for s in segments] == expected, name
        assert used == consumed, name
    (first,), _ = split_segments(make_result([ts(0), *hello, ts(1.0)]), tk, frames)
    assert first.tokens == [ts(0), *hello, ts(1.0)]
    scores = (first.avg_logprob, first.no_speech_prob, first.temperature, first.compression_ratio)
    assert scores == (-0.25, 0.01, 0.2, 1.5)  # copied from the window's result
    # a character cut by the window's end: its pieces are left out of the text, never shown as U+FFFD
    kanji = tk.encode(" 日本")
    (cut,), _ = split_segments(make_result([ts(0), *hello, *kanji[:-1]]), tk, frames)
    assert "\ufffd" in tk.decode(kanji[:-1]) and "\ufffd" not in cut.text and cut.text.startswith(" Hello")


def test_a_continuation_that_only_rereads_the_last_words_is_dropped():
    def segs(*texts):
        return [Segment(0.0, 1.0, t, [], -0.2, 1.0, 0.1, 0.0) for t in texts]

    assert rereads("...that is to say happiness upon earth. You didn't want to come.", segs(" come."))
    assert rereads("You didn't want to come.", segs(" want", " to COME!"))
    assert not rereads("You didn't want to come.", segs(" come here."))
    assert not rereads("You didn't want to come.", segs(" ", ""))  # no words: nothing to drop
    assert not rereads("", segs(" come."))


# --------------------------------------------------------------------------- fallback and no-speech


@pytest.fixture
def decode_calls(monkeypatch) -> list[tuple[torch.Tensor, DecodingOptions, list[DecodingResult]]]:
    """Records every ``decode`` call made by model.transcribe: (audio features, options, results, lengths)."""
    calls = []
    real = transcribe_module.decode

    def spy(model, tokenizer, audio_features, options, languages=None, prompts=None, lengths=None):
        results = real(model, tokenizer, audio_features, options, languages, prompts, lengths)
        calls.append((audio_features.clone(), options, results, lengths))
        return results

    monkeypatch.setattr(transcribe_module, "decode", spy)
    return calls


def window_ids(batch: torch.Tensor, af: torch.Tensor) -> list[int]:
    """Which rows of ``af`` make up ``batch``."""
    return [next(i for i in range(len(af)) if torch.equal(af[i], row)) for row in batch]


def test_fallback_redecodes_only_the_failing_rows(random_model, tiny_en_tokenizer, decode_calls):
    af = features(random_model, 6, seed=3)
    greedy = decode(random_model, tiny_en_tokenizer, af, DecodingOptions(sample_len=20))
    lps = sorted(r.avg_logprob for r in greedy)
    threshold = (lps[2] + lps[3]) / 2  # half the windows fail at temperature 0
    opts = TranscribeOptions(
        decoding=DecodingOptions(sample_len=20),
        temperatures=(0.0, 0.5, 1.0),
        logprob_threshold=threshold,
        compression_ratio_threshold=None,
        no_speech_threshold=None,
        best_of=2,
    )
    results = decode_with_fallback(random_model, tiny_en_tokenizer, af, opts)

    rows = [window_ids(batch, af) for batch, *_ in decode_calls]
    assert rows[0] == list(range(6)) and decode_calls[0][1].temperature == 0.0
    assert rows[1] == [i for i, r in enumerate(greedy) if r.avg_logprob < threshold] and len(rows[1]) == 3
    final: dict[int, DecodingResult] = {}
    for k, (ids, (_, options, out, _)) in enumerate(zip(rows, decode_calls)):
        assert options.temperature == opts.temperatures[k]
        if k:  # hotter passes sample best-of candidates
            assert options.best_of == 2 and options.beam_size is None
            failed_before = [i for i, r in zip(rows[k - 1], decode_calls[k - 1][2]) if r.avg_logprob < threshold]
            assert ids == failed_before  # exactly the rows that failed the previous pass, nothing else
        final.update(zip(ids, out))
    for i, r in enumerate(results):
        assert r is final[i]  # each window keeps its last decode ...
        last_pass = max(k for k, ids in enumerate(rows) if i in ids)
        assert r.temperature == opts.temperatures[last_pass]  # ... and the temperature of that decode
        if greedy[i].avg_logprob >= threshold:
            assert r.tokens == greedy[i].tokens and r.temperature == 0.0


def test_fallback_tries_every_temperature_when_all_fail(random_model, tiny_en_tokenizer, decode_calls):
    af = features(random_model, 3, seed=3)
    opts = TranscribeOptions(
        decoding=DecodingOptions(sample_len=10, beam_size=2),
        temperatures=(0.0, 0.3, 0.6),
        logprob_threshold=0.0,  # a logprob is never above 0: every decode fails
        no_speech_threshold=None,
        best_of=3,
    )
    results = decode_with_fallback(random_model, tiny_en_tokenizer, af, opts)
    assert [len(batch) for batch, *_ in decode_calls] == [3, 3, 3]
    assert [o.temperature for _, o, *_ in decode_calls] == [0.0, 0.3, 0.6]
    assert decode_calls[0][1].beam_size == 2 and decode_calls[1][1].beam_size is None
    assert decode_calls[1][1].best_of == 3  # TranscribeOptions.best_of
    assert [r.temperature for r in results] == [0.6, 0.6, 0.6]


def test_no_fallback_when_every_window_passes(random_model, tiny_en_tokenizer, decode_calls):
    af = features(random_model, 3, seed=3)
    opts = TranscribeOptions(
        decoding=DecodingOptions(sample_len=10), logprob_threshold=-100.0, compression_ratio_threshold=100.0
    )
    results = decode_with_fallback(random_model, tiny_en_tokenizer, af, opts)
    assert len(decode_calls) == 1 and all(r.temperature == 0.0 for r in results)


def padded_mel(frames: list[int], seed: int = 3) -> torch.Tensor:
    """Random windows holding ``frames`` mel frames of "audio" each, zeros after (as windows are made)."""
    mel = random_mel(len(frames), seed)
    for i, n in enumerate(frames):
        mel[i, :, n:] = 0
    return mel


def test_no_speech_rule_gives_empty_text_and_no_fallback(random_model, tiny_en_tokenizer, decode_calls):
    frames = [3000, 2000, 1000, 500]
    mel = padded_mel(frames)
    af = random_model.embed_audio(mel)
    greedy = decode(random_model, tiny_en_tokenizer, af, DecodingOptions(sample_len=15))
    nsp = sorted(r.no_speech_prob for r in greedy)
    assert nsp[1] < nsp[2]
    threshold = (nsp[1] + nsp[2]) / 2
    opts = TranscribeOptions(
        decoding=DecodingOptions(sample_len=15),
        temperatures=(0.0, 1.0),
        logprob_threshold=0.0,  # every window "fails" its logprob ...
        no_speech_threshold=threshold,  # ... but only those above the no-speech threshold are silence
        compression_ratio_threshold=None,
        best_of=2,
    )
    out = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, opts)
    silent = [r.no_speech_prob > threshold for r in greedy]
    assert [r.no_speech for r in out] == silent
    for r, is_silent in zip(out, silent):
        if is_silent:
            assert r.text == "" and r.segments == [] and r.tokens == [] and r.temperature == 0.0
        else:
            assert r.temperature == 1.0 and r.text == "".join(s.text for s in r.segments).strip()
    # the first pass decodes every window; its fallback never re-decodes the silent ones
    assert window_ids(decode_calls[0][0], af) == [0, 1, 2, 3]
    assert window_ids(decode_calls[1][0], af) == [i for i, s in enumerate(silent) if not s]
    # a logprob above the threshold overrides the no-speech probability
    kept = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, replace(opts, logprob_threshold=-100.0))
    assert not any(r.no_speech for r in kept)


def test_transcribe_windows_without_timestamps_is_one_segment_per_window(random_model, tiny_en_tokenizer):
    frames = [3000, 1234, 100]
    mel = padded_mel(frames)
    opts = TranscribeOptions(decoding=DecodingOptions(sample_len=15, without_timestamps=True), temperatures=(0.0,))
    out = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, opts)
    direct = decode(random_model, tiny_en_tokenizer, random_model.embed_audio(mel), opts.decoding)
    assert any(d.text for d in direct)
    for r, d, n in zip(out, direct, frames):
        assert r.tokens == d.tokens and r.text == d.text and r.language == "en"
        assert [(s.start, s.end) for s in r.segments] == ([(0.0, pytest.approx(n / 100))] if d.text else [])


def test_transcribe_windows_continues_after_the_last_timestamp(random_model, tiny_en_tokenizer, monkeypatch):
    """A window whose tokens end in a closed pair is decoded again from its last timestamp, like the reference."""
    tk = tiny_en_tokenizer
    ts = lambda s: timestamp(tk, s)  # noqa: E731
    hello, world = tk.encode(" Hello"), tk.encode(" world")
    scripted = iter([
        [[ts(0), *hello, ts(1.0), ts(1.0), *world], [*world, ts(8.0)]],  # window 0 stops trusting after 1.0 s
        [[*world, ts(14.0)]],  # the rest of window 0, from 1.0 s, to its end
    ])
    seen = []

    def fake_decode(model, tokenizer, audio_features, options, languages=None, prompts=None, lengths=None):
        seen.append(audio_features.clone())
        return [make_result(tokens) for tokens in next(scripted)]

    monkeypatch.setattr(transcribe_module, "decode", fake_decode)
    frames = [1500, 800]
    mel = padded_mel(frames)
    opts = TranscribeOptions(temperatures=(0.0,), logprob_threshold=None, compression_ratio_threshold=None)
    out = transcribe_windows(random_model, tk, mel, frames, opts)
    assert [len(f) for f in seen] == [2, 1]
    rest = torch.zeros(1, 80, 3000)
    rest[0, :, : 1500 - 100] = mel[0, :, 100:1500]  # window 0 from frame 100 (1.0 s), zero-padded
    torch.testing.assert_close(seen[1], random_model.embed_audio(rest), atol=1e-5, rtol=0)
    assert [(s.start, s.end, s.text) for s in out[0].segments] == [
        (0.0, 1.0, " Hello"), (1.0, pytest.approx(15.0), " world")
    ]
    assert out[0].text == "Hello world"
    assert [(s.start, s.end, s.text) for s in out[1].segments] == [(0.0, 8.0, " world")]


@pytest.mark.parametrize("case", ["sure", "unsure", "off"])
def test_the_rest_after_a_lone_timestamp_is_probed(random_model, tiny_en_tokenizer, monkeypatch, case):
    """A pass that ends at a lone timestamp before its audio does is followed by a probe of the rest, at the first
    temperature only; its text is kept only when the model is sure of it (else the rest is silence); a probe that
    repeats the last words before it is dropped. With probe_logprob_threshold=None the rest is skipped, as the
    reference skips it."""
    tk = tiny_en_tokenizer
    ts = lambda s: timestamp(tk, s)  # noqa: E731
    scripted = iter([
        [ts(0), *tk.encode(" Hello there."), ts(2.0)],  # speech "ends" at 2.0 s of 10 s
        [ts(0), *tk.encode(" You did not want to come."), ts(6.0)],  # the probe, from 2.0 s
        [ts(0), *tk.encode(" come."), ts(2.0)],  # a second probe, from 8.0 s: the last word again
    ])
    temperatures = []

    def fake_decode(model, tokenizer, audio_features, options, languages=None, prompts=None, lengths=None):
        temperatures.append(options.temperature)
        logprob = -0.9 if case == "unsure" and len(temperatures) > 1 else -0.3
        return [DecodingResult(next(scripted), "", "en", logprob, 0.1, options.temperature, 1.2)]

    monkeypatch.setattr(transcribe_module, "decode", fake_decode)
    opts = TranscribeOptions(probe_logprob_threshold=None if case == "off" else -0.7)
    out = transcribe_windows(random_model, tk, padded_mel([1000]), [1000], opts)[0]
    if case == "sure":
        assert temperatures == [0.0, 0.0, 0.0]  # the first pass and two probes
        assert [(s.start, s.end, s.text) for s in out.segments] == [
            (0.0, 2.0, " Hello there."), (2.0, 8.0, " You did not want to come.")
        ]
    else:  # unsure (-0.9 < -0.7): the rest is silence, without falling back hotter; off: never probed
        assert temperatures == ([0.0, 0.0] if case == "unsure" else [0.0])
        assert out.text == "Hello there."


def test_loop_stop_names_only_rows_that_already_repeat(tiny_en_tokenizer):
    from whisper_batch.model.decoding import LoopStop, compression_ratio

    tk = tiny_en_tokenizer
    loop = tk.encode(" I was there." * 20)[:40]
    prose = tk.encode(
        " Stephen leaned back and drew idly on his scribbler, listening to the talk about him which Heron checked"
        " from time to time by saying something sharp about the rector and the boys of the third form."
    )[:40]
    assert compression_ratio(tk.decode(loop)) > 2.4 > compression_ratio(tk.decode(prose))
    begin = 3
    tokens = torch.full((3, begin + 40), tk.sot, dtype=torch.long)
    tokens[0, begin:] = torch.tensor(loop)
    tokens[1, begin:] = torch.tensor(prose)
    tokens[2, begin:] = torch.tensor(loop)
    tokens[2, begin + 10] = tk.eot  # already finished: left alone
    stop = LoopStop(tk, begin, 2.4)
    assert stop(tokens, begin + 40) == [0]
    assert stop(tokens, begin + 39) == []  # checked every 8 steps only
    assert stop(tokens, begin + 24) == []  # too short to judge


def test_padding_rule_gives_steps_of_its_length_up_to_a_full_window():
    pad = TranscribeOptions(padding_seconds=10.0, padding_step_seconds=5.0)
    assert encoder_frames(450, pad) == 1500  # 4.5 s + 10 s, up to a multiple of 5 s
    assert encoder_frames(1000, pad) == 2000
    assert encoder_frames(1001, pad) == 2500
    assert encoder_frames(2500, pad) == 3000  # never past 30 s
    assert encoder_frames(1, TranscribeOptions(padding_seconds=0.0, padding_step_seconds=5.0)) == 500
    assert encoder_frames(300, TranscribeOptions()) == 3000  # None: the reference's 30 s windows
    fine = TranscribeOptions(padding_seconds=5.0, padding_step_seconds=1.0)
    assert [encoder_frames(n, fine) for n in (450, 500, 501, 2401)] == [1000, 1000, 1100, 3000]
    odd = TranscribeOptions(padding_seconds=5.0, padding_step_seconds=0.03)  # 3 frames: whole positions (4 frames)
    assert encoder_frames(450, odd) == 952 and encoder_frames(451, odd) == 952


def test_with_padding_a_windows_encoder_pass_does_not_depend_on_its_batch(random_model, tiny_en_tokenizer,
                                                                          decode_calls):
    """Each window is encoded at its own length: batched with a longer window it shares the decode (one batch, the
    features zero-padded to the longest, with each window's length) and is decoded as it is alone, so its text
    cannot depend on what it was batched with."""
    frames = [300, 2600]
    mel = padded_mel(frames)
    opts = TranscribeOptions(decoding=DecodingOptions(sample_len=10), temperatures=(0.0,), padding_seconds=10.0,
                             padding_step_seconds=5.0)
    together = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, opts)
    features, _, _, lengths = decode_calls[0]
    assert tuple(features.shape[:2]) == (2, 1500) and lengths == [1500, 750]  # longest first: 26 s + 10 s -> 30 s
    with torch.no_grad():  # 3 s + 10 s -> 15 s: 750 positions, zeros after
        torch.testing.assert_close(features[1, :750], random_model.embed_audio(mel[:1, :, :1500])[0])
    assert not features[1, 750:].any()
    for k in range(2):
        alone = transcribe_windows(random_model, tiny_en_tokenizer, mel[k : k + 1], frames[k : k + 1], opts)
        assert together[k].tokens == alone[0].tokens and together[k].text == alone[0].text


@pytest.mark.parametrize("beam_size", [None, 2])
def test_windows_of_several_lengths_decode_in_one_batch_as_each_alone(random_setup, beam_size):
    """decode() over features of 1500, 750 and 250 positions, zero-padded together with their lengths (the
    language detected per length on a multilingual model), gives each window the tokens it gets alone."""
    model, tokenizer = random_setup
    lengths = [1500, 750, 750, 250]
    with torch.no_grad():
        alone = [model.embed_audio(random_mel(1, seed=20 + k)[:, :, : 2 * n]) for k, n in enumerate(lengths)]
    padded = torch.zeros(len(lengths), 1500, alone[0].shape[2])
    for k, (f, n) in enumerate(zip(alone, lengths)):
        padded[k, :n] = f[0]
    opts = DecodingOptions(sample_len=12, beam_size=beam_size)
    together = decode(model, tokenizer, padded, opts, lengths=lengths)
    for k, f in enumerate(alone):
        own = decode(model, tokenizer, f, opts)[0]
        assert (together[k].tokens, together[k].language) == (own.tokens, own.language)
        assert together[k].avg_logprob == pytest.approx(own.avg_logprob, abs=1e-4)


def test_short_windows_are_encoded_with_their_padding_trimmed(random_model, tiny_en_tokenizer, decode_calls):
    frames = [450, 300, 120]
    mel = padded_mel(frames)
    opts = TranscribeOptions(decoding=DecodingOptions(sample_len=10), temperatures=(0.0,), padding_seconds=10.0,
                             padding_step_seconds=5.0)
    out = transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, opts)
    # the first pass: the three windows cut to 4.5 s + 10 s = 1500 frames, 750 encoder positions
    with torch.no_grad():
        trimmed = random_model.embed_audio(mel[:, :, :1500])
    torch.testing.assert_close(decode_calls[0][0], trimmed)
    assert len(out) == 3
    decode_calls.clear()
    transcribe_windows(random_model, tiny_en_tokenizer, mel, frames, replace(opts, padding_seconds=None))
    assert decode_calls[0][0].shape == (3, 1500, random_model.dims.n_audio_state)  # the reference's 30 s windows
