"""Shard commits in the driver: part records come in from the graph, and a shard whose rows are all written is
committed (:func:`commit_shard`) in one of the driver's threads while the graph goes on."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import pyarrow.parquet as pq

from .layout import RunLayout
from .schema import merge_output
from .sink import commit_shard_table, parquet_source


class Incomplete(RuntimeError):
    """The graph ended without every shard it was given committed."""


class ShardCommitter:
    """Commits each shard once its ``expected`` number of rows is written, in ``threads`` driver threads.

    :meth:`add_part` takes each part record the graph yields (a model call's rows of one shard, written as a part
    file); :meth:`collect` hands the records of finished commits to ``on_commit``, in the caller's thread, and
    raises a failed commit's error (the run fails; the shard is redone by the next one); :meth:`drain` waits for
    every commit; :meth:`check_complete` raises :class:`Incomplete` when a shard was never committed. A part re-sent
    by a retried task after its shard committed is ignored. ``on_part(part, new_rows)`` is told of each part taken
    (``new_rows``: its rows not seen before). Only the row indices of shards in flight are held, so the driver's
    memory does not grow with the corpus. Use as a context manager: leaving it drops the commits not yet started.
    """

    def __init__(
        self,
        layout: RunLayout,
        expected: dict[int, int],
        extra_types: dict[str, str],
        on_commit: Callable[[dict[str, Any]], None],
        replace_failed: bool = False,
        on_part: Callable[[dict[str, Any], int], None] | None = None,
        threads: int = 2,
    ):
        self.layout, self.expected, self.extra_types = layout, expected, extra_types
        self.on_commit, self.on_part, self.replace_failed = on_commit, on_part, replace_failed
        # commits run in the driver's threads: it already writes the input blocks to the same storage, and a commit
        # task would wait for a worker process to start and import pyarrow (the last shard's, after the last call)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="commit")
        self.written: dict[int, set[int]] = {}  # shard -> row indices written, of shards not committed
        self.parts: dict[int, list[str]] = {}  # shard -> its part files
        self.stats: dict[int, dict[str, float]] = {}  # shard -> decode seconds and window counts of its parts
        self.committed: set[int] = set()  # shards whose commit was started
        self.pending: list[Future] = []  # commits not collected yet

    def __enter__(self) -> ShardCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        # a failed run does not wait for the commits queued behind it
        self.pool.shutdown(wait=True, cancel_futures=True)

    def progress(self) -> tuple[int, int]:
        """(shards committed, shards given)."""
        return len(self.committed), len(self.expected)

    def add_part(self, part: dict[str, Any]) -> None:
        """Takes a part record; starts its shard's commit when the shard's rows are all written."""
        shard = int(part["shard_id"])
        if shard in self.committed:  # a part re-sent by a retried task after its shard committed
            return
        written = self.written.setdefault(shard, set())
        before = len(written)
        written.update(part["row_indices"])
        if self.on_part:  # the progress display: rows, audio and failures as they are written
            self.on_part(part, len(written) - before)
        self.parts.setdefault(shard, []).append(part["path"])
        acc = self.stats.setdefault(shard, {})
        for key, name in (("decode_s", "decode_seconds"), ("windows", "windows"),
                          ("window_fallbacks", "window_fallbacks")):
            acc[name] = acc.get(name, 0) + part[key]
        if len(written) >= self.expected[shard]:
            self.pending.append(self.pool.submit(
                commit_shard, self.layout, shard, self.parts.pop(shard), self.extra_types, self.stats.pop(shard),
                self.replace_failed,
            ))
            self.committed.add(shard)
            del self.written[shard]

    def collect(self, block: bool = False) -> int:
        """Hands finished commits' records to ``on_commit`` (with ``block``, waits for one at least); returns how
        many. Raises a failed commit's error."""
        if not self.pending:
            return 0
        ready, not_done = wait_futures(self.pending, timeout=None if block else 0)
        self.pending = list(not_done)
        for future in ready:
            self.on_commit(future.result())
        return len(ready)

    def drain(self) -> None:
        """Waits for every commit started, handing their records to ``on_commit``."""
        while self.pending:
            self.collect(block=True)

    def check_complete(self) -> None:
        """Raises :class:`Incomplete` when a shard given was never committed."""
        if missing := sorted(set(self.expected) - self.committed):
            raise Incomplete(
                f"the graph ended with {len(missing)} shard(s) not committed (e.g. shard {missing[0]}: "
                f"{len(self.written.get(missing[0], ()))} of {self.expected[missing[0]]} rows written). Committed "
                f"shards are kept; rerun the same command to do the rest."
            )


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
    # commits run in the driver: read over Arrow-owned copies, or its exit can abort (see parquet_source)
    table = merge_output(
        [pq.read_table(parquet_source(layout.read_bytes(p)), use_threads=False) for p in parts], extra_types
    )
    model = next((m for m in table.column("model").to_pylist() if m), None)
    record = commit_shard_table(layout, shard_id, table, extra_types, model, stats, replace_failed)
    for path in parts:  # the shard is committed: its parts are garbage now
        try:
            layout.fs.rm(path)
        except FileNotFoundError:
            pass
    return record
