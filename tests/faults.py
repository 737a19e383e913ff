"""Faults the tests install at the hook points of :mod:`whisper_batch.pipeline.faults` (in Ray workers through
``ray.worker_setup_hook=tests.faults.install_model_hang``, or ``...install_model_gate``)."""

from __future__ import annotations

import os
import sys
import time

# a model call on a row whose id contains this hangs
HANG_TAG = "hang-me"
# the environment variable (of the Ray nodes) naming the gate file: while that file exists, model calls wait
GATE_ENV = "WB_TEST_MODEL_GATE"
# a model call waits on a closed gate at most this long, so a test that never opens it still ends
GATE_MAX_WAIT_S = 120.0


def hang_on_tagged_rows(ids: list[str], n_windows: int) -> None:
    if any(HANG_TAG in row_id for row_id in ids):
        time.sleep(10**9)  # the model thread never returns: model.timeout_seconds must end the call


def wait_while_gate_closed(ids: list[str], n_windows: int) -> None:
    """Holds the model call while the file named by ``$WB_TEST_MODEL_GATE`` exists: a test closes the gate to keep
    work queued (e.g. until a node it added has received a model actor), then opens it."""
    path = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + GATE_MAX_WAIT_S
    while path and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def _install(hook) -> None:
    from whisper_batch.pipeline import faults

    if hook not in faults.model_call_hooks:
        faults.model_call_hooks.append(hook)


def install_model_hang() -> None:
    _install(hang_on_tagged_rows)


def install_model_gate() -> None:
    _install(wait_while_gate_closed)


# what the model actors raise as they start under install_model_start_failure
START_FAILURE = "libcudnn_ops.so.9: cannot open shared object file: No such file or directory (a test's fault)"


def install_model_start_failure() -> None:
    """Every model replica fails to load, as where a library is missing on a node: each model actor dies as it
    starts (Ray Data would restart it without end)."""
    from whisper_batch.pipeline import transcriber

    def fail(self, *args, **kwargs):
        raise ImportError(START_FAILURE)

    transcriber.Transcriber.__init__ = fail


def install_model_start_crash() -> None:
    """Every model replica's process ends as it loads, without a Python error (as a native library's crash does)."""
    from whisper_batch.pipeline import transcriber

    def crash(self, *args, **kwargs):
        print("Fatal Python error: Segmentation fault (a test's fault)", file=sys.stderr, flush=True)
        os._exit(139)

    transcriber.Transcriber.__init__ = crash
