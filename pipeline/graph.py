"""The Ray Data graph: one streaming dataset over every pending shard, committed shard by shard.

input block paths (the driver writes the pending manifest records to OUTPUT/_staging/<invocation>/input/) →
``ArrowFeaturizer`` (CPU actor pool: reads an input block, then fetch, decode, windows, log-mel; one row per output
block) → ``ArrowTranscriber`` (model actor pool, one Whisper replica each, a GPU each when the cluster has GPUs; a
call gets ``rows_per_call`` consecutive rows and writes them as a part file per shard) → small part records stream
back to the driver, which commits a shard (:func:`commit_shard`, in one of its threads) as soon as all its rows are
written: the shard's parts merged into ``transcripts/shard-NNNNN.parquet`` (one atomic write) and its completion
record. Rows and features never pass through the driver; actors live for the whole run.
"""

import logging
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Iterator

import pyarrow as pa
import ray

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
from .config import RunConfig
from .layout import RunLayout
from .schema import RECORD_SCHEMA, features_table, transcripts_table
from .sink import commit_shard_table

logger = logging.getLogger(__name__)

class ArrowFeaturizer:
    """Ray Data callable around :class:`~whisper_batch.pipeline.features.Featurizer` with a fixed output schema.

    Given a ``layout``, its input is input block paths, which it reads itself (:func:`read_inputs`): a separate read
    stage would start worker processes of its own, each importing Ray Data and pyarrow, on cores the actors need.
    """

    @log_start_errors
    def __init__(
        self,
        cfg: RunConfig,
        n_mels: int,
        rows_per_call: int,
        layout: RunLayout | None = None,
        wait_seconds: float = 0.0,
    ):
        from .features import Featurizer

        self.inner = Featurizer(cfg, n_mels)
        self.layout, self.wait_seconds = layout, wait_seconds
        self.rows_per_call = rows_per_call
        self.padded = cfg.decode.padding_seconds is not None

    def order(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return call_order(items, self.rows_per_call, self.padded)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """A block's features, yielded a few model calls' worth at a time: the model stage starts on the first rows
        instead of waiting for the whole block (with packing on, the packs come at the end, once a shard is read)."""
        if self.layout is not None:
            batch = read_inputs(batch, self.layout, self.wait_seconds)
        chunk, size = [], self.rows_per_call  # the first call's rows alone: the model actors are waiting
        for item in self.inner.iter_items(batch.to_pylist()):
            chunk.append(item)
            if len(chunk) >= size:
                yield features_table(self.order(chunk))
                chunk, size = [], FEATURE_CHUNK_CALLS * self.rows_per_call
        if chunk:
            yield features_table(self.order(chunk))


FEATURE_CHUNK_CALLS = 4  # model calls' rows per table a featurizer yields


def call_order(items: list[dict[str, Any]], rows_per_call: int, padded: bool) -> list[dict[str, Any]]:
    """The order of featurized rows, ``rows_per_call`` of them to a model call: each call gets one of the longest
    rows (:func:`balance_order`); with ``decode.padding_seconds`` (``padded``) the calls get rows of like lengths
    instead (longest first), so that their windows have like encoder lengths and share batches."""
    if padded:
        return sorted(items, key=row_cost, reverse=True)
    return balance_order(items, rows_per_call)


def row_cost(item: dict[str, Any]) -> tuple[int, float]:
    """A featurized row's model work, roughly: its windows, then its seconds."""
    return len(item.get("mel_frames") or []), item.get("audio_seconds") or 0.0


def balance_order(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Order featurized rows so that each run of ``k`` (one model call) holds one of the longest rows and a share of
    the rest, longest calls first.

    The calls of a block spread over the model actors, and a call takes as long as its windows take; a block's long
    files gathered in one call would leave the other actors idle at the end while one actor works through them.
    """
    cost = sorted(items, key=row_cost, reverse=True)
    calls = -(-len(cost) // k)
    heads, rest = cost[:calls], cost[calls:]
    return [r for c in range(calls) for r in [heads[c], *rest[c * (k - 1) : (c + 1) * (k - 1)]]]


class ArrowTranscriber:
    """Ray Data callable around :class:`~whisper_batch.pipeline.transcriber.Transcriber` (loads the model once per actor).

    A call writes its rows as part files to ``sink`` (layout, staging folder, extra column types; :func:`write_parts`)
    and returns their part records, instead of handing every row's transcript to a write stage of its own tasks and
    processes. A retried call writes its parts again; the commit keeps a row once.
    """

    @log_start_errors
    def __init__(self, cfg: RunConfig, sink: tuple[RunLayout, str, dict[str, str]], torch_threads: int | None = None):
        import torch

        self.sink = sink
        if torch_threads:
            torch.set_num_threads(torch_threads)
        from .transcriber import Transcriber

        self.inner = Transcriber(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.inner.transcribe_rows(batch.to_pylist())
        for r in rows:
            r["duration"] = r.get("duration") or 0.0
        return write_parts(transcripts_table(rows), *self.sink)


def read_inputs(batch: pa.Table, layout: RunLayout, wait_seconds: float = 0.0) -> pa.Table:
    """Input block paths → the manifest records they hold.

    The driver stages blocks while the graph runs (a few ahead of the commits): a block not written yet is waited
    for, up to ``wait_seconds``.
    """
    import io

    import pyarrow.parquet as pq

    tables = []
    for path in batch.column("path").to_pylist():
        deadline = time.monotonic() + wait_seconds
        while not layout.exists(path) and time.monotonic() < deadline:
            abort = f"{path.rsplit('/', 1)[0]}/ABORT"  # the driver's staging failed: its error
            if layout.exists(abort):
                raise RuntimeError(layout.read_bytes(abort).decode())
            time.sleep(0.2)
        tables.append(pq.read_table(io.BytesIO(layout.read_bytes(path))))
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def write_parts(batch: pa.Table, layout: RunLayout, staging: str, extra_types: dict[str, str]) -> pa.Table:
    """Write the batch's rows as one part file per shard; return one small record per part."""
    import uuid

    from .schema import error_cause, output_table
    from .sink import table_to_parquet_bytes

    rows = batch.to_pylist()
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_shard.setdefault(int(r["shard_id"]), []).append(r)
    out = {"shard_id": [], "path": [], "row_indices": [], "decode_s": [], "windows": [], "window_fallbacks": [],
           "audio_seconds": [], "error_causes": []}
    for shard_id, shard_rows in sorted(by_shard.items()):
        path = f"{staging}/parts/{shard_id:05d}/{uuid.uuid4().hex}.parquet"
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


def commit_shard(
    layout: RunLayout,
    shard_id: int,
    parts: list[str],
    extra_types: dict[str, str],
    stats: dict[str, Any],
    replace_failed: bool,
) -> dict[str, Any]:
    """Merge a shard's part files (a row written twice by a retried task is kept once) and commit the shard.

    The parts are output tables already: they are concatenated and de-duplicated, never converted again."""
    import io

    import pyarrow.parquet as pq

    from .schema import merge_output

    # read without Arrow's thread pool: commits run in the driver, and a process that used the pool can abort as
    # the interpreter exits (apache/arrow#34314, seen in `whisper-batch eval`); a part is a few rows
    table = merge_output(
        [pq.read_table(io.BytesIO(layout.read_bytes(p)), use_threads=False) for p in parts], extra_types
    )
    model = next((m for m in table.column("model").to_pylist() if m), None)
    record = commit_shard_table(layout, shard_id, table, extra_types, model, stats, replace_failed)
    for path in parts:  # the shard is committed: its parts are garbage now
        try:
            layout.fs.rm(path)
        except FileNotFoundError:
            pass
    return record


def build_dataset(
    input_files: list[str],
    cfg: RunConfig,
    layout: RunLayout,
    staging: str,
    extra_types: dict[str, str],
    n_mels: int,
) -> "ray.data.Dataset":
    """The streaming dataset whose rows are part records; iterating it runs the whole graph.

    Two stages, both actor pools: the feature actors (which read the input blocks) and the model actors (which
    write the part files). Every block holds one row (:data:`ROWS_PER_BLOCK`), so that Ray's bundling gives each
    model call the next ``rows_per_call`` rows in the featurizer's order, and a shard's calls spread over every
    model actor, without a split stage (tasks and worker processes of its own) between the two.
    """
    plan = model_resources(cfg)
    check_cluster(cfg, plan)  # a clear error before any work
    ds = ray.data.from_items([{"path": f} for f in input_files], override_num_blocks=len(input_files))
    ds = ds.map_batches(
        ArrowFeaturizer,
        fn_constructor_kwargs={"cfg": cfg, "n_mels": n_mels, "rows_per_call": plan.rows_per_call, "layout": layout,
                               "wait_seconds": cfg.ray.stall_timeout_seconds},
        compute=actor_pool(cfg.ray.cpu_actors, cfg.ray.max_cpu_actors or cfg.ray.cpu_actors),
        batch_size=None,  # a whole input block (whole shards) per call: containers read once, short rows packed
        batch_format="pyarrow",
        num_cpus=1,
    )
    ds = ds.map_batches(
        ArrowTranscriber,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": plan.threads, "sink": (layout, staging, extra_types)},
        compute=actor_pool(plan.actors, cfg.ray.max_model_actors or None),
        batch_size=plan.rows_per_call,
        batch_format="pyarrow",
        num_gpus=plan.gpus,
        num_cpus=plan.cpus,
    )
    ds.context.target_max_block_size = ROWS_PER_BLOCK
    ds.context._max_num_blocks_in_streaming_gen_buffer = FEATURE_BLOCKS_AHEAD
    return ds


# Ray Data gathers a map task's outputs into blocks of up to target_max_block_size bytes (default 128 MiB) before
# the next stage sees any of them, and slices larger ones to that size: with 1 byte, every block is one row. The
# featurizer's chunks go downstream as they are yielded, and the model stage's bundles (batch_size=rows_per_call)
# are exactly the featurizer's calls, each to whichever model actor is free.
ROWS_PER_BLOCK = 1

# Blocks a map call may yield before the driver has taken them (Ray Data's default is 2): with one-row blocks the
# featurizer, which yields a few model calls' rows at once, stopped after two rows until the driver's next round, and
# the model actors waited for features. Measured on the manifest x4 with cpu-fast (`whisper-batch run`, three runs
# each): idle CPU between the first model call and the end 1.21 CPU s with 2, 0.40 with 64. A row holds all the
# windows of its file, so 64 rows are 64 files' log-mel (about 0.5 MB per 30 s window, float16).
FEATURE_BLOCKS_AHEAD = 64


def run_graph(
    input_files: list[str],
    expected: dict[int, int],
    cfg: RunConfig,
    layout: RunLayout,
    staging: str,
    extra_types: dict[str, str],
    n_mels: int,
    replace_failed: bool = False,
    on_commit=None,
    on_part=None,
) -> list[dict[str, Any]]:
    """Run the graph over ``input_files``; commit each shard once its ``expected`` number of rows is written.

    Returns the completion records, or with ``on_commit`` nothing (a list that grows with the run): it is called
    with each record as its shard commits; and
    ``on_part(part, new_rows)`` as each part record arrives (``new_rows``: its rows not seen before). The driver only
    holds the row indices of shards in flight, so its memory does not grow with the corpus.
    """
    # commits run in the driver's threads: it already writes the input blocks to the same storage, and a commit
    # task would wait for a worker process to start and import pyarrow (the last shard's, after the last model call)
    commits = ThreadPoolExecutor(max_workers=commit_threads(), thread_name_prefix="commit")
    written: dict[int, set[int]] = {}
    parts: dict[int, list[str]] = {}
    stats: dict[int, dict[str, float]] = {}
    committed: set[int] = set()
    pending: list = []
    records: list[dict[str, Any]] = []
    n_records = 0

    def collect(block: bool) -> None:
        nonlocal n_records
        ready, not_done = wait_futures(pending, timeout=None if block else 0)
        pending[:] = not_done
        for future in ready:
            rec = future.result()  # a failed commit fails the run; the shard is redone by the next one
            n_records += 1
            if on_commit:
                on_commit(rec)
            else:
                records.append(rec)

    last_progress = time.monotonic()
    gpus = cfg.ray.gpus_per_model_actor
    gpus = (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0) if gpus is None else gpus
    nodes = NodeWatch(cfg.ray.lost_node_timeout_seconds, lambda: (len(committed), len(expected)), gpus)
    starts = StartWatch(("ArrowFeaturizer", "ArrowTranscriber"))
    try:
        stream = _stream(build_dataset(input_files, cfg, layout, staging, extra_types, n_mels))
        for part in nodes.guard(stream):
            nodes.poll()
            starts.check()  # raises ActorStartError when actors keep dying as they start
            if part is None:  # no output yet: commits may still finish, and a stall must not go unnoticed
                if pending:
                    n = n_records
                    collect(block=False)
                    last_progress = time.monotonic() if n_records > n else last_progress
                nodes.check(last_progress)  # raises NodeLost when a lost node's work is not redone in time
                idle = time.monotonic() - last_progress
                if idle > cfg.ray.stall_timeout_seconds:
                    raise Stalled(
                        f"no progress for {idle:.0f} s (ray.stall_timeout_seconds="
                        f"{cfg.ray.stall_timeout_seconds:g}): no rows came out of the graph and no shard committed. "
                        f"Committed shards are kept; rerun the same command to resume. Ray's logs "
                        f"(/tmp/ray/session_latest/logs) show where workers are stuck."
                    )
                continue
            last_progress = time.monotonic()
            starts.progressed()
            shard = int(part["shard_id"])
            if shard in committed:  # a part re-sent by a retried task after its shard committed
                continue
            before = len(written.setdefault(shard, set()))
            written[shard].update(part["row_indices"])
            if on_part:  # the progress display: rows, audio and failures as they are written
                on_part(part, len(written[shard]) - before)
            parts.setdefault(shard, []).append(part["path"])
            acc = stats.setdefault(shard, {})
            for key, name in (("decode_s", "decode_seconds"), ("windows", "windows"),
                              ("window_fallbacks", "window_fallbacks")):
                acc[name] = acc.get(name, 0) + part[key]
            if len(written[shard]) >= expected[shard]:
                pending.append(commits.submit(
                    commit_shard, layout, shard, parts.pop(shard), extra_types, stats.pop(shard), replace_failed))
                committed.add(shard)
                del written[shard]
            if pending:
                collect(block=False)
        while pending:
            collect(block=True)
    except ray.exceptions.ActorDiedError as e:
        if "creation task" not in str(e):  # died at work: Ray Data's own error
            raise
        # an actor whose class cannot even be loaded on its node: Ray Data stops at once, with a long message
        raise ActorStartError(start_failure(_class_of(e), 1, _pid_of(e))) from None
    finally:  # a failed run does not wait for the commits queued behind it
        commits.shutdown(wait=True, cancel_futures=True)
    if missing := sorted(set(expected) - committed):
        raise Incomplete(
            f"the graph ended with {len(missing)} shard(s) not committed (e.g. shard {missing[0]}: "
            f"{len(written.get(missing[0], ()))} of {expected[missing[0]]} rows written). Committed shards are "
            f"kept; rerun the same command to do the rest."
        )
    return records


def _pid_of(error: Exception) -> int:
    m = re.search(r"\bpid=(\d+)", str(error))
    return int(m.group(1)) if m else 0


def _class_of(error: Exception) -> str:
    m = re.search(r"ray::(\S+?)\.__init__", re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
    return m.group(1) if m else "an actor"


class Incomplete(RuntimeError):
    """The graph ended without every shard it was given committed."""


def _stream(ds: "ray.data.Dataset", poll: float = 2.0):
    """Iterate the dataset's rows in a thread; yield None every ``poll`` seconds without a row, so the caller can
    watch for a stall instead of blocking forever inside Ray."""
    q: queue.Queue = queue.Queue(maxsize=64)
    done = object()

    def produce() -> None:
        try:
            for row in ds.iter_rows():
                q.put(row)
            q.put(done)
        except BaseException as e:  # surfaced in the driver's thread
            q.put(e)

    threading.Thread(target=produce, name="graph-output", daemon=True).start()
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
