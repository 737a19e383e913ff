"""One driver per OUTPUT at a time: an exclusively created ``OUTPUT/lock.json`` with a heartbeat.

A second ``run`` on the same OUTPUT is refused while the first is alive. A lock left by a driver that died is taken
over: at once when its process is gone from this host (exited, a zombie not yet reaped, or its pid now another
process's), otherwise when its heartbeat is older than ``stale_after``. A driver started as another one is being
stopped (a resubmitted job right after ``jobs stop``) may wait ``wait_s`` for the holder to go instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from whisper_batch.pipeline.layout import RunLayout

logger = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live driver holds OUTPUT."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from the state on (field 3; the name before it may hold spaces and
    parentheses); None where there is no such file (no /proc, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot, ``/proc/<pid>/stat`` field 22), or None where unknown: with
    the pid it names one process, as a pid alone does not once the pid is reused."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host is running: not exited, not a zombie (a killed driver its parent has not
    reaped yet, as where a container's PID 1 reaps nothing) and, given ``started``, the process that started then."""
    try:
        os.kill(pid, 0)  # succeeds on a zombie too
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:  # no /proc (macOS): the signal's answer is all there is
        return True
    if fields[:1] and fields[0] in ("Z", "X"):  # zombie, dead
        return False
    return started is None or start_time(pid) in (None, started)


def is_stale(holder: dict[str, Any], stale_after: float) -> bool:
    """Whether the lock ``holder`` (lock.json's content) is left by a driver that died: its process is gone from this
    host, or (another host's) its heartbeat is older than ``stale_after`` seconds."""
    if holder.get("host") == socket.gethostname():
        started = holder.get("start_time")
        if not _alive(int(holder.get("pid", -1)), int(started) if started is not None else None):
            return True
    return time.time() - float(holder.get("heartbeat_at", 0)) > stale_after


def live_holder(layout: RunLayout, stale_after: float = 120.0) -> dict[str, Any] | None:
    """lock.json's content when a live driver holds OUTPUT's lock, else None (no lock, or a stale one)."""
    try:
        holder = layout.read_json(layout.lock_json)
    except (FileNotFoundError, ValueError):
        return None
    return None if is_stale(holder, stale_after) else holder


class RunLock:
    def __init__(
        self,
        layout: RunLayout,
        invocation: str,
        heartbeat: float = 30.0,
        stale_after: float = 120.0,
        wait_s: float = 0.0,
        poll_s: float = 0.5,
    ):
        self.layout, self.invocation = layout, invocation
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.wait_s, self.poll_s = wait_s, poll_s
        self.path = layout.lock_json
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": start_time(os.getpid()),  # tells this process from a later one given the same pid
            "invocation": self.invocation,
            "heartbeat_at": time.time(),
            "heartbeat_iso": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def acquire(self) -> None:
        """Takes the lock; while a live driver holds it, waits up to ``wait_s`` for it to end, then raises LockHeld."""
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                return self._try_acquire()
            except LockHeld as e:
                if time.monotonic() + self.poll_s > deadline:
                    raise
                if not said:
                    logger.warning("%s; waiting up to %.0f s for it to end", str(e).split(";")[0], self.wait_s)
                    said = True
                time.sleep(self.poll_s)

    def _try_acquire(self) -> None:
        data = json.dumps(self._info()).encode()
        for _ in range(2):
            if self.layout.create_bytes(self.path, data):
                self._start_heartbeat()
                return
            try:
                holder = self.layout.read_json(self.path)
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # released (or being written) just now: try again
            if holder.get("invocation") == self.invocation:
                # our own create took effect but its answer was lost; the client's retry then saw the lock
                logger.info("the lock of %s is already ours (a retried exclusive create)", self.layout.display_uri)
                self._start_heartbeat()
                return
            if not is_stale(holder, self.stale_after):
                raise LockHeld(
                    f"another whisper-batch run is active on {self.layout.display_uri} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, last heartbeat {holder.get('heartbeat_iso')}); wait for it to finish. "
                    f"If it died on another host, its lock expires {self.stale_after:.0f} s after its last heartbeat, "
                    f"or delete {self.layout.display_uri}/lock.json"
                )
            logger.warning("taking over the stale lock of %s (pid %s)", holder.get("host"), holder.get("pid"))
            self.layout.remove_tree(self.path)
        raise LockHeld(f"could not take the lock of {self.layout.display_uri}: another run took it just now")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                holder = self.layout.read_json(self.path)
                if holder.get("invocation") != self.invocation:
                    logger.error("the lock of %s was taken over by %s; stop this run", self.layout.display_uri, holder)
                    return
                self.layout.write_bytes(self.path, json.dumps(self._info()).encode())
            except Exception:  # a missed heartbeat is not fatal; the next one retries
                logger.warning("could not refresh %s", self.path, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                mine = self.layout.read_json(self.path).get("invocation") == self.invocation
            except (FileNotFoundError, ValueError):
                mine = False
            if mine:  # never delete a lock another run took over
                self.layout.remove_tree(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
