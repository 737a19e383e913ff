"""Test helper: synthetic English speech with espeak-ng (Debian package), converted with ffmpeg when needed.

    from tests.speech import make_speech, requires_espeak

    @requires_espeak
    def test_fox(tmp_path):
        path = make_speech("The quick brown fox jumps over the lazy dog.", tmp_path / "fox.flac")
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SPEECH_RATE = 150  # words per minute; a bit slower than espeak's 175 default, clearer for the tiny model


def have_espeak() -> bool:
    """True if espeak-ng and ffmpeg (for format conversion) are on PATH."""
    return shutil.which("espeak-ng") is not None and shutil.which("ffmpeg") is not None


requires_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng and ffmpeg are needed to make speech")


def make_speech(
    text: str,
    path: str | Path,
    voice: str = "en-us",
    rate: int = SPEECH_RATE,
    sr: int | None = 16000,
    channels: int = 1,
) -> Path:
    """Speak ``text`` into ``path``; the container/codec follows the extension (.wav, .flac, .mp3, .ogg, .m4a ...).

    Args:
        text: what to say.
        path: output file; its parent must exist.
        voice: espeak-ng voice (``espeak-ng --voices=en`` lists them).
        rate: speaking rate in words per minute.
        sr: output sample rate (None keeps espeak-ng's 22050 Hz).
        channels: output channels (the voice is duplicated into each).

    Returns:
        ``path`` as a Path.
    """
    if not have_espeak():
        raise RuntimeError("make_speech needs espeak-ng and ffmpeg on PATH (apt-get install espeak-ng ffmpeg)")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        _run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(raw), text])
        args = ["-ac", str(channels)] + (["-ar", str(sr)] if sr else [])
        if path.suffix.lower() in (".ogg", ".opus", ".webm"):
            args += ["-c:a", "libopus", "-b:a", "32k"]  # opus rather than vorbis: what real .ogg speech uses
        _run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw), *args, str(path)])
    return path


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
