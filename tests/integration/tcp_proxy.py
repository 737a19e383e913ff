"""A small fault-injecting TCP proxy for the fault tests: 127.0.0.1:<port> → an upstream server (e.g. moto's S3).

Each connection's first bytes (the start of its request) are read; every ``every``-th connection whose first bytes
contain ``match`` (and not ``spare``) gets a fault, cycling through ``faults``:

- ``"reset"``: the request is dropped and the connection reset (RST); the upstream never sees it.
- ``"truncate"``: the request reaches the upstream, which acts on it and answers; the client gets only the first
  bytes of the final answer, then a reset. A retry repeats a request that already took effect (a lost response).
- ``"stall"``: nothing happens for ``stall_seconds``, then the connection is reset (a client with a shorter read
  timeout gives up first).

Other connections are piped both ways untouched. The proxy counts connections and faults per kind, so a test can
assert that faults were really injected.

    with TcpProxy(("127.0.0.1", moto_port), every=4) as proxy:
        run_against(proxy.url)
    assert proxy.faults["reset"] > 0
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import Counter
from collections.abc import Sequence

logger = logging.getLogger(__name__)

FAULTS = ("reset", "truncate", "stall")
_CHUNK = 65536
_INTERIM = b"HTTP/1.1 100"


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # wakes a recv() blocked on this socket in another thread; until it returns, close() would not reset
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


def _recv(sock: socket.socket, timeout: float | None = None) -> bytes:
    try:
        sock.settimeout(timeout)
        return sock.recv(_CHUNK)
    except OSError:  # socket.timeout is an OSError
        return b""


class TcpProxy:
    """Threaded TCP proxy on 127.0.0.1 that injects connection faults (see the module docstring).

    Args:
        upstream: (host, port) of the real server.
        every: fault every n-th matching connection (0: never).
        faults: fault kinds to cycle through, from :data:`FAULTS`.
        match: only connections whose first bytes contain this count and can get a fault (None: all).
        spare: connections whose first bytes contain this never get a fault and are not counted.
        first: index (from 0) of the first matching connection that gets a fault.
        stall_seconds: how long a stalled connection hangs before it is reset.
        truncate_bytes: bytes of the final answer a truncated connection lets through.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        every: int = 0,
        faults: Sequence[str] = FAULTS,
        match: bytes | None = None,
        spare: bytes | None = None,
        first: int = 1,
        stall_seconds: float = 4.0,
        truncate_bytes: int = 12,
    ):
        if unknown := [f for f in faults if f not in FAULTS]:
            raise ValueError(f"unknown fault kinds {unknown}; expected some of {FAULTS}")
        self.upstream, self.every, self.kinds, self.match, self.spare = upstream, every, tuple(faults), match, spare
        self.first, self.stall_seconds, self.truncate_bytes = first, stall_seconds, truncate_bytes
        self.connections = 0  # connections that sent a request
        self.matched = 0  # of those, the ones that matched `match`
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:  # wake accept()
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._server.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._stop.is_set():
                client.close()
                return
            threading.Thread(target=self._handle, args=(client,), name="proxy-conn", daemon=True).start()

    def _choose(self, request: bytes) -> str | None:
        """The fault for a connection whose first bytes are ``request`` (counted in arrival order)."""
        with self._lock:
            self.connections += 1
            if (self.match is not None and self.match not in request) or (self.spare and self.spare in request):
                return None
            n, self.matched = self.matched, self.matched + 1
        if self.every <= 0 or n < self.first or (n - self.first) % self.every:
            return None
        return self.kinds[((n - self.first) // self.every) % len(self.kinds)]

    def _count(self, fault: str) -> None:
        with self._lock:
            self.faults[fault] += 1
        logger.info("proxy %d: injected %s", self.port, fault)

    def _handle(self, client: socket.socket) -> None:
        request = _recv(client, timeout=30)
        if not request:
            client.close()
            return
        fault = self._choose(request)
        if fault in ("reset", "stall"):
            if fault == "stall":
                self._stop.wait(self.stall_seconds)
            self._count(fault)
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.sendall(request)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        if fault == "truncate":
            self._truncate(client, upstream)
            return
        pump = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        pump.start()
        self._pipe(client, upstream)
        pump.join()
        upstream.close()
        client.close()

    def _truncate(self, client: socket.socket, upstream: socket.socket) -> None:
        """Let only the first bytes of the final answer through, then reset both sides."""
        # the rest of the request (a PUT body may span many reads) streams up while the answer is awaited here
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        answer = b""
        while data := _recv(upstream, timeout=30):
            answer += data
            # an interim "100 Continue" goes through whole: the client then sends its body, which the upstream acts on
            while answer.startswith(_INTERIM) and b"\r\n\r\n" in answer:
                end = answer.index(b"\r\n\r\n") + 4
                client.sendall(answer[:end])
                answer = answer[end:]
            if answer and not _INTERIM.startswith(answer[: len(_INTERIM)]):
                break  # the start of the final answer
        if answer:
            try:
                client.sendall(answer[: self.truncate_bytes])
                self._count("truncate")
            except OSError:
                pass
        _reset(upstream)
        _reset(client)

    def _before_send(self) -> None:
        """Called before each chunk is passed on (a subclass may hold it back)."""

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy src → dst until EOF or an error, then half-close dst so the other direction can finish."""
        try:
            while data := src.recv(_CHUNK):
                self._before_send()
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
