"""Stream mode: QEMU's ``-netdev stream`` (and ``-netdev socket``) on the same socket.

Each Ethernet frame travels as a 4-byte big-endian length followed by the frame,
with no virtio-net header, so it works with any NIC model (virtio-net, e1000).
``StreamFramer`` is the sans-IO half (bytes in, whole frames out as a
``FrameBatch`` whose storage is the read buffer: no copy); ``StreamDevice`` is the socket glue, the stream counterpart of
``NetDevice``: it reads the socket in large chunks (``StreamFramer.receive``: the read and
the framing in one kernel call, since a guest sending wakes it for a frame or two at a
time) and hands the network whole batches (``Network.receive_batch``, so the C fast paths run as for the rings), and
writes frames for the guest many at a time in one sendmsg, gathered where they lie
(``StreamSender``, ext/stream.pyx: no copy into a send buffer). Its socket buffers are
as large as the system allows (as passt sets them): the peer, a guest under QEMU, reads
in bursts, and a deep buffer keeps frames waiting for it in the kernel rather than here.

No header means no offloads: guest frames carry full checksums and frames for the
guest must carry them too, so the device tells the network the guest takes none.

``looks_like_vhost_user`` tells the two protocols apart from the first 4 bytes
the front-end sends: a vhost-user request number read as a big-endian length is
at least 16 MiB, which no frame can be.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostnet._stream import (
    FRAMES_PER_SEND,
    LARGEST_FRAME,
    LENGTH_PREFIX,
    SMALLEST_FRAME,
    StreamReader,
    StreamSender,
)
from vhostnet.guest_queue import GuestBatch
from vhostnet.vhost_user.ratelimit import limiter
from vhostnet.virtqueue import FrameBatch

if TYPE_CHECKING:
    from vhostnet.capture import Capture
    from vhostnet.network import GuestSide, SwitchedFrames

log = logging.getLogger(__name__)

LENGTH_BYTES = LENGTH_PREFIX  # the kernel's (ext/stream.pyx) framing
MIN_FRAME = SMALLEST_FRAME  # an Ethernet header
MAX_FRAME = LARGEST_FRAME  # the largest IP packet in an Ethernet frame
VHOST_USER_THRESHOLD = 1 << 24  # first 4 bytes at least this, as a big-endian length

READ_CHUNK = 256 * 1024
MAX_READS_PER_WAKEUP = 8
BATCH_FRAMES = 256
# Frames for the guest gathered into one sendmsg, and about the bytes one may carry.
SEND_FRAMES = FRAMES_PER_SEND  # two iovecs a frame, within IOV_MAX
SEND_BYTES = 1024 * 1024
SENDS_PER_WAKEUP = 16  # then the loop runs other callbacks before this peer's next sends
# Asked of SO_SNDBUF and SO_RCVBUF, as passt asks; the kernel caps it at wmem_max/rmem_max.
SOCKET_BUFFER = (1 << 31) // 2 - 1


def looks_like_vhost_user(first: bytes) -> bool:
    """True if the first 4 bytes a front-end sent are a vhost-user header, not a frame length."""
    return int.from_bytes(first[:LENGTH_BYTES], "big") >= VHOST_USER_THRESHOLD


class StreamError(Exception):
    """The peer sent a length no Ethernet frame can have: framing is lost."""


class StreamFramer:
    """Cuts a length-prefixed byte stream into frames, sans-IO, in bounded memory.

    Bytes go into a buffer of ``chunk`` plus one largest frame: read into ``space()`` and
    report with ``filled(n)``, or ``feed(data)``. That buffer is the storage of the framer's
    own ``batch``: ``next_frames`` makes the whole frames buffered that batch's frames where
    they lie, in one kernel call (ext/stream.pyx, no GIL), so a frame is read once and never
    copied; a partial frame stays for the next read. ``receive(fd)`` is the I/O shortcut:
    recv(2) straight into that buffer, then ``next_frames``, in one call. The batch's frames
    stay valid until the next ``space()``, ``feed`` or ``receive``.
    """

    def __init__(self, chunk: int = READ_CHUNK, frames: int = BATCH_FRAMES) -> None:
        self.chunk = chunk
        self.batch = FrameBatch(frames, chunk + LENGTH_BYTES + MAX_FRAME)
        self._reader = StreamReader(*self.batch.arrays(), chunk)

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def space(self) -> memoryview:
        """Where to read next (never empty: a partial frame always leaves room for a chunk)."""
        return self._reader.space()

    def filled(self, count: int) -> None:
        """``count`` bytes were read into ``space()``."""
        self._reader.filled(count)

    def feed(self, data: bytes | memoryview) -> None:
        """Copy ``data`` in (at most ``len(space())`` bytes at a time)."""
        view = memoryview(data)
        while view:
            space = self.space()
            taken = min(len(space), len(view))
            if not taken:
                raise BufferError("stream framer is full; call next_frames first")
            space[:taken] = view[:taken]
            self.filled(taken)
            view = view[taken:]

    def next_frames(self) -> int:
        """Make ``batch``'s frames the whole frames buffered (as many as it holds) in place;
        returns how many (fewer than the batch holds: no whole frame is left).

        Raises ``StreamError`` for a length outside [14, 65549] (the frames before it are
        in ``batch``).
        """
        return self._took(*self._reader.index())

    def receive(self, fd: int) -> tuple[int, int, int, int]:
        """One read of the socket ``fd`` straight into the buffer, then ``next_frames``, in
        one kernel call (a stream peer's wakeup often carries a frame or two, so the calls
        around each read are much of what a frame costs).

        Returns (bytes read, 0 at the end of the stream or after an error; the room the read
        had: fewer bytes means the socket is drained; frames now in ``batch``; the read's
        errno or 0, EAGAIN when there was nothing to read). The frames are in ``batch``
        whatever the read did. Raises ``StreamError`` as ``next_frames``.
        """
        got, room, count, bad, error = self._reader.receive(fd)
        self._took(count, bad)
        return got, room, count, error

    def _took(self, count: int, bad: int) -> int:
        self.batch.take_written(count)
        if bad >= 0:
            raise StreamError(f"frame length {bad} outside {MIN_FRAME}..{MAX_FRAME}")
        return count


def frame_header(length: int) -> bytes:
    """The 4-byte big-endian length that precedes a frame on the stream."""
    return length.to_bytes(LENGTH_BYTES, "big")


def encode_frames(frames: list[bytes]) -> bytes:
    """Frames as they go on the stream, each after its length."""
    return b"".join(frame_header(len(frame)) + bytes(frame) for frame in frames)


def enlarge_buffers(sock: socket.socket) -> None:
    """Ask for the largest send and receive buffers the system allows (best effort)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError as exc:
            log.debug("stream socket buffer left as it was: %s", exc)


class StreamDevice:
    """One stream peer (a QEMU ``-netdev stream``) between the socket and the network."""

    def __init__(self, loop: asyncio.AbstractEventLoop, network: GuestSide, sock: socket.socket,
                 first_bytes: bytes = b"", capture: Capture | None = None,
                 switched: SwitchedFrames | None = None) -> None:
        self.loop = loop
        self.network = network
        # Several guests: frames the switch queued for this port (None: one guest, no switch).
        self.switched = switched
        self.sock = sock
        self.capture = capture
        # Called once when the peer goes away or breaks the framing; set by the server.
        self.on_closed: Callable[[], None] | None = None
        # Reads the socket into its batch's storage: guest frames are read once, not copied.
        self.framer = StreamFramer()
        # Sends frames for the guest from where they lie; holds the tail of a cut frame.
        self.sender = StreamSender()
        self._writing = False
        self._rx_scheduled = False
        self._closed = False
        self.counters = {"tx.frames": 0, "rx.frames": 0, "rx.bytes": 0, "tx.bytes": 0, "rx.sends": 0,
                         "rx.send_waits": 0, "rx.dropped_offloaded": 0, "rx.dropped_unsendable": 0,
                         "protocol_errors": 0}
        # No virtio-net header: the guest takes no checksum or segmentation offload.
        network.set_guest_offloads(csum=False, tso4=False)
        enlarge_buffers(sock)
        self.framer.feed(first_bytes)
        loop.add_reader(sock.fileno(), self._on_readable)
        network.add_output_listener(self._schedule_rx)
        if first_bytes:
            loop.call_soon(self._on_readable)

    # ---- guest -> network -------------------------------------------------------

    def _on_readable(self) -> None:
        if self._closed:
            return
        # What this read queues for the guest (a TCP ACK, an ARP reply) goes in the flush at
        # its end, not in a callback of its own (one loop turn less per read).
        held, self._rx_scheduled = self._rx_scheduled, True
        read = False
        try:
            read = self._read()
        finally:
            self._rx_scheduled = held
            if not read:
                self._schedule_rx()  # (closed: nothing)
        # (A guest sending wakes this for a frame or two: most reads queue nothing back.)
        if read and not self._writing and (self.network.frames_to_guest or self.sender.cut_bytes
                                           or self.switched is not None):
            self._flush_rx()

    def _read(self) -> bool:
        """Read the socket and hand its frames to the network; False if the connection
        closed."""
        framer, fd = self.framer, self.sock.fileno()
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                count, room, frames, error = framer.receive(fd)
            except StreamError as exc:
                self._framing_lost(exc)
                return False
            if frames and not self._deliver(frames):
                return False
            if error:
                if error in (errno.EAGAIN, errno.EINTR):
                    break
                log.warning("stream connection error: %s", os.strerror(error))
                self.close()
                return False
            if not count:
                log.info("stream front-end disconnected")
                self.close()
                return False
            self.counters["tx.bytes"] += count
            if count < room:
                break  # drained (a stream recv takes all there is): no second recv for EAGAIN
        self.network.flush()
        return True

    def _deliver(self, count: int) -> bool:
        """Hand the ``count`` frames in the framer's batch, then every other whole frame
        buffered, to the network; False if the connection closed."""
        framer, network = self.framer, self.network
        batch = framer.batch
        while count:
            if self.capture is not None:
                self.capture.add_batch(batch, count)
            network.receive_batch(batch, count, time.monotonic())
            self.counters["tx.frames"] += count
            if count < batch.capacity_frames:
                return True  # no whole frame left
            try:
                count = framer.next_frames()
            except StreamError as exc:
                self._framing_lost(exc)
                return False
        return True

    def _framing_lost(self, exc: StreamError) -> None:
        self.counters["protocol_errors"] += 1
        limiter.log(log, logging.ERROR, "stream_framing",
                    "malformed stream from the front-end (%s); closing the connection", exc)
        self.close()

    # ---- network -> guest -------------------------------------------------------

    def _schedule_rx(self) -> None:
        # While waiting for the socket to be writable, that wakeup sends: trying before it
        # would only gather frames to see EAGAIN (the common case when the guest is slower).
        if not self._rx_scheduled and not self._closed and not self._writing:
            self._rx_scheduled = True
            self.loop.call_soon(self._flush_rx)

    def _flush_rx(self) -> None:
        """Send frames for the guest while the peer takes them; the rest wait in the network's
        queue (bounded there: the oldest are dropped and counted when the peer stops reading)."""
        self._rx_scheduled = False
        if self._closed:
            return
        pending = self.network.frames_to_guest
        for _ in range(SENDS_PER_WAKEUP):
            if pending or self.sender.cut_bytes:
                error = self._send(pending)
            elif self.switched is not None and (batch := self.switched.outgoing()) is not None:
                entry = GuestBatch(batch)  # the switch's batch goes the way of a built one
                error = self._send(deque((entry,)))
                self.switched.taken(entry.start)  # a cut frame's tail is the sender's copy
            else:
                self._stop_waiting()
                return
            if error == errno.EAGAIN:
                self._wait_writable()
                return
            if error:
                log.warning("cannot send to the stream front-end (%s); closing the connection",
                            os.strerror(error))
                self.close()
                return
        self._schedule_rx()  # more to send: after the loop's other callbacks

    def _send(self, pending: deque) -> int:
        """One sendmsg of frames from the front of ``pending``; 0, EAGAIN or the send's errno.

        (frame, vnet) entries are dropped: a partial or absent checksum left for a
        vhost-user guest that negotiated offloads, queued before it went; unusable here.
        """
        captured: list[bytes] | None = [] if self.capture is not None else None
        sent, frames, offloaded, unsendable, error = self.sender.send(
            self.sock.fileno(), pending, SEND_FRAMES, SEND_BYTES, GuestBatch, captured)
        counters = self.counters
        counters["rx.sends"] += 1
        counters["rx.bytes"] += sent
        counters["rx.frames"] += frames
        counters["rx.dropped_offloaded"] += offloaded
        counters["rx.dropped_unsendable"] += unsendable
        if captured:
            self.capture.add(captured)
        return error

    def _wait_writable(self) -> None:
        if not self._writing:
            self._writing = True
            self.counters["rx.send_waits"] += 1
            self.loop.add_writer(self.sock.fileno(), self._flush_rx)

    def _stop_waiting(self) -> None:
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    # ---- counters and life cycle ------------------------------------------------------

    def all_counters(self) -> dict[str, int]:
        """``stream.*`` counts (guest frames are ``tx``, frames for the guest ``rx``, as for rings)."""
        return {f"stream.{name}": value for name, value in self.counters.items()}

    def ring_positions(self) -> dict[str, int]:
        return {}  # no rings in stream mode

    def close(self) -> None:
        """Stop reading and writing; the socket is the caller's to close."""
        if self._closed:
            return
        self._closed = True
        self.network.remove_output_listener(self._schedule_rx)
        self._stop_waiting()
        self.loop.remove_reader(self.sock.fileno())
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback()
