"""recvmmsg(2) for the benchmark's UDP sink, through ctypes.

A sink that reads one datagram per Python call tops out near a million datagrams a
second on this machine, while both back-ends and the loopback baseline can hand the
host more than that: the figure would measure the sink. One ``recvmmsg`` takes up to
``batch`` datagrams per system call, and ctypes releases the GIL while it waits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

MSG_WAITFORONE = 0x10000


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("header", _Msghdr), ("length", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


class BatchReceiver:
    """Receives into ``batch`` buffers of ``size`` bytes per call on a blocking socket whose
    wait is bounded by SO_RCVTIMEO (``timeout``)."""

    def __init__(self, sock: socket.socket, timeout: float, batch: int = 64,
                 size: int = 65536) -> None:
        sock.setblocking(True)
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        self._fd = sock.fileno()
        self._batch = batch
        self._buffers = (ctypes.c_char * (size * batch))()
        self._iovecs = (_Iovec * batch)()
        self._messages = (_Mmsghdr * batch)()
        base = ctypes.addressof(self._buffers)
        for i in range(batch):
            self._iovecs[i].base = base + i * size
            self._iovecs[i].length = size
            self._messages[i].header.iov = ctypes.pointer(self._iovecs[i])
            self._messages[i].header.iovlen = 1

    def receive(self) -> tuple[int, int]:
        """(datagrams, bytes) of one call; (0, 0) when the wait timed out."""
        got = _recvmmsg(self._fd, self._messages, self._batch, MSG_WAITFORONE, None)
        if got < 0:
            error = ctypes.get_errno()
            if error in (errno.EAGAIN, errno.EINTR):
                return 0, 0
            raise OSError(error, os.strerror(error))
        messages = self._messages
        return got, sum(messages[i].length for i in range(got))
