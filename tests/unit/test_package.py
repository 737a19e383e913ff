"""The one import name: `whisper_batch`, whose parts (model/, pipeline/, jobs/) stay at the top of the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_imports_as_it_is_without_an_install():
    """With no site-packages at all (-S), the checkout's folder on sys.path is enough: a job's working_dir, a
    PYTHONPATH, or the repository as the working directory."""
    probe = "import whisper_batch.model.dims as d, whisper_batch; print(d.__file__); print(whisper_batch.__path__)"
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path, package_path = out.stdout.splitlines()
    assert Path(path) == REPO / "model" / "dims.py" and str(REPO) in package_path


def test_the_package_exports_its_api_lazily():
    """`import whisper_batch` alone imports neither Ray nor torch; the API's names load on first use."""
    probe = ("import sys, whisper_batch; heavy = [m for m in ('ray', 'torch') if m in sys.modules]; "
             "print(heavy, callable(whisper_batch.transcribe_dataset), whisper_batch.__version__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True 0.1.0"
