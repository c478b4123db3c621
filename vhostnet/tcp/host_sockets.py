"""The flow sockets of ``TcpHost`` (vhostnet/tcp/host.py): the per-socket record and the
small socket calls the glue and migration make (send space, SO_PEEK_OFF probe, SO_RCVLOWAT
kept in step, a connect already finished, the peer's FIN seen in TCP_INFO, abortive close).
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from dataclasses import dataclass, field

log = logging.getLogger("vhostnet.tcp.host")

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)  # Linux value; Python does not export it
# tcpi_state values meaning "the peer sent its FIN" (linux/tcp_states.h).
PEER_CLOSED_STATES = {6, 7, 8, 9, 11}  # TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING


@dataclass(eq=False)
class HostSocket:
    """One flow socket and what the glue knows of it (owned by ``TcpHost``)."""

    sock: socket.socket
    reading: bool = False
    writing: bool = False
    connecting: bool = False
    rearm_on_discard: bool = False
    peeked_until: int = 0  # bytes at the head of the queue already peeked (for SO_RCVLOWAT)
    space: int | None = None  # send space last measured by ``written_elsewhere``
    unmeasured: int = 0  # bytes written elsewhere since
    lowat: int = 1  # SO_RCVLOWAT as set (a new socket's is 1; 0: unknown)
    peek_awaited: bool = False  # a readable event ran; cleared by the peek it led to
    peer_fin: bool = False  # a readable event said the peer's FIN is in (EPOLLRDHUP)
    fd: int = field(init=False)  # sock.fileno() while open, without its call (several a flow)

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


def tune(sock: socket.socket) -> None:
    """What every flow socket gets: keepalive, and no Nagle (the guest's own TCP batches)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_space(sock: socket.socket, nothing_sent: bool = False) -> int | None:
    """Bytes the socket can take now: SO_SNDBUF minus what is queued (SIOCOUTQ; not asked
    when ``nothing_sent``: a socket just connected or accepted)."""
    try:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if nothing_sent:
            return buffer
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return None
    return max(0, buffer - queued)


def probe_peek_off(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError:
        log.info("SO_PEEK_OFF not supported for TCP: peeking whole prefixes")
        return False
    return True


def connected_already(sock: socket.socket) -> bool:
    """Whether a connect() that answered EINPROGRESS has finished by now (one syscall)."""
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: still in progress (or failed: the epoll set will say)
    return True


def peer_closed(sock: socket.socket) -> bool:
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return False
    return state in PEER_CLOSED_STATES


def set_lowat(entry: HostSocket, value: int) -> None:
    # (Clamped to 1 ... 2^30 without min/max calls: twice per request/response.)
    if value < 1:
        value = 1
    elif value > 1 << 30:
        value = 1 << 30
    if value == entry.lowat:
        return  # already so (a new socket's first reader, a discard after a short peek)
    try:
        entry.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        entry.lowat = value
    except OSError:
        entry.lowat = 0  # only an optimisation: without it the reader fires early, never late


def abort_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer gets a RST, as the guest's RST asked."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def peek_at(sock: socket.socket, peek_off: bool, offset: int, length: int) -> tuple[bytes, bool]:
    """(data, eof): ``length`` bytes at ``offset`` into the receive queue, without consuming;
    ``peek_off``: SO_PEEK_OFF works here (``probe_peek_off``), else the whole prefix is peeked
    and sliced."""
    try:
        if peek_off:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
            data = sock.recv(length, socket.MSG_PEEK)
            return data, data == b""
        prefix = sock.recv(offset + length, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return b"", False
    if prefix == b"":
        return b"", True
    if len(prefix) > offset:
        return prefix[offset:], False
    # All queued bytes were peeked already; only the TCP state tells whether a FIN came.
    return b"", peer_closed(sock)
