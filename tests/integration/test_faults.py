"""Faults injected into real runs through the CLI: a model actor killed, the driver killed at ten moments, S3
connections reset / cut / stalled by a proxy, hung decodes and model calls, two drivers on one OUTPUT, and
credentials that must never show up.

The runs share one Ray cluster that this module starts (``ray start --head --block`` in a private temp dir) and kills,
so each run pays a driver connect instead of a Ray start. Every run installs the model-hang hook in the cluster's
workers (``ray.worker_setup_hook``, :func:`tests.faults.install_model_hang`): a model call on a row whose id contains
``hang-me`` hangs; no other row is affected. Every run transcribes the same 8 short espeak
utterances, one per shard, so any run can be compared with a clean run: same rows, exactly once, same text.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults import HANG_TAG
from tests.integration.conftest import (
    RUN_TIMEOUT_S,
    alive,
    cli_env,
    completion_records,
    count_ids,
    descendants,
    output_of,
    read_rows,
    sigkill,
    start_whisper_batch,
    status_json,
    stop_processes,
    wait_until,
    whisper_batch,
    whisper_batch_ok,
    write_manifest,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.servers import free_port, moto_s3
from tests.speech import have_espeak

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "The weather is nice today, so we will walk to the park.",
    "Please bring me a cup of hot coffee.",
    "Seven green apples were sitting on the kitchen table.",
    "Please call Stella and ask her to bring these things.",
    "My name is Anna and I live in a small town near the sea.",
    "Every morning I wake up early and drink a glass of water.",
    "The library opens at nine o'clock on Monday.",
]
N_ROWS = len(SENTENCES)
CANARY_KEY = "AKIACANARY7RELIAB1LTY"
CANARY_SECRET = "canary-secret-reliability-7f3a9e"
BUCKET = "wb-faults"


# --- the shared Ray cluster --------------------------------------------------------------------------------------


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the drivers

    @property
    def settings(self) -> tuple[str, ...]:
        """`--set` arguments of every run here: this cluster, one row per shard, one row per model call (so
        shards commit one by one while a run goes on)."""
        sets = (f"ray.address={self.address}", "manifest.shard_size=1", "ray.model_batch_size=1",
                "ray.worker_setup_hook=tests.faults.install_model_hang")
        return tuple(a for s in sets for a in ("--set", s))

    def start(self, *args: Any, log: Path) -> subprocess.Popen:
        """Starts ``whisper-batch ARGS`` as a driver of this cluster, in the background."""
        return start_whisper_batch(*args, log=log, env=self.env)

    def actor_pids(self, name: str) -> set[int]:
        """Live worker processes of this cluster whose title names ``name`` (e.g. ArrowTranscriber)."""
        found = set()
        for pid in descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and name in cmd:
                found.add(pid)
        return alive(found)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    # Ray's socket paths must stay short: a temp dir directly under /tmp
    temp = Path(tempfile.mkdtemp(prefix="wbf-", dir="/tmp"))
    port = free_port()
    env = cli_env({"RAY_AUTH_MODE": "disabled"})
    log_path = tmp_path_factory.mktemp("cluster") / "ray-start.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
           "--disable-usage-stats"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(f"127.0.0.1:{port}", temp, proc, {"RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test's Ray cluster did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield c
    finally:
        tree = descendants(proc.pid) | {proc.pid}
        # killed, not stopped: on SIGTERM `ray start --block` took over 10 s to stop this cluster, and nothing of it
        # outlives the test (its temp dir goes below)
        sigkill(proc, group=True)
        stop_processes(tree, timeout=0)  # only processes of this cluster, by pid: those outside its process group
        shutil.rmtree(temp, ignore_errors=True)


# --- the shared manifest and the clean run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Any]:
    """8 utterances (WAV, 16 kHz) and a manifest of them with ids row-0 .. row-7."""
    if not have_espeak():
        pytest.skip("espeak-ng and ffmpeg are needed to make speech")
    from tests.speech import make_speech

    folder = tmp_path_factory.mktemp("speech")
    rows = []
    for i, text in enumerate(SENTENCES):
        make_speech(text, folder / f"u{i}.wav")
        rows.append({"id": f"row-{i}", "audio_filepath": f"u{i}.wav", "text": text})
    manifest = write_manifest(folder / "manifest.jsonl", rows, base=folder)
    return {"folder": folder, "rows": rows, "manifest": manifest}


@pytest.fixture(scope="module")
def concurrent(cluster: Cluster, speech: dict[str, Any], tmp_path_factory) -> dict[str, Any]:
    """Two drivers started at once on one fresh OUTPUT; the result doubles as the clean run of the manifest."""
    base = tmp_path_factory.mktemp("concurrent")
    out = base / "out"
    args = ("run", speech["manifest"], "-o", out, *cluster.settings)
    t0 = time.monotonic()
    procs = [cluster.start(*args, log=base / f"driver-{i}.log") for i in range(2)]
    for p in procs:
        p.wait(timeout=RUN_TIMEOUT_S)
    logs = [(base / f"driver-{i}.log").read_text() for i in range(2)]
    print(f"two drivers at once: exit {[p.returncode for p in procs]}, {time.monotonic() - t0:.0f} s")
    return {"out": out, "procs": procs, "logs": logs}


@pytest.fixture(scope="module")
def reference(concurrent: dict[str, Any]) -> dict[str, str]:
    """id -> text of the clean run (every row decoded at temperature 0, so every run must reproduce it)."""
    rows = read_rows(concurrent["out"])
    assert count_ids(rows) == {f"row-{i}": 1 for i in range(N_ROWS)}, concurrent["logs"]
    for r in rows:
        assert r["error"] is None and r["text"].strip(), r
        temps = {s["temperature"] for s in r["segments"]}
        assert temps == {0.0}, f"{r['id']} needed a sampling fallback ({temps}); its text would not be reproducible"
    return {r["id"]: r["text"] for r in rows}


def _check_output(out: Path, reference: dict[str, str], complete: bool = True) -> list[dict[str, Any]]:
    """Committed rows appear once each with the clean run's text; with ``complete``, every row is there."""
    rows = read_rows(out)
    counts = count_ids(rows)
    assert all(n == 1 for n in counts.values()), f"rows written more than once: {counts}"
    if complete:
        assert set(counts) == set(reference), f"rows missing: {sorted(set(reference) - set(counts))}"
    for r in rows:
        if r["id"] in reference:
            assert r["text"] == reference[r["id"]], f"{r['id']}: {r['text']!r} != clean run's {reference[r['id']]!r}"
    return rows


# --- 4. two drivers on one OUTPUT --------------------------------------------------------------------------------


def test_two_runs_started_at_once_on_one_output(concurrent: dict[str, Any], reference: dict[str, str]):
    codes = sorted(p.returncode for p in concurrent["procs"])
    assert codes[0] == 0, f"neither driver finished:\n{concurrent['logs']}"
    if codes[1] != 0:  # refused: a clear message, no traceback, and before any work of its own
        [refused] = [log for p, log in zip(concurrent["procs"], concurrent["logs"]) if p.returncode != 0]
        assert "another whisper-batch run is active" in refused and "Traceback" not in refused, refused[-3000:]
    records = completion_records(concurrent["out"])
    assert sorted(records) == list(range(N_ROWS))
    _check_output(concurrent["out"], reference)


# --- 2. a model actor killed mid-run -----------------------------------------------------------------------------


def test_model_actor_killed_mid_run_is_restarted_and_its_work_redone(
    cluster: Cluster, speech: dict[str, Any], reference: dict[str, str], tmp_path: Path
):
    out = tmp_path / "out"
    proc = cluster.start("run", speech["manifest"], "-o", out, *cluster.settings, log=tmp_path / "driver.log")
    killed: list[tuple[int, int]] = []  # (pid, shards committed when it was killed)
    restarted = False
    try:
        # once the actor has done some work (a shard committed) and has more to do
        if wait_until(lambda: len(completion_records(out)) >= 1, proc) and len(completion_records(out)) < N_ROWS:
            pids = cluster.actor_pids("ArrowTranscriber")  # one per core by default
            assert pids, "no model actor found"
            pid = min(pids)
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, len(completion_records(out))))
            restarted = wait_until(lambda: bool(cluster.actor_pids("ArrowTranscriber") - pids), proc)
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "driver.log").read_text()
    print(f"model actor killed (pid, shards committed then): {killed}")
    assert killed, f"no model actor was killed: the run ended first\n{log[-3000:]}"
    assert killed[0][1] < N_ROWS and restarted, f"no new model actor replaced the killed one:\n{log[-3000:]}"
    assert proc.returncode == 0, f"the run did not survive the actor kill:\n{log[-4000:]}"
    _check_output(out, reference)
    assert sorted(completion_records(out)) == list(range(N_ROWS))


# --- 2. the driver killed at ten moments ---------------------------------------------------------------------------


@dataclass
class Attempt:
    """What OUTPUT held when an attempt started, to tell this attempt's progress from earlier ones'."""

    out: Path
    proc: subprocess.Popen
    t0: float
    records: int
    invocations: set[str]
    staged: set[str]
    parts: set[str]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def lock_mine(self) -> bool:
        try:
            return json.loads((self.out / "lock.json").read_text())["pid"] == self.proc.pid
        except (OSError, ValueError, KeyError):
            return False

    def new_invocation(self) -> bool:
        return bool(_names(self.out, "invocations/*.json") - self.invocations)

    def new_staged(self) -> bool:
        return bool(_names(self.out, "_staging/*/input/*.parquet") - self.staged)

    def new_part(self) -> bool:
        return bool(_names(self.out, "_staging/*/parts/*/*.parquet") - self.parts)

    def commits(self) -> int:
        return len(completion_records(self.out)) - self.records


def _names(out: Path, pattern: str) -> set[str]:
    return {str(p) for p in out.glob(pattern)}


def _staged(out: Path) -> list[str]:
    """Files under OUTPUT/_staging (what invocations staged and did not clean up)."""
    return sorted(str(p.relative_to(out)) for p in (out / "_staging").rglob("*") if p.is_file())


_staged_at: dict[int, float] = {}


def _staged_for(a: Attempt, seconds: float) -> bool:
    if a.new_staged():
        _staged_at.setdefault(a.proc.pid, time.monotonic())
    return a.proc.pid in _staged_at and time.monotonic() - _staged_at[a.proc.pid] >= seconds


# (moment, predicate): the driver is killed as soon as the predicate holds
MOMENTS: list[tuple[str, Callable[[Attempt], bool]]] = [
    ("starting the interpreter (0.5 s)", lambda a: a.elapsed() >= 0.5),
    ("imports / preflight / plan (2.5 s)", lambda a: a.elapsed() >= 2.5),
    ("lock just taken", Attempt.lock_mine),
    ("invocation recorded", Attempt.new_invocation),
    ("inputs staged", Attempt.new_staged),
    ("graph starting (staged + 3 s)", lambda a: _staged_for(a, 3.0)),
    ("rows written, shard not yet committed", Attempt.new_part),
    ("first commit", lambda a: a.commits() >= 1),
    ("second commit", lambda a: a.commits() >= 2),
    ("every shard committed, driver finishing", lambda a: a.records + a.commits() >= N_ROWS),
]


def _check_committed(out: Path, reference: dict[str, str]) -> None:
    """What a kill leaves: complete files only, a record only beside its file, committed text = the clean run's."""
    import pyarrow.parquet as pq

    for folder in ("transcripts", "shards"):
        for path in (out / folder).glob("*"):
            assert path.suffix in (".parquet", ".json"), f"the kill left {path.name} in {folder}/"
            if path.suffix == ".parquet":
                pq.read_table(path)
    for shard_id, rec in completion_records(out).items():
        assert (out / rec["file"]).is_file(), f"shard {shard_id} is recorded but its file is missing"
        assert pq.read_metadata(out / rec["file"]).num_rows == rec["rows"]
    _check_output(out, reference, complete=False)


def test_driver_killed_at_ten_moments_then_rerun_gives_the_clean_result(
    cluster: Cluster, speech: dict[str, Any], reference: dict[str, str], tmp_path: Path
):
    out = tmp_path / "out"
    args = ("run", speech["manifest"], "-o", out, *cluster.settings)
    history = []
    for i, (moment, ready) in enumerate(MOMENTS):
        before = len(completion_records(out))
        proc = cluster.start(*args, log=tmp_path / f"attempt-{i}.log")
        a = Attempt(out, proc, time.monotonic(), before, _names(out, "invocations/*.json"),
                    _names(out, "_staging/*/input/*.parquet"), _names(out, "_staging/*/parts/*/*.parquet"))
        try:
            hit = wait_until(lambda ready=ready, a=a: ready(a), proc, poll=0.02)
        finally:
            running = sigkill(proc)
        history.append((moment, hit and running, round(a.elapsed(), 1), before, len(completion_records(out))))
        _check_committed(out, reference)
    for moment, live, seconds, before, after in history:
        print(f"  killed at {moment:42s} live={live!s:5s} after {seconds:5.1f} s; shards {before} -> {after}")
    missed = [h[0] for h in history if not h[1]]
    assert not missed, f"the driver was not alive at these moments (nothing was interrupted): {missed}"

    t0 = time.monotonic()
    proc = whisper_batch_ok(*args, env=cluster.env)
    print(f"  final rerun: {time.monotonic() - t0:.0f} s")
    _check_output(out, reference)
    assert sorted(completion_records(out)) == list(range(N_ROWS))
    assert not (out / "lock.json").exists(), "the finished run left its lock behind"
    assert not _staged(out), f"the finished run left the killed attempts' staging behind: {_staged(out)}"
    status = status_json(out)
    # attempts killed before they recorded an invocation leave none
    assert status["complete"] and status["rows_done"] == N_ROWS and 2 <= status["invocations"] <= len(MOMENTS) + 1
    assert "Traceback" not in output_of(proc)


# --- 2. hung decodes and model calls ----------------------------------------------------------------------------


def test_hung_decode_and_model_call_stall_is_reported_then_time_out_as_error_rows(
    cluster: Cluster, speech: dict[str, Any], reference: dict[str, str], tmp_path: Path
):
    fifo = tmp_path / "never-written.wav"  # opening a FIFO nobody writes blocks forever: a decode that hangs
    os.mkfifo(fifo)
    rows = [dict(r) for r in speech["rows"][:2]]
    rows.append({"id": "decode-hangs", "audio_filepath": str(fifo)})
    rows.append({"id": f"{HANG_TAG}-model", "audio_filepath": speech["rows"][2]["audio_filepath"]})
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows, base=speech["folder"])
    out = tmp_path / "out"
    args = ("run", manifest, "-o", out, *cluster.settings)

    t0 = time.monotonic()
    stalled = whisper_batch(*args, "--set", "ray.stall_timeout_seconds=10", env=cluster.env)
    message = output_of(stalled)
    print(f"stalled run: exit {stalled.returncode} after {time.monotonic() - t0:.0f} s")
    assert stalled.returncode != 0, f"a run with a hung decode finished?\n{message[-3000:]}"
    errors = [line for line in message.splitlines() if line.startswith("Error:")]
    assert errors and "no progress for" in errors[0] and "stall_timeout_seconds" in errors[0], message[-3000:]
    assert "Traceback" not in message, f"the stall surfaced with a traceback:\n{message[-3000:]}"
    kept = completion_records(out)
    assert set(kept) <= {0, 1}, f"shards of hung rows were committed: {sorted(kept)}"

    t0 = time.monotonic()
    done = whisper_batch_ok(*args, "--set", "audio.decode_timeout_seconds=5", "--set", "model.timeout_seconds=5",
                            env=cluster.env)
    print(f"rerun with 5 s timeouts: {time.monotonic() - t0:.0f} s")
    by_id = {r["id"]: r for r in read_rows(out)}
    assert count_ids(read_rows(out)) == {r["id"]: 1 for r in rows}
    assert by_id["decode-hangs"]["error"].startswith("timeout:"), by_id["decode-hangs"]["error"]
    assert by_id[f"{HANG_TAG}-model"]["error"].startswith("timeout:"), by_id[f"{HANG_TAG}-model"]["error"]
    for r in rows[:2]:
        assert by_id[r["id"]]["error"] is None and by_id[r["id"]]["text"] == reference[r["id"]]
    for shard_id, rec in kept.items():  # what the stalled run committed was kept, not redone
        assert completion_records(out)[shard_id]["finished_at"] == rec["finished_at"]
    status = status_json(out)
    assert status["complete"] and status["failures_by_cause"] == {"timeout": 2}, status
    assert not _staged(out), f"the finished run left the stalled run's staging behind: {_staged(out)}"
    assert "Traceback" not in output_of(done)


# --- 2 and 5. S3 through a faulty proxy, and credentials ----------------------------------------------------------


@dataclass
class S3:
    port: int

    @property
    def upstream(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def fs(self):
        """A filesystem talking to moto directly (not through any proxy)."""
        import s3fs

        return s3fs.S3FileSystem(key=CANARY_KEY, secret=CANARY_SECRET, skip_instance_cache=True,
                                 use_listings_cache=False, client_kwargs={"endpoint_url": f"http://127.0.0.1:{self.port}"})

    def options(self, endpoint: str) -> dict[str, Any]:
        return {"key": CANARY_KEY, "secret": CANARY_SECRET, "client_kwargs": {"endpoint_url": endpoint}}


@pytest.fixture(scope="module")
def s3() -> S3:
    with moto_s3() as endpoint:
        s = S3(int(endpoint.rsplit(":", 1)[1]))
        s.fs().mkdir(BUCKET)
        yield s


def _s3_config(path: Path, options: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"storage": {"storage_options": options}}))
    return path


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode(errors="replace") if isinstance(text, str) else text
    return [c for c in (CANARY_KEY, CANARY_SECRET) if c.encode() in data]


def test_s3_connections_reset_cut_or_stalled_are_retried_and_nothing_is_lost(
    cluster: Cluster, speech: dict[str, Any], reference: dict[str, str], s3: S3, tmp_path: Path
):
    fs = s3.fs()
    for r in speech["rows"]:
        fs.put_file(str(speech["folder"] / r["audio_filepath"]), f"{BUCKET}/in/{r['audio_filepath']}")
    rows = speech["rows"] + [{"id": "missing-object", "audio_filepath": "gone.wav"}]
    fs.pipe_file(f"{BUCKET}/in/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = f"s3://{BUCKET}/out"
    # every 5th request fails; the lock's exclusive create is spared (a lost answer to it is tested on its own)
    with TcpProxy(s3.upstream, every=5, faults=("reset", "truncate", "stall"), stall_seconds=1.5,
                  spare=b"lock.json") as proxy:
        config = _s3_config(tmp_path / "s3.yaml", s3.options(proxy.url))
        t0 = time.monotonic()
        proc = whisper_batch("-v", "run", f"s3://{BUCKET}/in/manifest.jsonl", "-o", out, "--config", config,
                             *cluster.settings, env=cluster.env)
        seconds = time.monotonic() - t0
        status_text = whisper_batch_ok("status", out, "--config", config)
        status = whisper_batch_ok("-v", "status", out, "--json", "--config", config)
    print(f"S3 run through the proxy: exit {proc.returncode}, {seconds:.0f} s, {proxy.connections} connections, "
          f"faults injected {dict(proxy.faults)}")
    assert proc.returncode == 0, f"the run did not survive the faults:\n{output_of(proc)[-4000:]}"
    assert min(proxy.faults[k] for k in ("reset", "truncate", "stall")) >= 3, dict(proxy.faults)

    import pyarrow.parquet as pq

    got = []
    for key in sorted(fs.glob(f"{BUCKET}/out/transcripts/*.parquet")):
        with fs.open(key, "rb") as f:
            got += pq.read_table(f).to_pylist()
    assert count_ids(got) == {r["id"]: 1 for r in rows}
    by_id = {r["id"]: r for r in got}
    for row_id, text in reference.items():
        assert by_id[row_id]["error"] is None and by_id[row_id]["text"] == text, by_id[row_id]
    assert by_id["missing-object"]["error"].startswith("not found:"), by_id["missing-object"]["error"]
    st = json.loads(status.stdout)
    assert st["complete"] and st["rows_done"] == len(rows) and st["failures_by_cause"] == {"not found": 1}

    # credentials: not in the run's output, OUTPUT's objects, status, the rows' errors, or the cluster's logs
    places = {"run output": output_of(proc), "status": output_of(status_text) + output_of(status)}
    for key in fs.find(f"{BUCKET}/out"):
        places[key] = fs.cat_file(key)
    for path in cluster.temp_dir.rglob("*"):
        if path.is_file() and "logs" in path.parts:
            places[str(path)] = path.read_bytes()
    leaked = {where: found for where, data in places.items() if (found := _leaks(data))}
    assert not leaked, f"credentials found in {leaked}"
    assert len(places) > 10


def test_credentials_stay_out_of_errors(s3: S3, tmp_path: Path):
    config = _s3_config(tmp_path / "s3.yaml", s3.options(f"http://127.0.0.1:{s3.port}"))
    s3.fs().pipe_file(f"{BUCKET}/err/manifest.jsonl", b'{"id": "a", "audio_filepath": "a.wav"}\n')
    cases = {
        "missing bucket": ("run", f"s3://{BUCKET}/err/manifest.jsonl", "-o", "s3://no-such-bucket-wb/out"),
        "missing input": ("run", f"s3://{BUCKET}/nothing/manifest.jsonl", "-o", f"s3://{BUCKET}/err/out"),
        "no run there": ("status", f"s3://{BUCKET}/err/out"),
    }
    for case, args in cases.items():
        proc = whisper_batch("-v", *args, "--config", config, timeout=120)
        assert proc.returncode != 0, f"{case}: {output_of(proc)[-2000:]}"
        assert not _leaks(output_of(proc)), f"{case}: credentials in\n{output_of(proc)[-3000:]}"
        assert "Traceback" not in output_of(proc), f"{case}:\n{output_of(proc)[-3000:]}"


def test_credentials_stay_out_of_debug_logs(s3: S3, tmp_path: Path):
    config = _s3_config(tmp_path / "s3.yaml", s3.options(f"http://127.0.0.1:{s3.port}"))
    s3.fs().pipe_file(f"{BUCKET}/debug/plan.json", b"{}")
    proc = whisper_batch("-vv", "status", f"s3://{BUCKET}/debug", "--config", config, timeout=120)
    text = output_of(proc)
    assert "DEBUG" in text, "-vv printed no debug log"
    lines = [line[:300] for line in text.splitlines() if _leaks(line)]
    assert not lines, f"-vv logs credentials ({len(lines)} lines), e.g.:\n" + "\n".join(lines[:3])


def test_s3_lock_taken_despite_a_lost_answer_to_its_exclusive_create(s3: S3):
    from whisper_batch.jobs.lock import LockHeld, RunLock
    from whisper_batch.pipeline.layout import RunLayout

    # the first PUT of lock.json reaches S3 (the lock is created) but its answer is lost; the client retries
    with TcpProxy(s3.upstream, every=10**9, first=0, faults=("truncate",),
                  match=f"PUT /{BUCKET}/lost-answer/out/lock.json".encode()) as proxy:
        layout = RunLayout(f"s3://{BUCKET}/lost-answer/out", s3.options(proxy.url))
        lock = RunLock(layout, "inv-1")
        try:
            lock.acquire()
        except LockHeld as e:
            pytest.fail(f"a driver was refused by its own lock after one lost answer: {e}")
        finally:
            lock.release()
    assert proxy.faults["truncate"] == 1
