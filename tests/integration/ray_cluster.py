"""Real multi-node Ray clusters on 127.0.0.1 for tests: a head and worker nodes, each a ``ray start --block``.

Every node is one ``ray start --block`` process started in a session (and process group) of its own, with its own
ports and its own ``--temp-dir``, so that:

- a test can SIGKILL one node's whole process group (its raylet, object manager, agents and workers at once), the way
  a spot preemption takes a machine away (:meth:`Node.kill`);
- which actors ran on which node can be read from that node's own worker logs afterwards (:meth:`Node.actor_names`),
  even when the node is dead;
- teardown stops exactly the processes the cluster started, by pid (SIGTERM to each ``ray start --block``, which
  shuts its node down, then SIGKILL for anything left in its session). ``ray stop`` is never used: it stops every
  Ray on the machine, other people's included.

The harness hands clients no authentication token. The nodes get the environment the test passes (``env``; for the
token tests nothing about authentication, so ``ray start`` decides as Ray does by default); with ``home``, ``HOME``
points there for the nodes, so Ray's token file (``HOME/.ray/auth_token``) is the test's own.
Every wait is bounded; a node that does not come up fails the test with the tail of its log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import free_ports

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
_RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def session_pids(sid: int) -> set[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
        except OSError:
            continue
        pids.add(int(entry))
    return pids


class ClusterError(RuntimeError):
    """A node did not start (the message has the tail of its log)."""


@dataclass
class Node:
    """One ``ray start --block`` process and what it started (its session)."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    num_cpus: int
    num_gpus: int
    ports: dict[str, int] = field(default_factory=dict)
    killed: bool = False

    @property
    def pids(self) -> set[int]:
        return session_pids(self.proc.pid)

    def kill(self) -> int:
        """SIGKILLs every process of this node at once (its process group, then any straggler of its session);
        returns how many processes were running."""
        pids = self.pids
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.pids:  # a process that left the group but not the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.killed = True
        return len(pids)

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` (it stops its node), then SIGKILL for what is left of its session."""
        started = self.pids | {self.proc.pid}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while started & self.pids and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in started & self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> None:
        """Waits until ``ray start`` says the node runs; raises :class:`ClusterError` with its log's tail if it
        ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"node {self.name} did not start ({' '.join(self.proc.args)}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def live_actors(self, name: str) -> int:
        """How many live worker processes of this node run an actor whose title contains ``name`` (Ray titles an
        actor's process ``ray::CLASS...``; a Ray Data pool's ``ray::MapWorker(MapBatches(CLASS))...``)."""
        count = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            count += title.startswith("ray::") and name in title
        return count

    def actor_names(self) -> list[str]:
        """Names of the actors that ran on this node, one entry per actor process, from its worker logs (Ray writes
        ``:actor_name:NAME`` into an actor's log; a Ray Data pool's actors are ``MapWorker(MapBatches(CLASS))``)."""
        by_pid: dict[str, str] = {}  # a worker may have several log files (one per job): count it once
        for path in sorted(self.temp_dir.glob("session_*/logs/worker-*.out")):
            try:
                found = re.findall(r":actor_name:(.+)", path.read_text(errors="replace"))
            except OSError:
                continue
            if found:  # the last one: Ray Data's MapWorker names its function once initialised
                by_pid[path.stem.rsplit("-", 1)[-1]] = found[-1].strip()
        return sorted(by_pid.values())


class RayCluster:
    """A head and worker nodes on 127.0.0.1; use as a context manager (or call :meth:`stop`)."""

    def __init__(self, env: dict[str, str] | None = None, home: Path | None = None, root: Path | None = None):
        # Ray's socket paths must stay short (< 108 bytes): temp dirs directly under /tmp
        self.root = Path(tempfile.mkdtemp(prefix="wbc-", dir=str(root or "/tmp")))
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # a test node has nothing to drain: SIGTERM stops it at once
        self.env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        self.env.pop("RAY_ADDRESS", None)
        # a job's entrypoint runs `python` from the nodes' PATH: this interpreter's, as in an activated environment
        self.env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), self.env.get("PATH", "")])
        if home is not None:
            self.env["HOME"] = str(home)
        self.nodes: list[Node] = []
        self.port: int | None = None
        self.dashboard_port: int | None = None

    # --- addresses ---

    @property
    def address(self) -> str:
        """The GCS address drivers join (``ray.address``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The job server (``--address`` of ``whisper-batch submit``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    # --- nodes ---

    def _node_ports(self, extra: tuple[str, ...] = ()) -> dict[str, int]:
        """Distinct free ports for a node's components (and ``extra`` names): one port for two components stops the
        node from starting."""
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                 "metrics-export-port", "runtime-env-agent-port", *extra)
        return dict(zip(names, free_ports(len(names))))

    def _start(self, name: str, args: list[str], ports: dict[str, int], num_cpus: int, num_gpus: int,
               timeout: float) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir()
        log = self.root / f"{name}.log"
        # worker ports are left to the OS (Ray binds workers to random free ports when --min-worker-port is unset),
        # so no two nodes or clusters on this machine can collide on them
        cmd = [*_RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--num-gpus={num_gpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *(f"--{k}={v}" for k, v in ports.items()), *args]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = Node(name, proc, temp_dir, log, num_cpus, num_gpus, ports)
        self.nodes.append(node)
        if timeout:
            node.wait_started(timeout)
        return node

    def start_head(self, num_cpus: int = 1, num_gpus: int = 0, dashboard: bool = False,
                   timeout: float = START_TIMEOUT_S, extra: tuple[str, ...] = ()) -> Node:
        """Starts the head (GCS, and with ``dashboard`` the dashboard and job server on 127.0.0.1)."""
        assert not self.nodes, "the head is the first node"
        ports = self._node_ports(("ray-client-server-port", "port", "dashboard-port"))
        self.port, dashboard_port = ports.pop("port"), ports.pop("dashboard-port")
        args = ["--head", f"--port={self.port}"]
        if dashboard:
            self.dashboard_port = dashboard_port
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        node = self._start("head", [*args, *extra], ports, num_cpus, num_gpus, timeout)
        if dashboard:
            self._wait_http(f"{self.dashboard_url}/api/authentication_mode", node, timeout)  # public: no token
        return node

    def add_node(self, num_cpus: int = 1, num_gpus: int = 0, timeout: float = START_TIMEOUT_S,
                 extra: tuple[str, ...] = ()) -> Node:
        """Starts a worker node that joins the head; waits until it runs unless ``timeout`` is 0 (then call
        :meth:`Node.wait_started`)."""
        assert self.nodes, "start the head first"
        name = f"worker{len(self.nodes)}"
        return self._start(name, [f"--address={self.address}", *extra], self._node_ports(), num_cpus, num_gpus,
                           timeout)

    def _wait_http(self, url: str, node: Node, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.exceptions.RequestException:
                pass
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"{url} did not answer:\n{node.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def actors_by_node(self) -> dict[str, list[str]]:
        """node name -> class names of the actors that ran there (alive or dead nodes)."""
        return {n.name: n.actor_names() for n in self.nodes}

    # --- teardown ---

    def stop(self) -> None:
        """Stops every node this cluster started (workers first), by pid; removes the temp dirs."""
        for node in reversed(self.nodes):
            try:
                node.stop()
            except (OSError, subprocess.TimeoutExpired):  # keep stopping the others
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
