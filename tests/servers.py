"""Servers the tests start on 127.0.0.1: one place for a free port and the moto S3 server."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago. They are held open together while they are
    picked: ports picked one at a time may repeat (the OS hands a port it just released out again), and a Ray node
    given one port for two of its components refuses to start."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def moto_s3() -> Iterator[str]:
    """A real S3 server (moto's) on 127.0.0.1 for the block, with no buckets; yields its endpoint URL. Skips without
    moto[server]."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets per process, not per server: start every server empty, as a fresh S3 would be
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    try:
        yield endpoint
    finally:
        server.stop()
