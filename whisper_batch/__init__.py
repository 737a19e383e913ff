"""whisper-batch: batch transcription with Whisper on Ray Data.

The Python API (see the README): :func:`run` (the managed job, as ``whisper-batch run``), :func:`transcribe` (files in
this process), :func:`transcribe_dataset` (Whisper as stages of a user's own Ray Data pipeline).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["run", "transcribe", "transcribe_dataset", "load_config", "__version__"]


def __getattr__(name: str):
    # the API imports Ray and torch: only when it is used, so `import whisper_batch.model` stays light
    if name in ("run", "transcribe", "transcribe_dataset", "load_config"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'whisper_batch' has no attribute {name!r}")
