"""Reading and decoding audio: the only module that touches storage for audio.

``read_bytes`` fetches an object through fsspec (local paths, ``s3://``, ...); ``decode_audio`` and
``iter_audio_chunks`` turn any container/codec PyAV can read into float32 mono 16 kHz waveforms. The format is
probed from the bytes, never from the file name, so an m4a named ``.wav`` decodes.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import av
import fsspec
import numpy as np

from whisper_batch.model.constants import SAMPLE_RATE

from .schema import DECODE_CAUSES

logger = logging.getLogger(__name__)


# Seek instead of decoding from the start only when the offset is this large: seeking lands on a packet
# boundary before the target and costs a resampler restart, which is not worth it for short skips.
SEEK_THRESHOLD_S = 10.0
# How far before the target to seek, so that codec priming / keyframe distance does not overshoot it.
SEEK_MARGIN_S = 1.0


class AudioError(Exception):
    """Audio that cannot be turned into samples.

    Attributes:
        cause: one of ``CAUSES``: a short machine-readable reason (goes into the output ``error`` column).
        detail: what was wrong, naming the file where known.
    """

    CAUSES = DECODE_CAUSES

    def __init__(self, cause: str, detail: str):
        if cause not in self.CAUSES:
            raise ValueError(f"unknown AudioError cause {cause!r}, expected one of {self.CAUSES}")
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Read a whole object (local path or any fsspec URL) into memory.

    Raises:
        AudioError("not found") if the object does not exist.
    """
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise AudioError("not found", f"{uri} ({e})") from e


@contextmanager
def open_stream(uri: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """Open an object as a seekable binary file for ``iter_audio_chunks`` (streaming long files).

    Raises:
        AudioError("not found") if the object does not exist.
    """
    try:
        f = fsspec.open(uri, "rb", **(storage_options or {})).open()
    except FileNotFoundError as e:
        raise AudioError("not found", f"{uri} ({e})") from e
    try:
        yield f
    finally:
        f.close()


def _as_fileobj(source: bytes | bytearray | memoryview | BinaryIO, name: str) -> BinaryIO:
    """Wrap bytes in a file object; raise "empty" for a zero-length source."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("empty", f"{name} has 0 bytes")
        return io.BytesIO(source)
    if source.seekable():
        pos = source.tell()
        size = source.seek(0, io.SEEK_END)
        source.seek(pos)
        if size - pos == 0:
            raise AudioError("empty", f"{name} has 0 bytes")
    return source


def _open_container(fileobj: BinaryIO, name: str) -> av.container.InputContainer:
    try:
        return av.open(fileobj, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise AudioError("decode failed", f"{name}: {e}") from e


def _seek(container: av.container.InputContainer, stream: av.audio.AudioStream, offset: float, name: str) -> bool:
    """Seek to a packet at or before ``offset`` seconds; False (decode from the start) if the format cannot."""
    target = max(0.0, offset - SEEK_MARGIN_S)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    try:
        # backward=True (the default) lands at or before the target; decoding then trims exactly
        container.seek(int((target + start) / stream.time_base), stream=stream)
    except av.error.FFmpegError as e:
        logger.warning("%s: cannot seek (%s), decoding from the start", name, e)
        return False
    return True


def _decoded_frames(
    container: av.container.InputContainer, stream: av.audio.AudioStream, name: str
) -> Iterator[av.AudioFrame]:
    """Decode the audio stream packet by packet, skipping packets the codec rejects (as the ffmpeg CLI does)."""
    bad, decoded, first_error = 0, 0, None
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                bad, first_error = bad + 1, first_error or e
                logger.debug("%s: skipping undecodable packet (%s)", name, e)
                continue
            decoded += len(frames)
            yield from frames
    except av.error.FFmpegError as e:
        # demuxer failure mid-file (e.g. a cut-off container): keep what was decoded, like the ffmpeg CLI
        if decoded == 0:
            raise AudioError("decode failed", f"{name}: {e}") from e
        logger.warning("%s: stopped reading after %d frames: %s", name, decoded, e)
    if bad:
        if decoded == 0:
            raise AudioError("decode failed", f"{name}: no decodable audio packet ({bad} rejected): {first_error}")
        logger.warning("%s: skipped %d undecodable audio packets (%s)", name, bad, first_error)


def _frame_time(frame: av.AudioFrame, stream: av.audio.AudioStream) -> float | None:
    """Start of a decoded frame in seconds from the stream's start, or None if the codec gave no pts."""
    if frame.pts is None or frame.time_base is None:
        return None
    start = stream.start_time * stream.time_base if stream.start_time is not None else 0
    return float(frame.pts * frame.time_base - start)


def _resampled(frames: Iterator[av.AudioFrame], sr: int, name: str) -> Iterator[np.ndarray]:
    """Resample + downmix to float32 mono at ``sr``; flushes the resampler at the end.

    Goes through s16 on purpose: like the reference's ``ffmpeg -f s16le -ac 1``, integer output makes swresample
    normalise the downmix matrix (stereo -> (L + R) / 2). Float output would sum at 1/sqrt(2) each, 3 dB louder
    than what Whisper was trained on, and the log-mel is not gain-invariant.
    """
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
    try:
        for frame in itertools.chain(frames, [None]):  # None flushes the resampler's delay line
            for out in resampler.resample(frame):
                yield out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
    except (av.error.FFmpegError, ValueError) as e:
        # e.g. a stream whose sample rate or layout changes mid-file
        raise AudioError("decode failed", f"{name}: resampling failed: {e}") from e


def _trimmed(
    arrays: Iterator[np.ndarray], skip: int, remaining: int | None, name: str, must_decode: bool
) -> Iterator[np.ndarray]:
    """Drop the first ``skip`` samples, stop after ``remaining`` (None: never); "empty" if nothing decoded."""
    seen = 0
    for samples in arrays:
        seen += len(samples)
        if skip:
            dropped = min(skip, len(samples))
            samples, skip = samples[dropped:], skip - dropped
        if remaining is not None:
            samples = samples[:remaining]
            remaining -= len(samples)
        if len(samples):
            yield samples
        if remaining == 0:
            return
    if seen == 0 and must_decode:
        raise AudioError("empty", f"{name} decoded to 0 samples")


def _rechunk(arrays: Iterator[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """Regroup arrays into pieces of exactly ``chunk`` samples (the last one may be shorter)."""
    buffered: list[np.ndarray] = []
    n_buffered = 0
    for samples in arrays:
        buffered.append(samples)
        n_buffered += len(samples)
        if n_buffered >= chunk:
            whole = np.concatenate(buffered)
            n_full = len(whole) // chunk * chunk
            yield from np.split(whole[:n_full], n_full // chunk)
            buffered = [whole[n_full:]]
            n_buffered = len(whole) - n_full
    if n_buffered:
        yield np.concatenate(buffered)


def iter_audio_chunks(
    source: bytes | BinaryIO,
    chunk_seconds: float = 30.0,
    offset: float = 0.0,
    duration: float | None = None,
    sr: int = SAMPLE_RATE,
    name: str = "<audio>",
) -> Iterator[np.ndarray]:
    """Decode audio as a stream of float32 mono chunks, holding about one chunk in memory.

    Args:
        source: the encoded file as bytes, or a readable (ideally seekable) binary file object.
        chunk_seconds: length of every yielded chunk except the last (which may be shorter).
        offset: skip this many seconds from the start; large offsets seek instead of decoding.
        duration: stop after this many seconds (None: until the end).
        sr: output sample rate.
        name: how errors refer to the file (its URI).

    Yields:
        np.ndarray (chunk_seconds * sr,) float32 in [-1, 1]; nothing if ``offset`` is past the end.

    Raises:
        AudioError: "empty" (0 bytes, or a stream without samples), "no audio stream", "decode failed".
    """
    if offset < 0 or (duration is not None and duration < 0):
        raise ValueError(f"{name}: offset and duration must be >= 0, got offset={offset} duration={duration}")
    chunk = max(1, int(round(chunk_seconds * sr)))
    remaining = None if duration is None else int(round(duration * sr))
    fileobj = _as_fileobj(source, name)
    with _open_container(fileobj, name) as container:
        if not container.streams.audio:
            raise AudioError("no audio stream", f"{name} has streams {[s.type for s in container.streams]}")
        stream = container.streams.audio[0]
        frames = _decoded_frames(container, stream, name)
        skip = int(round(offset * sr))  # samples to drop before the requested range
        seeked = offset >= SEEK_THRESHOLD_S and fileobj.seekable() and _seek(container, stream, offset, name)
        if seeked:
            frames, skip = _align_after_seek(frames, stream, offset, sr)
        # after a seek past the end nothing decodes, which is not an empty file
        samples = _trimmed(_resampled(frames, sr, name), skip, remaining, name, must_decode=not seeked)
        yield from _rechunk(samples, chunk)


def _align_after_seek(
    frames: Iterator[av.AudioFrame], stream: av.audio.AudioStream, offset: float, sr: int
) -> tuple[Iterator[av.AudioFrame], int]:
    """After a seek, start the decoded stream on the output sample grid; return (frames, samples to skip).

    The seek lands on an arbitrary packet. Feeding the resampler from an input sample whose time is a multiple
    of 1/sr (a multiple of in_sr / gcd(in_sr, sr) input samples) puts its output on the same grid as a decode
    from the start, so the trimmed samples match it instead of being shifted by a fraction of a sample.
    """
    first = next(frames, None)
    if first is None:
        return iter(()), 0
    t0 = _frame_time(first, stream)
    if t0 is None:
        raise AudioError("decode failed", "cannot seek: the codec gives no timestamps")
    in_sr = first.sample_rate
    n0 = int(round(t0 * in_sr))  # input samples before the first decoded one
    drop = (-n0) % (in_sr // math.gcd(in_sr, sr))

    def aligned():
        todo = drop
        for frame in itertools.chain([first], frames):
            if todo >= frame.samples:
                todo -= frame.samples
                continue
            if todo:
                frame, todo = _drop_head(frame, todo), 0
            yield frame

    skip = int(round(offset * sr)) - (n0 + drop) * sr // in_sr
    if skip < 0:
        logger.warning("seek landed %.3f s after the requested offset %.3f s", -skip / sr, offset)
    return aligned(), max(0, skip)


def _drop_head(frame: av.AudioFrame, n: int) -> av.AudioFrame:
    """A copy of ``frame`` without its first ``n`` samples (per channel)."""
    arr = frame.to_ndarray()  # planar: (channels, samples); packed: (1, samples * channels)
    per = 1 if frame.format.is_planar else len(frame.layout.channels)
    out = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(arr[:, n * per :]), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    return out


def decode_audio(
    data: bytes | BinaryIO,
    offset: float = 0.0,
    duration: float | None = None,
    sr: int = SAMPLE_RATE,
    name: str = "<audio>",
) -> np.ndarray:
    """Decode a whole file (or the ``[offset, offset + duration)`` seconds of it) to float32 mono.

    Returns:
        np.ndarray (n_samples,) float32 at ``sr`` Hz; empty if ``offset`` is past the end.

    Raises:
        AudioError: "empty", "no audio stream" or "decode failed" (with PyAV's message).
    """
    chunks = list(iter_audio_chunks(data, chunk_seconds=600.0, offset=offset, duration=duration, sr=sr, name=name))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
