"""Hook points where tests inject faults into real runs; product code never reads failpoints from anywhere.

A hook is a callable that the tests install, in the process that runs the stage: with a plain ``append`` in a
test's own process, or in every Ray worker through ``ray.worker_setup_hook`` (Ray's ``worker_process_setup_hook``:
a function Ray calls in each worker process as it starts). Nothing is installed normally, so a hook point costs one
empty-list check.
"""

from __future__ import annotations

from collections.abc import Callable

# called as hook(ids, n_windows) on the model thread, before a batch of windows is decoded: a hook may raise (an
# error, MemoryError for out of memory) or block (a hung model call, ended by model.timeout_seconds)
model_call_hooks: list[Callable[[list[str], int], None]] = []


def before_model_call(ids: list[str], n_windows: int) -> None:
    for hook in model_call_hooks:
        hook(ids, n_windows)
