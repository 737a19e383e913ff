"""The local Ray that a command starts (``whisper_batch.jobs.run.init_ray``) is stopped whole by
``whisper_batch.jobs.run.stop_ray``: no process of the session (Ray's own, and the workers under the raylet) is left
once it returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, os
    import ray
    from ray._private import worker
    from whisper_batch.jobs.run import init_ray, stop_ray
    from whisper_batch.pipeline.config import load_config

    init_ray(load_config(None, []))

    @ray.remote
    def pid():
        return os.getpid()

    workers = sorted(set(ray.get([pid.remote() for _ in range(4)])))
    node = worker._global_node
    ray_pids = {t: [i.process.pid for i in infos] for t, infos in node.all_processes.items()}
    stop_ray()
    print(json.dumps({"ray_pids": ray_pids, "workers": workers}))
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_local_ray_stops_whole():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pids = [p for ps in result["ray_pids"].values() for p in ps] + result["workers"]
    assert len(pids) >= 5 and result["workers"], result
    assert not [p for p in pids if _alive(p)], f"processes left after stop_ray: {result}"
