"""The cluster as the graph sees it: how many actors of what size it runs (:func:`model_resources`), whether the
cluster can host them at all (:func:`check_cluster`), how actor pools grow and shrink as nodes come and go
(:func:`actor_pool`), how many shard commits may run at once (:func:`commit_threads`), which nodes were lost
mid-run (:class:`NodeWatch`), and actors that die as they start (:class:`StartWatch`).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from .calls import CallShape
from .config import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """How the model stage runs on this cluster."""

    actors: int
    gpus: float  # per actor
    cpus: float  # per actor (Ray's logical share)
    threads: int | None  # torch threads per actor (None: torch's default, on GPUs)
    rows_per_call: int  # manifest rows per actor call (with call_windows: the first call's)
    call_windows: int | None = None  # windows per actor call, on CPUs (None: calls of rows_per_call rows)

    def calls(self, cfg: RunConfig) -> CallShape:
        """How the featurizers group rows into this plan's model calls."""
        return CallShape(self.rows_per_call, self.call_windows, self.actors, cfg.decode.padding_seconds is not None)


def model_resources(cfg: RunConfig, rows: int | None = None) -> ModelPlan:
    """The model stage's plan, from the config and the cluster.

    ``ray.model_actors: 0`` means one actor per GPU, or on a CPU cluster one per core: single-threaded replicas
    side by side do more work per core than one replica spread over all cores, whose small decoding steps leave
    threads waiting. The CPU count is capped so that the replicas fit in half of the cluster's memory.
    ``ray.model_batch_size: 0`` means 64 rows per call on GPUs, where a batch should fill the device, and on CPUs
    calls of one decoding batch of windows (``model.batch_size``; ``call_windows``): a long file alone, short files
    many to a call, so that the decoder steps over full batches and a shard's long files spread over the actors
    (with ``decode.condition_on_previous_text``, whose windows go one per file at a time: 4 rows per call).

    ``rows``: the rows this run sends to the model stage, where known. With ``ray.model_actors: 0`` there are then
    no more actors than model calls, counted as ``rows_per_call`` rows each (calls by windows hold at least as many
    short rows, but a run's last rows are spread over the actors, so the count stands): an actor more
    would load the model and get no work (a small run, a retry of a few failed rows on a large cluster). On a CPU
    node the fewer actors each get more of its cores.
    """
    nodes = usable_nodes()
    cluster = _total(nodes) if nodes else ray.cluster_resources()
    cores = max(1, int(cluster.get("CPU", os.cpu_count() or 1)))
    gpus = cfg.ray.gpus_per_model_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    per_call = cfg.ray.model_batch_size or (64 if gpus > 0 else 4)
    windows = call_windows(cfg, gpus)

    def auto(most: int) -> int:
        if cfg.ray.model_actors:
            return cfg.ray.model_actors
        calls = -(-rows // per_call) if rows is not None else most
        return max(1, min(most, calls))

    if gpus > 0:
        return ModelPlan(auto(int(cluster.get("GPU", 0) // gpus)), gpus, 1.0, None, per_call, windows)
    fit = int(cluster.get("memory", 0) / 2 // actor_memory(cfg))  # as many as half the memory holds
    if len(nodes) > 1:
        # several nodes: whole cores, so the actors pack onto nodes whatever their sizes (shares of the cluster's
        # total would not: a node that holds a feature actor has no room left for a 0.67-core share)
        return ModelPlan(auto(min(cores - cfg.ray.cpu_actors, fit)), 0.0, 1.0, 1, per_call, windows)
    actors = auto(min(cores, fit))
    # CPU inference: the actors share the cores the feature actors leave (logical shares: the feature actors only
    # decode and compute log-mels, a small fraction of the model's work), each runs torch on its share of the cores
    cpus = max(0.01, min(1.0, (cores - cfg.ray.cpu_actors) / actors))
    return ModelPlan(actors, 0.0, cpus, max(1, cores // actors), per_call, windows)


def call_windows(cfg: RunConfig, gpus: float) -> int | None:
    """Windows per model call (:func:`model_resources`), or None for calls of a number of rows."""
    if gpus > 0 or cfg.ray.model_batch_size or cfg.decode.condition_on_previous_text:
        return None
    return cfg.model.batch_size or 16


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes (``ray.nodes()`` entries); none while this process is not connected to Ray."""
    return [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []


def _total(nodes: list[dict[str, Any]]) -> dict[str, float]:
    return {k: sum(n.get("Resources", {}).get(k, 0) for n in nodes) for k in ("CPU", "GPU", "memory")}


def _raylet_answers(node: dict[str, Any], timeout_s: float) -> bool:
    port = node.get("NodeManagerPort")
    if not port:
        return True  # nothing to ask: take Ray's word
    try:
        with socket.create_connection((node.get("NodeManagerAddress", "127.0.0.1"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def usable_nodes(timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """The live nodes whose raylet accepts a connection: what the plan may count on.

    Ray lists a SIGKILLed node as alive until its health checks have failed (about 15 s by default); a run
    started in that time (the rerun after a driver's kill that followed a node's) planned actors for the dying node's
    cores, and once they were gone the model actors held every core left and the feature actor could not start.
    """
    nodes = alive_nodes()
    if len(nodes) < 2:
        return nodes
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        answers = list(pool.map(lambda n: _raylet_answers(n, timeout_s), nodes))
    for node, ok in zip(nodes, answers, strict=True):
        if not ok:
            logger.warning("node %s is listed alive but its raylet does not answer: left out of the plan (it is "
                           "probably being lost)", _describe_node(node))
    return [n for n, ok in zip(nodes, answers, strict=True) if ok] or nodes


class ClusterResourceError(ValueError):
    """The cluster lacks a resource the config asks for (raised before any work)."""


def check_cluster(cfg: RunConfig, plan: ModelPlan) -> None:
    """Raises :class:`ClusterResourceError` when no node can host a feature actor or a model actor as planned."""
    nodes = usable_nodes()
    have = [n.get("Resources", {}) for n in nodes]
    total = {k: sum(r.get(k, 0) for r in have) for k in ("CPU", "GPU")}
    where = f"the cluster ({len(nodes)} node(s): {total['CPU']:g} CPUs, {total['GPU']:g} GPUs)"
    if plan.gpus > 0 and not any(r.get("GPU", 0) >= plan.gpus for r in have):
        raise ClusterResourceError(
            f"a model actor needs {plan.gpus:g} GPU(s) (ray.gpus_per_model_actor={cfg.ray.gpus_per_model_actor}) "
            f"but no node of {where} has that many. Add GPU nodes, or run on CPUs with "
            f"--set ray.gpus_per_model_actor=0 --set model.device=cpu"
        )
    if cfg.model.device.startswith("cuda") and total["GPU"] == 0:
        raise ClusterResourceError(f"model.device={cfg.model.device} but {where} has no GPU: add GPU nodes, or set "
                                   f"model.device=cpu")
    for name, cpus in (("feature actor", 1.0), ("model actor", plan.cpus)):
        if not any(r.get("CPU", 0) >= cpus for r in have):
            raise ClusterResourceError(f"a {name} needs {cpus:g} CPU(s) but no node of {where} has that many: "
                                       f"add nodes with CPUs (`ray start --num-cpus=N`)")


def actor_memory(cfg: RunConfig) -> int:
    """Bytes one CPU model actor takes, roughly: four times the checkpoint's files (fp16 on disk become fp32 on a CPU
    without bf16, and the weights packed for oneDNN take as much again; activations fit in the rest) and a Python
    with torch."""
    from whisper_batch.model.checkpoint import local_path

    from .model_store import fetcher

    path = local_path(cfg.model.name, fetch=fetcher(cfg.storage.storage_options))
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    return 4 * sum(os.path.getsize(f) for f in files) + 700 * 2**20


def commit_threads() -> int:
    """How many shard commits may run at once (the driver's threads): half the cluster's cores, at least 2.

    A commit mostly waits on storage: with one at a time, a shard's commit waited for the previous one's round trips,
    and on a small cluster the commits of a run came in one burst at its end. Also how many input blocks the driver
    stages ahead of the commits (a multiple of it).
    """
    return max(2, int(ray.cluster_resources().get("CPU", 2)) // 2)


def actor_pool(initial: int, most: int | None) -> ray.data.ActorPoolStrategy:
    """An autoscaling actor pool that starts with ``initial`` actors and grows to ``most`` (None: no limit) as nodes
    join and work queues up.

    On a cluster of several nodes it may shrink to one actor: when a node is lost, Ray restarts its actors
    elsewhere, and a restart needs cores that the surviving actors hold; idle actors released make room for it
    (with a fixed pool the restart, and every task waiting on it, waited forever). A cluster of one node at the
    start keeps a fixed pool unless ``most`` is given: no model reloads when the model stage idles a moment, and no
    actors beyond the memory the plan allowed for.
    """
    if len(alive_nodes()) > 1:
        floor = 1
    else:
        floor, most = initial, most or initial
    most = None if most is None else max(most, initial)
    return ray.data.ActorPoolStrategy(min_size=floor, max_size=most, initial_size=initial)


class Stalled(RuntimeError):
    """The graph made no progress for longer than ``ray.stall_timeout_seconds``."""


class NodeLost(Stalled):
    """Nodes were lost and the graph made no progress since for ``ray.lost_node_timeout_seconds``, or failed."""


class NodeWatch:
    """Watches the cluster's nodes while the graph runs (``ray.nodes()`` every ``poll_s`` seconds at most).

    A lost node (spot preemption) is logged at once. Ray restarts its actors and resubmits the tasks whose outputs
    died with it; when that cannot happen (the remaining nodes lack the resources, or no node is left), nothing
    comes out of the graph any more, and after ``timeout_s`` without progress :meth:`check` raises
    :class:`NodeLost`, saying which nodes were lost and that the same command resumes. ``progress()`` returns
    (shards committed, shards given) for that message.
    """

    def __init__(self, timeout_s: float, progress, model_gpus: float = 0.0, poll_s: float = 5.0):
        self.timeout_s, self.progress, self.model_gpus, self.poll_s = timeout_s, progress, model_gpus, poll_s
        self.known = {n["NodeID"]: n for n in alive_nodes()}
        self.alive = dict(self.known)
        self.lost: dict[str, dict[str, Any]] = {}
        self.lost_at: float | None = None
        self._next = time.monotonic() + poll_s

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.poll_s
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        for node_id, node in self.known.items():
            if node_id not in alive and node_id not in self.lost:
                self.lost[node_id] = node
                self.lost_at = now
                logger.warning("lost node %s: Ray redoes the work that was in flight there on the other nodes",
                            _describe_node(node))
        self.known.update(alive)  # nodes that joined are watched too
        self.alive = alive

    def check(self, last_progress: float) -> None:
        if self.lost_at is None:
            return
        idle = time.monotonic() - max(last_progress, self.lost_at)
        if idle > self.timeout_s:
            raise NodeLost(self.message(f"nothing came out of the graph for {idle:.0f} s since "
                                        f"(ray.lost_node_timeout_seconds={self.timeout_s:g})"))

    def message(self, what: str) -> str:
        done, total = self.progress()
        lost = ", ".join(_describe_node(n) for n in self.lost.values())
        have = [n.get("Resources", {}) for n in self.alive.values()]
        cpus, gpus = (sum(r.get(k, 0) for r in have) for k in ("CPU", "GPU"))
        left = f"left: {len(have)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
        if not any(r.get("CPU", 0) >= 1 and r.get("GPU", 0) >= self.model_gpus for r in have):
            need = f"{self.model_gpus:g} GPU(s) and a CPU" if self.model_gpus else "a CPU"
            left += f": the cluster has shrunk to nothing (no node left has {need} for the model stage)"
        return (f"lost {len(self.lost)} node(s) mid-run ({lost}); {left}; {what}. The rows in flight on the lost "
                f"nodes were not redone. {done} of {total} shard(s) of this run are committed and kept; rerun the "
                f"same command to resume (it does only the {total - done} uncommitted shard(s)).")

    def guard(self, stream):
        """``stream``, with a failure after a node loss explained as :class:`NodeLost`."""
        try:
            yield from stream
        except Stalled:
            raise
        except Exception as e:  # any failure of the graph: re-raised, as NodeLost when a node was lost
            self.poll(force=True)
            if not self.lost:
                raise
            raise NodeLost(self.message(f"the graph failed ({type(e).__name__}: {str(e)[:300]})")) from e


def _describe_node(node: dict[str, Any]) -> str:
    res = node.get("Resources", {})
    gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
    return f"{node.get('NodeManagerAddress', '?')} id {node['NodeID'][:8]} ({res.get('CPU', 0):g} CPUs{gpus})"


class ActorStartError(RuntimeError):
    """The graph's actors die as they start (a library missing on a node, a checkpoint that cannot load)."""


def log_start_errors(init):
    """Decorates an actor's ``__init__``: an error there is written to the worker's log (where :class:`StartWatch`
    reads it) before Ray sees it: Ray keeps no cause for an actor it restarts."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:  # any failure to start is logged, then re-raised
            print(f"{type(self).__name__} failed to start:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            raise

    return wrapped


class StartWatch:
    """Stops a graph whose actors keep dying as they start, instead of letting Ray Data restart them without end.

    An actor of ``classes`` restarted ``limit`` times with nothing out of the graph since :meth:`progressed` was
    last called raises :class:`ActorStartError`, with the cause from the actor's own log where this machine can
    read it. A node lost costs its actors one restart each, so a limit of 3 tells a broken start from preemptions.
    """

    def __init__(self, classes: tuple[str, ...], limit: int = 3, poll_s: float = 2.0):
        self.classes, self.limit, self.poll_s = classes, limit, poll_s
        self.job = ray.get_runtime_context().get_job_id()
        self.base: dict[str, int] = {}
        self.pids: dict[str, list[int]] = {}  # each actor's worker processes seen, oldest first
        self._reset, self._next = False, 0.0

    def progressed(self) -> None:
        self._reset = True

    def check(self) -> None:
        from .ray_compat import actor_restarts

        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.poll_s
        ours = [a for a in actor_restarts() if a.job_id == self.job and any(c in a.class_name for c in self.classes)]
        if self._reset:
            self.base, self._reset = {a.actor_id: a.restarts for a in ours}, False
        for a in ours:
            seen = self.pids.setdefault(a.actor_id, [])
            if a.pid and a.pid not in seen:
                seen.append(a.pid)
            if a.restarts - self.base.get(a.actor_id, 0) >= self.limit:
                raise ActorStartError(start_failure(a.class_name, a.restarts + 1, *reversed(seen)))


def start_failure(class_name: str, deaths: int, *pids: int) -> str:
    """One line: which actor died as it started, how often, and the error it wrote to its log (the first of the
    logs of ``pids``, its worker processes newest first, that holds one)."""
    from .ray_compat import worker_error

    cause = next((e for e in map(worker_error, pids) if e), None)
    cause = cause or ("no Python error in its log on this machine: a crash or the OOM killer, or a node whose "
                      "logs are elsewhere (Ray's logs there, worker-*.err)")
    return (f"{class_name} died {deaths} time(s) as it started, so the run stops instead of restarting it without "
            f"end: {cause}")
