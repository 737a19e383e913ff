"""The model stage's own rules: no-speech gates, packs split by word times, fp16 features, out-of-memory backoff."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_batch.model.audio import SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper_batch.model.decoding import DecodingResult
from whisper_batch.model.results import Segment, WindowResult, Word
from whisper_batch.model.transcribe import TranscribeOptions, first_sound, is_silence, transcribe_windows
from whisper_batch.pipeline import faults
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.device import cpu_has_bf16, is_out_of_memory, pick_device
from whisper_batch.pipeline.features import Featurizer, featurize_windows, mel_windows
from whisper_batch.pipeline.packing import member_share, pack_ok
from whisper_batch.pipeline.transcriber import Transcriber, stitch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def window(audio: np.ndarray) -> torch.Tensor:
    return log_mel_spectrogram(torch.from_numpy(pad_or_trim(audio.astype(np.float32))), 80)[None]


# --- no speech ---------------------------------------------------------------------------------------------------


def test_quiet_windows_are_no_speech_without_running_the_model(random_model, tiny_en_tokenizer):
    rng = np.random.default_rng(0)
    silence = window(np.zeros(SAMPLE_RATE * 10))
    hiss = window(1e-5 * rng.standard_normal(SAMPLE_RATE * 10))  # -100 dBFS
    calls = []
    encode = random_model.embed_audio
    random_model.embed_audio = lambda mel: calls.append(mel.shape[0]) or encode(mel)
    try:
        out = transcribe_windows(random_model, tiny_en_tokenizer, torch.cat([silence, hiss]), [1000, 1000])
    finally:
        del random_model.embed_audio
    assert calls == []  # the encoder never ran
    assert all(r.no_speech and r.text == "" and r.segments == [] for r in out)


def test_quiet_gate_keeps_quiet_speech_and_can_be_switched_off():
    rng = np.random.default_rng(1)
    mel = window(1e-3 * rng.standard_normal(SAMPLE_RATE * 5))[0, :, :500]  # -60 dBFS: quiet, not silent
    assert first_sound(mel, TranscribeOptions()) == 0
    silent = window(np.zeros(SAMPLE_RATE))[0, :, :100]
    assert first_sound(silent, TranscribeOptions()) is None
    assert first_sound(silent, TranscribeOptions(quiet_log_mel=None)) == 0
    late = window(np.concatenate([np.zeros(SAMPLE_RATE * 2), 0.1 * rng.standard_normal(SAMPLE_RATE)]))[0, :, :300]
    assert 195 <= first_sound(late, TranscribeOptions()) <= 200  # the 25 ms frame reaching into the noise


def result(temperature: float, avg_logprob: float, no_speech_prob: float) -> DecodingResult:
    return DecodingResult(tokens=[1], text="we", language="en", avg_logprob=avg_logprob,
                          no_speech_prob=no_speech_prob, temperature=temperature, compression_ratio=1.0)


def test_window_that_failed_every_temperature_is_no_speech_when_the_model_doubted_speech():
    opts = TranscribeOptions()
    last = opts.temperatures[-1]
    assert is_silence(result(last, -3.0, 0.53), opts)  # a tone: failed at T=1.0, no_speech 0.53
    assert not is_silence(result(0.4, -3.0, 0.53), opts)  # hotter temperatures are still to come
    assert not is_silence(result(last, -3.0, 0.3), opts)  # the model heard speech: its best guess is kept
    assert not is_silence(result(last, -0.5, 0.9), opts)  # did not fail
    assert not is_silence(result(last, -3.0, 0.53), TranscribeOptions(failed_no_speech_threshold=None))
    assert is_silence(result(0.0, -1.5, 0.7), opts)  # the reference's own rule still holds


def test_a_pass_of_no_word_where_the_model_doubts_speech_gives_no_text_but_its_rest_is_still_decoded(
        tiny_en_tokenizer):
    """"." over 7 s of white noise (log-prob -0.87, no-speech 0.95: the reference's rule keeps it) is no text; where
    such a pass ends at a timestamp pair, what follows is still decoded, as for any pass."""
    from whisper_batch.model.transcribe import Seek, WindowBatch

    tk = tiny_en_tokenizer
    tb, dot = tk.timestamp_begin, tk.encode(" .")
    batch = WindowBatch(None, tk, TranscribeOptions(), torch.zeros(1, 80, 3000), [3000], ["en"], [False])

    def decoded(tokens, text, no_speech):
        return DecodingResult(tokens=tokens, text=text, language="en", avg_logprob=-0.87, no_speech_prob=no_speech,
                              temperature=0.0, compression_ratio=1.0)

    noise = batch.cut(Seek(0, 0), decoded([tb, *dot, tb + 350], " .", 0.95))  # <0.00> . <7.00>
    assert noise.segments == [] and noise.consumed == 700 and noise.lone_ending  # a probe of the rest follows
    paired = batch.cut(Seek(0, 0), decoded([tb, *dot, tb + 500, tb + 500], " .", 0.95))  # <0.00> . <10.00><10.00>
    assert paired.segments == [] and paired.consumed == 1000  # the rest, from 10 s, is decoded in a further pass
    heard = batch.cut(Seek(0, 0), decoded([tb, *dot, tb + 350], " .", 0.3))  # the model heard speech: kept
    assert [seg.text for seg in heard.segments] == [" ."]
    words = batch.cut(Seek(0, 0), decoded([tb, *tk.encode(" Okay."), tb + 350], " Okay.", 0.95))
    assert [seg.text.strip() for seg in words.segments] == ["Okay."]


# --- features ----------------------------------------------------------------------------------------------------


def test_features_are_fp16_windows_one_after_another():
    rng = np.random.default_rng(2)
    audio = [(0, 0.1 * rng.standard_normal(SAMPLE_RATE * 30).astype(np.float32)),
             (SAMPLE_RATE * 30, 0.1 * rng.standard_normal(SAMPLE_RATE * 7).astype(np.float32))]
    w = featurize_windows(audio, 80)
    assert w.frames == [3000, 700] and w.starts == [0.0, 30.0] and w.duration == pytest.approx(37.0)
    assert len(w.mel) == 80 * 3700 * 2
    first, second = mel_windows(bytes(w.mel), w.frames, 80)
    assert first.shape == (80, 3000) and second.shape == (80, 700) and second.dtype == np.float16
    want = log_mel_spectrogram(audio[1][1], 80, padding=480000)[:, :700].numpy()
    np.testing.assert_allclose(second.astype(np.float32), want, atol=2e-3)


def test_stitched_segments_are_ordered_apart_and_carry_their_windows_language():
    """Segments of a row come out in time order without overlap; each keeps its window's language; the row's is the
    language of most of its segments' seconds (here German: 1 window of 3, but 20 s of 26)."""

    def window_result(language, *spans, failed=False):
        segs = [Segment(a, b, f" {language} {a}", [], -0.3, 1.2, 0.1, 0.0, language=language, fallback_failed=failed)
                for a, b in spans]
        return WindowResult("", segs, language, [], -0.3, 1.2, 0.1, 0.0)

    results = [window_result("en", (0.0, 2.0), (2.0, 4.5)), window_result("de", (0.0, 20.0), failed=True),
               window_result("en", (0.0, 1.5))]
    row = stitch(results, [0.0, 4.0, 24.0])  # the second window starts before the first one's last segment ends
    spans = [(s["start"], s["end"], s["language"]) for s in row["segments"]]
    assert spans == [(0.0, 2.0, "en"), (2.0, 4.0, "en"), (4.0, 24.0, "de"), (24.0, 25.5, "en")]
    assert [s["fallback_failed"] for s in row["segments"]] == [False, False, True, False]
    assert row["language"] == "de"
    assert stitch([WindowResult("", [], "fr", [], 0.0, 0.0, 1.0, 0.0)], [0.0])["language"] == "fr"


# --- packs -------------------------------------------------------------------------------------------------------


def seg(start, end, words, temperature=0.0):
    text = "".join(w.word for w in words)
    return Segment(start, end, text, [t for w in words for t in w.tokens], -0.2, 1.0, 0.1, temperature, words=words)


def pack_result(segments, temperature=0.0) -> WindowResult:
    return WindowResult("".join(s.text for s in segments), segments, "en", [t for s in segments for t in s.tokens],
                        -0.2, 1.0, 0.1, temperature)


MEMBERS = [{"window_start": 0.0, "audio_seconds": 3.0}, {"window_start": 5.0, "audio_seconds": 3.0}]


def test_a_segment_across_the_silence_between_members_is_split_by_its_words():
    words = [Word(" One", 0.5, 1.0, 0.9, [11]), Word(" two.", 1.0, 2.5, 0.9, [12]),
             Word(" Three", 5.4, 6.0, 0.9, [13]), Word(" four.", 6.0, 7.2, 0.9, [14])]
    r = pack_result([seg(0.4, 7.5, words)])  # Whisper did not break the segment at the silence
    first, second = (member_share(r, MEMBERS, m) for m in MEMBERS)
    assert first.text == "One two." and first.tokens == [11, 12]
    assert (first.segments[0].start, first.segments[0].end) == (0.4, 2.5)
    assert second.text == "Three four." and second.tokens == [13, 14]
    assert second.segments[0].start == pytest.approx(0.4) and second.segments[0].end == pytest.approx(2.5)
    assert [w.word for w in second.segments[0].words] == [" Three", " four."]
    assert pack_ok(r, [first, second])
    plain = member_share(r, MEMBERS, MEMBERS[0], keep_words=False)
    assert plain.segments[0].words is None and plain.text == "One two."


def test_pack_decodes_that_cannot_be_split_are_refused():
    words = [Word(" One", 0.5, 1.0, 0.9, [11]), Word(" two.", 1.0, 2.5, 0.9, [12])]
    skipped = pack_result([seg(0.4, 2.6, words)])  # the second member got nothing
    assert not pack_ok(skipped, [member_share(skipped, MEMBERS, m) for m in MEMBERS])
    both = words + [Word(" Three", 5.4, 6.0, 0.9, [13])]
    sampled = pack_result([seg(0.4, 6.1, both)], temperature=0.2)
    assert not pack_ok(sampled, [member_share(sampled, MEMBERS, m) for m in MEMBERS])
    repeat = [Word(" One", 7.9, 7.9, 0.2, [11]), Word(" two.", 7.9, 7.9, 0.2, [12])]  # re-read, squeezed at the end
    reread = pack_result([seg(0.4, 6.1, both), seg(7.9, 7.9, repeat)])
    assert not pack_ok(reread, [member_share(reread, MEMBERS, m) for m in MEMBERS])


# --- devices and memory ------------------------------------------------------------------------------------------


def test_auto_dtype_on_cpu_is_bf16_only_where_native():
    cfg = load_config(None, ["model.device=cpu"])
    assert pick_device(cfg.model) == ("cpu", torch.bfloat16 if cpu_has_bf16() else torch.float32)  # else int8 + fp32
    assert pick_device(load_config(None, ["model.device=cpu", "model.quantize=int8"]).model)[1] == torch.float32
    assert pick_device(load_config(None, ["model.device=cpu", "model.dtype=float32"]).model)[1] == torch.float32


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_quantize_auto_is_the_encoders_int8_only_on_a_cpu_without_bf16(monkeypatch, bf16):
    import whisper_batch.pipeline.device as device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: bf16)
    auto = load_config(None, ["model.device=cpu", "model.quantize=auto"]).model
    assert device.quantize_mode(auto, "cpu") == ("none" if bf16 else "int8-encoder")
    assert device.pick_device(auto) == ("cpu", torch.bfloat16 if bf16 else torch.float32)
    assert device.quantize_mode(auto, "cuda") == "none"  # int8 layers are the CPU's
    assert device.quantize_mode(load_config(None, ["model.quantize=int8"]).model, "cpu") == "int8"
    encoder = load_config(None, ["model.device=cpu", "model.quantize=int8-encoder"]).model
    assert device.quantize_mode(encoder, "cpu") == "int8-encoder" and device.quantize_mode(encoder, "cuda") == "none"
    # the decoder of int8-encoder keeps bf16 where the CPU has it
    assert device.pick_device(encoder)[1] == (torch.bfloat16 if bf16 else torch.float32)
    assert device.quantize_mode(load_config(None, []).model, "cpu") == "none"  # the default
    # the reference's arithmetic: no int8
    reference = load_config(str(EXAMPLES.parent / "configs" / "reference.yaml"), []).model
    assert device.quantize_mode(reference, "cpu") == "none"



@pytest.mark.parametrize("mode", ["int8", "int8-encoder"])
def test_the_model_actor_quantises_the_layers_its_setting_names(mode):
    """Real tiny.en: int8 makes every linear layer and the vocabulary projection int8; int8-encoder only the
    encoder's, the decoder left as loaded."""
    from whisper_batch.model.quantize import Int8Linear
    from whisper_batch.model.whisper import Linear

    model = Transcriber(load_config(None, ["model.device=cpu", f"model.quantize={mode}", "model.compile=false"])).model
    assert not [m for m in model.encoder.modules() if isinstance(m, Linear)]
    decoder_int8 = [m for m in model.decoder.modules() if isinstance(m, Int8Linear)]
    if mode == "int8":
        assert decoder_int8 and isinstance(model.decoder.out_proj, Int8Linear)
    else:
        assert not decoder_int8 and model.decoder.out_proj is None
        assert [m for m in model.decoder.modules() if isinstance(m, Linear)]

def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_batch_that_runs_out_of_memory_is_halved_and_retried(monkeypatch):
    """Real tiny.en on the example speech; batches of more than ``limit`` windows fail with MemoryError (a hook)."""
    paths = sorted(str(p) for p in EXAMPLES.iterdir() if p.suffix in (".flac", ".ogg"))
    cfg = load_config(None, ["model.batch_size=8", "model.device=cpu"])
    transcriber, rows = Transcriber(cfg), []
    featurizer = Featurizer(cfg, transcriber.n_mels)
    for i, p in enumerate(paths):
        rows.append({"uri": p, "audio_filepath": p, "offset": 0.0, "duration": None, "language": None,
                     "row_index": i, "id": f"r{i}"})
    items = featurizer.featurize_rows(rows)
    assert len(items) > 2
    limit = [2]

    def out_of_memory_above(ids, n_windows):
        if n_windows > limit[0]:
            raise MemoryError(f"out of memory (test hook: a batch of {n_windows} windows)")

    monkeypatch.setattr(faults, "model_call_hooks", [out_of_memory_above])
    out = transcriber.transcribe_rows(items)
    assert transcriber.batch_size == 2
    assert [r["error"] for r in out] == [None] * len(items) and all(r["text"] for r in out)
    limit[0] = 0  # not even one window fits: error rows
    out = transcriber.transcribe_rows(items[:1])
    assert transcriber.batch_size == 1 and out[0]["error"].startswith("model failed: MemoryError")


def test_every_decode_setting_reaches_the_model_options():
    """Each DecodeConfig field, set away from its default, arrives by name (or its one rename) in the options."""
    import dataclasses

    from whisper_batch.pipeline.config import DecodeConfig
    from whisper_batch.pipeline.transcriber import transcribe_options

    def other(value):  # a value of the same kind that differs from the default
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 3
        if isinstance(value, tuple):
            return (0.0, 0.5)
        return "xx" if value is None or isinstance(value, str) else value

    default = DecodeConfig()
    changed = {f.name: other(getattr(default, f.name)) for f in dataclasses.fields(DecodeConfig)}
    opts = transcribe_options(DecodeConfig(**changed))
    for name, value in changed.items():
        target = "prompt" if name == "initial_prompt" else name
        got = getattr(opts, target) if hasattr(opts, target) else getattr(opts.decoding, target)
        assert got == value, name
    assert opts.decoding.temperature == 0.0  # the pass's temperature comes from `temperatures`, not the config
    base = transcribe_options(default)
    assert (base.quiet_log_mel, base.failed_no_speech_threshold, base.stop_loops) == (-6.0, 0.5, True)


def test_window_features_equal_the_reference_padding_of_30_seconds():
    """The featurizer pads a window with N_FFT zeros, not 30 s of them: the real frames come out the same."""
    from whisper_batch.model.constants import N_SAMPLES
    from whisper_batch.pipeline.features import MEL_DTYPE, featurize_windows, mel_windows

    rng = np.random.default_rng(0)
    for seconds, loud_end in ((0.3, False), (6.2, True), (17.0, False), (30.0, True)):
        audio = (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 0.05).astype(np.float32)
        if loud_end:  # the last samples the loudest: the frames past the audio must not change the 80 dB floor
            audio[-100:] = 0.9
        w = featurize_windows([(0, audio)], 80)
        [got] = mel_windows(w.mel, w.frames, 80)
        n = w.frames[0]
        want = log_mel_spectrogram(audio, 80, padding=N_SAMPLES)[:, :n].numpy().astype(MEL_DTYPE)
        assert np.array_equal(got, want), seconds
