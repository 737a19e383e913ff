"""The driver of ``whisper-batch run``: plan, resume, feed the pending shards to the graph, record stats.

The driver reads the manifest (streaming) into the graph's input blocks and handles small part and commit records:
audio, features and transcripts stay on the workers. The model actors write each call's rows as part files; the
driver's commit threads merge a shard's parts into its shard file and write its completion record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from whisper_batch.pipeline.config import RunConfig
from whisper_batch.pipeline.layout import NoSpace, RunLayout, is_no_space
from whisper_batch.pipeline.plan import Plan, ResumeState, build_plan, check_resume, finish_run, start_run
from whisper_batch.pipeline.sink import failed_rows
from whisper_batch.pipeline.stager import InputStager
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
    elif os.environ.get("RAY_ADDRESS"):  # a driver Ray started, as `ray job submit` starts one: join its cluster
        join_cluster(os.environ["RAY_ADDRESS"], runtime_env, source="RAY_ADDRESS")
    else:
        # a local Ray of its own ("local": ray.init would join a `ray start` cluster left on this machine), with this
        # machine's cores; the dashboard is not needed for a batch job
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env)
    # Ray Data's operator bars: on (Ray's default) unless whisper_batch.jobs.progress.quiet_screen turned them off


def stop_ray() -> None:
    """Stops the local Ray that ``init_ray`` started (on a cluster: disconnects), once a command's work is done.

    Ray would do the same at interpreter exit, but its exit hook first sleeps half a second for late worker output,
    which ``log_to_driver=False`` never shows."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def join_cluster(address: str, runtime_env: dict[str, Any] | None, source: str = "ray.address") -> None:
    """Joins the Ray cluster at ``address``, with this machine's token when it has one.

    ``ray.init`` sends a token to a cluster it finds itself (``auto``) but not to an address it is given, unless
    ``RAY_AUTH_MODE=token``; here, as for ``whisper-batch submit``, the token Ray's CLI would use (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) is sent whenever one is found and the mode is not set.

    Raises:
        ValueError: the cluster cannot be joined (the message has Ray's reason, e.g. a missing token).
    """
    import ray

    from whisper_batch.pipeline.ray_compat import enable_local_token

    enable_local_token()
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except ConnectionError as e:
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ValueError(f"cannot join the Ray cluster at {address} ({source}){cause}"[:1500]) from None


def run(
    input_uri: str,
    output_uri: str,
    cfg: RunConfig,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
    screen: Screen | None = None,
    progress_interval: float = DEFAULT_INTERVAL,
    lock_wait: float = 0.0,
) -> RunSummary:
    """Transcribe ``input_uri`` into ``output_uri``, skipping shards already committed there.

    ``lock_wait``: seconds to wait for another driver that holds OUTPUT to end before refusing (a job resubmitted
    right after ``jobs stop``, whose driver may still be exiting).

    With a ``screen`` (see ``whisper_batch.jobs.progress.quiet_screen``) the graph's progress is drawn there, as a bar
    or as a line every ``progress_interval`` seconds; without one, ``echo`` gets a line per committed shard.

    Raises:
        NoSpace: OUTPUT's storage filled up, in the driver or on a worker (its message says how to resume).
    """
    cfg = preflight(input_uri, output_uri, cfg)  # raises StorageError (a ValueError) before any work
    so = cfg.storage.storage_options
    layout = RunLayout(output_uri, so)
    plan = build_plan(input_uri, cfg, so)
    name, n_mels = model_label(cfg)
    lock = RunLock(layout, f"{os.getpid()}-{time.time()}", wait_s=lock_wait)
    try:
        # raises LockHeld when another driver is alive on OUTPUT. Taken before check_resume, so the done shards are
        # read while no other driver can commit: a driver started as another one ends never redoes what that one did
        lock.acquire()
        try:
            state = check_resume(layout, plan, cfg, name)  # raises PlanMismatch before any work
            driver = RunDriver(input_uri, layout, plan, state, cfg, name, n_mels, echo, screen, progress_interval)
            return driver.run(retry_failed)
        finally:
            lock.release()
    except Exception as e:
        # e.g. a model actor's part file, relayed by Ray (whose error classes may derive from NoSpace, with its own
        # text): one message, naming OUTPUT
        if is_no_space(e) and type(e) is not NoSpace:
            raise layout.no_space() from e
        raise


class RunDriver:
    """One invocation of ``run`` on OUTPUT, under its run lock: its pending shards staged and put through the graph,
    its commits counted and shown (on ``screen`` as a bar or a line every ``progress_interval`` seconds, else a line
    per commit to ``echo``), and its invocation record finished whatever happens."""

    def __init__(
        self,
        input_uri: str,
        layout: RunLayout,
        plan: Plan,
        state: ResumeState,
        cfg: RunConfig,
        model: str,
        n_mels: int,
        echo: Callable[[str], None] = print,
        screen: Screen | None = None,
        progress_interval: float = DEFAULT_INTERVAL,
    ):
        self.input_uri, self.layout, self.plan, self.state, self.cfg = input_uri, layout, plan, state, cfg
        self.model, self.n_mels = model, n_mels
        self.echo, self.screen, self.progress_interval = echo, screen, progress_interval
        self.shards = self.rows = self.errors = 0  # committed by this invocation
        self.pending: list[int] = []  # shards to do
        self.started = time.time()
        self.progress: Progress | None = None
        self.stager: InputStager | None = None

    def run(self, retry_failed: bool = False) -> RunSummary:
        invocation = start_run(self.layout, self.plan, self.cfg, self.model)
        only_rows = self._choose_pending(retry_failed)
        self.echo(
            f"{self.plan.n_rows} rows in {self.plan.n_shards} shards; {len(self.state.done)} already committed, "
            f"{len(self.pending)} to do → {self.layout.display_uri}"
        )
        status, self.started = "ok", time.time()
        try:
            if self.pending:
                self._transcribe(invocation["id"], only_rows, retry_failed)
            remove_staging(self.layout, invocation["id"])
        except BaseException:  # any exit by an exception, Ctrl-C included, records a failed run; re-raised
            status = "failed"
            raise
        finally:
            try:
                stats = finish_run(self.layout, invocation, status=status, shards_committed=self.shards)
            except OSError as e:
                if status == "ok":
                    raise
                # e.g. a full disk: the run's own error, on its way out, says more than this one
                logger.warning(
                    "could not record the end of the failed invocation in %s: %s", self.layout.display_uri, e
                )
        return RunSummary(self.layout.display_uri, self.plan.n_shards, len(self.state.done), self.shards, self.rows,
                          self.errors, stats)

    def _choose_pending(self, retry_failed: bool) -> list[int] | None:
        """Sets the shards to do; returns the rows to redo with ``retry_failed`` (else None: every row)."""
        self.pending = list(self.state.pending)
        if not retry_failed:
            return None
        failed = failed_rows(self.layout)
        only_rows = sorted(i for rows in failed.values() for i in rows)
        self.pending = sorted(set(self.pending) | set(failed))
        self.echo(f"retrying {len(only_rows)} failed rows in {len(failed)} shards")
        return only_rows

    def _transcribe(self, invocation_id: str, only_rows: list[int] | None, retry_failed: bool) -> None:
        """Stages the pending shards' rows and runs the graph over them while they are staged."""
        stager = InputStager(self.layout, invocation_id, self.input_uri, self.plan, self.pending, self.cfg,
                             only_rows, self.state.pending)
        if not stager.files:
            return
        init_ray(self.cfg)
        from whisper_batch.pipeline.cluster import commit_threads
        from whisper_batch.pipeline.graph import run_graph

        self.stager = stager
        with stager.running(ahead_blocks=max(8, 4 * commit_threads())):
            self.progress = self._progress(stager.expected)
            with self.progress or contextlib.nullcontext():
                run_graph(
                    stager.files, stager.expected, self.cfg, self.layout, invocation_id, self.plan.extra_types,
                    self.n_mels, self.on_commit, replace_failed=retry_failed,
                    on_part=self.progress and self.progress.on_part, check=stager.check,
                )
        self.echo(
            f"staged {len(stager.files)} input blocks as the graph ran: {stager.seconds:.1f} s of staging, "
            f"the first block after {stager.first_block_seconds or 0.0:.2f} s"
        )

    def on_commit(self, record: dict[str, Any]) -> None:
        """A shard committed: counted, shown, and room for the stager to stage one more."""
        if self.stager is not None:
            self.stager.committed(1)
        self.shards += 1
        self.rows += record["rows"]
        self.errors += record["errors"]
        if self.progress is not None:
            self.progress.on_commit(record)
            return
        self.echo(
            f"  committed shard {record['shard_id']} ({record['rows']} rows, {record['errors']} failed) — "
            f"{self.shards}/{len(self.pending)} shards, {time.time() - self.started:.0f}s"
        )

    def _progress(self, expected: dict[int, int]) -> Progress | None:
        """The progress display of this invocation's graph, or None without a screen."""
        if self.screen is None:
            return None
        rows = sum(expected.values())
        counts = Counts(
            rows_total=rows, run_rows_total=self.plan.n_rows, run_rows_before=max(0, self.plan.n_rows - rows),
            shards_total=len(expected), run_shards_total=self.plan.n_shards, run_shards_before=len(self.state.done),
        )
        return Progress(counts, self.screen, self.progress_interval)


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
