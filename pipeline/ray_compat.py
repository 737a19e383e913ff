"""Ray's private internals that whisper-batch uses, in one place, each with a test on the installed Ray
(tests/unit/test_ray_compat.py); pyproject.toml pins Ray to the range those tests have passed on. One is kept only
where it is needed for a function or is worth more than 1 % of a run (start-up and shutdown shortcuts were not:
docs/performance.md).

- :func:`actor_restarts`: the GCS actor table (``ray._private.state``). Ray Data's actor pools restart an actor that
  dies without end, and no public API tells a driver without a dashboard how often that happened.
- :func:`session_logs_dir`: this node's session logs (``ray._private.worker``), where a dead actor's error is.
- :func:`set_blocks_ahead`: how many blocks a map task may yield before its consumer takes them
  (``DataContext._max_num_blocks_in_streaming_gen_buffer``); Ray Data has no public setting for it, and the graph's
  one-row blocks need more than its default to keep the model actors fed all through a run.
- :func:`stop_executions`: Ray Data's ``StreamingExecutor``, a thread named after its dataset, and its ``shutdown``
  (what Ray's own iterator calls when a loop over it ends early). A consumer waiting inside ``iter_rows`` for the next
  row cannot be interrupted otherwise, and a driver must not stop Ray under it.
- :func:`enable_local_token`, :func:`token_source`, :func:`auth_mode`, :func:`has_local_token`: Ray's token
  authentication (``ray._private.authentication``, ``ray._raylet.AuthenticationTokenLoader``): a client joins or
  submits to a token-authenticated cluster only with the token, found here as Ray's own CLI finds it.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any


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


def set_blocks_ahead(context: Any, blocks: int) -> None:
    """Lets a map task of a dataset with this ``DataContext`` yield ``blocks`` blocks before its consumer has taken
    them (Ray Data's default: 2)."""
    context._max_num_blocks_in_streaming_gen_buffer = blocks


def stop_executions(dataset_name: str) -> int:
    """Shuts down this process's running executions of the dataset named ``dataset_name`` (its map actors are
    killed, its iterators end); returns how many there were."""
    prefix = f"StreamingExecutor-{dataset_name}_"  # the thread's name: StreamingExecutor-<name>_<uuid>_<run index>
    running = [t for t in threading.enumerate() if t.name.startswith(prefix) and hasattr(t, "shutdown")]
    for executor in running:
        executor.shutdown(force=True)
    return len(running)


AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"


def auth_mode() -> str:
    """This process's ``RAY_AUTH_MODE``, lower case ("" when unset)."""
    return os.environ.get(AUTH_MODE_ENV_VAR, "").lower()


def enable_local_token() -> None:
    """Makes Ray's clients in this process send this machine's token, when it has one and ``RAY_AUTH_MODE`` is not
    set (Ray's ``maybe_enable_token_auth_if_token_available``), as Ray's CLI finds it: ``RAY_AUTH_TOKEN``, then the
    file ``RAY_AUTH_TOKEN_PATH`` names, then ``~/.ray/auth_token``."""
    from ray._private.authentication import authentication_token_setup as setup

    quiet = logging.getLogger(setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning speaks to a cluster's owner ("set RAY_AUTH_MODE=disabled to opt out")
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def has_local_token() -> bool:
    """Whether Ray finds a token on this machine, whatever ``RAY_AUTH_MODE`` says."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def token_source() -> str:
    """Where Ray takes this machine's token from (for messages)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return str(_get_default_token_path())
