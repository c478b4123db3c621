"""Packet capture (``-p/--pcap FILE``): every frame both ways, in a classic pcap file.

The file is libpcap's classic format with nanosecond timestamps (magic
0xa1b23c4d) and LINKTYPE_ETHERNET, so ``tcpdump -r`` and ``tshark -r`` read it.
Frames are what the guest sent (as drained from its TX ring or stream) and what
vhostnet gave it (as pushed to its RX ring or written to its stream), without
the virtio-net header: in vhost-user mode with offloads, TCP/UDP checksums may be
partial and TCP segments up to 64 KiB, as tcpdump shows them on a tap device.

Frames go into an in-memory buffer and ``flush`` writes it once per event-loop turn
(scheduled by the first frame of a turn): one write per turn, not per frame. A turn
that brings more than the buffer holds (a burst of a download on a loaded machine)
writes the buffer out at once and goes on: a regular file takes it into the page
cache, so a capture loses nothing to a burst. A FIFO whose reader is behind takes
nothing (EAGAIN): then frames beyond the buffer are dropped and counted, and memory
stays bounded. The file is bounded too: once ``size_limit`` bytes are written the
capture stops, with one log line, and keeps the start of the session (where problems
usually begin).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144  # tcpdump's default: frames with offloads reach 64 KiB + headers
DEFAULT_SIZE_LIMIT = 32 * 1024 * 1024
# Frames waiting for the disk; beyond this they are dropped (counted).
MAX_BUFFERED_BYTES = 8 * 1024 * 1024

_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
RECORD_HEADER_LEN = _RECORD_HEADER.size


def file_header() -> bytes:
    """The pcap global header: version 2.4, nanosecond timestamps, Ethernet."""
    return _FILE_HEADER.pack(PCAP_MAGIC_NS, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


def record(frame: bytes | memoryview, when_ns: int) -> bytes:
    """One pcap record: header (seconds, nanoseconds, captured and original length) + frame."""
    length = len(frame)
    seconds, nanoseconds = divmod(when_ns, 1_000_000_000)
    return _RECORD_HEADER.pack(seconds, nanoseconds, length, length) + bytes(frame)


class Capture:
    """Writes frames to a pcap file without ever blocking the caller."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop | None,
                 size_limit: int = DEFAULT_SIZE_LIMIT,
                 max_buffered: int = MAX_BUFFERED_BYTES) -> None:
        # O_NONBLOCK is harmless on a regular file and keeps a FIFO from stalling us.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK
                          | os.O_CLOEXEC, 0o600)
        self.path = path
        self.loop = loop
        self.size_limit = size_limit
        self.max_buffered = max_buffered
        self._buffer = bytearray(file_header())
        self._flush_scheduled = False
        self.written = 0  # bytes in the file, header included
        self.stopped = False  # the size limit was reached
        self.counters = {"frames": 0, "dropped": 0, "write_errors": 0}
        self._schedule_flush()

    def add(self, frames: Iterable[bytes | memoryview]) -> None:
        """Record ``frames`` (a batch, one direction) at the current time."""
        if self.stopped or self.fd < 0:
            return
        now = time.time_ns()
        buffer = self._buffer
        limit = self.max_buffered
        taken = dropped = 0
        for frame in frames:
            if len(buffer) + RECORD_HEADER_LEN + len(frame) > limit:
                self.flush()  # (the same buffer, emptied as far as the file took it)
                if self.stopped or self.fd < 0:
                    break
                if len(buffer) + RECORD_HEADER_LEN + len(frame) > limit:
                    dropped += 1
                    continue
            buffer += record(frame, now)
            taken += 1
        self.counters["frames"] += taken
        self.counters["dropped"] += dropped
        if taken:
            self._schedule_flush()

    def add_batch(self, batch: object, count: int, start: int = 0) -> None:
        """Record ``count`` frames of a ``FrameBatch``, from frame ``start`` on."""
        frame = batch.frame  # type: ignore[attr-defined]
        self.add(frame(index) for index in range(start, start + count))

    def _schedule_flush(self) -> None:
        if self.loop is None:
            return  # the owner calls flush() itself (tests)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is buffered, up to the size limit; stop the capture at the limit."""
        self._flush_scheduled = False
        if self.fd < 0 or not self._buffer:
            return
        room = self.size_limit - self.written
        data = self._buffer
        if len(data) > room:
            # Only whole records go in: cut at the last record boundary that fits.
            data = self._buffer[:_whole_records(self._buffer, room, self.written == 0)]
            self._stop()
        try:
            written = os.write(self.fd, data) if data else 0
        except BlockingIOError:
            return  # a FIFO that is full: try again next turn
        except OSError as exc:
            self.counters["write_errors"] += 1
            log.error("capture to %s failed (%s); capture stopped", self.path, exc.strerror)
            self.close()
            return
        self.written += written
        del self._buffer[:written]
        if self.stopped:
            self._buffer.clear()
        elif self._buffer:
            self._schedule_flush()

    def _stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            log.warning("capture file %s reached %d bytes; capture stopped", self.path,
                        self.size_limit)

    def close(self) -> None:
        """Write what is left (within the limit) and close the file."""
        if self.fd < 0:
            return
        self.loop = None
        self.flush()
        os.close(self.fd)
        self.fd = -1


def _whole_records(buffer: bytearray, room: int, with_header: bool) -> int:
    """Bytes of ``buffer`` (records, after the file header if ``with_header``) that fit ``room``."""
    position = _FILE_HEADER.size if with_header else 0
    if position > room:
        return 0
    while position + RECORD_HEADER_LEN <= len(buffer):
        captured = _RECORD_HEADER.unpack_from(buffer, position)[2]
        end = position + RECORD_HEADER_LEN + captured
        if end > room:
            break
        position = end
    return position
