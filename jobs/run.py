"""The driver of ``whisper-batch run``: plan, resume, feed waves of shards to the graph, record stats.

The driver reads the manifest (streaming) and handles small commit records; audio, features and transcripts stay on
the workers, which write the shard files themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn

from whisper_batch.pipeline.config import RunConfig
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import build_plan, check_resume, finish_run, iter_waves, start_run
from whisper_batch.pipeline.sink import failed_rows
from whisper_batch.pipeline.storage import preflight

from .lock import RunLock
from .progress import DEFAULT_INTERVAL, Counts, Progress, Screen

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_done_before: int
    shards_committed: int
    rows_committed: int
    rows_failed: int
    stats: dict[str, Any]


def model_label(cfg: RunConfig) -> tuple[str, int]:
    """The model's display name and its mel bins, from the checkpoint's metadata (no weights loaded)."""
    from whisper_batch.model.checkpoint import describe_model
    from whisper_batch.pipeline.model_store import fetcher

    return describe_model(cfg.model.name, fetch=fetcher(cfg.storage.storage_options))


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    hook = cfg.ray.worker_setup_hook
    runtime_env = {"worker_process_setup_hook": hook} if hook else None
    if cfg.ray.address:
        join_cluster(cfg.ray.address, runtime_env)
    else:
        # a local Ray: this machine's cores; the dashboard is not needed for a batch job
        with prompt_node_check():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    # Ray Data's operator bars: on (Ray's default) unless whisper_batch.jobs.progress.quiet_screen turned them off


NODE_POLL_SECONDS = 0.05
NODE_POLL_LIMIT_SECONDS = 10.0


@contextlib.contextmanager
def prompt_node_check() -> Iterator[None]:
    """While a local Ray starts, find out within ``NODE_POLL_SECONDS`` when its raylet has registered.

    ``ray.init`` starts the raylet, waits 0.1 s, then asks the GCS for the new node in C++ (``GetNode``), which sleeps
    a whole second after each miss. The raylet registers once its dashboard agent is up, 0.9-1.1 s after it starts
    on two busy cores (1.8 s when it also waits a second on its object store), so the second ask came at 1.1 s or at
    2.1 s, and Ray's start took 2.5 s or 3.5 s from one run to the next. Inside this block, that ask is made only once
    the node is in the GCS's node table, polled here (``GcsClient.get_all_node_info``); the ask then answers at once.
    Ray's functions are internal: where they are not as expected, Ray starts as it would without this block.
    """
    try:
        from ray._private import services
        from ray._raylet import GcsClient

        original = services.get_node
    except Exception:  # noqa: BLE001 — an internal that moved costs the wait, never the start
        yield
        return

    def get_node(gcs_address: str, node_id: str, *args: Any, **kwargs: Any) -> Any:
        try:
            client = GcsClient(address=gcs_address)
            # a raylet that has not registered by then gets Ray's own wait (30 s) and its error, after this one
            deadline = time.monotonic() + NODE_POLL_LIMIT_SECONDS
            while time.monotonic() < deadline:
                if any(key.hex() == node_id for key in client.get_all_node_info(timeout=5)):
                    break
                time.sleep(NODE_POLL_SECONDS)
        except Exception:  # noqa: BLE001
            logger.debug("polling the GCS for the new node failed; Ray's own wait follows", exc_info=True)
        return original(gcs_address, node_id, *args, **kwargs)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


def stop_ray() -> None:
    """Stops the local Ray that ``init_ray`` started (on a cluster: disconnects), once a command's work is done.

    Ray would do the same at interpreter exit, but its exit hook first sleeps half a second for late worker output,
    which ``log_to_driver=False`` never shows."""
    import ray

    if ray.is_initialized():
        _end_autoscaler_monitor()
        ray.shutdown()


def exit_process(code: int | str | None = 0) -> NoReturn:
    """Ends this process with exit status ``code`` (as ``sys.exit`` takes it) once a command's work is done,
    without Python's teardown of its modules.

    That teardown (Ray's, pyarrow's and pandas' modules and objects, after Ray's shutdown) took 0.5-0.65 s of every
    ``whisper-batch run`` and does nothing a finished command needs. The exit handlers still run (logging's flush,
    Ray's own hook, temporary folders' finalizers), then the standard streams are flushed. Where Ray is still
    connected, or a thread other than a daemon is alive, the usual exit runs instead: they may have work to finish.
    """
    import atexit

    ray = sys.modules.get("ray")
    busy = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if busy or (ray is not None and ray.is_initialized()):
        logger.debug("usual interpreter exit: Ray connected or threads alive (%s)", busy)
        sys.exit(code)
    status = 0 if code is None else code
    if not isinstance(status, int):  # sys.exit("message"): the message to stderr, status 1
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _end_autoscaler_monitor() -> None:
    """Ends the autoscaler monitor of a local Ray this process started, before ``ray.shutdown``.

    ``ray.shutdown`` stops the GCS before the monitor; the monitor's SIGTERM handler then reports to the GCS that is
    gone, and the shutdown waits a full second before killing it (1.0 of its 1.1-1.4 s; 0.1-0.35 s without). A
    local Ray has no autoscaler for the monitor to clean up after. Ray's process table is internal: where it is not
    as expected, nothing is done and the shutdown takes its second.
    """
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is None or not node.head:  # a cluster joined by address: its processes are not ours
            return
        for info in list(node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 — an internal that moved costs the second, never the shutdown
        logger.debug("autoscaler monitor not ended before Ray's shutdown", exc_info=True)


def join_cluster(address: str, runtime_env: dict[str, Any] | None) -> None:
    """Joins the Ray cluster at ``address``, with this machine's token when it has one.

    ``ray.init`` sends a token to a cluster it finds itself (``auto``) but not to an address it is given, unless
    ``RAY_AUTH_MODE=token``; here, as for ``whisper-batch submit``, the token Ray's CLI would use (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) is sent whenever one is found and the mode is not set.

    Raises:
        ValueError: the cluster cannot be joined (the message has Ray's reason, e.g. a missing token).
    """
    import ray

    from .ray_token import enable_local_token

    enable_local_token()
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except ConnectionError as e:
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ValueError(f"cannot join the Ray cluster at {address} (ray.address){cause}"[:1500]) from None


def run(
    input_uri: str,
    output_uri: str,
    cfg: RunConfig,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
    screen: Screen | None = None,
    progress_interval: float = DEFAULT_INTERVAL,
) -> RunSummary:
    """Transcribe ``input_uri`` into ``output_uri``, skipping shards already committed there.

    With a ``screen`` (see ``whisper_batch.jobs.progress.quiet_screen``) the graph's progress is drawn there, as a bar or as a
    line every ``progress_interval`` seconds; without one, ``echo`` gets a line per committed shard.
    """
    cfg = preflight(input_uri, output_uri, cfg)  # raises StorageError (a ValueError) before any work
    so = cfg.storage.storage_options
    layout = RunLayout(output_uri, so)
    plan = build_plan(input_uri, cfg, so)
    name, n_mels = model_label(cfg)
    lock = RunLock(layout, f"{os.getpid()}-{time.time()}")
    # raises LockHeld when another driver is alive on OUTPUT. Taken before check_resume, so the done shards are
    # read while no other driver can commit: a driver started as another one ends never redoes what that one did
    lock.acquire()
    try:
        state = check_resume(layout, plan, cfg, name)  # raises PlanMismatch before any work
        display = (screen, progress_interval)
        return _run_locked(input_uri, layout, plan, state, cfg, name, n_mels, retry_failed, echo, display)
    finally:
        lock.release()


def _run_locked(input_uri, layout, plan, state, cfg, name, n_mels, retry_failed, echo, display=(None, 0)) -> RunSummary:
    invocation = start_run(layout, plan, cfg, name)
    only_rows = None
    pending = list(state.pending)
    if retry_failed:
        failed = failed_rows(layout)
        only_rows = sorted(i for rows in failed.values() for i in rows)
        pending = sorted(set(pending) | set(failed))
        echo(f"retrying {len(only_rows)} failed rows in {len(failed)} shards")
    echo(
        f"{plan.n_rows} rows in {plan.n_shards} shards; {len(state.done)} already committed, "
        f"{len(pending)} to do → {layout.display_uri}"
    )
    totals = {"shards": 0, "rows": 0, "errors": 0}
    status, t0 = "ok", time.time()
    progress: Progress | None = None

    def on_commit(rec: dict[str, Any]) -> None:
        totals["shards"] += 1
        totals["rows"] += rec["rows"]
        totals["errors"] += rec["errors"]
        if progress is not None:
            progress.on_commit(rec)
            return
        echo(
            f"  committed shard {rec['shard_id']} ({rec['rows']} rows, {rec['errors']} failed) — "
            f"{totals['shards']}/{len(pending)} shards, {time.time() - t0:.0f}s"
        )

    try:
        if pending:
            staging = layout.staging_dir(invocation["id"])
            stager = InputStager(layout, staging, input_uri, plan, pending, cfg, only_rows, set(state.pending))
            if stager.files:
                init_ray(cfg)
                from whisper_batch.pipeline.cluster import commit_threads
                from whisper_batch.pipeline.graph import run_graph

                def on_commit_staged(rec: dict[str, Any]) -> None:
                    stager.committed(1)
                    on_commit(rec)

                stager.start(ahead_blocks=max(8, 4 * commit_threads()))
                progress = _progress(display, plan, state, stager.expected)
                try:
                    with progress or contextlib.nullcontext():
                        run_graph(
                            stager.files, stager.expected, cfg, layout, staging, plan.extra_types, n_mels,
                            replace_failed=retry_failed, on_commit=on_commit_staged,
                            on_part=progress and progress.on_part,
                        )
                except BaseException:
                    stager.stop()
                    stager.raise_error()  # the cause, when staging failed and the graph only saw missing blocks
                    raise
                stager.stop()
                stager.raise_error()
                echo(
                    f"staged {len(stager.files)} input blocks as the graph ran: {stager.seconds:.1f} s of staging, "
                    f"the first block after {stager.first_block_seconds or 0.0:.2f} s"
                )
        remove_staging(layout, invocation["id"])
    except BaseException:
        status = "failed"
        raise
    finally:
        stats = finish_run(layout, invocation, status=status, shards_committed=totals["shards"])
    return RunSummary(
        layout.display_uri, plan.n_shards, len(state.done), totals["shards"], totals["rows"], totals["errors"], stats
    )


def _progress(display: tuple[Screen | None, float], plan, state, expected: dict[int, int]) -> Progress | None:
    """The progress display of this invocation's graph, or None without a screen."""
    screen, interval = display
    if screen is None:
        return None
    rows = sum(expected.values())
    counts = Counts(
        rows_total=rows, run_rows_total=plan.n_rows, run_rows_before=max(0, plan.n_rows - rows),
        shards_total=len(expected), run_shards_total=plan.n_shards, run_shards_before=len(state.done),
    )
    return Progress(counts, screen, interval)


def remove_staging(layout: RunLayout, invocation_id: str) -> None:
    """Deletes the staging folder of this invocation and those that earlier ones left (drivers killed or failed).

    Called under the run lock, so no other driver is live on OUTPUT. The folders of later invocations (a driver
    that took over a lock it judged stale) and the storage preflight's probes of drivers about to be refused the
    lock are left alone. Staging is garbage once a run ends, so a failure to delete it is only a warning.
    """
    try:
        for name in layout.list_staged_invocations():
            if name <= invocation_id:
                layout.remove_tree(layout.staging_dir(name))
    except Exception as e:  # noqa: BLE001 - every shard is committed; leftovers go at the next run's end
        logger.warning("could not remove staging under %s/_staging: %s", layout.display_uri, e)


def longest_first(record: dict[str, Any]) -> tuple[int, float]:
    """Order of a block's records: shard by shard, and within a shard the longest rows (by the manifest's duration,
    where it gives one) first, so that a shard's long files do not start last and leave one model actor working
    through them while the others idle. Rows keep their row_index: the committed order does not change."""
    duration = record.get("duration")
    return record["shard_id"], -(duration if duration and duration == duration else 0.0)


class InputStager:
    """Writes the pending manifest records as the graph's input blocks while the graph runs.

    The block paths and each shard's row count are known from the plan before any block is written, so the graph
    starts at once; a thread streams the manifest (one wave of ``ray.shards_per_block`` shards in memory at a time)
    and writes block after block, at most ``ahead_blocks`` blocks' shards ahead of the commits, so staging keeps
    pace with the graph instead of copying a million-row manifest before it starts. The feature actors wait
    for a block not written yet; a failed staging writes ``ABORT`` (its error) beside the blocks, which ends
    those waits.

    With ``only_rows`` (--retry-failed) a committed shard contributes only those rows; a shard never committed
    contributes all of its rows.
    """

    def __init__(self, layout, staging, input_uri, plan, pending, cfg, only_rows, never_committed):
        self.layout, self.input_uri, self.plan, self.cfg = layout, input_uri, plan, cfg
        self.pending = sorted(pending)
        self.retry = set(only_rows) if only_rows is not None else None
        self.never_committed = never_committed
        spb = cfg.ray.shards_per_block
        self.folder = f"{staging}/input"
        self.files = [f"{self.folder}/block-{i:06d}.parquet" for i in range(-(-len(self.pending) // spb))]
        self.block_of = {s: i // spb for i, s in enumerate(self.pending)}
        self.expected = {}
        for shard in self.pending:
            rows = plan.shard_rows(shard)
            if self.retry is not None and shard not in never_committed:
                n = sum(1 for r in rows if r in self.retry)
            else:
                n = len(rows)
            if n:
                self.expected[shard] = n
        self.seconds = 0.0  # staging time, waits for the graph not counted (set when the last block is written)
        self.first_block_seconds: float | None = None
        self._error: BaseException | None = None
        self._lock = threading.Condition()
        self._committed = 0  # shards
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def abort_path(self) -> str:
        return f"{self.folder}/ABORT"

    def start(self, ahead_blocks: int) -> None:
        self._ahead = ahead_blocks * self.cfg.ray.shards_per_block
        self._thread = threading.Thread(target=self._run, name="stage-inputs", daemon=True)
        self._thread.start()

    def committed(self, shards: int) -> None:
        with self._lock:
            self._committed += shards
            self._lock.notify_all()

    def wait(self) -> None:
        """Blocks until every block is written (or staging failed)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_room(self, staged_shards: int) -> bool:
        """Blocks until fewer than the look-ahead's shards are staged but not committed; False once stopped."""
        t0 = time.monotonic()
        with self._lock:
            while not self._stop and staged_shards - self._committed >= self._ahead:
                self._lock.wait(0.5)
        self.seconds -= time.monotonic() - t0  # waiting for room is not staging time
        return not self._stop

    def _check_rows(self, block: int, records: list[dict[str, Any]]) -> None:
        """Raises ValueError when a block's shards do not have the rows the plan counted (the manifest changed)."""
        spb = self.cfg.ray.shards_per_block
        got: dict[int, int] = {}
        for r in records:
            got[r["shard_id"]] = got.get(r["shard_id"], 0) + 1
        for shard in self.pending[block * spb : (block + 1) * spb]:
            if got.get(shard, 0) != self.expected.get(shard, 0):
                raise ValueError(
                    f"the manifest changed while the run was reading it: shard {shard} has {got.get(shard, 0)} "
                    f"rows now, the plan counted {self.expected.get(shard, 0)}. Committed shards are kept; rerun "
                    f"the same command (it refuses a changed manifest, naming the change)"
                )

    def _run(self) -> None:
        from whisper_batch.pipeline.schema import records_table
        from whisper_batch.pipeline.sink import table_to_parquet_bytes

        written, staged_shards = set(), 0
        so = self.cfg.storage.storage_options
        t_start = time.monotonic()
        try:
            waves = iter_waves(self.input_uri, self.plan, self.pending, self.cfg.ray.shards_per_block, so)
            for shard_ids, records in waves:
                if not self._wait_room(staged_shards):
                    return
                if self.retry is not None:
                    records = [r for r in records if r["shard_id"] in self.never_committed or r["row_index"] in self.retry]
                block = self.block_of[shard_ids[0]]
                self._check_rows(block, records)
                records.sort(key=longest_first)
                table = records_table(records)
                self.layout.write_bytes(self.files[block], table_to_parquet_bytes(table))
                written.add(block)
                staged_shards += len(shard_ids)
                if block == 0:
                    self.first_block_seconds = time.monotonic() - t_start
            for block in sorted(set(range(len(self.files))) - written):  # a wave without rows: an empty block
                self._check_rows(block, [])
                self.layout.write_bytes(self.files[block], table_to_parquet_bytes(records_table([])))
            self.seconds += time.monotonic() - t_start
        except BaseException as e:  # noqa: BLE001 - surfaced by raise_error in the driver's thread
            self._error = e
            logger.error("staging the input blocks failed: %s", e)
            try:
                self.layout.write_bytes(self.abort_path, f"staging the input blocks failed: {e}".encode())
            except Exception:  # noqa: BLE001
                pass

