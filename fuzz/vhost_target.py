"""Fuzz target for the vhost-user codec and handler with the real device.

The fuzz bytes are a message stream with file descriptors: a little-endian u16 gives
the length of the message part, the rest fills a 64 KiB memfd the messages can map as
guest memory (so rings the messages start are read from fuzz bytes too). Each message
is one byte of fd kinds, then a raw 12-byte header, then up to its size of payload
bytes; the bytes go through ``Framer`` with fresh fds attached, as ``server.Connection``
does, and every message to ``BackendHandler.handle`` with a ``NetDevice`` on a private
``Network``. After each message the event loop turns once, so kicks drain the rings.

The contract: nothing raises but a ``CodecError`` from the framer (the connection then
closes), ``handle`` returns replies or CLOSE, and once the connection is closed as the
server closes it, no fd is left open.
"""

from __future__ import annotations

import asyncio
import os
import struct

from fuzz.stack_target import require_private_netns
from vhostnet.device import NetDevice
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.vhost_user.backend import BackendHandler
from vhostnet.vhost_user.codec import CodecError, Framer, Message
from vhostnet.vhost_user.device_api import CLOSE
from vhostnet.vhost_user.protocol import HEADER_SIZE, VHOST_USER_MAX_FDS

MEMFD_BYTES = 0x10000
MAX_MESSAGES = 32
_LENGTH = struct.Struct("<H")
_HEADER = struct.Struct("<III")
# fd kinds, two bits each in a message's first byte (its low two bits: how many fds).
EVENTFD_KICKED, MEMFD, PIPE_READ, EVENTFD_QUIET = range(4)


def encode(messages: list[tuple[int, int, bytes, list[int]]], memory: bytes = b"") -> bytes:
    """Fuzz bytes for ``(request, flags, payload, fd kinds)`` messages (for the corpus)."""
    stream = bytearray()
    for request, flags, payload, kinds in messages:
        spec = len(kinds)
        for position, kind in enumerate(kinds[:3]):
            spec |= kind << (2 + 2 * position)
        stream += bytes([spec]) + _HEADER.pack(request, flags, len(payload)) + payload
    return _LENGTH.pack(len(stream)) + bytes(stream) + memory


def decode(data: bytes) -> tuple[list[tuple[bytes, list[int]]], bytes]:
    """(chunks of stream bytes with their fd kinds, memfd contents) from fuzz bytes."""
    if len(data) < _LENGTH.size:
        return [], b""
    (length,) = _LENGTH.unpack_from(data)
    stream, memory = data[2: 2 + length], data[2 + length:]
    chunks, offset = [], 0
    while offset < len(stream) and len(chunks) < MAX_MESSAGES:
        spec = stream[offset]
        header = stream[offset + 1: offset + 1 + HEADER_SIZE]
        size = _HEADER.unpack(header)[2] if len(header) == HEADER_SIZE else 0
        end = offset + 1 + HEADER_SIZE + min(size, 0x1000)
        kinds = [(spec >> (2 + 2 * i)) & 3 for i in range(min(spec & 3, VHOST_USER_MAX_FDS))]
        chunks.append((stream[offset + 1: end], kinds))
        offset = end
    return chunks, memory


class FdPool:
    """The fds one case hands out: each message gets fresh ones, the handler owns those."""

    def __init__(self, memory: bytes) -> None:
        self.memfd = os.memfd_create("vhostnet-fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEMFD_BYTES)
        if memory:
            os.pwrite(self.memfd, memory[:MEMFD_BYTES], 0)
        self.pipe_read, self.pipe_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fd(self, kind: int) -> int:
        if kind == MEMFD:
            return os.dup(self.memfd)
        if kind == PIPE_READ:
            return os.dup(self.pipe_read)
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind == EVENTFD_KICKED:
            os.eventfd_write(fd, 1)
        return fd

    def close(self) -> None:
        for fd in (self.memfd, self.pipe_read, self.pipe_write):
            os.close(fd)


def _open_fds() -> int:
    """Open fds other than sockets (the network's host sockets outlive a connection)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += not os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except FileNotFoundError:
            pass  # the directory's own fd, closed by now
    return count


class VhostUserTarget:
    def __init__(self) -> None:
        require_private_netns()
        self.loop = asyncio.new_event_loop()
        self.network = Network(StackConfig(), self.loop)

    def _tick(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def __call__(self, data: bytes) -> None:
        chunks, memory = decode(data)
        baseline = _open_fds()
        pool = FdPool(memory)
        device = NetDevice(self.loop, self.network)
        faulted: list[bool] = []
        device.on_memory_fault = lambda: faulted.append(True)
        handler = BackendHandler(device, offer_log=True)
        framer = Framer()
        try:
            self._converse(chunks, pool, framer, handler, faulted)
        finally:
            handler.close()
            device.close()
            device.on_memory_fault = None
            for fd in framer.take_fds():
                os.close(fd)
            self._tick()
            self.network.frames_to_guest.clear()
            pool.close()
        left = _open_fds() - baseline
        assert left == 0, f"{left} fd(s) left open after the connection closed"

    def _converse(self, chunks, pool: FdPool, framer: Framer, handler: BackendHandler,
                  faulted: list[bool]) -> None:
        for chunk, kinds in chunks:
            framer.feed(chunk, [pool.fd(kind) for kind in kinds])
            try:
                messages = list(framer.messages())
            except CodecError:
                return  # framing lost: the server closes the connection
            for message in messages:
                assert isinstance(message, Message)
                replies = handler.handle(message)
                if replies is CLOSE:
                    return
                assert isinstance(replies, list)
                for reply in replies:
                    assert reply.is_reply and not reply.fds
                    reply.emit()
                self._tick()
                if faulted:
                    return
