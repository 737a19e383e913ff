"""The local Ray that a command starts: started without Ray's one-second sleeps while its raylet registers, and
stopped whole, without Ray's one-second wait on its autoscaler monitor.

``whisper_batch.jobs.run.prompt_node_check`` polls the GCS's node table while ``ray.init`` waits for the new raylet; the script
counts those polls on the installed Ray (a Ray whose start no longer goes through ``services.get_node`` fails here,
not in the product: the start only loses the saving).

``ray.shutdown`` stops the GCS before the monitor, whose SIGTERM handler then reports to the GCS that is gone; the
shutdown waits a second before killing it. ``whisper_batch.jobs.run.stop_ray`` ends the monitor first. This checks it on the Ray
installed here (Ray's process table is internal: a Ray that moved it fails this test, not the product), and that no
process of the session (Ray's own, and the workers under the raylet) is left once ``stop_ray`` returns.
"""

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
    import ray, ray._raylet
    from ray._private import ray_constants, services, worker
    from whisper_batch.jobs.run import _end_autoscaler_monitor, init_ray, stop_ray
    from whisper_batch.pipeline.config import load_config

    polls, real_client, ray_get_node = [], ray._raylet.GcsClient, services.get_node

    class CountingClient:  # the GCS client prompt_node_check makes, its node-table polls counted
        def __init__(self, *args, **kwargs):
            self.inner = real_client(*args, **kwargs)

        def get_all_node_info(self, *args, **kwargs):
            polls.append(1)
            return self.inner.get_all_node_info(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    ray._raylet.GcsClient = CountingClient
    init_ray(load_config(None, []))
    ray._raylet.GcsClient = real_client
    start = {"node_polls": len(polls), "get_node_restored": services.get_node is ray_get_node}

    @ray.remote
    def pid():
        return os.getpid()

    workers = sorted(set(ray.get([pid.remote() for _ in range(4)])))
    node = worker._global_node
    ray_pids = {t: [i.process.pid for i in infos] for t, infos in node.all_processes.items()}
    monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
    gcs = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process
    _end_autoscaler_monitor()
    ended = {"monitor_exit": monitor.poll(), "gcs_alive": gcs.poll() is None}
    stop_ray()
    print(json.dumps({"ray_pids": ray_pids, "workers": workers, **ended, **start}))
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_local_ray_starts_polling_for_its_node_and_stops_whole():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node_polls"] >= 1 and result["get_node_restored"], result
    assert result["monitor_exit"] is not None and result["gcs_alive"], result
    pids = [p for ps in result["ray_pids"].values() for p in ps] + result["workers"]
    assert len(pids) >= 5 and result["workers"], result
    assert not [p for p in pids if _alive(p)], f"processes left after stop_ray: {result}"
