"""Ray's private internals that whisper-batch uses, in one place, each with a test on the installed Ray
(tests/unit/test_ray_compat.py); pyproject.toml pins Ray to the range those tests have passed on.

- :func:`actor_restarts`: the GCS actor table (``ray._private.state``). Ray Data's actor pools restart an actor that
  dies without end, and no public API tells a driver without a dashboard how often that happened.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ActorInfo:
    actor_id: str
    job_id: str
    class_name: str
    state: str  # ALIVE, RESTARTING, DEAD, ...
    restarts: int
    pid: int  # of its latest worker process (0 when it has none)


def actor_restarts() -> list[ActorInfo]:
    """Every actor of this Ray cluster's GCS table (all jobs), with its restart count."""
    from ray._private.state import state

    return [
        ActorInfo(str(a.get("ActorID")), str(a.get("JobID") or ""), str(a.get("ActorClassName") or ""),
                  str(a.get("State") or ""),
                  int(a.get("NumRestarts") or 0), int(a.get("Pid") or 0))
        for a in state.actor_table(None).values()
    ]


def session_logs_dir() -> str | None:
    """This node's Ray session logs folder (where each worker's ``worker-*-<pid>.err`` is), or None."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    path = node.get_logs_dir_path() if node is not None else None
    return path if path and os.path.isdir(path) else None


def worker_error(pid: int) -> str | None:
    """The last error line a worker process of this node wrote to its log (``ImportError: ...``), or None when
    its log is elsewhere (another node) or holds none."""
    logs = session_logs_dir()
    if not logs or not pid:
        return None
    for path in sorted(glob.glob(os.path.join(logs, f"worker-*-{pid}.err")), key=os.path.getmtime, reverse=True):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f.read()[-65536:].splitlines() if line.strip()]
        except OSError:
            continue
        errors = [line for line in lines if _is_error_line(line)]
        if errors:
            return errors[-1]
    return None


def _is_error_line(line: str) -> bool:
    """``SomethingError: message`` / ``SomeException: ...`` (the last line of a Python traceback), or the line
    CPython writes as it crashes (``Fatal Python error: Segmentation fault``)."""
    if line.startswith("Fatal Python error"):
        return True
    head, sep, _ = line.partition(": ")
    name = head.rsplit(".", 1)[-1]
    return bool(sep) and name.isidentifier() and (name.endswith("Error") or name.endswith("Exception"))
