"""Host -> guest bulk: what the guest acknowledged leaves the host socket in one system call
(recv MSG_TRUNC of the whole length, nothing copied), and exactly that much leaves."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time

import pytest
from vhostnet.tcp._fast import discard_acked

WANTED = 1024 * 1024
OLD_ROUND = 256 * 1024  # the old discard's recv size (a buffer that large, and rounds of it)


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * WANTED)  # capped by rmem_max
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    return client, server


def _queued(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _fill(client: socket.socket, server: socket.socket, data: bytes) -> int:
    """Send what the receive queue takes of ``data``; how much it holds once settled."""
    client.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += client.send(data[sent:])
        except BlockingIOError:
            if _queued(server) == sent:
                break  # the receive queue is full: the window closed
            time.sleep(0.005)
    while _queued(server) < sent and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _queued(server) == sent
    return sent


def test_all_acknowledged_bytes_leave_in_one_call_and_the_rest_stays_in_order() -> None:
    client, server = _pair()
    try:
        data = os.urandom(WANTED)
        queued = _fill(client, server, data)
        assert queued > OLD_ROUND + 1000
        acked = queued - 1000
        assert discard_acked(server.fileno(), acked) == acked
        assert _queued(server) == 1000
        assert server.recv(4096) == data[acked:queued]
    finally:
        client.close()
        server.close()


def test_asking_more_than_queued_drops_what_is_there_and_says_so() -> None:
    client, server = _pair()
    try:
        assert _fill(client, server, b"x" * 5000) == 5000
        assert discard_acked(server.fileno(), 9000) == 5000
        assert discard_acked(server.fileno(), 10) == 0  # empty: EAGAIN is no error
        assert discard_acked(server.fileno(), 0) == 0
    finally:
        client.close()
        server.close()


def test_the_peek_offset_moves_back_with_the_discard() -> None:
    # The direct peek relies on SO_PEEK_OFF meaning "from the head": the kernel moves it
    # back by what a non-peeking read consumed, MSG_TRUNC included.
    client, server = _pair()
    try:
        data = bytes(range(256)) * 64
        assert _fill(client, server, data) == len(data)
        try:
            server.setsockopt(socket.SOL_SOCKET, 42, 4000)  # SO_PEEK_OFF
        except OSError:
            pytest.skip("SO_PEEK_OFF not supported for TCP by this kernel (Linux < 6.9)")
        assert discard_acked(server.fileno(), 3000) == 3000
        assert server.recv(100, socket.MSG_PEEK) == data[4000:4100]
    finally:
        client.close()
        server.close()


def test_a_bad_socket_raises_its_errno() -> None:
    with pytest.raises(OSError) as raised:
        discard_acked(-1, 100)
    assert raised.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        discard_acked(0, -1)
