"""Model calls: which featurized rows a model actor transcribes together, and how a call travels through Ray Data.

A call's windows are decoded in batches of ``model.batch_size`` windows. On CPUs a call holds about one batch of
windows (:attr:`CallShape.windows`): a long recording alone, short files many to a call, so the decoder steps over
full batches, and no call holds every long file of a block while the other actors wait. Ray Data gives a map call a
fixed number of rows, so each call travels as one row (:func:`pack_call`), and the model stage takes one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# calls' worth of rows a featurizer gathers before ordering them into calls (after the first call, sent alone: the
# model actors are waiting)
FEATURE_CHUNK_CALLS = 4

CALL_SCHEMA = pa.schema([("call", pa.large_binary()), ("rows", pa.int64())])


@dataclass(frozen=True)
class CallShape:
    """How featurized rows are grouped into model calls."""

    rows: int  # rows per call; with ``windows``, the first call's rows only
    windows: int | None = None  # windows per call (a row is never split: a longer row is a call of its own)
    actors: int = 1  # model actors: a block's last rows are spread over them
    padded: bool = True  # decode.padding_seconds set: calls of rows of like lengths (else each leads with a long one)


def row_cost(item: dict[str, Any]) -> tuple[int, float]:
    """A featurized row's model work, roughly: its windows, then its seconds."""
    return len(item.get("mel_frames") or []), item.get("audio_seconds") or 0.0


def row_weight(item: dict[str, Any]) -> int:
    """A row's share of a call's window budget (a row without windows, an error, still counts once)."""
    return max(1, len(item.get("mel_frames") or []))


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


def call_order(items: list[dict[str, Any]], rows_per_call: int, padded: bool) -> list[dict[str, Any]]:
    """The order of featurized rows, ``rows_per_call`` of them to a model call: each call gets one of the longest
    rows (:func:`balance_order`); with ``decode.padding_seconds`` (``padded``) the calls get rows of like lengths
    instead (longest first), so that their windows have like encoder lengths and share batches."""
    if padded:
        return sorted(items, key=row_cost, reverse=True)
    return balance_order(items, rows_per_call)


def split_calls(items: list[dict[str, Any]], shape: CallShape, budget: int | None = None) -> list[list[dict[str, Any]]]:
    """``items`` as model calls: by rows (:func:`call_order`), or longest first, up to ``budget`` windows each
    (``shape.windows`` by default)."""
    if not shape.windows:
        ordered = call_order(items, shape.rows, shape.padded)
        return [ordered[k : k + shape.rows] for k in range(0, len(ordered), shape.rows)]
    budget = budget or shape.windows
    calls: list[list[dict[str, Any]]] = []
    call: list[dict[str, Any]] = []
    held = 0
    for item in sorted(items, key=row_cost, reverse=True):
        w = row_weight(item)
        if call and held + w > budget:
            calls.append(call)
            call, held = [], 0
        call.append(item)
        held += w
    return calls + [call] if call else calls


def iter_calls(items: Iterable[dict[str, Any]], shape: CallShape) -> Iterator[list[dict[str, Any]]]:
    """Featurized rows (as a featurizer makes them) → model calls, each as soon as it is known.

    The first call goes with its first ``shape.rows`` rows, or as soon as its rows fill a call's windows (the model
    actors are waiting); then
    :data:`FEATURE_CHUNK_CALLS` calls' worth of rows at a time are ordered and split. With a window budget, the last
    call of a chunk waits for the next rows (it may not be full), and at the end the rows left are spread over the
    model actors: a small block's rows go to every actor, not one call.
    """
    pending: list[dict[str, Any]] = []
    first = True
    chunk = FEATURE_CHUNK_CALLS * (shape.windows or shape.rows)
    for item in items:
        pending.append(item)
        if first:  # the first call: a few rows, or fewer that fill a call's windows
            if len(pending) >= shape.rows or (shape.windows and sum(map(row_weight, pending)) >= shape.windows):
                yield call_order(pending, shape.rows, shape.padded)
                pending, first = [], False
            continue
        if (sum(map(row_weight, pending)) if shape.windows else len(pending)) >= chunk:
            calls = split_calls(pending, shape)
            pending = calls.pop() if shape.windows else []
            yield from calls
    if not pending:
        return
    if shape.windows:  # calls of like sizes, at least one per actor
        held = sum(map(row_weight, pending))
        calls = max(shape.actors, -(-held // shape.windows))
        yield from split_calls(pending, shape, budget=-(-held // calls))
    else:
        yield from split_calls(pending, shape)


def pack_call(items: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """One call's rows as a one-row table (their table as an Arrow IPC stream): one Ray Data block, one call."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_pylist(items, schema=schema))
    # the stream as the cell's bytes without a copy: a long file's log-mel is tens of MB
    stream = sink.getvalue()
    offsets = pa.py_buffer(np.array([0, stream.size], dtype=np.int64))
    call = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, stream])
    return pa.Table.from_arrays([call, pa.array([len(items)], pa.int64())], schema=CALL_SCHEMA)


def unpack_calls(batch: pa.Table) -> list[dict[str, Any]]:
    """The rows of the calls :func:`pack_call` made (a batch of several calls gives all their rows, in order)."""
    return [row for chunk in batch.column("call").chunks for cell in chunk
            for row in pa.ipc.open_stream(cell.as_buffer()).read_all().to_pylist()]
