"""Socket glue for vhost-user: messages over a UNIX stream socket with SCM_RIGHTS.

Thin on purpose: framing lives in codec.py. ``send_message``/``recv_message``
are blocking and used by the front-end; ``read_available`` serves the
back-end's non-blocking reader callback and feeds a ``Framer``.
"""

from __future__ import annotations

import array
import os
import socket
import time

from vhostnet.vhost_user.codec import CodecError, Header, Message
from vhostnet.vhost_user.protocol import HEADER_SIZE, VHOST_USER_MAX_FDS

# Room for a few more fds than allowed, so that excess fds arrive (and get
# closed) instead of being silently truncated by the kernel (MSG_CTRUNC leaks
# nothing, but we would not know how many were lost).
_ANCILLARY_FDS = VHOST_USER_MAX_FDS * 2
_ANCILLARY_SIZE = socket.CMSG_SPACE(_ANCILLARY_FDS * array.array("i").itemsize)


def close_fds(fds: list[int]) -> None:
    """Close every fd in the list, ignoring ones that are already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def is_eventfd(fd: int) -> bool:
    """True if ``fd`` is an eventfd (Linux names its anonymous inode in /proc)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    return list(fds)


def _limit_fds(fds: list[int]) -> list[int]:
    """Keep what one message may carry; close the rest so nothing leaks."""
    if len(fds) > VHOST_USER_MAX_FDS:
        close_fds(fds[VHOST_USER_MAX_FDS:])
        return fds[:VHOST_USER_MAX_FDS]
    return fds


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message, its fds as SCM_RIGHTS on the first byte. Blocking."""
    if len(msg.fds) > VHOST_USER_MAX_FDS:
        raise ValueError(f"a message carries at most {VHOST_USER_MAX_FDS} fds")
    data = msg.emit()
    ancillary = []
    if msg.fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds))]
    sent = sock.sendmsg([data], ancillary)
    # The fds went with the first chunk; the remainder (rare) is plain data.
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
        data = sock.recv(size - len(chunks))
        if not data:
            raise ConnectionError("vhost-user peer closed the connection")
        chunks += data
    return bytes(chunks)


def recv_message(sock: socket.socket, timeout: float = 5.0) -> Message:
    """Receive one whole message (blocking, at most ``timeout`` seconds).

    Raises ``TimeoutError`` (socket.timeout), ``ConnectionError`` at EOF, or
    ``CodecError`` for a header that cannot be trusted.
    """
    deadline = time.monotonic() + timeout
    header_bytes = bytearray()
    fds: list[int] = []
    # The header is read with recvmsg so that fds arriving with it are kept.
    while len(header_bytes) < HEADER_SIZE:
        sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
        data, ancdata, _flags, _addr = sock.recvmsg(HEADER_SIZE - len(header_bytes), _ANCILLARY_SIZE)
        fds.extend(_fds_from_ancillary(ancdata))
        if not data:
            close_fds(fds)
            raise ConnectionError("vhost-user peer closed the connection")
        header_bytes += data
    fds = _limit_fds(fds)
    try:
        header = Header.parse(bytes(header_bytes))
        header.check()
        payload = _recv_exact(sock, header.size, deadline)
    except (CodecError, OSError):
        close_fds(fds)
        raise
    return Message(header.request, header.flags, payload, fds)


def read_available(sock: socket.socket, max_bytes: int = HEADER_SIZE) -> tuple[bytes, list[int]]:
    """One recvmsg of at most ``max_bytes`` on a non-blocking socket: (data, fds).

    Pass ``framer.wanted()`` as ``max_bytes``: a larger read could return the
    tail of one message together with the next message's fds, and the fds
    would be attached to the wrong message (see ``Framer``).
    Returns ``(b"", [])`` at EOF; raises ``BlockingIOError`` if nothing is
    waiting. Fds beyond what a message may carry are closed here.
    """
    data, ancdata, _flags, _addr = sock.recvmsg(max_bytes, _ANCILLARY_SIZE)
    fds = _limit_fds(_fds_from_ancillary(ancdata))
    if not data and fds:
        # fds without data cannot belong to any message.
        close_fds(fds)
        fds = []
    return data, fds
