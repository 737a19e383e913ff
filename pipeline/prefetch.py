"""Bounded prefetch: the next rows' audio bytes are fetched while the current row is decoded.

An object store answers each GET after tens of milliseconds. Fetched one after another, a shard of small files
spends most of its time waiting; with a few fetches in flight the latency overlaps the decode and the other
fetches. The bound is a number of files, never a shard: at most ``depth`` fetched-but-unconsumed files, each at
most ``max_bytes`` (a larger file is not kept: it is streamed by the decoder as before).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import fsspec

from .audio import AudioError

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T],
    fetch: Callable[[T], R],
    depth: int,
    pool: ThreadPoolExecutor,
    timeout: float | None = None,
) -> Iterator[tuple[T, R | BaseException]]:
    """Yields ``(item, fetch(item))`` in the order of ``items``, with up to ``depth`` fetches running or done ahead
    of the consumer; a fetch that raised (or took longer than ``timeout`` seconds once waited for) yields its
    exception instead of a result. ``depth`` 0 fetches each item when it is reached."""
    if depth <= 0:
        for item in items:
            try:
                yield item, fetch(item)
            except Exception as e:  # noqa: BLE001 - handed to the caller with its item
                yield item, e
        return
    ahead: deque[tuple[T, Future]] = deque()
    source = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(ahead) < depth:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            ahead.append((item, pool.submit(fetch, item)))
        if not ahead:
            return
        item, future = ahead.popleft()
        try:
            result: Any = future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            result = TimeoutError(f"fetching took more than {timeout:g} s")
        except Exception as e:  # noqa: BLE001 - handed to the caller with its item
            result = e
        yield item, result


def fetch_small(uri: str, storage_options: dict[str, Any] | None, max_bytes: int) -> bytes | None:
    """The whole object at ``uri`` when it has at most ``max_bytes`` bytes (one ranged GET), else None (stream it).

    Raises:
        AudioError("not found") when the object does not exist.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError as e:
        raise AudioError("not found", f"{uri} ({e})") from e
    return bytes(data) if len(data) <= max_bytes else None
