"""Audio decoding (pipeline/audio.py) and log-mel features (model/audio.py) against the reference implementation."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.speech import make_speech, requires_espeak
from whisper_batch.model import audio as ma
from whisper_batch.pipeline import audio as pa
from whisper_batch.pipeline.audio import AudioError, decode_audio, iter_audio_chunks, open_stream, read_bytes

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO.parent / "shared" / "data" / "eval"
JFK = EVAL / "longform" / "jfk.flac"
LIBRI = EVAL / "librispeech" / "test-clean" / "1089-134686-0001.flac"
FOX = REPO / "examples" / "fox.flac"

def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared eval data not mounted)")
    return path


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def _speech() -> np.ndarray:
    return whisper.load_audio(str(_need(FOX)))


# --------------------------------------------------------------------------- model/audio.py: features


def test_constants_match_reference():
    ref = whisper.audio
    for name in ("SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_LENGTH", "N_SAMPLES", "N_FRAMES",
                 "N_SAMPLES_PER_TOKEN", "FRAMES_PER_SECOND", "TOKENS_PER_SECOND"):
        assert getattr(ma, name) == getattr(ref, name), name


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_reference_asset(n_mels):
    asset = Path(whisper.__file__).parent / "assets" / "mel_filters.npz"
    with np.load(asset) as f:
        ref = f[f"mel_{n_mels}"]
    ours = ma.mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-7)
    assert ma.mel_filters(n_mels) is ours  # cached


def test_mel_filters_rejects_unsupported_sizes():
    with pytest.raises(ValueError, match="unsupported n_mels=64"):
        ma.mel_filters(64)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("padding", [0, ma.N_SAMPLES])
def test_log_mel_matches_reference_on_speech(n_mels, padding):
    wave = _speech()
    ours = ma.log_mel_spectrogram(wave, n_mels, padding=padding)
    ref = whisper.log_mel_spectrogram(wave, n_mels, padding=padding)
    assert ours.shape == ref.shape == (n_mels, (len(wave) + padding) // ma.HOP_LENGTH)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference_on_real_recording(n_mels):
    wave = whisper.load_audio(str(_need(JFK)))
    torch.testing.assert_close(
        ma.log_mel_spectrogram(torch.from_numpy(wave), n_mels), whisper.log_mel_spectrogram(wave, n_mels),
        rtol=0, atol=1e-5,
    )


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference_on_noise(n_mels):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 3 * ma.SAMPLE_RATE + 123).astype(np.float32)
    torch.testing.assert_close(
        ma.log_mel_spectrogram(noise, n_mels), whisper.log_mel_spectrogram(noise, n_mels), rtol=0, atol=1e-5
    )


def test_log_mel_batch_rows_equal_single():
    wave = _speech()[: 2 * ma.SAMPLE_RATE]
    # a quiet copy: its 80 dB floor differs, so a max shared across the batch would change it
    batch = np.stack([wave, 0.001 * wave, np.zeros_like(wave)])
    out = ma.log_mel_spectrogram(batch)
    assert out.shape == (3, 80, len(wave) // ma.HOP_LENGTH)
    for row, x in zip(out, batch):
        torch.testing.assert_close(row, whisper.log_mel_spectrogram(x), rtol=0, atol=1e-5)


def test_log_mel_casts_float64_input():
    wave = _speech()[:16000]
    torch.testing.assert_close(ma.log_mel_spectrogram(wave.astype(np.float64)), ma.log_mel_spectrogram(wave))


@pytest.mark.parametrize("length", [10, 3000, 4000])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_pad_or_trim_matches_reference(length, as_tensor):
    x = np.arange(2 * 3500, dtype=np.float32).reshape(2, 3500)
    for axis in (-1, 1):
        arr = torch.from_numpy(x) if as_tensor else x
        ours, ref = ma.pad_or_trim(arr, length, axis=axis), whisper.pad_or_trim(arr, length, axis=axis)
        assert type(ours) is type(ref) and tuple(ours.shape) == (2, length)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    arr = torch.from_numpy(x.T.copy()) if as_tensor else x.T
    assert tuple(ma.pad_or_trim(arr, length, axis=0).shape) == (length, 2)
    assert ma.pad_or_trim(np.zeros(5)).shape == (ma.N_SAMPLES,)


def test_check_mel():
    mel = torch.zeros(128, 3000)
    ma.check_mel(mel, 128)
    with pytest.raises(ValueError, match=r"mel has 128 bins, model expects 80 \(s3://b/x.flac\)"):
        ma.check_mel(mel, 80, "s3://b/x.flac")
    with pytest.raises(ValueError, match="mel has 80 bins, model expects 128"):
        ma.check_mel(torch.zeros(4, 80, 3000), 128)


# --------------------------------------------------------------------------- pipeline/audio.py: decoding


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same 3.4 s of speech in many containers, plus broken files. Names lie on purpose where noted."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI is needed to make test files")
    src, d = _need(FOX), tmp_path_factory.mktemp("audio")
    out = {name: d / name for name in (
        "stereo48k.wav", "mono8k.wav", "speech.mp3", "speech.ogg", "opus.webm", "m4a_named.wav", "video.mp4",
        "no_audio.mp4", "header_only.wav", "zero.wav", "text.mp3", "truncated.flac", "random.wav", "noise44k.mp3",
    )}
    _ffmpeg("-i", str(src), "-ac", "2", "-ar", "48000", str(out["stereo48k.wav"]))
    _ffmpeg("-i", str(src), "-ar", "8000", str(out["mono8k.wav"]))
    _ffmpeg("-i", str(src), "-ar", "44100", str(out["speech.mp3"]))
    _ffmpeg("-i", str(src), "-c:a", "libvorbis", str(out["speech.ogg"]))
    _ffmpeg("-i", str(src), "-c:a", "libopus", "-f", "webm", str(out["opus.webm"]))
    _ffmpeg("-i", str(src), "-c:a", "aac", "-f", "mp4", str(out["m4a_named.wav"]))  # AAC in MP4, named .wav
    _ffmpeg("-f", "lavfi", "-i", "testsrc=duration=3:size=64x64:rate=10", "-i", str(src), "-shortest",
            "-c:a", "aac", str(out["video.mp4"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=10", "-an", str(out["no_audio.mp4"]))
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0", str(out["header_only.wav"]))
    out["zero.wav"].write_bytes(b"")
    out["text.mp3"].write_text("this is not an mp3\n" * 20)
    data = src.read_bytes()
    out["truncated.flac"].write_bytes(data[: len(data) // 2])
    out["random.wav"].write_bytes(np.random.default_rng(0).bytes(20000))
    # 40 s of pink noise, 44.1 kHz stereo: long enough to seek, and every sample differs from its neighbours
    _ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=40:c=pink:r=44100:a=0.3:seed=1", "-ac", "2",
            str(out["noise44k.mp3"]))
    return out


def _assert_close_to_reference(ours: np.ndarray, ref: np.ndarray) -> None:
    """PyAV's swresample vs the ffmpeg CLI's: same length, and equal up to resampler/s16 rounding."""
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert len(ours) == len(ref)
    rel_rms = np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2))
    assert rel_rms < 1e-3, rel_rms  # measured: 0 for 16 kHz sources, ~1e-4 for resampled ones


@pytest.mark.parametrize("name", [
    "stereo48k.wav", "mono8k.wav", "speech.mp3", "speech.ogg", "m4a_named.wav", "video.mp4",
])
def test_decode_matches_reference_loader(files, name):
    ours = decode_audio(files[name].read_bytes(), name=name)
    _assert_close_to_reference(ours, whisper.load_audio(str(files[name])))


def test_decode_webm_opus_within_a_few_ms_of_reference(files):
    """WebM/Opus decodes; alignment is only good to a few ms, because of the file, not the decoder.

    FFmpeg <= 5.1 (the CLI here) writes a Matroska CodecDelay that newer FFmpeg (PyAV's) reads per spec,
    so the two skip a different number of Opus pre-skip samples (208 at 48 kHz, 69.33 at 16 kHz, for this file).
    """
    ours = decode_audio(files["opus.webm"].read_bytes())
    ref = whisper.load_audio(str(files["opus.webm"]))
    extra = len(ours) - len(ref)
    assert 0 <= extra <= 0.005 * 16000
    # the leftover third of a sample of misalignment costs some correlation at high frequencies
    assert np.corrcoef(ours[extra:], ref)[0, 1] > 0.98


@pytest.mark.parametrize("path", [JFK, LIBRI], ids=["jfk-44k-stereo-24bit", "librispeech"])
def test_decode_real_recordings_match_reference(path):
    ours = decode_audio(read_bytes(str(_need(path))))
    ref = whisper.load_audio(str(path))
    _assert_close_to_reference(ours, ref)
    # stereo downmix is (L + R) / 2 as in ffmpeg's s16 path, not 3 dB louder
    np.testing.assert_allclose(ours, ref, atol=1 / 32768)


@pytest.mark.parametrize("name, cause", [
    ("no_audio.mp4", "no audio stream"),
    ("zero.wav", "empty"),
    ("header_only.wav", "empty"),
    ("text.mp3", "decode failed"),
    ("random.wav", "decode failed"),
])
def test_decode_errors_have_causes(files, name, cause):
    with pytest.raises(AudioError) as info:
        decode_audio(files[name].read_bytes(), name=str(files[name]))
    assert info.value.cause == cause
    assert str(info.value).startswith(f"{cause}: ") and name in str(info.value)


def test_decode_failed_carries_pyav_message(files):
    with pytest.raises(AudioError, match="Invalid data found"):
        decode_audio(files["text.mp3"].read_bytes())


def test_truncated_flac_decodes_its_prefix(files):
    """Like the ffmpeg CLI: the complete frames of a cut-off file decode, the broken tail is dropped."""
    full = decode_audio(_need(FOX).read_bytes())
    part = decode_audio(files["truncated.flac"].read_bytes())
    assert len(full) // 4 < len(part) < len(full)
    np.testing.assert_array_equal(part, full[: len(part)])
    assert len(part) == len(whisper.load_audio(str(files["truncated.flac"])))


def test_offset_and_duration_without_seek(files):
    data = files["speech.mp3"].read_bytes()
    full = decode_audio(data)
    part = decode_audio(data, offset=1.2345, duration=1.5)
    start = round(1.2345 * 16000)
    np.testing.assert_array_equal(part, full[start : start + 24000])
    np.testing.assert_array_equal(decode_audio(data, offset=2.0), full[32000:])
    assert len(decode_audio(data, offset=60.0)) == 0  # past the end: nothing, not an error


def test_large_offset_seeks_and_cuts_the_same_samples(files, monkeypatch):
    seeks = []
    real_seek = pa._seek
    monkeypatch.setattr(pa, "_seek", lambda *a: seeks.append(a[2]) or real_seek(*a))
    data = files["noise44k.mp3"].read_bytes()
    full = decode_audio(data)
    assert not seeks and abs(len(full) - 40 * 16000) <= 1
    for offset, duration in [(25.3717, 3.0), (12.0, 0.5), (39.5, None)]:
        part = decode_audio(data, offset=offset, duration=duration)
        start = round(offset * 16000)
        expected = full[start : start + round(duration * 16000)] if duration else full[start:]
        assert len(part) == len(expected)
        # the seek restarts the decoder 1 s early and the resampler on the output grid: same samples
        np.testing.assert_allclose(part, expected, atol=2e-3)
    assert seeks == [25.3717, 12.0, 39.5]
    assert len(decode_audio(data, offset=100.0)) == 0


def test_negative_offset_is_rejected():
    with pytest.raises(ValueError, match="offset and duration must be >= 0"):
        decode_audio(b"x", offset=-1.0)


def test_chunks_are_exact_and_concatenate_to_decode(files):
    data = files["speech.ogg"].read_bytes()
    chunks = list(iter_audio_chunks(data, chunk_seconds=0.5))
    assert all(len(c) == 8000 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 8000
    np.testing.assert_array_equal(np.concatenate(chunks), decode_audio(data))


def test_chunks_stream_from_a_file_object(files):
    """The first chunk comes out before the whole file has been read."""
    path = files["noise44k.mp3"]

    class CountingFile(io.FileIO):
        read_bytes = 0

        def readinto(self, b):
            n = super().readinto(b)
            CountingFile.read_bytes += n or 0
            return n

    with CountingFile(str(path), "rb") as f:
        chunks = iter_audio_chunks(f, chunk_seconds=1.0)
        first = next(chunks)
        assert len(first) == 16000
        assert CountingFile.read_bytes < path.stat().st_size / 2
        rest = list(chunks)
    np.testing.assert_array_equal(np.concatenate([first, *rest]), decode_audio(path.read_bytes()))


def test_read_bytes_local_and_fsspec(files, tmp_path):
    path = files["speech.mp3"]
    assert read_bytes(str(path)) == path.read_bytes()
    assert read_bytes(f"file://{path}") == path.read_bytes()
    with open_stream(str(path)) as f:
        np.testing.assert_array_equal(np.concatenate(list(iter_audio_chunks(f))), decode_audio(path.read_bytes()))
    for missing in (str(tmp_path / "nope.wav"), "memory://bucket/nope.wav"):
        with pytest.raises(AudioError, match="not found: .*nope.wav") as info:
            read_bytes(missing)
        assert info.value.cause == "not found"
        with pytest.raises(AudioError, match="not found"):
            with open_stream(missing):
                pass


def test_empty_file_object_is_empty():
    with pytest.raises(AudioError, match="empty: x.wav has 0 bytes"):
        decode_audio(io.BytesIO(b""), name="x.wav")


def test_unknown_cause_is_a_bug():
    with pytest.raises(ValueError, match="unknown AudioError cause"):
        AudioError("weird", "x")


@requires_espeak
@pytest.mark.parametrize("ext", [".wav", ".ogg", ".mp3"])
def test_make_speech_gives_decodable_speech(tmp_path, ext):
    path = make_speech("Hello world, this is a test.", tmp_path / f"hello{ext}")
    audio = decode_audio(path.read_bytes(), name=str(path))
    assert 1.0 < len(audio) / 16000 < 4.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # audible speech, not silence
