"""Stream mode: QEMU's ``-netdev stream`` (and ``-netdev socket``) on the same socket.

Each Ethernet frame travels as a 4-byte big-endian length followed by the frame,
with no virtio-net header, so it works with any NIC model (virtio-net, e1000).
``StreamFramer`` is the sans-IO half (bytes in, whole frames out into a
``FrameBatch``); ``StreamDevice`` is the socket glue, the stream counterpart of
``NetDevice``: it reads the socket in large chunks and hands the network whole
batches (``Network.receive_batch``, so the C fast paths run as for the rings), and
writes frames for the guest many at a time in one ``send``.

No header means no offloads: guest frames carry full checksums and frames for the
guest must carry them too, so the device tells the network the guest takes none.

``looks_like_vhost_user`` tells the two protocols apart from the first 4 bytes
the front-end sends: a vhost-user request number read as a big-endian length is
at least 16 MiB, which no frame can be.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostnet.vhost_user.ratelimit import limiter
from vhostnet.virtqueue import FrameBatch

if TYPE_CHECKING:
    from vhostnet.capture import Capture
    from vhostnet.network import GuestFrameQueue, Network

log = logging.getLogger(__name__)

LENGTH_BYTES = 4
MIN_FRAME = 14  # an Ethernet header
MAX_FRAME = 65535 + 14  # the largest IP packet in an Ethernet frame
VHOST_USER_THRESHOLD = 1 << 24  # first 4 bytes at least this, as a big-endian length

READ_CHUNK = 256 * 1024
MAX_READS_PER_WAKEUP = 8
BATCH_FRAMES = 256
# Frames for the guest joined into one send, and the bytes one send may carry.
SEND_FRAMES = 512
SEND_BYTES = 1024 * 1024


def looks_like_vhost_user(first: bytes) -> bool:
    """True if the first 4 bytes a front-end sent are a vhost-user header, not a frame length."""
    return int.from_bytes(first[:LENGTH_BYTES], "big") >= VHOST_USER_THRESHOLD


class StreamError(Exception):
    """The peer sent a length no Ethernet frame can have: framing is lost."""


class StreamFramer:
    """Cuts a length-prefixed byte stream into frames, sans-IO, in bounded memory.

    Bytes go into a buffer of ``READ_CHUNK`` plus one largest frame: read into
    ``space()`` and report with ``filled(n)``, or ``feed(data)``. ``fill_batch``
    copies the whole frames buffered into a ``FrameBatch``; a partial frame stays
    for the next read.
    """

    def __init__(self, chunk: int = READ_CHUNK) -> None:
        self._buffer = bytearray(chunk + LENGTH_BYTES + MAX_FRAME)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of the bytes read

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def space(self) -> memoryview:
        """Where to read next (never empty: a partial frame always leaves room for a chunk)."""
        if self._start:
            if self._start == self._end:
                self._start = self._end = 0
            elif len(self._buffer) - self._end < READ_CHUNK // 4:
                # Move the partial frame to the front (at most one frame's bytes).
                self._buffer[:self._end - self._start] = self._view[self._start:self._end]
                self._end -= self._start
                self._start = 0
        return self._view[self._end:]

    def filled(self, count: int) -> None:
        """``count`` bytes were read into ``space()``."""
        self._end += count

    def feed(self, data: bytes | memoryview) -> None:
        """Copy ``data`` in (at most ``len(space())`` bytes at a time)."""
        view = memoryview(data)
        while view:
            space = self.space()
            taken = min(len(space), len(view))
            if not taken:
                raise BufferError("stream framer is full; call fill_batch first")
            space[:taken] = view[:taken]
            self.filled(taken)
            view = view[taken:]

    def fill_batch(self, batch: FrameBatch) -> int:
        """Append whole buffered frames to ``batch`` until it is full; returns how many.

        Raises ``StreamError`` for a length outside [14, 65549].
        """
        buffer, view = self._buffer, self._view
        position, end = self._start, self._end
        added = 0
        try:
            while end - position >= LENGTH_BYTES:
                length = int.from_bytes(buffer[position:position + LENGTH_BYTES], "big")
                if not MIN_FRAME <= length <= MAX_FRAME:
                    raise StreamError(f"frame length {length} outside {MIN_FRAME}..{MAX_FRAME}")
                frame_end = position + LENGTH_BYTES + length
                if frame_end > end:
                    break
                if not batch.append(view[position + LENGTH_BYTES:frame_end]):
                    break
                added += 1
                position = frame_end
        finally:
            self._start = position
        return added


def frame_header(length: int) -> bytes:
    """The 4-byte big-endian length that precedes a frame on the stream."""
    return length.to_bytes(LENGTH_BYTES, "big")


def encode_frames(frames: list[bytes]) -> bytes:
    """Frames as they go on the stream, each after its length."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(frame_header(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class StreamDevice:
    """One stream peer (a QEMU ``-netdev stream``) between the socket and the network."""

    def __init__(self, loop: asyncio.AbstractEventLoop, network: Network, sock: socket.socket,
                 first_bytes: bytes = b"", capture: Capture | None = None) -> None:
        self.loop = loop
        self.network = network
        self.sock = sock
        self.capture = capture
        # Called once when the peer goes away or breaks the framing; set by the server.
        self.on_closed: Callable[[], None] | None = None
        self.framer = StreamFramer()
        self.batch = FrameBatch(BATCH_FRAMES)
        self._out = b""  # the rest of a send the peer did not take yet
        self._out_offset = 0
        self._writing = False
        self._rx_scheduled = False
        self._closed = False
        self.counters = {"tx.frames": 0, "rx.frames": 0, "rx.bytes": 0, "tx.bytes": 0,
                         "rx.send_waits": 0, "rx.dropped_offloaded": 0, "protocol_errors": 0}
        # No virtio-net header: the guest takes no checksum or segmentation offload.
        network.set_guest_offloads(csum=False, tso4=False)
        self.framer.feed(first_bytes)
        loop.add_reader(sock.fileno(), self._on_readable)
        network.add_output_listener(self._schedule_rx)
        if first_bytes:
            loop.call_soon(self._on_readable)

    # ---- guest -> network -------------------------------------------------------

    def _on_readable(self) -> None:
        if self._closed:
            return
        framer, sock = self.framer, self.sock
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                count = sock.recv_into(framer.space())
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("stream connection error: %s", exc)
                self.close()
                return
            if not count:
                self._deliver()
                log.info("stream front-end disconnected")
                self.close()
                return
            framer.filled(count)
            self.counters["tx.bytes"] += count
            if not self._deliver():
                return
            if count < READ_CHUNK // 4:
                break  # most likely drained: no second recv just to see EAGAIN
        self.network.flush()
        self._flush_rx()

    def _deliver(self) -> bool:
        """Hand every whole frame buffered to the network; False if the connection closed."""
        batch, network = self.batch, self.network
        while True:
            batch.clear()
            try:
                count = self.framer.fill_batch(batch)
            except StreamError as exc:
                self.counters["protocol_errors"] += 1
                limiter.log(log, logging.ERROR, "stream_framing",
                            "malformed stream from the front-end (%s); closing the connection", exc)
                self.close()
                return False
            if not count:
                return True
            if self.capture is not None:
                self.capture.add_batch(batch, count)
            network.receive_batch(batch, count, time.monotonic())
            self.counters["tx.frames"] += count

    # ---- network -> guest -------------------------------------------------------

    def _schedule_rx(self) -> None:
        if not self._rx_scheduled and not self._closed:
            self._rx_scheduled = True
            self.loop.call_soon(self._flush_rx)

    def _flush_rx(self) -> None:
        """Send frames for the guest while the peer takes them; the rest wait in the network's
        queue (bounded there: the oldest are dropped and counted when the peer stops reading)."""
        self._rx_scheduled = False
        if self._closed:
            return
        pending = self.network.frames_to_guest
        while True:
            if self._out_offset >= len(self._out):
                if not pending:
                    break
                self._take(pending)
            try:
                sent = self.sock.send(memoryview(self._out)[self._out_offset:])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.warning("cannot send to the stream front-end (%s); closing the connection", exc)
                self.close()
                return
            self._out_offset += sent
            self.counters["rx.bytes"] += sent
            if self._out_offset < len(self._out):
                self._wait_writable()
                return
        self._stop_waiting()

    def _take(self, pending: GuestFrameQueue) -> None:
        """Join up to ``SEND_FRAMES`` frames (``SEND_BYTES``) of the queue into one send."""
        frames: list[bytes] = []
        size = 0
        popleft = pending.popleft
        while pending and len(frames) < SEND_FRAMES and size < SEND_BYTES:
            frame = popleft()
            if type(frame) is tuple:
                # (frame, vnet): a partial or absent checksum left for a vhost-user guest
                # that negotiated offloads, queued before it went; unusable here.
                self.counters["rx.dropped_offloaded"] += 1
                continue
            frames.append(frame)
            size += len(frame) + LENGTH_BYTES
        if self.capture is not None:
            self.capture.add(frames)
        self.counters["rx.frames"] += len(frames)
        self._out = encode_frames(frames)
        self._out_offset = 0

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
