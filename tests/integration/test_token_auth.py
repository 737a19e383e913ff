"""Ray's token authentication, as a plain ``ray start --head`` sets it up, against `submit`, `jobs` and `resume`.

Ray 2.60's ``ray start --head`` turns token authentication on when the machine has a token (``~/.ray/auth_token``,
which ``ray get-auth-token --generate`` and any local ``ray.init()`` create); Ray's own job client then sends
nothing unless ``RAY_AUTH_MODE=token`` is set. Here HOME is a fresh folder for the head and the client alike: the
token is made there by Ray's own command, the head is started with no RAY_AUTH_* variable, and the client is given
no token: it must find the one in HOME as Ray's CLI does. The head's job server must really refuse a request
without it (checked), so the successful commands prove the client authenticated.

Bad input, each a clear error before any work: a token that is not the head's, no token at all, an address where
something answers that is not a Ray job server (a plain HTTP server; the head's GCS port).
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import count_ids, job_server_missing, read_jsonl, read_rows
from tests.integration.ray_cluster import RayCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(job_server_missing(),
                       reason="the Ray job server needs ray[default]: pip install 'ray[default]'"),
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SETTINGS = ["--config", "configs/cpu-tiny.yaml", "--set", "manifest.shard_size=1"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no RAY_* or AWS_* variable of the machine running the tests, HOME = ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), **extra)
    return env


def _cli(args: list, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_batch.jobs.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def _refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started by plain `ray start --head` in a fresh HOME that holds a token; yields (cluster, HOME)."""
    import requests

    home = tmp_path_factory.mktemp("home")
    made = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                          env=_env(home), capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    cluster = RayCluster(env=_env(home))
    try:
        cluster.start_head(num_cpus=2, dashboard=True)
        mode = requests.get(f"{cluster.dashboard_url}/api/authentication_mode", timeout=10).json()
        assert mode == {"authentication_mode": "token"}, f"ray start did not turn token authentication on: {mode}"
        bare = requests.get(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
        assert bare.status_code == 401, f"the job server answered a request without a token: {bare.status_code}"
        yield cluster, home
    finally:
        cluster.stop()


def test_submit_jobs_and_resume_find_the_token_as_ray_does(head, tmp_path):
    cluster, home = head
    env, address = _env(home), ["--address", cluster.dashboard_url]
    manifest = EXAMPLES / "manifest.jsonl"
    ids = {r["id"] for r in read_jsonl(manifest)}

    out = tmp_path / "out"
    job = _ok(_cli(["submit", manifest, "-o", out, *address, *SETTINGS, "--wait"], env)).strip().splitlines()[-1]
    assert count_ids(read_rows(out)) == {i: 1 for i in ids}
    assert "SUCCEEDED" in _ok(_cli(["jobs", "status", job, *address], env))
    logs = _ok(_cli(["jobs", "logs", job, *address], env))
    assert re.search(rf"shards\s+{len(ids)}/{len(ids)} done", logs), logs[-3000:]  # the run's closing status

    # stopped at once, then resumed to the end: every row once
    out2 = tmp_path / "out2"
    job2 = _ok(_cli(["submit", manifest, "-o", out2, *address, *SETTINGS], env)).strip().splitlines()[-1]
    assert "STOPPED" in _ok(_cli(["jobs", "stop", job2, *address], env))
    _ok(_cli(["resume", out2, *address, "--wait"], env))
    assert count_ids(read_rows(out2)) == {i: 1 for i in ids}


def test_a_driver_joining_by_address_sends_the_token(head, tmp_path):
    """`run --set ray.address=HEAD:PORT`: Ray itself sends no token to an address it is given; the driver does."""
    cluster, home = head
    manifest, out = EXAMPLES / "manifest.jsonl", tmp_path / "out"
    _ok(_cli(["run", manifest, "-o", out, *SETTINGS, "--set", f"ray.address={cluster.address}"], _env(home)))
    assert count_ids(read_rows(out)) == {r["id"]: 1 for r in read_jsonl(manifest)}
    empty = tmp_path / "empty-home"
    empty.mkdir()
    refused = _refused(_cli(["run", manifest, "-o", tmp_path / "never", *SETTINGS, "--set",
                             f"ray.address={cluster.address}"], _env(empty), timeout=120))
    assert f"cannot join the Ray cluster at {cluster.address}" in refused and "RAY_AUTH_TOKEN" in refused, refused


def test_a_token_that_is_not_the_heads_is_refused_with_what_to_set(head, tmp_path):
    cluster, home = head
    wrong = _refused(_cli(["jobs", "status", "nope", "--address", cluster.dashboard_url],
                          _env(home, RAY_AUTH_TOKEN="0" * 32)))
    assert "refused this machine's token (from RAY_AUTH_TOKEN)" in wrong and "ray get-auth-token" in wrong, wrong

    empty = tmp_path / "empty-home"
    empty.mkdir()
    out = tmp_path / "never"
    none = _refused(_cli(["submit", EXAMPLES / "manifest.jsonl", "-o", out, "--address", cluster.dashboard_url,
                          *SETTINGS], _env(empty)))
    assert "requires a token and this machine has none" in none, none
    assert "RAY_AUTH_TOKEN" in none and ".ray/auth_token" in none, none
    assert not out.exists(), "a refused submission must do no work"


class _NotRay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"not here")

    def log_message(self, *args):
        pass


def test_an_address_that_answers_but_has_no_job_server(head, tmp_path):
    cluster, home = head
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{server.server_address[1]}", f"http://{cluster.address}"):
            out = tmp_path / "never"
            err = _refused(_cli(["submit", EXAMPLES / "manifest.jsonl", "-o", out, "--address", url, *SETTINGS],
                                _env(home), timeout=60))
            assert "not a Ray job server" in err or "not as an HTTP server" in err, (url, err)
            assert "8265" in err, err  # says where the job server is
            assert not out.exists()
    finally:
        server.shutdown()
