"""whisper-batch: batch transcription with Whisper on Ray Data.

The Python API (see the README): :func:`run` (the managed job, as ``whisper-batch run``), :func:`transcribe` (files in
this process), :func:`transcribe_dataset` (Whisper as stages of a user's own Ray Data pipeline).
"""

from __future__ import annotations

import os as _os

# In a checkout this folder holds only the package's root: its parts stay at the top of the repository (model/,
# pipeline/, jobs/), where an install maps them (pyproject.toml's package-dir). A checkout imported as it is (its
# folder on sys.path: the working directory, a job's working_dir, PYTHONPATH) finds them there too.
_parent = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "model")) and all(
    _os.path.isfile(_os.path.join(_parent, part, "__init__.py")) for part in ("model", "pipeline", "jobs")
):
    __path__.append(_parent)

__version__ = "0.1.0"
__all__ = ["run", "transcribe", "transcribe_dataset", "load_config", "__version__"]


def __getattr__(name: str):
    # the API imports Ray and torch: only when it is used, so `import whisper_batch.model` stays light
    if name in ("run", "transcribe", "transcribe_dataset", "load_config"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'whisper_batch' has no attribute {name!r}")
