"""``python -m benchmarks.chaos``: one `whisper-batch run` on a loopback Ray cluster while a seeded schedule injects
faults one after another, then the bars it must meet.

The cluster is the tests' (tests/integration/ray_cluster.py): a head and worker nodes on 127.0.0.1, each a
``ray start --block`` in a process group of its own. The input is the eval manifest repeated to ``--minutes`` of
audio, served from a real S3 (moto's server, tests/servers.py) through the tests' TCP fault proxy
(tests/integration/tcp_proxy.py); the output is a local folder; ``model.dtype=float32`` so that texts are
deterministic; small shards so that commits come throughout the run.

Faults (``--faults`` of them, in a seeded order, each one injected only after the previous one's recovery showed
as a new commit, spread over the run's shards):

- ``node_kill``: a worker node's whole process group SIGKILLed (a spot preemption), and a new node started;
- ``actor_kill``: one model actor's process SIGKILLed;
- ``s3_faults``: every S3 connection reset (open ones at once, new ones as they come) for ``--s3-seconds``, then
  every connection stalled for as long;
- ``driver_kill``: the driver's process group SIGKILLed and left unreaped (a zombie, as under a container's PID 1
  that reaps nothing), and the same command run again at once: its lock must be taken over at once, not refused;
- ``node_join``: a node started mid-run (it should receive actors).

Measured per fault: when it was injected, the time from then to the next commit (the time lost, roughly: it
includes the ordinary time to a commit), and the rows redone: rows whose model work began in more than one process
(every model call records its row ids through a ``ray.worker_setup_hook``, :func:`install_ledger`), each repeat
counted against the last fault injected before it. Bars: the run completes with at most one rerun per driver kill;
every row exactly once; texts equal to a reference (the quick in-process path on the unique files, one torch thread
as the model actors have; or ``--reference clean``: a clean run on the same cluster); ``whisper-batch verify`` clean;
no hang (no invocation needed the harness's time limit, every fault recovered within ``--recover-limit``); each
driver kill's rerun took the lock at once. Exit status 1 when a bar fails.

Everything this starts (nodes, drivers, the proxy, the S3 server) is stopped by pid in ``finally``; ``ray stop`` is
never used. Needs the test extras (moto[server], pytest) and ../shared/data/eval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Nothing heavy at the top: Ray workers import this module for install_ledger.
REPO = Path(__file__).resolve().parents[1]
EVAL_MANIFEST = REPO.parent / "shared" / "data" / "eval" / "manifest.jsonl"
LEDGER_ENV = "WB_CHAOS_LEDGER"  # the nodes' environment: the file every model call appends its row ids to
KINDS = ("node_kill", "actor_kill", "s3_faults", "driver_kill", "node_join")
MODEL_ACTOR = "ArrowTranscriber"  # in a model actor's process title
FEATURE_ACTOR = "ArrowFeaturizer"
BUCKET = "chaos"
KEY_ID, SECRET = "AKIACHAOS00000000001", "wb-chaos-secret"
REFUSED = "another whisper-batch run is active"
S3_ARM_S = 60.0  # an armed S3 fault starts at the next request, or after this long without one


# --- the ledger: runs in the model actors ------------------------------------------------------------------------


def record_model_call(ids: list[str], n_windows: int) -> None:
    """A model-call hook (pipeline/faults.py): appends ``{t, pid, ids}`` to the file ``$WB_CHAOS_LEDGER`` names."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "ids": sorted(set(ids))}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of one line with O_APPEND: lines of many processes never interleave
    finally:
        os.close(fd)


def install_ledger() -> None:
    """``ray.worker_setup_hook=benchmarks.chaos.install_ledger``: every model call records its rows."""
    from whisper_batch.pipeline import faults

    if record_model_call not in faults.model_call_hooks:
        faults.model_call_hooks.append(record_model_call)


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by a process killed mid-write
            continue
    return sorted(events, key=lambda e: e["t"])


def redone_rows(events: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(time, row id) of every repeat: a row whose model work begins in a process other than the ones that began it
    before (a row decoded in several batches of one call, in one process, is one piece of work)."""
    seen: dict[str, set[int]] = defaultdict(set)
    repeats = []
    for e in events:
        for row_id in e["ids"]:
            pids = seen[row_id]
            if pids and e["pid"] not in pids:
                repeats.append((e["t"], row_id))
            pids.add(e["pid"])
    return repeats


# --- the S3 fault proxy ------------------------------------------------------------------------------------------


def chaos_proxy(upstream: tuple[str, int]):
    """The tests' TcpProxy (no faults until :meth:`window`), that can also reset the connections open at the
    moment and hold every open connection's bytes while a stall lasts."""
    from tests.integration.tcp_proxy import TcpProxy, _reset

    class ChaosProxy(TcpProxy):
        def __init__(self) -> None:
            super().__init__(upstream, every=0)
            self.open: set = set()
            self.held = threading.Event()  # while set, no byte goes through an open connection
            self.reset_open = 0

        def _handle(self, client) -> None:
            with self._lock:
                self.open.add(client)
            try:
                super()._handle(client)
            finally:
                with self._lock:
                    self.open.discard(client)

        def _before_send(self) -> None:  # the bytes are held while a stall lasts
            while self.held.is_set() and not self._stop.is_set():
                time.sleep(0.05)

        def window(self, kind: str, seconds: float) -> dict[str, int]:
            """``kind`` ("reset" or "stall") on every connection for ``seconds``, and longer if no connection came
            (until one does, within ``S3_ARM_S``); returns the faults injected."""
            before = dict(self.faults)
            with self._lock:
                self.kinds, self.stall_seconds = (kind,), seconds
                self.first, self.every = self.matched, 1
                victims = list(self.open) if kind == "reset" else []
                held = len(self.open) if kind == "stall" else 0
            if kind == "stall":
                self.held.set()
            for sock in victims:
                _reset(sock)
            self.reset_open += len(victims)
            start, first = time.monotonic(), self.first
            self._stop.wait(seconds)
            # a window that met no connection goes on until one comes (within S3_ARM_S): the fault is injected
            while (not victims and not held and self.matched == first and time.monotonic() - start < S3_ARM_S
                   and not self._stop.is_set()):
                time.sleep(0.05)
            with self._lock:
                self.every = 0
            self.held.clear()
            got = {k: self.faults[k] - before.get(k, 0) for k in self.faults}
            if victims:
                got["reset (open)"] = len(victims)
            if held:
                got["held (open)"] = held
            return {k: v for k, v in got.items() if v}

    return ChaosProxy()


# --- the corpus --------------------------------------------------------------------------------------------------


def corpus_rows(manifest: Path, minutes: float, folder: Path) -> list[dict[str, Any]]:
    """The manifest's rows repeated (benchmarks.bench.repeat_manifest: ids ``ID#k``, paths resolved), cut once
    ``minutes`` of audio are reached."""
    from benchmarks.bench import repeat_manifest

    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    total = sum(float(r["duration"]) for r in rows)
    path = repeat_manifest(str(manifest), max(1, math.ceil(minutes * 60 / total)), str(folder))
    out, seconds = [], 0.0
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        out.append(row)
        seconds += float(row["duration"])
        if seconds >= minutes * 60:
            break
    return out


def upload_corpus(endpoint: str, rows: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    """Each distinct audio file once into s3://chaos/audio/, and the manifest (relative paths, no offset or duration:
    whole files, as the quick reference reads them) as s3://chaos/manifest.jsonl; returns its URI and id -> file."""
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, skip_instance_cache=True, use_listings_cache=False,
                           client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    keys: dict[str, str] = {}
    lines, files = [], {}
    for r in rows:
        local = r["audio_filepath"]
        if local not in keys:
            keys[local] = f"audio/{len(keys):04d}{Path(local).suffix}"
            fs.put_file(local, f"{BUCKET}/{keys[local]}")
        lines.append(json.dumps({"id": r["id"], "audio_filepath": keys[local], "text": r.get("text")}))
        files[r["id"]] = local
    fs.pipe_file(f"{BUCKET}/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return f"s3://{BUCKET}/manifest.jsonl", files


def quick_reference(files: list[str], timeout: float) -> dict[str, str]:
    """file -> text by the quick path (whisper_batch.transcribe: this process's Featurizer and Transcriber, no Ray),
    fp32 with one torch thread as each CPU model actor has, in a child process bounded by ``timeout``."""
    code = (
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "import whisper_batch\n"
        "files = json.load(sys.stdin)\n"
        "rows = whisper_batch.transcribe(files, language='en', model__dtype='float32', model__device='cpu')\n"
        "print(json.dumps({f: (r['error'] or r['text']) for f, r in zip(files, rows)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(files), capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"the quick reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    after_commit: int  # injected once this many shards are committed (and the previous fault recovered)
    delay_s: float  # and this long after that
    at: float | None = None  # seconds after the run's start
    end: float | None = None  # when the fault's action ended (the S3 windows last a while)
    recovered: float | None = None  # the first commit after `end`
    rows_redone: int = 0
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def lost_s(self) -> float | None:
        return None if self.at is None or self.recovered is None else self.recovered - self.at


@dataclass
class Invocation:
    proc: subprocess.Popen
    log: Path
    started: float
    reason: str  # "first", "after driver_kill", "rerun after exit N"
    ended: float | None = None
    rc: int | None = None
    killed_by: str | None = None  # "driver_kill" or "harness timeout"
    lock_s: float | None = None  # from its start until it held the lock (lock.json, or its invocation record)
    wall: float = field(default_factory=time.time)
    refused: bool = False
    state_at_takeover: str | None = None  # a killed driver's process state when its successor held the lock


def make_schedule(seed: int, n_faults: int, kinds: list[str] | None, shards: int) -> list[Fault]:
    """``n_faults`` faults in a seeded order (every kind once, then seeded extra kills/resets), each due at a commit
    count spread over the run's ``shards``."""
    rng = random.Random(seed)
    if kinds:
        picked = list(kinds)
    else:
        picked = list(KINDS)[:n_faults]
        picked += [rng.choice(("node_kill", "actor_kill", "s3_faults")) for _ in range(n_faults - len(picked))]
        rng.shuffle(picked)
    n = len(picked)
    faults = []
    for i, kind in enumerate(picked):
        due = round((i + 1) * shards / (n + 1.5)) + rng.choice((-1, 0, 0, 1))
        faults.append(Fault(kind, max(1, min(due, shards - 2)), round(rng.uniform(0.0, 3.0), 1)))
    return faults


class Chaos:
    """One faulted run: the cluster, the proxy, the drivers, the commits seen, the faults."""

    def __init__(self, cluster, proxy, args: list[str], out: Path, work: Path, faults: list[Fault], rng: random.Random,
                 s3_seconds: float, budget_s: float, max_extra_reruns: int = 1):
        self.cluster, self.proxy, self.args, self.out, self.work = cluster, proxy, args, out, work
        self.faults, self.rng, self.s3_seconds, self.budget_s = faults, rng, s3_seconds, budget_s
        self.max_extra_reruns = max_extra_reruns
        self.invocations: list[Invocation] = []
        self.commits: dict[int, float] = {}  # shard id -> seconds after t0 when its record was first seen
        self.t0 = time.monotonic()
        self.joined: list[tuple[Fault, Any]] = []  # node_join / node_kill replacement nodes, with their fault
        self.model_seen: dict[str, int] = {}  # node name -> most model actors seen alive there at once
        self.feature_seen: dict[str, int] = {}
        self._s3_thread: threading.Thread | None = None
        self._polls = 0
        self.timed_out = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- drivers ---

    def start_driver(self, reason: str) -> Invocation:
        from tests.integration.conftest import start_whisper_batch
        from tests.integration.test_cluster import ENV

        log = self.work / f"driver-{len(self.invocations)}.log"
        inv = Invocation(start_whisper_batch(*self.args, log=log, env=ENV), log, self.now(), reason)
        self.invocations.append(inv)
        return inv

    @property
    def driver(self) -> Invocation:
        return self.invocations[-1]

    def _lock_pid(self) -> int | None:
        try:
            return int(json.loads((self.out / "lock.json").read_text()).get("pid", -1))
        except (OSError, ValueError):
            return None

    def _recorded_start(self, inv: Invocation) -> float | None:
        """Seconds from ``inv``'s start to its invocation record's ``started_at`` (written under the lock), for a
        driver that held the lock too briefly for a sample to see it."""
        from datetime import datetime

        for path in sorted((self.out / "invocations").glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("pid") == inv.proc.pid and record.get("started_at"):
                return datetime.fromisoformat(record["started_at"]).timestamp() - inv.wall
        return None

    # --- sampling ---

    def poll(self) -> None:
        folder = self.out / "shards"
        if folder.is_dir():
            for p in folder.glob("*.json"):
                if p.stem.isdigit() and int(p.stem) not in self.commits:
                    self.commits[int(p.stem)] = self.now()
        inv = self.driver
        if inv.lock_s is None and self._lock_pid() == inv.proc.pid:
            inv.lock_s = self.now() - inv.started
        self._polls += 1
        if self._polls % 4:  # the nodes' actors once a second: a scan of /proc per node
            return
        for node in self.cluster.nodes:
            if not node.killed and node.proc.poll() is None:
                self.model_seen[node.name] = max(self.model_seen.get(node.name, 0), node.live_actors(MODEL_ACTOR))
                self.feature_seen[node.name] = max(self.feature_seen.get(node.name, 0),
                                                   node.live_actors(FEATURE_ACTOR))

    def commits_after(self, t: float) -> list[float]:
        return sorted(c for c in self.commits.values() if c > t)

    # --- faults ---

    def inject(self, fault: Fault) -> None:
        fault.at = self.now()
        getattr(self, f"_{fault.kind}")(fault)
        if fault.end is None and fault.kind != "s3_faults":
            fault.end = self.now()
        print(f"[{fault.at:7.1f} s] {fault.kind}: {fault.note}", flush=True)

    def _model_actor_pids(self) -> list[tuple[Any, int]]:
        found = []
        for node in self.cluster.nodes:
            if node.killed or node.proc.poll() is not None:
                continue
            for pid in sorted(node.pids):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::") and MODEL_ACTOR in title:
                    found.append((node, pid))
        return found

    def _node_kill(self, fault: Fault) -> None:
        workers = [n for n in self.cluster.nodes[1:] if not n.killed and n.proc.poll() is None
                   and "Ray runtime started" in n.log.read_text(errors="replace")]
        if not workers:
            fault.note = "no worker node alive to kill"
            return
        with_model = [n for n in workers if n.live_actors(MODEL_ACTOR)]
        victim = self.rng.choice(with_model or workers)
        actors = victim.live_actors(MODEL_ACTOR), victim.live_actors(FEATURE_ACTOR)
        n = victim.kill()
        new = self.cluster.add_node(num_cpus=1, timeout=0)
        self.joined.append((fault, new))
        fault.note = (f"{victim.name} SIGKILLed ({n} processes: {actors[0]} model, {actors[1]} feature actor(s)); "
                      f"{new.name} started")
        fault.detail.update(node=victim.name, processes=n, model_actors=actors[0], feature_actors=actors[1],
                            replacement=new.name)

    def _actor_kill(self, fault: Fault) -> None:
        found = self._model_actor_pids()
        if not found:
            fault.note = "no model actor alive to kill"
            return
        node, pid = self.rng.choice(found)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fault.note = f"model actor pid {pid} on {node.name} SIGKILLed"
        fault.detail.update(pid=pid, node=node.name)

    def _s3_faults(self, fault: Fault) -> None:
        """Armed now; the windows start with the next S3 request (or an open connection), within ``S3_ARM_S``: the
        feature actors fetch a shard's audio in bursts, a few shards ahead of the commits."""

        def windows() -> None:
            armed, seen = time.monotonic(), self.proxy.connections
            while (self.proxy.connections == seen and not self.proxy.open and time.monotonic() - armed < S3_ARM_S
                   and self.driver.rc is None):
                time.sleep(0.02)
            waited = time.monotonic() - armed
            fault.at = self.now()  # injected when the windows start
            got = {"reset": self.proxy.window("reset", self.s3_seconds)}
            stalled = self.proxy.faults["stall"]
            got["stall"] = self.proxy.window("stall", self.s3_seconds)
            fault.end = self.now()
            # a connection stalled in the window is counted as it is reset, up to s3_seconds after the window
            time.sleep(self.s3_seconds + 0.5)
            got["stall"]["stall"] = self.proxy.faults["stall"] - stalled
            got["stall"] = {k: v for k, v in got["stall"].items() if v}
            fault.detail.update(got, waited_for_traffic_s=round(waited, 1))
            fault.note = (f"{self.s3_seconds:g} s of resets ({_counts(got['reset'])}), then {self.s3_seconds:g} s "
                          f"of stalls ({_counts(got['stall'])}), from the first S3 request {waited:.1f} s after "
                          f"it was armed")

        self._s3_thread = threading.Thread(target=windows, name="s3-faults", daemon=True)
        self._s3_thread.start()
        fault.note = "S3 resets then stalls (armed)"

    def _driver_kill(self, fault: Fault) -> None:
        old = self.driver
        try:
            os.killpg(old.proc.pid, signal.SIGKILL)  # not reaped until the rerun holds the lock: a zombie till then
        except ProcessLookupError:
            pass
        old.killed_by, old.ended = "driver_kill", self.now()
        new = self.start_driver("after driver_kill")
        fault.note = f"driver pid {old.proc.pid} SIGKILLed (left a zombie); the same command rerun at once"
        fault.detail.update(killed_pid=old.proc.pid, rerun_pid=new.proc.pid)

    def _node_join(self, fault: Fault) -> None:
        new = self.cluster.add_node(num_cpus=1, timeout=0)
        self.joined.append((fault, new))
        fault.note = f"{new.name} started"
        fault.detail.update(node=new.name)

    # --- the loop ---

    def run(self) -> None:
        self.start_driver("first")
        pending = list(self.faults)
        current: Fault | None = None
        due_at: float | None = None
        deadline = self.t0 + self.budget_s
        while True:
            self.poll()
            inv = self.driver
            for old in self.invocations[:-1]:  # reap the killed drivers once the rerun holds the lock
                if old.rc is None and (inv.lock_s is not None or inv.proc.poll() is not None):
                    old.state_at_takeover = _proc_state(old.proc.pid)
                    old.rc = old.proc.wait(timeout=30)
            if inv.proc.poll() is not None:
                inv.rc, inv.ended = inv.proc.returncode, self.now()
                inv.refused = REFUSED in inv.log.read_text(errors="replace")
                if inv.lock_s is None:
                    inv.lock_s = self._recorded_start(inv)
                if inv.rc == 0:
                    break
                extra = sum(1 for i in self.invocations if i.reason.startswith("rerun after exit"))
                if extra >= self.max_extra_reruns:
                    break
                print(f"[{self.now():7.1f} s] the driver exited {inv.rc}: the same command again", flush=True)
                self.start_driver(f"rerun after exit {inv.rc}")
                continue
            if time.monotonic() > deadline:
                self.timed_out = True
                inv.killed_by = "harness timeout"
                os.killpg(inv.proc.pid, signal.SIGKILL)
                inv.rc, inv.ended = inv.proc.wait(timeout=30), self.now()
                print(f"[{self.now():7.1f} s] the run did not end within {self.budget_s:g} s: killed", flush=True)
                break
            if current is not None and current.end is not None and current.recovered is None:
                after = self.commits_after(current.end)
                if after:
                    current.recovered = after[0]
                    print(f"[{self.now():7.1f} s] {current.kind}: recovered, next commit {current.lost_s:.1f} s "
                          f"after the injection", flush=True)
            if pending and (current is None or current.recovered is not None):
                nxt = pending[0]
                if len(self.commits) >= nxt.after_commit:
                    due_at = due_at if due_at is not None else self.now() + nxt.delay_s
                    if self.now() >= due_at:
                        current, due_at = pending.pop(0), None
                        self.inject(current)
            time.sleep(0.25)
        if self._s3_thread is not None:
            self._s3_thread.join(timeout=60)
        self.poll()
        for fault in self.faults:  # a recovery the last samples saw; else the run's end, when nothing was left to do
            if fault.at is not None and fault.end is not None and fault.recovered is None:
                after = self.commits_after(fault.end)
                if after:
                    fault.recovered = after[0]
                elif self.driver.rc == 0:
                    fault.recovered = self.driver.ended
                    fault.note += "; no shard was left to commit after it: recovery counted at the run's end"
        for old in self.invocations:
            if old.rc is None:
                old.rc = old.proc.wait(timeout=30)
        for fault, node in self.joined:
            fault.detail["joined_model_actors"] = self.model_seen.get(node.name, 0)
            fault.detail["joined_feature_actors"] = self.feature_seen.get(node.name, 0)
            fault.note += (f"; {node.name} ran {self.model_seen.get(node.name, 0)} model, "
                           f"{self.feature_seen.get(node.name, 0)} feature actor(s)")
        for k, inv in enumerate(self.invocations):
            if inv.reason == "after driver_kill":
                for fault in self.faults:
                    if fault.detail.get("rerun_pid") == inv.proc.pid:
                        fault.detail["lock_taken_s"] = inv.lock_s
                        fault.detail["refused"] = inv.refused
                        fault.note += ("; rerun refused by the lock" if inv.refused else
                                       f"; the rerun took the lock {inv.lock_s:.1f} s after it started"
                                       if inv.lock_s is not None else "; the rerun never took the lock")
                        state = self.invocations[k - 1].state_at_takeover
                        fault.detail["killed_driver_state"] = state
                        if state == "Z":
                            fault.note += "; the killed driver was a zombie (unreaped) then"

    def attribute_redone(self, ledger: Path, shard_of: dict[str, int]) -> tuple[int, int]:
        """Counts each repeated row against the last fault injected before it, and notes when the last shard holding
        a fault's repeated rows committed; returns (all repeats, repeats before any fault)."""
        repeats = redone_rows(read_ledger(ledger))
        wall0 = time.time() - self.now()  # the ledger's clock is the wall clock
        injected = sorted((f for f in self.faults if f.at is not None), key=lambda f: f.at)
        unattributed = 0
        redone: dict[int, set[str]] = defaultdict(set)
        for t, row_id in repeats:
            owner = None
            for k, f in enumerate(injected):
                if f.at <= t - wall0:
                    owner = k
            if owner is None:
                unattributed += 1
            else:
                injected[owner].rows_redone += 1
                redone[owner].add(row_id)
        for k, ids in redone.items():
            f = injected[k]
            done = [self.commits[shard_of[i]] for i in ids if shard_of.get(i) in self.commits]
            f.detail["redone_ids"] = sorted(ids)[:20]
            if done:
                f.detail["redone_committed_s"] = round(max(done) - f.at, 1)
                f.note += f"; its redone rows were committed {max(done) - f.at:.1f} s after it"
        return len(repeats), unattributed


def _proc_state(pid: int) -> str:
    """"Z" for a zombie, "gone", or the state letter of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _counts(got: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in got.items()) or "no connection came"


# --- checks and the table ----------------------------------------------------------------------------------------


def check_output(out: Path, ids: list[str], reference: dict[str, str]) -> dict[str, Any]:
    from tests.integration.conftest import count_ids, output_of, read_rows, whisper_batch

    rows = read_rows(out)
    counts = count_ids(rows)
    missing = [i for i in ids if i not in counts]
    doubled = {i: n for i, n in counts.items() if n > 1}
    stray = [i for i in counts if i not in set(ids)]
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    texts = {r["id"]: r["text"] for r in rows}
    differ = {i: {"got": texts[i], "reference": reference.get(i)} for i in texts
              if i in reference and texts[i] != reference[i]}
    verify = whisper_batch("verify", out, timeout=300)
    return {
        "rows": len(rows), "expected": len(ids), "missing": missing[:20], "n_missing": len(missing),
        "doubled": dict(list(doubled.items())[:20]), "n_doubled": len(doubled), "stray": stray[:20],
        "errors": dict(list(errors.items())[:20]), "n_errors": len(errors),
        "texts_differ": dict(list(differ.items())[:10]), "n_texts_differ": len(differ),
        "verify_rc": verify.returncode, "verify": output_of(verify).strip().splitlines()[-5:],
    }


def table(faults: list[Fault]) -> str:
    head = f"{'fault':<12} {'at s':>7} {'time lost s':>11} {'rows redone':>11}  note"
    lines = [head, "-" * len(head)]
    for f in faults:
        at = "-" if f.at is None else f"{f.at:.1f}"
        lost = "-" if f.lost_s is None else f"{f.lost_s:.1f}"
        note = f.note if f.at is not None else f"not injected (due after commit {f.after_commit})"
        lines.append(f"{f.kind:<12} {at:>7} {lost:>11} {f.rows_redone:>11}  {note}")
    return "\n".join(lines)


def chaos(seed: int = 0, minutes: float = 20.0, n_faults: int = 6, kinds: list[str] | None = None,
          shard_size: int = 4, s3_seconds: float = 4.0, reference: str = "quick", budget_s: float = 1500.0,
          recover_limit: float = 150.0, lost_node_timeout: float = 120.0, stall_timeout: float = 300.0,
          manifest: Path = EVAL_MANIFEST, keep: Path | None = None, extra_sets: list[str] | None = None
          ) -> dict[str, Any]:
    """The whole chaos run (see the module's docs); returns its figures and bars."""
    import shutil

    from tests.integration.conftest import read_rows, whisper_batch
    from tests.integration.ray_cluster import RayCluster
    from tests.integration.test_cluster import ENV, HEALTH_CHECKS
    from tests.servers import moto_s3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per S3 request
    if kinds and (unknown := [k for k in kinds if k not in KINDS]):
        raise ValueError(f"unknown fault kinds {unknown}; expected some of {KINDS}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wb-chaos-", dir=str(keep) if keep else None))
    rng = random.Random(seed)
    result: dict[str, Any] = {"seed": seed, "work": str(work)}
    t_start = time.monotonic()
    try:
        rows = corpus_rows(manifest, minutes, work)
        ids = [r["id"] for r in rows]
        audio_s = sum(float(r["duration"]) for r in rows)
        shards = math.ceil(len(rows) / shard_size)
        faults = make_schedule(seed, n_faults, kinds, shards)
        result.update(rows=len(rows), audio_minutes=round(audio_s / 60, 2), shards=shards,
                      schedule=[(f.kind, f.after_commit, f.delay_s) for f in faults])
        print(f"corpus: {len(rows)} rows, {audio_s / 60:.1f} min of audio, {shards} shards of {shard_size}; "
              f"schedule (kind, after commit, +s): {result['schedule']}", flush=True)

        files = sorted({r["audio_filepath"] for r in rows})
        if reference == "quick":
            t = time.monotonic()
            by_file = quick_reference(files, timeout=900)
            ref = {r["id"]: by_file[r["audio_filepath"]] for r in rows}
            result["reference_s"] = round(time.monotonic() - t, 1)
            print(f"reference: the quick path on {len(files)} files in {result['reference_s']} s", flush=True)

        with moto_s3() as endpoint:
            uri, _ = upload_corpus(endpoint, rows)
            proxy = chaos_proxy(("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))).start()
            ledger = work / "ledger.jsonl"
            env = {**os.environ, **ENV, **HEALTH_CHECKS, LEDGER_ENV: str(ledger),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            cluster = RayCluster(env=env)
            try:
                t = time.monotonic()
                cluster.start_head(num_cpus=1)
                cluster.add_node(num_cpus=1)
                cluster.add_node(num_cpus=1)
                result["cluster_start_s"] = round(time.monotonic() - t, 1)
                config = work / "s3.yaml"
                config.write_text(json.dumps({"storage": {"storage_options": {
                    "key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": proxy.url}}}}))
                sets = [f"ray.address={cluster.address}", "model.device=cpu", "model.dtype=float32",
                        "decode.language=en", f"manifest.shard_size={shard_size}",
                        f"ray.lost_node_timeout_seconds={lost_node_timeout:g}",
                        f"ray.stall_timeout_seconds={stall_timeout:g}",
                        "ray.worker_setup_hook=benchmarks.chaos.install_ledger", *(extra_sets or [])]

                def args(out: Path) -> list[str]:
                    flags = [a for s in sets for a in ("--set", s)]
                    return ["run", uri, "-o", str(out), "--config", str(config), *flags]

                if reference == "clean":
                    t = time.monotonic()
                    clean = whisper_batch(*args(work / "clean"), timeout=budget_s, env=ENV)
                    if clean.returncode:
                        raise RuntimeError(f"the clean run failed:\n{(clean.stdout + clean.stderr)[-3000:]}")
                    ref = {r["id"]: r["text"] for r in read_rows(work / "clean")}
                    result["reference_s"] = round(time.monotonic() - t, 1)
                    result["clean_run_s"] = result["reference_s"]
                    print(f"reference: a clean run on the cluster in {result['reference_s']} s", flush=True)
                    ledger.unlink(missing_ok=True)

                out = work / "out"
                run = Chaos(cluster, proxy, args(out), out, work, faults, rng, s3_seconds, budget_s)
                try:
                    run.run()
                finally:
                    for inv in run.invocations:
                        if inv.proc.poll() is None:
                            os.killpg(inv.proc.pid, signal.SIGKILL)
                            inv.proc.wait(timeout=30)
                result["run_s"] = round(run.now(), 1)
                shard_of = {r["id"]: r["shard_id"] for r in read_rows(out)}
                repeats, unattributed = run.attribute_redone(ledger, shard_of)
                result["checks"] = check_output(out, ids, ref)
            finally:
                cluster.stop()
                proxy.stop()
        driver_kills = sum(1 for f in faults if f.kind == "driver_kill" and f.at is not None)
        reruns = len(run.invocations) - 1
        kill_reruns = [i for i in run.invocations if i.reason == "after driver_kill"]
        checks = result["checks"]
        final = run.invocations[-1]
        bars = {
            "completes": final.rc == 0 and not run.timed_out,
            "reruns <= driver kills": reruns <= driver_kills,
            "every row exactly once": checks["n_missing"] == 0 and checks["n_doubled"] == 0 and not checks["stray"],
            "no error rows": checks["n_errors"] == 0,
            "texts equal the reference": checks["n_texts_differ"] == 0 and checks["n_missing"] == 0,
            "verify clean": checks["verify_rc"] == 0,
            "no hang": not run.timed_out and all(f.lost_s is not None and f.lost_s <= recover_limit
                                                  for f in faults if f.at is not None),
            "lock taken at once after each driver kill": all(not i.refused and i.lock_s is not None
                                                             and i.lock_s <= 60 for i in kill_reruns),
            "every scheduled fault injected": all(f.at is not None for f in faults),
        }
        gaps = sorted(b - a for a, b in zip(sorted(run.commits.values()), sorted(run.commits.values())[1:]))
        result.update(
            faults=[{**asdict(f), "lost_s": f.lost_s} for f in faults],
            invocations=[{"reason": i.reason, "started_s": round(i.started, 1), "ended_s": i.ended, "rc": i.rc,
                          "killed_by": i.killed_by, "lock_s": i.lock_s, "refused": i.refused, "pid": i.proc.pid}
                         for i in run.invocations],
            commits=len(run.commits), median_commit_gap_s=round(gaps[len(gaps) // 2], 1) if gaps else None,
            rows_redone=repeats, rows_redone_before_any_fault=unattributed,
            time_lost_s=round(sum(f.lost_s or 0 for f in faults), 1), reruns=reruns, driver_kills=driver_kills,
            proxy={"connections": proxy.connections, "faults": dict(proxy.faults), "reset_open": proxy.reset_open},
            bars=bars, ok=all(bars.values()), table=table(faults), total_s=round(time.monotonic() - t_start, 1),
        )
        return result
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _invocation_line(i: dict[str, Any]) -> str:
    line = f"{i['reason']}: rc {i['rc']}"
    if i["killed_by"]:
        line += f" ({i['killed_by']})"
    if i["lock_s"] is not None:
        line += f", lock after {i['lock_s']:.1f} s"
    return line + (", REFUSED by the lock" if i["refused"] else "")


def report(result: dict[str, Any]) -> str:
    lines = [
        f"chaos run, seed {result['seed']}: {result['rows']} rows, {result['audio_minutes']} min of audio, "
        f"{result['shards']} shards; faulted run {result['run_s']} s ({result['commits']} commits, median gap "
        f"{result['median_commit_gap_s']} s); reference {result.get('reference_s')} s; total {result['total_s']} s",
        "",
        result["table"],
        "",
        f"totals: {sum(1 for f in result['faults'] if f['at'] is not None)} faults injected, time lost "
        f"{result['time_lost_s']} s (injection to next commit, summed), rows redone {result['rows_redone']} "
        f"({result['rows_redone_before_any_fault']} before any fault), reruns {result['reruns']} for "
        f"{result['driver_kills']} driver kill(s); S3 proxy: {result['proxy']['connections']} connections, faults "
        f"{result['proxy']['faults']}, open connections reset {result['proxy']['reset_open']}",
        "invocations: " + "; ".join(_invocation_line(i) for i in result["invocations"]),
        f"output: {result['checks']['rows']} rows of {result['checks']['expected']}, missing "
        f"{result['checks']['n_missing']}, doubled {result['checks']['n_doubled']}, error rows "
        f"{result['checks']['n_errors']}, texts differing {result['checks']['n_texts_differ']}; verify: "
        f"{' | '.join(result['checks']['verify'])}",
        "",
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {bar}" for bar, ok in result["bars"].items()]
    if result["checks"]["n_texts_differ"]:
        lines.append(f"texts differing (first ones): {json.dumps(result['checks']['texts_differ'])[:2000]}")
    if result["checks"]["n_errors"]:
        lines.append(f"error rows (first ones): {json.dumps(result['checks']['errors'])[:2000]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=EVAL_MANIFEST, help="the rows to repeat (default: the eval set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=20.0, help="audio to transcribe (the eval set repeated)")
    p.add_argument("--faults", type=int, default=6, help="how many faults (every kind once, then seeded extras)")
    p.add_argument("--kinds", default=None, help=f"comma-separated fault kinds, in order, instead ({','.join(KINDS)})")
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--s3-seconds", type=float, default=4.0, help="length of the S3 reset window, and of the stall")
    p.add_argument("--reference", choices=("quick", "clean"), default="quick")
    p.add_argument("--budget", type=float, default=1500.0, help="seconds the faulted run may take before it is killed")
    p.add_argument("--recover-limit", type=float, default=150.0, help="seconds from a fault to the next commit")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable)")
    p.add_argument("--keep", type=Path, default=None, help="keep the work folder (output, logs, ledger) under DIR")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    kinds = a.kinds.split(",") if a.kinds else None

    def stop(signum, frame):  # SIGTERM: leave through the finally blocks, which stop what was started
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    result = chaos(seed=a.seed, minutes=a.minutes, n_faults=len(kinds) if kinds else a.faults, kinds=kinds,
                   shard_size=a.shard_size, s3_seconds=a.s3_seconds, reference=a.reference, budget_s=a.budget,
                   recover_limit=a.recover_limit, manifest=a.manifest, keep=a.keep,
                   extra_sets=a.sets)
    print(report(result), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
