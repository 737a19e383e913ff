"""``RunLock``: one driver per OUTPUT — refusal while the holder lives, take-over of dead or silent holders,
heartbeats, exactly one winner among concurrent takers, and a release that never frees someone else's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from whisper_batch.jobs.lock import LockHeld, RunLock, start_time
from whisper_batch.pipeline.layout import RunLayout


@pytest.fixture
def layout(tmp_path: Path) -> RunLayout:
    return RunLayout(str(tmp_path / "out"))


def _holder(layout: RunLayout) -> dict:
    return json.loads(Path(layout.path("lock.json")).read_text())


def _write_holder(layout: RunLayout, **info) -> None:
    path = Path(layout.path("lock.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_driver_is_refused_with_a_clear_message(layout: RunLayout):
    first = RunLock(layout, "inv-1")
    first.acquire()
    try:
        holder = _holder(layout)
        assert holder["invocation"] == "inv-1" and holder["pid"] > 0 and holder["host"]
        with pytest.raises(LockHeld) as info:
            RunLock(layout, "inv-2").acquire()
        message = str(info.value)
        assert "another whisper-batch run is active" in message and layout.display_uri in message
        assert str(holder["pid"]) in message and "lock.json" in message  # says who holds it and how to clear it
        assert _holder(layout)["invocation"] == "inv-1"  # the refusal left the holder's lock alone
    finally:
        first.release()
    assert not Path(layout.path("lock.json")).exists()


def test_lock_can_be_taken_again_after_release(layout: RunLayout):
    with RunLock(layout, "inv-1"):
        pass
    with RunLock(layout, "inv-2"):
        assert _holder(layout)["invocation"] == "inv-2"


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(layout: RunLayout):
    import socket

    _write_holder(layout, host=socket.gethostname(), pid=_dead_pid(), invocation="crashed", heartbeat_at=time.time())
    with RunLock(layout, "inv-2"):
        assert _holder(layout)["invocation"] == "inv-2"


def test_lock_of_another_host_is_kept_while_its_heartbeat_is_fresh(layout: RunLayout):
    _write_holder(layout, host="elsewhere", pid=1, invocation="remote", heartbeat_at=time.time() - 5)
    with pytest.raises(LockHeld, match="elsewhere"):
        RunLock(layout, "inv-2", stale_after=60).acquire()
    assert _holder(layout)["invocation"] == "remote"


def test_lock_of_another_host_expires_after_its_heartbeat_goes_silent(layout: RunLayout):
    _write_holder(layout, host="elsewhere", pid=1, invocation="remote", heartbeat_at=time.time() - 300)
    with RunLock(layout, "inv-2", stale_after=120):
        assert _holder(layout)["invocation"] == "inv-2"


def test_heartbeat_refreshes_the_lock(layout: RunLayout):
    with RunLock(layout, "inv-1", heartbeat=0.05):
        first = _holder(layout)["heartbeat_at"]
        deadline = time.time() + 5
        while _holder(layout)["heartbeat_at"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert _holder(layout)["heartbeat_at"] > first, "the heartbeat never refreshed lock.json"
        assert _holder(layout)["invocation"] == "inv-1"


def test_concurrent_takers_exactly_one_wins(layout: RunLayout):
    n = 8
    barrier = threading.Barrier(n)
    won, refused, errors = [], [], []

    def take(i: int) -> None:
        lock = RunLock(layout, f"inv-{i}")
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            refused.append(i)
        except Exception as e:  # noqa: BLE001 - anything else is a bug, asserted in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and len(won) == 1 and len(refused) == n - 1, (won, refused, errors)
        assert _holder(layout)["invocation"] == won[0].invocation
    finally:
        for lock in won:
            lock.release()


def test_heartbeat_does_not_overwrite_a_lock_taken_over_by_another_run(layout: RunLayout):
    lock = RunLock(layout, "inv-1", heartbeat=0.05)
    lock.acquire()
    try:
        _write_holder(layout, host="elsewhere", pid=1, invocation="usurper", heartbeat_at=time.time())
        time.sleep(0.3)  # several heartbeats
        assert _holder(layout)["invocation"] == "usurper"
    finally:
        lock._stop.set()


def test_release_never_removes_a_lock_another_run_took_over(layout: RunLayout):
    lock = RunLock(layout, "inv-1", heartbeat=3600)
    lock.acquire()
    # the holder stalled past stale_after and another driver took the lock over (as acquire() does)
    _write_holder(layout, host="elsewhere", pid=1, invocation="successor", heartbeat_at=time.time())
    lock.release()
    assert Path(layout.path("lock.json")).exists(), (
        "release() deleted the lock that another run holds now: a third run could then start beside it"
    )
    assert _holder(layout)["invocation"] == "successor"


def test_a_lock_holding_our_own_invocation_is_ours(layout: RunLayout):
    # our exclusive create took effect but its answer was lost; the retry finds the lock naming this invocation
    _write_holder(layout, host="elsewhere", pid=1, invocation="inv-1", heartbeat_at=time.time())
    lock = RunLock(layout, "inv-1")
    lock.acquire()
    lock.release()
    assert not Path(layout.path("lock.json")).exists()


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through /proc")
def test_lock_of_a_killed_driver_not_yet_reaped_is_taken_over_at_once(layout: RunLayout):
    # a driver killed with SIGKILL whose parent has not reaped it (a container's PID 1 that reaps nothing): its pid
    # still answers signal 0, but the process is a zombie
    import socket

    proc = _sleeper()
    try:
        _write_holder(
            layout,
            host=socket.gethostname(),
            pid=proc.pid,
            start_time=start_time(proc.pid),
            invocation="killed",
            heartbeat_at=time.time(),
        )
        with pytest.raises(LockHeld):  # alive: refused
            RunLock(layout, "inv-2").acquire()
        proc.kill()  # not waited for: left a zombie
        deadline = time.time() + 10
        while _state(proc.pid) != "Z" and time.time() < deadline:
            time.sleep(0.01)
        assert _state(proc.pid) == "Z"
        with RunLock(layout, "inv-2"):  # at once, not after stale_after
            assert _holder(layout)["invocation"] == "inv-2"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times are read from /proc")
def test_lock_whose_pid_is_now_another_process_is_taken_over(layout: RunLayout):
    import socket

    proc = _sleeper()
    try:
        started = start_time(proc.pid)
        assert started is not None and started == start_time(proc.pid)
        _write_holder(
            layout,
            host=socket.gethostname(),
            pid=proc.pid,
            start_time=started - 1,  # the pid reused
            invocation="gone",
            heartbeat_at=time.time(),
        )
        with RunLock(layout, "inv-2"):
            assert _holder(layout)["invocation"] == "inv-2"
            assert _holder(layout)["start_time"] == start_time(os.getpid())  # the new holder records its own
    finally:
        proc.kill()
        proc.wait()


def test_a_waiting_driver_takes_the_lock_once_the_holder_exits(layout: RunLayout):
    """As a job resubmitted right after `jobs stop` does: the stopped driver still holds OUTPUT for a moment."""
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    _write_holder(layout, host=socket.gethostname(), pid=holder.pid, start_time=start_time(holder.pid),
                  invocation="stopping", heartbeat_at=time.time())
    with pytest.raises(LockHeld):
        RunLock(layout, "impatient").acquire()  # no wait: refused while the holder lives
    started = time.monotonic()
    try:
        with RunLock(layout, "patient", wait_s=30, poll_s=0.1):
            assert _holder(layout)["invocation"] == "patient"
            waited = time.monotonic() - started
    finally:
        holder.wait()
    assert 0.5 < waited < 10  # took it once the holder had gone, not before, not at the end of the wait


def test_a_wait_that_runs_out_still_refuses(layout: RunLayout):
    with RunLock(layout, "inv-1"):
        started = time.monotonic()
        with pytest.raises(LockHeld, match="another whisper-batch run is active"):
            RunLock(layout, "inv-2", wait_s=1.0, poll_s=0.2).acquire()
        assert 0.7 < time.monotonic() - started < 5
        assert _holder(layout)["invocation"] == "inv-1"
