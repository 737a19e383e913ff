"""One driver per OUTPUT at a time: an exclusively created ``OUTPUT/lock.json`` with a heartbeat.

A second ``run`` on the same OUTPUT is refused while the first is alive. A lock left by a driver that died is taken
over: at once when its process is gone from this host, otherwise when its heartbeat is older than ``stale_after``.
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, layout: RunLayout, invocation: str, heartbeat: float = 30.0, stale_after: float = 120.0):
        self.layout, self.invocation = layout, invocation
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.path = layout.lock_json
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "invocation": self.invocation,
            "heartbeat_at": time.time(),
            "heartbeat_iso": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return True
        return time.time() - float(holder.get("heartbeat_at", 0)) > self.stale_after

    def acquire(self) -> None:
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
            if not self.is_stale(holder):
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
