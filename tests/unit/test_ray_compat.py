"""Ray's private internals that pipeline/ray_compat.py uses, checked on the installed Ray: a Ray that moved one fails
here (and pyproject.toml's pin says which Rays passed). The GCS actor table on a running Ray is exercised by
tests/integration/test_start_failures.py; token authentication against a real head by
tests/integration/test_jobs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from whisper_batch.pipeline import ray_compat

REPO = Path(__file__).resolve().parents[2]


def test_the_gcs_actor_table_and_the_session_node_are_where_ray_compat_reads_them():
    import inspect

    import ray
    from ray._private.state import state

    assert list(inspect.signature(state.actor_table).parameters)[:1] == ["actor_id"]
    assert hasattr(ray._private.worker, "_global_node")
    if not ray.is_initialized():
        assert ray_compat.session_logs_dir() is None


def test_a_workers_last_error_line_is_read_from_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_compat, "session_logs_dir", lambda: str(tmp_path))
    (tmp_path / "worker-abc-01000000-123.err").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nnot an error: line\n"
        "ModuleNotFoundError: No module named 'whisper_batch'\nsome chatter after it\n"
    )
    assert ray_compat.worker_error(123) == "ModuleNotFoundError: No module named 'whisper_batch'"
    assert ray_compat.worker_error(456) is None and ray_compat.worker_error(0) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # a fresh DataContext sets Ray's deprecated fields
def test_blocks_ahead_reach_the_actor_tasks_as_generator_backpressure():
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    ctx = DataContext()
    assert ctx._max_num_blocks_in_streaming_gen_buffer == 2  # Ray Data's default, which the graph raises
    ray_compat.set_blocks_ahead(ctx, 64)
    args = ActorPoolMapOperator._apply_default_actor_task_remote_args(None, ctx)
    assert args["_generator_backpressure_num_objects"] == 2 * 64  # a block and its metadata each


def _token_state(tmp_path: Path, **env: str) -> dict:
    """enable_local_token in a fresh process (it changes the process's environment and Ray's cached config), with
    HOME at ``tmp_path`` and only the RAY_AUTH_* variables given."""
    script = textwrap.dedent(
        """
        import json
        from whisper_batch.pipeline import ray_compat as c
        before = c.auth_mode()
        c.enable_local_token()
        print(json.dumps({"before": before, "mode": c.auth_mode(), "has": c.has_local_token(),
                          "source": c.token_source()}))
        """
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", script], env={**clean, "HOME": str(tmp_path), **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_token_in_the_environment_turns_token_auth_on(tmp_path):
    from ray._private.authentication import authentication_token_setup

    assert ray_compat.AUTH_MODE_ENV_VAR == authentication_token_setup.AUTH_MODE_ENV_VAR
    got = _token_state(tmp_path, RAY_AUTH_TOKEN="0" * 32)
    assert got == {"before": "", "mode": "token", "has": True, "source": "RAY_AUTH_TOKEN"}


def test_a_token_file_is_found_as_rays_cli_finds_it(tmp_path):
    path = tmp_path / "token"
    path.write_text("1" * 32)
    got = _token_state(tmp_path, RAY_AUTH_TOKEN_PATH=str(path))
    assert got == {"before": "", "mode": "token", "has": True, "source": f"RAY_AUTH_TOKEN_PATH={path}"}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("2" * 32)
    got = _token_state(tmp_path)
    assert got == {"before": "", "mode": "token", "has": True, "source": str(tmp_path / ".ray" / "auth_token")}


def test_without_a_token_or_with_the_mode_set_nothing_changes(tmp_path):
    assert _token_state(tmp_path) == {"before": "", "mode": "", "has": False,
                                      "source": str(tmp_path / ".ray" / "auth_token")}
    got = _token_state(tmp_path, RAY_AUTH_TOKEN="0" * 32, RAY_AUTH_MODE="disabled")
    assert (got["before"], got["mode"], got["has"]) == ("disabled", "disabled", True)


def test_a_graph_stopped_while_its_output_waits_inside_ray_leaves_no_thread_in_ray():
    """The graph's output stream closed early (as a run's error closes it) while its thread waits inside Ray Data for
    a row that never comes: the execution is shut down through its dataset's name and the thread ends, so the driver
    can stop Ray without a thread inside it. Run in a fresh process with a local Ray of its own."""
    script = textwrap.dedent(
        """
        import json, threading, time
        import ray
        from whisper_batch.pipeline import ray_compat
        from whisper_batch.pipeline.graph import _stream

        def never(batch):
            time.sleep(600)
            return batch

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        stream = _stream(ray.data.range(2, override_num_blocks=2).map_batches(never), poll=0.2)
        first = next(stream)  # None: no row yet, the producer waits inside Ray
        executors = lambda: [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor-")]
        deadline = time.monotonic() + 60
        while not executors() and time.monotonic() < deadline:
            time.sleep(0.1)
        running, t0 = executors(), time.monotonic()
        stream.close()
        print(json.dumps({"first": first, "running": running, "close_s": time.monotonic() - t0,
                          "after": executors(), "other": ray_compat.stop_executions("no-such-dataset"),
                          "producers": [t.name for t in threading.enumerate() if t.name == "graph-output"]}))
        ray.shutdown()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["first"] is None
    assert len(got["running"]) == 1 and got["running"][0].startswith("StreamingExecutor-whisper-batch-"), got
    assert got["after"] == [] and got["producers"] == [], got
    assert got["other"] == 0 and got["close_s"] < 30, got
