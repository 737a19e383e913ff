"""Faults the tests install at the hook points of :mod:`pipeline.faults` (in Ray workers through
``ray.worker_setup_hook=tests.faults.install_model_hang``)."""

from __future__ import annotations

import time

# a model call on a row whose id contains this hangs
HANG_TAG = "hang-me"


def hang_on_tagged_rows(ids: list[str], n_windows: int) -> None:
    if any(HANG_TAG in row_id for row_id in ids):
        time.sleep(10**9)  # the model thread never returns: model.timeout_seconds must end the call


def install_model_hang() -> None:
    from pipeline import faults

    if hang_on_tagged_rows not in faults.model_call_hooks:
        faults.model_call_hooks.append(hang_on_tagged_rows)
