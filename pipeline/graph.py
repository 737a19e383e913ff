"""The Ray Data graph: one streaming dataset over every pending shard, committed shard by shard.

input block paths (the driver's :class:`~whisper_batch.pipeline.stager.InputStager` writes the pending manifest
records as input blocks) → ``ArrowFeaturizer`` (CPU actor pool: reads an input block, then fetch, decode, windows,
log-mel; one model call per output row and block: :mod:`~whisper_batch.pipeline.calls`) → ``ArrowTranscriber``
(model actor pool, one Whisper replica each, a GPU each when the cluster has GPUs; a call's rows are written as a part
file per shard) → small part records stream back to the driver, whose
:class:`~whisper_batch.pipeline.committer.ShardCommitter` commits a shard (in one of its threads) as soon as all its
rows are written: the shard's parts merged into
``transcripts/shard-NNNNN.parquet`` (one atomic write) and its completion record. Rows and features never pass
through the driver; actors live for the whole run.
"""

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import ray

from .calls import CallShape, iter_calls, pack_call, unpack_calls
from .cluster import (
    ActorStartError,
    NodeWatch,
    Stalled,
    StartWatch,
    actor_pool,
    check_cluster,
    commit_threads,
    log_start_errors,
    model_resources,
    start_failure,
)
from .committer import Incomplete, ShardCommitter  # noqa: F401 - Incomplete: raised by run_graph, for its callers
from .config import RunConfig
from .layout import RunLayout
from .ray_compat import set_blocks_ahead, stop_executions
from .schema import FEATURE_SCHEMA, transcripts_table
from .stager import read_inputs

logger = logging.getLogger(__name__)


class ArrowFeaturizer:
    """Ray Data callable around :class:`~whisper_batch.pipeline.features.Featurizer` with a fixed output schema.

    Given a ``layout`` and the ``invocation_id`` that staged them, its input is input block paths, which it reads
    itself (:func:`~whisper_batch.pipeline.stager.read_inputs`): a separate read stage would start worker processes of
    its own, each importing Ray Data and pyarrow, on cores the actors need.
    """

    @log_start_errors
    def __init__(
        self,
        cfg: RunConfig,
        n_mels: int,
        calls: CallShape,
        layout: RunLayout | None = None,
        invocation_id: str = "",
        wait_seconds: float = 0.0,
    ):
        from .features import Featurizer

        self.inner = Featurizer(cfg, n_mels)
        self.layout, self.invocation_id, self.wait_seconds = layout, invocation_id, wait_seconds
        self.calls = calls

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """A block's features, one model call at a time (:func:`~whisper_batch.pipeline.calls.iter_calls`): the
        model stage starts on the first rows instead of waiting for the whole block (with packing on, the packs come
        at the end, once a shard is read)."""
        if self.layout is not None:
            batch = read_inputs(batch, self.layout, self.invocation_id, self.wait_seconds)
        for call in iter_calls(self.inner.iter_items(batch.to_pylist()), self.calls):
            yield pack_call(call, FEATURE_SCHEMA)


class ArrowTranscriber:
    """Ray Data callable around :class:`~whisper_batch.pipeline.transcriber.Transcriber` (loads the model once per
    actor).

    A call writes its rows as part files to ``sink`` (layout, invocation id, extra column types; :func:`write_parts`)
    and returns their part records, instead of handing every row's transcript to a write stage of its own tasks and
    processes. A retried call writes its parts again; the commit keeps a row once.
    """

    @log_start_errors
    def __init__(self, cfg: RunConfig, sink: tuple[RunLayout, str, dict[str, str]], torch_threads: int | None = None):
        import torch

        from .device import trim_heap  # torch: in the actors, not the driver

        self.sink, self.trim_heap, self.trimmed = sink, trim_heap, time.monotonic()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        from .transcriber import Transcriber

        self.inner = Transcriber(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.inner.transcribe_rows(unpack_calls(batch))
        for r in rows:
            r["duration"] = r.get("duration") or 0.0
        parts = write_parts(transcripts_table(rows), *self.sink)
        del rows
        if time.monotonic() - self.trimmed > TRIM_SECONDS:  # what the calls freed goes back to the OS (glibc)
            self.trim_heap()
            self.trimmed = time.monotonic()
        return parts


# Seconds between two trims of a model actor's C heap (pipeline/device.py:trim_heap): without them its RSS kept
# growing; a trim takes 25-40 ms, and the next call faults the pages it gave back in again, so not after every call.
TRIM_SECONDS = 10.0


def write_parts(batch: pa.Table, layout: RunLayout, invocation_id: str, extra_types: dict[str, str]) -> pa.Table:
    """Write the batch's rows as one part file per shard; return one small record per part."""
    from .schema import error_cause, output_table
    from .sink import table_to_parquet_bytes

    rows = batch.to_pylist()
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_shard.setdefault(int(r["shard_id"]), []).append(r)
    out = {"shard_id": [], "path": [], "row_indices": [], "decode_s": [], "windows": [], "window_fallbacks": [],
           "audio_seconds": [], "error_causes": []}
    for shard_id, shard_rows in sorted(by_shard.items()):
        path = layout.new_part_file(invocation_id, shard_id)
        table = output_table(shard_rows, extra_types)
        layout.write_bytes(path, table_to_parquet_bytes(table))
        temps = [t for r in shard_rows for t in (r.get("window_temperatures") or [])]
        out["shard_id"].append(shard_id)
        out["path"].append(path)
        out["row_indices"].append([int(r["row_index"]) for r in shard_rows])
        out["decode_s"].append(sum(r.get("decode_s") or 0.0 for r in shard_rows))
        out["windows"].append(len(temps))
        out["window_fallbacks"].append(sum(t > 0 for t in temps))
        # for the driver's progress display: the part's audio and the cause of each failed row
        out["audio_seconds"].append(float(sum(r.get("duration") or 0.0 for r in shard_rows)))
        out["error_causes"].append([error_cause(r["error"]) for r in shard_rows if r.get("error")])
    return pa.table(out)


def build_dataset(
    input_files: list[str],
    cfg: RunConfig,
    layout: RunLayout,
    invocation_id: str,
    extra_types: dict[str, str],
    n_mels: int,
    rows: int | None = None,
) -> "ray.data.Dataset":
    """The streaming dataset whose rows are part records; iterating it runs the whole graph (``rows``: how many
    rows the input blocks hold, where known: no more model actors than they make model calls).

    Two stages, both actor pools: the feature actors (which read the input blocks ``invocation_id`` staged) and the
    model actors (which write the part files). The featurizer yields each model call as one row
    (:mod:`~whisper_batch.pipeline.calls`) and every block holds one row (:data:`MAX_BLOCK_BYTES`), so that each call
    goes to whichever model actor is free, and a shard's calls spread over every model actor, without a split stage
    (tasks and worker processes of its own) between the two.
    """
    plan = model_resources(cfg, rows)
    check_cluster(cfg, plan)  # a clear error before any work
    ds = ray.data.from_items([{"path": f} for f in input_files], override_num_blocks=len(input_files))
    ds = ds.map_batches(
        ArrowFeaturizer,
        fn_constructor_kwargs={"cfg": cfg, "n_mels": n_mels, "calls": plan.calls(cfg), "layout": layout,
                               "invocation_id": invocation_id, "wait_seconds": cfg.ray.stall_timeout_seconds},
        compute=actor_pool(cfg.ray.cpu_actors, cfg.ray.max_cpu_actors or cfg.ray.cpu_actors),
        batch_size=None,  # a whole input block (whole shards) per call: containers read once, short rows packed
        batch_format="pyarrow",
        num_cpus=1,
    )
    ds = ds.map_batches(
        ArrowTranscriber,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": plan.threads, "sink": (layout, invocation_id, extra_types)},
        compute=actor_pool(plan.actors, cfg.ray.max_model_actors or None),
        batch_size=1,  # one call
        batch_format="pyarrow",
        num_gpus=plan.gpus,
        num_cpus=plan.cpus,
    )
    ds.context.target_max_block_size = MAX_BLOCK_BYTES
    # no per-second poll of each map actor's USS (psutil reads /proc/PID/smaps): about 1 % of a model actor's samples
    # at steady state, for memory stats the run does not use
    ds.context.memory_usage_poll_interval_s = None
    set_blocks_ahead(ds.context, FEATURE_BLOCKS_AHEAD)
    return ds


# Bytes, not rows: Ray Data gathers a map task's outputs into blocks of up to target_max_block_size bytes (default
# 128 MiB) before the next stage sees any of them, and slices larger ones to that size: with 1 byte, every block is
# one row: one model call, which goes downstream as soon as it is yielded, to whichever model actor is free (with
# larger blocks, an actor would get several calls in one task).
MAX_BLOCK_BYTES = 1

# Calls a featurizer call may yield before the driver takes them (Ray Data's default, 2, stalled it and left the
# model actors waiting: docs/performance.md); a call holds up to 16 windows' log-mel on CPUs, about 0.5 MB a window.
FEATURE_BLOCKS_AHEAD = 16


def run_graph(
    input_files: list[str],
    expected: dict[int, int],
    cfg: RunConfig,
    layout: RunLayout,
    invocation_id: str,
    extra_types: dict[str, str],
    n_mels: int,
    on_commit: Callable[[dict[str, Any]], None],
    replace_failed: bool = False,
    on_part: Callable[[dict[str, Any], int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Run the graph over the input blocks ``input_files`` that ``invocation_id`` stages; commit each shard once its
    ``expected`` number of rows is written, calling ``on_commit`` with its completion record.

    ``check`` is called while the graph yields nothing, and may raise: the staging's error (where its ``ABORT`` file
    could not be written either, e.g. on a full disk, the feature actors would wait for the block until the stall
    timeout).

    ``on_part(part, new_rows)`` is called as each part record arrives (``new_rows``: its rows not seen before).

    Raises:
        Incomplete: the graph ended with a shard not committed.
        Stalled: no progress for ``ray.stall_timeout_seconds`` (:class:`~whisper_batch.pipeline.cluster.NodeLost`
            after a node was lost).
        ActorStartError: the graph's actors keep dying as they start.
    """
    committer = ShardCommitter(layout, expected, extra_types, on_commit, replace_failed, on_part, commit_threads())
    watch = GraphWatch(cfg, committer.progress)
    try:
        with committer:
            stream = _stream(build_dataset(input_files, cfg, layout, invocation_id, extra_types, n_mels,
                                           sum(expected.values())))
            for part in watch.guard(stream):
                watch.check()  # raises ActorStartError when actors keep dying as they start
                if part is None:  # no output yet: commits may still finish, and a stall must not go unnoticed
                    if check is not None:
                        check()
                    watch.idle(commits=committer.collect())
                    continue
                watch.output()
                committer.add_part(part)
                committer.collect()
            committer.drain()
    except ray.exceptions.ActorDiedError as e:
        if "creation task" not in str(e):  # died at work: Ray Data's own error
            raise
        # an actor whose class cannot even be loaded on its node: Ray Data stops at once, with a long message
        raise ActorStartError(start_failure(_class_of(e), 1, _pid_of(e))) from None
    committer.check_complete()


class GraphWatch:
    """Whether a running graph still progresses: nodes lost (:class:`NodeWatch`), actors dying as they start
    (:class:`StartWatch`), and time without output or commits (:class:`Stalled` after ``ray.stall_timeout_seconds``).
    ``progress()`` returns (shards committed, shards given) for the messages."""

    def __init__(self, cfg: RunConfig, progress: Callable[[], tuple[int, int]]):
        self.stall_s = cfg.ray.stall_timeout_seconds
        self.last_progress = time.monotonic()
        gpus = cfg.ray.gpus_per_model_actor
        gpus = (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0) if gpus is None else gpus
        self.nodes = NodeWatch(cfg.ray.lost_node_timeout_seconds, progress, gpus)
        self.starts = StartWatch(("ArrowFeaturizer", "ArrowTranscriber"))

    def guard(self, stream: Iterator[Any]) -> Iterator[Any]:
        """``stream``, with a failure after a node loss explained."""
        return self.nodes.guard(stream)

    def check(self) -> None:
        self.nodes.poll()
        self.starts.check()

    def output(self) -> None:
        """A part record came out of the graph."""
        self.last_progress = time.monotonic()
        self.starts.progressed()

    def idle(self, commits: int) -> None:
        """Nothing came out of the graph for a while, but ``commits`` shards committed meanwhile; raises
        :class:`~whisper_batch.pipeline.cluster.NodeLost` or :class:`Stalled` when that has lasted too long."""
        if commits:
            self.last_progress = time.monotonic()
        self.nodes.check(self.last_progress)  # a lost node's work not redone in time
        idle = time.monotonic() - self.last_progress
        if idle > self.stall_s:
            raise Stalled(
                f"no progress for {idle:.0f} s (ray.stall_timeout_seconds={self.stall_s:g}): no rows came out of the "
                f"graph and no shard committed. Committed shards are kept; rerun the same command to resume. Ray's "
                f"logs (/tmp/ray/session_latest/logs) show where workers are stuck."
            )


def _pid_of(error: Exception) -> int:
    m = re.search(r"\bpid=(\d+)", str(error))
    return int(m.group(1)) if m else 0


def _class_of(error: Exception) -> str:
    m = re.search(r"ray::(\S+?)\.__init__", re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
    return m.group(1) if m else "an actor"


def _stream(ds: "ray.data.Dataset", poll: float = 2.0):
    """Iterate the dataset's rows in a thread; yield None every ``poll`` seconds without a row, so the caller can
    watch for a stall instead of blocking forever inside Ray.

    When the caller stops early (a stall, actors dying as they start, any error), the graph's execution is shut down
    and the thread joined before the error goes on: a driver that stops Ray while a thread is still inside it can
    crash (a segmentation fault instead of the run's message and exit status)."""
    q: queue.Queue = queue.Queue(maxsize=64)
    done = object()
    stop = threading.Event()
    ds.set_name(f"whisper-batch-{uuid.uuid4().hex[:12]}")  # how stop_executions finds this graph's execution

    def produce() -> None:
        try:
            for row in ds.iter_rows():
                if not _put(q, row, stop):
                    return  # leaving the loop shuts Ray Data's execution down
            _put(q, done, stop)
        except BaseException as e:  # noqa: BLE001 - surfaced in the driver's thread, which raises it
            _put(q, e, stop)

    producer = threading.Thread(target=produce, name="graph-output", daemon=True)
    producer.start()
    try:
        while True:
            try:
                item = q.get(timeout=poll)
            except queue.Empty:
                yield None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if producer.is_alive():
            stop_executions(ds.name)  # a producer waiting inside Ray for the next row gets the end of the stream
            producer.join(timeout=60)
            if producer.is_alive():
                logger.warning("the graph's output thread did not stop within 60 s of the run's end")


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts ``item`` on ``q`` unless ``stop`` is set first; False when it was not put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False
