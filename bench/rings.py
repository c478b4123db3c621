"""The benchmark guest's rings: the test kit's ``SplitRing`` or ``PackedRing`` with fixed buffers.

The test front-end posts buffers chain by chain, which is fine for tests but
would measure itself rather than the back-end. Here every descriptor owns one
fixed buffer for the life of the ring (``SplitRing.attach_buffers``), so
posting ``k`` chains is one store of the avail index and the per-frame work is
numpy copies.

Completion is interrupt-driven like a real guest: while it has work it polls
the used index, and when it must wait it arms ``used_event`` and sleeps on the
call eventfd (``SplitRing.wait``), so on a small machine the guest does not
steal the back-end's CPU.
"""

from __future__ import annotations

import os

import numpy as np

from testkit.frontend import DRIVER_FEATURES, RX_RING, TX_RING, Frontend
from testkit.guest_ring import GuestRing
from vhostnet.vhost_user.protocol import VirtioFeature

VIRTIO_NET_HDR_LEN = 12  # VERSION_1: the header always has num_buffers
# What a Linux guest negotiates: checksum offload and TCPv4 segmentation both ways.
OFFLOAD_FEATURES = (VirtioFeature.NET_F_CSUM | VirtioFeature.NET_F_GUEST_CSUM
                    | VirtioFeature.NET_F_HOST_TSO4 | VirtioFeature.NET_F_GUEST_TSO4)


class BenchFrontend(Frontend):
    """The test front-end for the control plane, with RX left empty for ``NumpyRing``."""

    def _refill_rx(self, pair: int = 0) -> int:
        return 0


class GuestRings:
    """A connected front-end with numpy rings on RX and TX and one buffer per descriptor."""

    def __init__(self, socket_path: str, *, queue_size: int = 256, tx_buf: int = 2048,
                 rx_buf: int = 2048, timeout: float = 5.0, offload: bool = False,
                 packed: bool = False) -> None:
        pool = queue_size * (tx_buf + rx_buf)
        memory_size = max(64 << 20, ((pool + (4 << 20)) + 0xFFFFF) & ~0xFFFFF)
        features = DRIVER_FEATURES | (OFFLOAD_FEATURES if offload else 0)
        self.frontend = BenchFrontend(socket_path, memory_size=memory_size,
                                      queue_size=queue_size, timeout=timeout, features=features,
                                      packed=packed)
        # Offloads as far as the back-end offered them: TSO both ways, checksums left partial.
        self.tx_tso = False
        self.rx_tso = False
        fe = self.frontend
        try:
            fe.connect()
            fe.start()
            base = (fe.layouts[RX_RING].end + 0xFFFF) & ~0xFFFF
            self.rx = self._ring(RX_RING, base, rx_buf, True)
            self.tx = self._ring(TX_RING, base + queue_size * rx_buf, tx_buf, False)
            acked = fe.acked_features
            self.tx_tso = bool(acked & VirtioFeature.NET_F_HOST_TSO4 and acked & VirtioFeature.NET_F_CSUM)
            self.rx_tso = bool(acked & VirtioFeature.NET_F_GUEST_TSO4)
        except BaseException:
            self.close()
            raise
        # Post every RX buffer at once; the device fills them in order.
        self.rx.expose(self.rx.size)
        os.eventfd_write(fe.kick_fds[RX_RING], 1)

    def _ring(self, ring: int, buf_gpa: int, buf_size: int, writable: bool) -> GuestRing:
        """The front-end's started ring, with its eventfds and one buffer per descriptor."""
        fe = self.frontend
        driver = fe.rx if ring == RX_RING else fe.tx
        assert driver is not None
        driver.kick_fd, driver.call_fd = fe.kick_fds[ring], fe.call_fds[ring]
        driver.attach_buffers(buf_gpa, buf_size, writable)
        return driver

    def close(self) -> None:
        # numpy views pin the mmap; drop them before the front-end unmaps it.
        for name in ("rx", "tx"):
            if hasattr(self, name):
                delattr(self, name)
        self.frontend.close()

    def __enter__(self) -> GuestRings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- TX ------------------------------------------------------------------

    def fill_tx_all(self, frame: bytes) -> None:
        """Put the same frame (with a zero virtio-net header) in every TX buffer."""
        data = np.frombuffer(bytes(VIRTIO_NET_HDR_LEN) + frame, dtype=np.uint8)
        self.tx.buffers[:, : len(data)] = data
        self.tx.set_buffer_length(slice(None), len(data))

    def reclaim_tx(self) -> int:
        start, count = self.tx.consume_used()
        return count

    def write_tx(self, position: int, frame: bytes | bytearray | memoryview) -> None:
        """Copy ``frame`` into the buffer of the chain at avail position ``position``."""
        slot = self.tx.slot(position)
        length = VIRTIO_NET_HDR_LEN + len(frame)
        buf = self.tx.buffers[slot]
        buf[:VIRTIO_NET_HDR_LEN] = 0
        buf[VIRTIO_NET_HDR_LEN:length] = np.frombuffer(frame, dtype=np.uint8)
        self.tx.set_buffer_length(slot, length)

    def send_frames(self, frames: list[bytes], timeout: float = 5.0) -> None:
        """Queue frames on TX (waiting for room, bounded) and publish them."""
        import time

        deadline = time.monotonic() + timeout
        pending = 0
        for frame in frames:
            while self.tx.free - pending <= 0:
                self.tx.expose(pending)
                pending = 0
                self.reclaim_tx()
                if self.tx.free > 0:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("TX ring stayed full")
                self.tx.wait_for_room(0.05)
            self.write_tx(self.tx.avail_idx + pending, frame)
            pending += 1
        self.tx.expose(pending)
        self.reclaim_tx()

    # ---- RX ------------------------------------------------------------------

    def receive_frames(self) -> list[bytes]:
        """Frames completed on RX since the last call (copied out); buffers reposted."""
        start, count = self.rx.consume_used()
        if not count:
            return []
        self.rx.check_in_order(start, count)
        frames = []
        buffers = self.rx.buffers
        mask = self.rx.mask
        lengths = self.rx.used_lengths(start, count)
        for i in range(count):
            frames.append(buffers[(start + i) & mask, VIRTIO_NET_HDR_LEN : int(lengths[i])].tobytes())
        self.rx.expose(count)
        return frames

    def receive_counts(self) -> tuple[int, int]:
        """Completed RX frames and their bytes (headers excluded), without copying; reposted."""
        start, count = self.rx.consume_used()
        if not count:
            return 0, 0
        total = int(self.rx.used_lengths(start, count).sum(dtype=np.int64)) - count * VIRTIO_NET_HDR_LEN
        self.rx.expose(count)
        return count, total
