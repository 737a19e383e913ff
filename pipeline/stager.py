"""The graph's input: the driver writes the pending manifest records as input blocks while the graph runs
(:class:`InputStager`), and the feature actors read them, waiting for a block not written yet (:func:`read_inputs`).

Both sides find the blocks and the ``ABORT`` file of a failed staging through :class:`RunLayout`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from .config import RunConfig
from .layout import RunLayout
from .schema import RECORD_SCHEMA, records_table
from .sink import parquet_source, table_to_parquet_bytes

if TYPE_CHECKING:  # the feature actors import this module for read_inputs: not the manifest readers
    from .plan import Plan

logger = logging.getLogger(__name__)


class InputStager:
    """Writes the pending manifest records as the graph's input blocks while the graph runs.

    The block paths and each shard's row count are known from the plan before any block is written, so the graph
    starts at once; a thread streams the manifest (one block of ``ray.shards_per_block`` shards in memory at a time)
    and writes block after block, at most ``ahead_blocks`` blocks' shards ahead of the commits, so staging keeps
    pace with the graph instead of copying a million-row manifest before it starts. The feature actors wait
    for a block not written yet; a failed staging writes ``ABORT`` (its error) beside the blocks, which ends
    those waits.

    With ``only_rows`` (--retry-failed) a committed shard contributes only those rows; a shard never committed
    (in ``never_committed``) contributes all of its rows.

    Use :meth:`running` around the graph; tell it of each commit with :meth:`committed`.
    """

    def __init__(
        self,
        layout: RunLayout,
        invocation_id: str,
        input_uri: str,
        plan: Plan,
        pending: Iterable[int],
        cfg: RunConfig,
        only_rows: Iterable[int] | None = None,
        never_committed: Iterable[int] = (),
    ):
        self.layout, self.input_uri, self.plan, self.cfg = layout, input_uri, plan, cfg
        self.pending = sorted(pending)
        self.retry = set(only_rows) if only_rows is not None else None
        self.never_committed = set(never_committed)
        spb = cfg.ray.shards_per_block
        self.abort_path = layout.staging_abort(invocation_id)
        self.files = [layout.input_block(invocation_id, i) for i in range(-(-len(self.pending) // spb))]
        self.block_of = {s: i // spb for i, s in enumerate(self.pending)}
        self.expected: dict[int, int] = {}  # shard -> rows the graph gets of it
        for shard in self.pending:
            rows = plan.shard_rows(shard)
            if self.retry is not None and shard not in self.never_committed:
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
        self._ahead = 0  # shards
        self._stop = False

    @contextlib.contextmanager
    def running(self, ahead_blocks: int) -> Iterator[InputStager]:
        """Stages in a thread while the block runs, at most ``ahead_blocks`` blocks ahead of the commits.

        Leaving the block normally waits for the thread to end (a graph that ended has read every block, so they are
        all written); leaving it by an exception stops the staging. Either way a failed staging's error is raised,
        the cause of the graph's own error (which only saw missing blocks)."""
        self._ahead = ahead_blocks * self.cfg.ray.shards_per_block
        thread = threading.Thread(target=self._run, name="stage-inputs", daemon=True)
        thread.start()
        try:
            yield self
        except BaseException:  # any exit by an exception stops the staging, then is re-raised
            self._halt(thread)
            self._raise_error()
            raise
        thread.join()
        self._raise_error()

    def committed(self, shards: int) -> None:
        """``shards`` more shards committed: room for as many more staged."""
        with self._lock:
            self._committed += shards
            self._lock.notify_all()

    def check(self) -> None:
        """Raises the staging's error once it has failed (the graph's loop asks while it waits for output)."""
        self._raise_error()

    def _halt(self, thread: threading.Thread) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        thread.join()

    def _raise_error(self) -> None:
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
        try:
            self._stage()
        except BaseException as e:  # noqa: BLE001 - raised in the driver's thread as the staging ends
            self._error = e
            logger.error("staging the input blocks failed: %s", e)
            try:
                self.layout.write_bytes(self.abort_path, f"staging the input blocks failed: {e}".encode())
            except Exception:  # noqa: BLE001 - ABORT only spares the readers' wait; the driver raises the error
                pass

    def _stage(self) -> None:
        from .plan import iter_blocks

        written, staged_shards = set(), 0
        t_start = time.monotonic()
        spb, so = self.cfg.ray.shards_per_block, self.cfg.storage.storage_options
        for shard_ids, records in iter_blocks(self.input_uri, self.plan, self.pending, spb, so):
            if not self._wait_room(staged_shards):
                return
            if self.retry is not None:
                records = [r for r in records if r["shard_id"] in self.never_committed or r["row_index"] in self.retry]
            block = self.block_of[shard_ids[0]]
            self._check_rows(block, records)
            records.sort(key=longest_first)
            self.layout.write_bytes(self.files[block], table_to_parquet_bytes(records_table(records)))
            written.add(block)
            staged_shards += len(shard_ids)
            if block == 0:
                self.first_block_seconds = time.monotonic() - t_start
        for block in sorted(set(range(len(self.files))) - written):  # a block without rows: an empty block
            self._check_rows(block, [])
            self.layout.write_bytes(self.files[block], table_to_parquet_bytes(records_table([])))
        self.seconds += time.monotonic() - t_start


def longest_first(record: dict[str, Any]) -> tuple[int, float]:
    """Order of a block's records: shard by shard, and within a shard the longest rows (by the manifest's duration,
    where it gives one) first, so that a shard's long files do not start last and leave one model actor working
    through them while the others idle. Rows keep their row_index: the committed order does not change."""
    duration = record.get("duration")
    return record["shard_id"], -(duration if duration and duration == duration else 0.0)


def read_inputs(batch: pa.Table, layout: RunLayout, invocation_id: str, wait_seconds: float = 0.0) -> pa.Table:
    """Input block paths → the manifest records they hold.

    The driver stages blocks while the graph runs (a few ahead of the commits): a block not written yet is waited
    for, up to ``wait_seconds``, unless the driver's staging failed (its ``ABORT`` file: its error is raised).
    """
    abort = layout.staging_abort(invocation_id)
    tables = []
    for path in batch.column("path").to_pylist():
        deadline = time.monotonic() + wait_seconds
        while not layout.exists(path) and time.monotonic() < deadline:
            if layout.exists(abort):
                raise RuntimeError(layout.read_bytes(abort).decode())
            time.sleep(0.2)
        tables.append(pq.read_table(parquet_source(layout.read_bytes(path))))  # Arrow-owned: see its doc
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
