"""Host-side servers for the NAT tests, all on loopback (127.0.0.1, or ::1 where a
server is given ``host=LOOPBACK6``) and all in threads.

Every server binds an ephemeral port on loopback, runs in daemon threads with
bounded socket timeouts, records what it saw, and is stopped by ``close()``
(each is a context manager). Nothing here ever talks to another machine.

* ``DnsServer``: answers A and AAAA queries for a few names over UDP and TCP on the same port.
* ``HttpFileServer``: serves one generated file over HTTP/1.0.
* ``TcpSink``: reads each connection to EOF, records size, sha256 and duration,
  answers with the sha256 in hex.
* ``TcpSource``: sends a generated payload on each connection, then closes.
* ``PacedHttpServer``: like ``HttpFileServer``, but paced, and held at a
  point until released (a download that spans a migration).
* ``BarrierEchoServer``: reads one line per connection, holds every connection
  open until ``expected`` of them are open at once, then echoes the lines back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Self

LOOPBACK = "127.0.0.1"
LOOPBACK6 = "::1"
IO_TIMEOUT = 120.0  # no single socket operation of a test may block longer
ACCEPT_POLL = 0.2


def generated_bytes(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes, so two sides can agree without sending a key."""
    return random.Random(seed).randbytes(size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _AcceptLoop:
    """A listening TCP socket whose connections each get a daemon thread running ``handle``."""

    def __init__(self, handle: Callable[[socket.socket], None], port: int = 0,
                 host: str = LOOPBACK) -> None:
        self._handle = handle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.listener.settimeout(ACCEPT_POLL)
        self.port = self.listener.getsockname()[1]
        self.peers: list[str] = []  # the source address of each connection, in order
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            conn.settimeout(IO_TIMEOUT)
            worker = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._handle(conn)
            except OSError:
                pass  # the test sees the missing result; the server stays up

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self.listener.close()
        for worker in self._threads:
            worker.join(timeout=5)


# --- DNS ------------------------------------------------------------------------


def dns_query(name: str, query_id: int = 0x1234, qtype: int = 1) -> bytes:
    """A standard recursive query for ``name`` (type A by default)."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return header + labels + b"\0" + struct.pack("!HH", qtype, 1)


def _question_end(message: bytes) -> int:
    offset = 12
    for _ in range(128):
        length = message[offset]
        offset += 1
        if length == 0:
            return offset + 4
        offset += length
    raise ValueError("name too long")


def _question_name(message: bytes) -> str:
    parts, offset = [], 12
    for _ in range(128):
        length = message[offset]
        if length == 0:
            break
        parts.append(message[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    return ".".join(parts).lower()


class _AcceptLoopServer:
    """A test server running on one ``_AcceptLoop``: ``close()`` ends it, ``with`` closes it."""

    _loop: _AcceptLoop

    @property
    def peers(self) -> list[str]:
        """The source address of each connection the server accepted."""
        return self._loop.peers

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DnsServer:
    """A tiny authoritative server: A and AAAA records from ``records`` (a name's addresses,
    one or a list; IPv4 ones answer A queries, IPv6 ones AAAA), NXDOMAIN for unknown names.
    It listens on ``host`` (127.0.0.1, or ::1 for an upstream on IPv6)."""

    def __init__(self, records: dict[str, str | list[str]], host: str = LOOPBACK) -> None:
        self.records = {name.lower().rstrip("."): [address] if isinstance(address, str)
                        else list(address) for name, address in records.items()}
        self.udp_queries: list[str] = []
        self.udp_peers: list[str] = []  # the source address of each UDP query
        self.tcp_queries: list[str] = []
        self.query_types: list[int] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp: _AcceptLoop | None = None
        # UDP and TCP must share a port number; a busy TCP port means pick again (bounded).
        for _ in range(20):
            self.udp.bind((host, 0))
            try:
                self.tcp = _AcceptLoop(self._serve_tcp, self.udp.getsockname()[1], host)
                break
            except OSError:
                self.udp.close()
                self.udp = socket.socket(family, socket.SOCK_DGRAM)
        if self.tcp is None:
            raise OSError("no port free for both UDP and TCP")
        self.port = self.udp.getsockname()[1]
        self.udp.settimeout(ACCEPT_POLL)
        self._stop = threading.Event()
        self._udp_thread = threading.Thread(target=self._serve_udp, daemon=True)
        self._udp_thread.start()

    def answer(self, query: bytes) -> bytes | None:
        """The response to ``query``, or None for something that is not a query."""
        if len(query) < 17 or query[2] & 0x80:
            return None
        try:
            end = _question_end(query)
            name = _question_name(query)
        except (IndexError, ValueError):
            return None
        (qtype,) = struct.unpack("!H", query[end - 4 : end - 2])
        self.query_types.append(qtype)
        question = query[12:end]
        addresses = self.records.get(name)
        family = {1: socket.AF_INET, 28: socket.AF_INET6}.get(qtype)
        records = [socket.inet_pton(family, address) for address in addresses or []
                   if family is not None and (":" in address) == (family == socket.AF_INET6)]
        rcode = 0 if addresses is not None else 3
        header = struct.pack("!HHHHHH", *struct.unpack("!H", query[:2]), 0x8580 | rcode,
                             1, len(records), 0, 0)
        return header + question + b"".join(
            struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(packed)) + packed
            for packed in records)

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.udp_peers.append(peer[0])
            reply = self.answer(query)
            if reply is not None:
                self.udp_queries.append(_question_name(query))
                self.udp.sendto(reply, peer)

    def _serve_tcp(self, conn: socket.socket) -> None:
        for _ in range(16):  # a client may send a few queries on one connection
            length_bytes = _recv_exact(conn, 2)
            if length_bytes is None:
                return
            query = _recv_exact(conn, struct.unpack("!H", length_bytes)[0])
            if query is None:
                return
            reply = self.answer(query)
            if reply is None:
                return
            self.tcp_queries.append(_question_name(query))
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        self._stop.set()
        self._udp_thread.join(timeout=5)
        self.udp.close()
        assert self.tcp is not None
        self.tcp.close()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- bulk TCP -------------------------------------------------------------------


@dataclasses.dataclass
class Transfer:
    """One connection's worth of bulk data, as the host saw it."""

    size: int
    sha256: str
    seconds: float  # first byte to last byte (or connection to last byte when sending)

    @property
    def bytes_per_second(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0


class TcpSink(_AcceptLoopServer):
    """Reads each connection to EOF; answers with the sha256 hex of what arrived."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.transfers: list[Transfer] = []
        self.done = threading.Event()
        self._loop = _AcceptLoop(self._serve, host=host)
        self.port = self._loop.port

    def _serve(self, conn: socket.socket) -> None:
        digest, size, first = hashlib.sha256(), 0, None
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            if first is None:
                first = time.monotonic()
            digest.update(chunk)
            size += len(chunk)
        seconds = time.monotonic() - first if first is not None else 0.0
        self.transfers.append(Transfer(size, digest.hexdigest(), seconds))
        self.done.set()
        conn.sendall(digest.hexdigest().encode() + b"\n")


def _read_http_request(conn: socket.socket) -> bytes | None:
    """The request head (bounded to 8 KiB); None if the client closed first."""
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 8192:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        request += chunk
    return request


def _answer_get_of(conn: socket.socket, request: bytes, name: str) -> bool:
    """True for ``GET /<name>``; anything else is answered 404 here."""
    fields = request.split(b" ", 2)
    if len(fields) < 2 or fields[0] != b"GET" or fields[1] != f"/{name}".encode():
        conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return False
    return True


class HttpFileServer(_AcceptLoopServer):
    """HTTP/1.0: ``GET /<name>`` returns the generated file, anything else 404. ``port``: one
    chosen beforehand (``free_port()``), for a guest that polls until the test serves it."""

    def __init__(self, name: str, data: bytes, host: str = LOOPBACK, port: int = 0) -> None:
        self.name, self.data = name, data
        self.transfers: list[Transfer] = []
        self._loop = _AcceptLoop(self._serve, port, host)
        self.port = self._loop.port

    def _serve(self, conn: socket.socket) -> None:
        request = _read_http_request(conn)
        if request is None or not _answer_get_of(conn, request, self.name):
            return
        started = time.monotonic()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(self.data))
        conn.sendall(self.data)
        conn.shutdown(socket.SHUT_WR)
        # Wait for the client's close, so the duration covers delivery, not buffering.
        while conn.recv(4096):
            pass
        self.transfers.append(Transfer(len(self.data), sha256_hex(self.data),
                                       time.monotonic() - started))


class PacedHttpServer(_AcceptLoopServer):
    """HTTP/1.0 ``GET /<name>``, the body paced to last ``seconds`` and held at ``hold_at``.

    ``sent`` is how far the body got; past ``hold_at`` bytes nothing more goes
    out until ``release()`` (or IO_TIMEOUT), so a transfer can be made to span
    an event of unknown duration such as a live migration. ``release()`` also ends the
    pacing: once the event is over, the rest goes out as fast as the client takes it (the
    test need not wait out ``seconds``). ``half_closed``: the
    answer waits for the client's FIN after the request (``client_closed`` is set
    then), so the whole body travels over a half-closed connection. ``port``: a
    port chosen beforehand (``free_port()``), so a guest that retries connecting
    starts its download only when the test starts the server.
    """

    CHUNK = 64 * 1024

    def __init__(self, name: str, data: bytes, seconds: float, hold_at: int,
                 host: str = LOOPBACK, half_closed: bool = False, port: int = 0) -> None:
        self.name, self.data, self.seconds, self.hold_at = name, data, seconds, hold_at
        self.half_closed = half_closed
        self.sent = 0
        self.requests = 0
        self.finished = threading.Event()
        self.client_closed = threading.Event()
        self._gate = threading.Event()
        self._loop = _AcceptLoop(self._serve, port, host)
        self.port = self._loop.port

    def release(self) -> None:
        self._gate.set()

    def _serve(self, conn: socket.socket) -> None:
        request = _read_http_request(conn)
        if request is None:
            return
        self.requests += 1
        if self.half_closed:
            if conn.recv(4096):
                return  # more than one request: not the client this server waits for
            self.client_closed.set()
        if not _answer_get_of(conn, request, self.name):
            return
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(self.data))
        started, total = time.monotonic(), len(self.data)
        for offset in range(0, total, self.CHUNK):
            if offset >= self.hold_at:
                self._gate.wait(IO_TIMEOUT)
            delay = started + self.seconds * offset / total - time.monotonic()
            if delay > 0:
                self._gate.wait(delay)  # release() ends the pacing, this wait included
            conn.sendall(self.data[offset:offset + self.CHUNK])
            self.sent = min(total, offset + self.CHUNK)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
        self.finished.set()

    def close(self) -> None:
        self._gate.set()
        super().close()


class BarrierEchoServer(_AcceptLoopServer):
    """Echoes one line per connection, but only once ``expected`` connections are open at once.

    This proves that that many flows really were concurrent. ``peak`` is the
    most connections seen open together; ``on_all_open`` (if given) runs once,
    in a server thread, when the barrier is reached and before any reply.
    """

    def __init__(self, expected: int, wait_limit: float = 120.0,
                 on_all_open: Callable[[], None] | None = None) -> None:
        self.expected = expected
        self.wait_limit = wait_limit
        self.on_all_open = on_all_open
        self.lines: list[bytes] = []
        self.peak = 0
        self._open = 0
        self._lock = threading.Lock()
        self._all_open = threading.Event()
        self._loop = _AcceptLoop(self._serve)
        self.port = self._loop.port

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._open += 1
            self.peak = max(self.peak, self._open)
            reached = self._open >= self.expected and not self._all_open.is_set()
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                line += chunk
            if reached:
                if self.on_all_open is not None:
                    self.on_all_open()
                self._all_open.set()
            self._all_open.wait(self.wait_limit)
            with self._lock:
                self.lines.append(line)
            conn.sendall(b"echo " + line)
        finally:
            with self._lock:
                self._open -= 1

    @property
    def all_were_open(self) -> bool:
        return self._all_open.is_set()

    def close(self) -> None:
        self._all_open.set()
        super().close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (for forwards vhostnet must bind)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]
