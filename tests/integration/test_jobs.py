"""Cluster jobs end to end: a real Ray head on this machine (job server + dashboard) and a real S3 server.

The head is ``ray start --head --block`` in a session of its own, with the S3 server's endpoint and credentials in
its environment (as a cluster node has its instance role). The client side (the CLI run here) has no AWS
credentials at all: the jobs can only work with the nodes' own.

Ray's token authentication, as a plain ``ray start --head`` sets it up: Ray 2.60 turns it on when the machine has a
token (``~/.ray/auth_token``, which ``ray get-auth-token --generate`` and any local ``ray.init()`` create), and Ray's
own job client then sends nothing unless ``RAY_AUTH_MODE=token`` is set. Here HOME is a fresh folder for the head and
the client alike: the token is made there by Ray's own command, the head is started with no RAY_AUTH_* variable, and
the client is given no token: it must find the one in HOME as Ray's CLI does. The head's job server must really
refuse a request without it (checked), so every successful command proves the client authenticated. Bad input, each
a clear error before any work: a token that is not the head's, no token at all, an address where something answers
that is not a Ray job server (a plain HTTP server; the head's GCS port).

Only this head is stopped at teardown: SIGTERM to its ``ray start --block`` process (which shuts down what it
started), then SIGKILL for anything left in its session. ``ray stop`` is never used: it kills every Ray process on
the machine, other people's included.
"""

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import count_ids, job_server_missing, read_jsonl, read_rows
from tests.servers import free_port, moto_s3
from tests.shards import read_committed
from tests.speech import have_espeak, make_speech
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.storage import resolve_storage_options

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have_espeak(), reason="espeak-ng and ffmpeg are needed to make speech"),
    pytest.mark.skipif(job_server_missing(),
                       reason="the Ray job server needs ray[default]: pip install 'ray[default]'"),
]

REPO = Path(__file__).resolve().parents[2]
KEY_ID = "AKIAWBJOBS0000000001"
SECRET = "wb-jobs-secret-9b41e7"
SHORT = {"fox": "The quick brown fox jumps over the lazy dog.", "rain": "It is raining in the city today."}
# longer utterances, one shard each and one row per model call: shards commit seconds apart, so a stop lands midway
LONG = {
    "train": "The train to the coast leaves at seven in the morning. It stops at every small town along the river, "
             "and the whole journey takes almost four hours.",
    "garden": "My grandmother grew tomatoes, beans and sunflowers in the garden behind her old stone house. "
              "Every summer we helped her pick the beans and carry them to the kitchen.",
    "market": "On Saturdays the market square is full of people buying fresh bread, cheese and apples from local "
              "farms. The stalls open early and close just after noon.",
    "library": "The library stays open late on Thursdays, so students can study there until ten in the evening. "
               "It is quiet, warm and close to the station.",
}
JOB_SETTINGS = ["--config", "configs/cpu-tiny.yaml", "--set", "manifest.shard_size=1"]
EXAMPLES = REPO / "examples"


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY_ID, secret=SECRET, skip_instance_cache=True,
                             use_listings_cache=False)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with the two manifests (relative audio paths) in s3://jobs/; yields its endpoint."""
    with moto_s3() as endpoint:
        yield _put_speech(endpoint, tmp_path_factory.mktemp("speech"))


def _put_speech(endpoint: str, local) -> str:
    fs = _fs(endpoint)
    fs.mkdir("jobs")
    for name, spoken in (("short", SHORT), ("long", LONG)):
        lines = []
        for utt, text in spoken.items():
            fs.put_file(str(make_speech(text, local / f"{utt}.flac")), f"jobs/{name}/audio/{utt}.flac")
            lines.append(json.dumps({"id": utt, "audio_filepath": f"audio/{utt}.flac", "text": text}))
        fs.pipe_file(f"jobs/{name}/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return endpoint


def _session_pids(sid: int) -> set[int]:
    """Processes of session ``sid`` (the head's ``ray start`` and everything it started)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen) -> None:
    started = _session_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)  # `ray start --block` then shuts down the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.monotonic() + 20
    while (left := started & _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head(s3, tmp_path_factory):
    """A Ray head with its job server, token authentication on as plain `ray start` turns it on; yields (address,
    client environment, token, GCS address)."""
    import requests

    home = tmp_path_factory.mktemp("home")
    client_env = {**_clean_env(), "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}  # no token given: HOME has it
    made = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                          env=client_env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    temp_dir = tempfile.mkdtemp(prefix="wbray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    node_env = {
        **client_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a test head has nothing to drain: stop at once
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": f"{temp_dir}/no-credentials", "AWS_CONFIG_FILE": f"{temp_dir}/no-config",
    }
    dashboard, gcs = free_port(), free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    log = open(f"{temp_dir}/head.log", "w")
    proc = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(f"{temp_dir}/head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start its job server in 120 s"
            try:
                if requests.get(f"{address}/api/jobs/", headers=_auth(token), timeout=2).status_code == 200:
                    break
            except requests.exceptions.RequestException:
                pass
            time.sleep(1)
        mode = requests.get(f"{address}/api/authentication_mode", timeout=10).json()
        assert mode == {"authentication_mode": "token"}, f"ray start did not turn token authentication on: {mode}"
        bare = requests.get(f"{address}/api/jobs/", timeout=10)
        assert bare.status_code == 401, f"the job server answered a request without a token: {bare.status_code}"
        yield address, client_env, token, f"127.0.0.1:{gcs}"
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_batch.jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout


def _job(address: str, token: str, submission_id: str) -> dict:
    import requests

    r = requests.get(f"{address}/api/jobs/{submission_id}", headers=_auth(token), timeout=10)
    r.raise_for_status()
    return r.json()


def _layout(endpoint: str, output: str) -> RunLayout:
    return RunLayout(output, resolve_storage_options({"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET}))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def _check_transcripts(layout: RunLayout, spoken: dict[str, str]) -> None:
    table = read_committed(layout)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(spoken), f"every utterance exactly once, got {ids}"
    for row in table.to_pylist():
        assert row["error"] is None, row["error"]
        expected = _words(spoken[row["id"]])
        # half its words: the row holds its own utterance (tiny.en hears espeak's voice differently in fp32 and bf16:
        # "This raining in my city today." on a CPU without bf16)
        assert len(_words(row["text"]) & expected) >= 0.5 * len(expected), (row["id"], row["text"])


def _no_secrets(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text


def test_submit_follows_the_job_to_success(s3, head):
    address, env, token, _ = head
    out = _ok(_cli(["submit", "s3://jobs/short/manifest.jsonl", "-o", "s3://jobs/out-short", "--address", address,
                    "--wait", *JOB_SETTINGS], env))
    submission_id = out.strip().splitlines()[-1]
    assert re.fullmatch(r"raysubmit_\w+", submission_id), out[-2000:]
    # the job's own log, followed: its progress lines (a pipe there), the last one at the end of the graph
    assert f"job {submission_id} SUCCEEDED" in out and re.search(r"done: rows \d+/\d+ \(100%\) .* shards 2/2", out)
    layout = _layout(s3, "s3://jobs/out-short")
    assert layout.list_done_shards() == {0, 1}
    _check_transcripts(layout, SHORT)
    status = _ok(_cli(["jobs", "status", submission_id, "--address", address], env))
    assert re.search(r"status\s+SUCCEEDED", status) and "s3://jobs/out-short" in status
    logs = _ok(_cli(["jobs", "logs", submission_id, "--address", address], env))
    assert re.search(r"done: rows \d+/\d+ \(100%\) .* shards 2/2", logs) and "MapBatches(" not in logs
    # no credential in what the job server holds (entrypoint, metadata, runtime env), printed, or stored
    info = _job(address, token, submission_id)
    assert info["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    stored = [_fs(s3).cat_file(p).decode(errors="replace") for p in _fs(s3).find("jobs/out-short")
              if p.endswith(".json")]
    _no_secrets(json.dumps(info), out, status, logs, *stored)


def test_stop_midway_then_resume_exactly_once(s3, head):
    address, env, token, _ = head
    output = "s3://jobs/out-long"
    args = ["submit", "s3://jobs/long/manifest.jsonl", "-o", output, "--address", address, *JOB_SETTINGS,
            "--set", "ray.model_batch_size=1", "--set", "model.batch_size=1", "--set", "decode.beam_size=5",
            "--set", "ray.model_actors=1", "--set", "model.dtype=float32"]  # one row at a time, slowly
    first = _ok(_cli(args, env)).strip().splitlines()[-1]
    busy = _cli(["resume", output, "--address", address], env)  # while it runs: refused, nothing submitted
    assert busy.returncode == 1 and f"job {first} is still " in busy.stderr, busy.stderr
    layout = _layout(s3, output)
    deadline = time.monotonic() + 180
    while not layout.list_done_shards():
        assert _job(address, token, first)["status"] in ("PENDING", "RUNNING"), _job(address, token, first)
        assert time.monotonic() < deadline, "no shard committed in 180 s"
        time.sleep(0.25)
    # asked at once, over the job server's API: a CLI's start-up took longer than the rest of the shards
    # (`jobs stop` itself: test_jobs_stop_stops_a_job_at_once)
    import requests

    requests.post(f"{address}/api/jobs/{first}/stop", headers=_auth(token), timeout=10).raise_for_status()
    deadline = time.monotonic() + 60
    while _job(address, token, first)["status"] not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, "the job did not stop in 60 s"
        time.sleep(0.25)
    assert _job(address, token, first)["status"] == "STOPPED"
    time.sleep(2)  # the stopped job's workers are gone by now: what is committed stays committed
    done = layout.list_done_shards()
    finished = sorted(layout.read_json(layout.record_file(s))["finished_at"] for s in done)
    assert 0 < len(done) < len(LONG), f"the stop came after the last shard: {finished}"
    records = {s: layout.read_bytes(layout.record_file(s)) for s in done}
    files = {s: layout.read_bytes(layout.shard_file(s)) for s in done}

    result = _cli(["resume", output, "--address", address, "--wait"], env)
    out = _ok(result)
    second = out.strip().splitlines()[-1]
    assert second != first and f"job {second} SUCCEEDED" in out
    assert f"after job {first} (STOPPED)" in out
    assert layout.list_done_shards() == set(range(len(LONG)))
    _check_transcripts(layout, LONG)
    for s in done:  # committed before the stop: never redone
        assert layout.read_bytes(layout.record_file(s)) == records[s]
        assert layout.read_bytes(layout.shard_file(s)) == files[s]
    assert _job(address, token, second)["entrypoint"] == _job(address, token, first)["entrypoint"]
    _no_secrets(out, json.dumps(_job(address, token, second)))


def test_resume_and_status_of_unknown_things_say_so(s3, head):
    address, env, _, _ = head
    result = _cli(["resume", "s3://jobs/never-written", "--address", address], {**env, "AWS_ENDPOINT_URL": s3,
                  "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"})
    assert result.returncode == 1
    assert "nothing to resume: no job on this cluster wrote s3://jobs/never-written" in result.stderr
    bad = _cli(["jobs", "status", "raysubmit_doesnotexist", "--address", address], env)
    assert bad.returncode == 1 and "no job 'raysubmit_doesnotexist'" in bad.stderr


def test_jobs_stop_stops_a_job_at_once(s3, head):
    address, env, _, _ = head
    job = _ok(_cli(["submit", "s3://jobs/short/manifest.jsonl", "-o", "s3://jobs/out-stopped", "--address", address,
                    *JOB_SETTINGS], env)).strip().splitlines()[-1]
    stopped = _ok(_cli(["jobs", "stop", job, "--address", address], env))
    assert "STOPPED" in stopped, stopped
    assert re.search(r"status\s+STOPPED", _ok(_cli(["jobs", "status", job, "--address", address], env)))


def test_a_driver_joining_by_address_sends_the_token(head, tmp_path):
    """`run --set ray.address=HEAD:PORT`: Ray itself sends no token to an address it is given; the driver does."""
    _, env, _, gcs = head
    manifest, out = EXAMPLES / "manifest.jsonl", tmp_path / "out"
    _ok(_cli(["run", str(manifest), "-o", str(out), *JOB_SETTINGS, "--set", f"ray.address={gcs}"], env))
    assert count_ids(read_rows(out)) == {r["id"]: 1 for r in read_jsonl(manifest)}
    empty = tmp_path / "empty-home"
    empty.mkdir()
    refused = _cli(["run", str(manifest), "-o", str(tmp_path / "never"), *JOB_SETTINGS, "--set",
                    f"ray.address={gcs}"], {**env, "HOME": str(empty)}, timeout=120)
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert f"cannot join the Ray cluster at {gcs}" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr, \
        refused.stderr


INIT_RAY = """
import json, ray
from whisper_batch.jobs.run import init_ray, stop_ray
from whisper_batch.pipeline.config import load_config
init_ray(load_config(None, []))
print(json.dumps({"gcs_port": ray.get_runtime_context().gcs_address.rsplit(":", 1)[1], "nodes": len(ray.nodes())}))
stop_ray()
"""


def test_no_ray_address_joins_RAY_ADDRESS_else_starts_its_own_ray_beside_a_ray_start_cluster(head, tmp_path):
    """``ray.address: null``: a driver that `ray job submit` starts has RAY_ADDRESS and joins that cluster (with the
    token); elsewhere the command starts a Ray of its own, even on a machine where `ray start` left a cluster, which
    a bare ``ray.init()`` would join (and refuse the cores it is given: "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided")."""
    _, env, _, gcs = head
    port = gcs.rsplit(":", 1)[1]

    def init(extra: dict[str, str]) -> dict:
        proc = subprocess.run([sys.executable, "-c", INIT_RAY], cwd=REPO, env={**env, **extra}, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert init({"RAY_ADDRESS": gcs}) == {"gcs_port": port, "nodes": 1}
    # `ray start` (without --temp-dir) records its cluster in Ray's temp folder, where ray.init() looks for one
    ray_tmp = Path(tempfile.mkdtemp(prefix="wbtmp-", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(gcs)
        own = init({"RAY_TMPDIR": str(ray_tmp)})
        assert own["gcs_port"] != port and own["nodes"] == 1, own
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_token_in_the_environment_is_used_and_a_wrong_or_missing_one_refused_with_what_to_set(head, tmp_path):
    address, env, token, _ = head
    wrong = _cli(["jobs", "status", "nope", "--address", address], {**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode != 0, wrong.stdout[-2000:]
    assert "refused this machine's token (from RAY_AUTH_TOKEN)" in wrong.stderr, wrong.stderr
    assert "ray get-auth-token" in wrong.stderr, wrong.stderr

    empty = tmp_path / "empty-home"
    empty.mkdir()
    # the head's token in RAY_AUTH_TOKEN, and none in HOME: accepted (the job server answers that there is no such job)
    given = _cli(["jobs", "status", "raysubmit_doesnotexist", "--address", address],
                 {**env, "HOME": str(empty), "RAY_AUTH_TOKEN": token})
    assert given.returncode == 1 and "no job 'raysubmit_doesnotexist'" in given.stderr, given.stderr
    out = tmp_path / "never"
    none = _cli(["submit", str(EXAMPLES / "manifest.jsonl"), "-o", str(out), "--address", address, *JOB_SETTINGS],
                {**env, "HOME": str(empty)})
    assert none.returncode != 0, none.stdout[-2000:]
    assert "requires a token and this machine has none" in none.stderr, none.stderr
    assert "RAY_AUTH_TOKEN" in none.stderr and ".ray/auth_token" in none.stderr, none.stderr
    assert not out.exists(), "a refused submission must do no work"


class _NotRay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"not here")

    def log_message(self, *args):
        pass


def test_an_address_that_answers_but_has_no_job_server(head, tmp_path):
    _, env, _, gcs = head
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{server.server_address[1]}", f"http://{gcs}"):
            out = tmp_path / "never"
            err = _cli(["submit", str(EXAMPLES / "manifest.jsonl"), "-o", str(out), "--address", url, *JOB_SETTINGS],
                       env, timeout=60)
            assert err.returncode != 0, err.stdout[-2000:]
            assert "not a Ray job server" in err.stderr or "not as an HTTP server" in err.stderr, (url, err.stderr)
            assert "8265" in err.stderr, err.stderr  # says where the job server is
            assert not out.exists()
    finally:
        server.shutdown()
