"""Actors that die as they start stop the run with their cause in one line, instead of being restarted without end
(Ray Data restarts a dead actor of its pools as long as the job lasts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults import START_FAILURE
from tests.integration.conftest import REPO, whisper_batch

pytestmark = pytest.mark.integration
JOINS_SHARED_RAY = True  # its runs are about the output: they join one shared Ray head (conftest._shared_ray)


def _error_line(stderr: str) -> str:
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    return line


@pytest.mark.parametrize("fault, cause", [
    ("install_model_start_failure", f"ImportError: {START_FAILURE}"),  # a Python error as the replica loads
    ("install_model_start_crash", "Fatal Python error: Segmentation fault (a test's fault)"),  # no Python error
])
def test_model_actors_dying_as_they_start_stop_the_run(tmp_path: Path, fault: str, cause: str):
    t0 = time.monotonic()
    proc = whisper_batch("run", REPO / "examples" / "manifest.jsonl", "-o", tmp_path / "out",
                         "--set", f"ray.worker_setup_hook=tests.faults.{fault}", timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _error_line(proc.stderr)
    assert "ArrowTranscriber" in line and "as it started" in line and line.endswith(cause), line
    assert time.monotonic() - t0 < 120  # a few deaths, not minutes of restarts
    # nothing was committed; the same command without the fault does the work
    assert not list((tmp_path / "out").glob("transcripts/*.parquet"))


def test_worker_error_reads_the_last_error_of_a_workers_log(tmp_path: Path, monkeypatch):
    from whisper_batch.pipeline import ray_compat

    log = tmp_path / "worker-abc-01000000-4242.err"
    log.write_text("some warning\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ModuleNotFoundError: No module named 'libfoo'\n\nRay: exiting\n")
    monkeypatch.setattr(ray_compat, "session_logs_dir", lambda: str(tmp_path))
    assert ray_compat.worker_error(4242) == "ModuleNotFoundError: No module named 'libfoo'"
    assert ray_compat.worker_error(4243) is None


def test_the_actor_table_on_the_installed_ray():
    """ray_compat's use of Ray's private GCS actor table, on the Ray this project is installed with."""
    import ray

    from whisper_batch.pipeline.ray_compat import actor_restarts, session_logs_dir

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(max_restarts=2)
        class Flaky:
            def pid(self):
                import os
                return os.getpid()

            def die(self):
                import os
                os._exit(1)

        actor = Flaky.remote()
        pid = ray.get(actor.pid.remote())
        actor.die.remote()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = [a for a in actor_restarts() if a.actor_id == actor._actor_id.hex()]
            if info and info[0].restarts == 1 and info[0].state == "ALIVE":
                break
            time.sleep(0.2)
        [a] = info
        assert a.class_name.endswith("Flaky") and a.job_id == ray.get_runtime_context().get_job_id()
        assert a.restarts == 1 and a.pid != pid and a.pid == ray.get(actor.pid.remote())
        assert session_logs_dir() and Path(session_logs_dir(), "raylet.out").exists()
    finally:
        ray.shutdown()
