"""Connected socket pairs on loopback and the freeze/read helpers the TCP_REPAIR tests share."""

from __future__ import annotations

import fcntl
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vhostnet.migration import tcp_repair
from vhostnet.migration.tcp_freeze import (
    attach_drop_filter,
    detach_drop_filter,
)
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    REPAIR_ON,
    set_repair_direct,
)

IO_SECONDS = 10.0
TCP_STATE_ESTABLISHED = 1


def open_pair(peer_rcvbuf: int | None = None, host: str = "127.0.0.1"
              ) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, peer, ours): ``ours`` plays a vhostnet host socket (accepted side)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen()
    peer = socket.socket(family)
    if peer_rcvbuf is not None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
    peer.connect(listener.getsockname())
    ours, _ = listener.accept()
    peer.settimeout(IO_SECONDS)
    ours.settimeout(IO_SECONDS)
    return listener, peer, ours


@contextmanager
def connected_pair(peer_rcvbuf: int | None = None, host: str = "127.0.0.1"
                   ) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """``open_pair``, all three sockets closed at the end."""
    sockets = open_pair(peer_rcvbuf, host)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def freeze(sock: socket.socket) -> None:
    """What vhostnet does to freeze: its own drop filter, then repair mode."""
    attach_drop_filter(sock)
    set_repair_direct(sock, REPAIR_ON)


def thaw(sock: socket.socket) -> None:
    detach_drop_filter(sock)
    set_repair_direct(sock, REPAIR_OFF)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + IO_SECONDS
    while len(data) < size and time.monotonic() < deadline:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def send_queue_ioctl(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def unacked_bytes(sock: socket.socket) -> int:
    return send_queue_ioctl(sock, tcp_repair.SIOCOUTQ)


def settled_unacked_bytes(sock: socket.socket, *, tries: int = 50, pause: float = 0.05) -> int:
    """The peer's unacknowledged bytes once no more ACKs are arriving: after a freeze, ACKs our
    kernel sent just before it can still be on their way (a loaded machine delays softirqs)."""
    last = unacked_bytes(sock)
    for _ in range(tries):
        time.sleep(pause)
        now = unacked_bytes(sock)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the peer's unacknowledged count kept moving ({last})")


def not_yet_sent_bytes(sock: socket.socket) -> int:
    return send_queue_ioctl(sock, tcp_repair.SIOCOUTQNSD)


def assert_same_stream(got: bytes, expected: bytes, what: str) -> None:
    """Equality without a multi-megabyte diff in the failure."""
    if got != expected:
        common = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
        raise AssertionError(f"{what}: got {len(got)} of {len(expected)} bytes, "
                             f"equal for the first {common}")


def send_what_fits(sock: socket.socket, data: bytes) -> int:
    sock.setblocking(False)
    sent = 0
    for _ in range(1000):
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            break
    sock.settimeout(IO_SECONDS)
    return sent
