"""A fast guest-side split-ring driver for benchmarks, vectorised with numpy.

The test front-end's driver (``vhost_user/driver.py``) writes every
descriptor with ``struct`` per frame, which is fine for tests but would
measure itself rather than the back-end. Here every descriptor owns one fixed
buffer for the life of the ring and the avail ring is pre-filled with the
identity permutation, so posting ``k`` chains is one store of the avail index.
That relies on the device completing chains in order, which every virtio-net
back-end does for a single queue; ``check_in_order`` verifies it.

Completion is interrupt-driven like a real guest: while it has work it polls
the used index, and when it must wait it arms ``used_event`` and sleeps on the
call eventfd, so on a small machine the guest does not steal the back-end's CPU.
Waiting for TX room asks for the interrupt as Linux's virtio-net does when its
queue is full (``virtqueue_enable_cb_delayed``): once three quarters of the
chains in flight are used, not at the first one.
"""

from __future__ import annotations

import os
import select

import numpy as np

from testkit.driver import RingLayout
from testkit.frontend import DRIVER_FEATURES, Frontend
from vhostnet.vhost_user.protocol import VirtioFeature

VIRTQ_DESC_F_WRITE = 2
VIRTIO_NET_HDR_LEN = 12  # VERSION_1: the header always has num_buffers
# What a Linux guest negotiates: checksum offload and TCPv4 segmentation both ways.
OFFLOAD_FEATURES = (VirtioFeature.NET_F_CSUM | VirtioFeature.NET_F_GUEST_CSUM
                    | VirtioFeature.NET_F_HOST_TSO4 | VirtioFeature.NET_F_GUEST_TSO4)
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index move past the other side's event index?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class NumpyRing:
    """One split ring whose descriptor ``i`` always points at buffer ``i``."""

    def __init__(self, mem: np.ndarray, layout: RingLayout, buf_gpa: int, buf_size: int,
                 writable: bool, kick_fd: int, call_fd: int) -> None:
        n = layout.size
        self.size = n
        self.mask = n - 1
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.desc = mem[layout.desc_gpa : layout.desc_gpa + 16 * n].view(DESC_DTYPE)
        # avail: flags, idx, ring[n], used_event
        self.avail = mem[layout.avail_gpa : layout.avail_gpa + 6 + 2 * n].view("<u2")
        used = layout.used_gpa
        self.used_head = mem[used : used + 4].view("<u2")
        self.used_ring = mem[used + 4 : used + 4 + 8 * n].view("<u4").reshape(n, 2)
        self.avail_event = mem[used + 4 + 8 * n : used + 6 + 8 * n].view("<u2")
        self.buffers = mem[buf_gpa : buf_gpa + n * buf_size].reshape(n, buf_size)
        self.buf_size = buf_size
        self.desc["addr"] = buf_gpa + np.arange(n, dtype=np.uint64) * buf_size
        self.desc["len"] = buf_size
        self.desc["flags"] = VIRTQ_DESC_F_WRITE if writable else 0
        self.desc["next"] = 0
        self.avail[2 : 2 + n] = np.arange(n, dtype=np.uint16)
        self.avail_idx = int(self.avail[1])
        self.used_seen = int(self.used_head[1])
        self.kicks = 0
        self.quiet()

    # ---- indices -------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return (self.avail_idx - self.used_seen) & 0xFFFF

    @property
    def free(self) -> int:
        return self.size - self.in_flight

    def slot(self, position: int) -> int:
        """The descriptor (and buffer) used by the chain at avail position ``position``."""
        return position & self.mask

    def publish(self, count: int) -> None:
        """Make ``count`` more chains available and kick if the device asked for it."""
        if count <= 0:
            return
        old = self.avail_idx
        self.avail_idx = (old + count) & 0xFFFF
        self.avail[1] = self.avail_idx  # x86 keeps the buffer stores before this one
        if need_event(int(self.avail_event[0]), self.avail_idx, old):
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1

    def used_idx(self) -> int:
        return int(self.used_head[1])

    def take_used(self) -> tuple[int, int]:
        """Completed chains since the last call: (first avail position, count)."""
        start = self.used_seen
        now = self.used_idx()
        self.used_seen = now
        return start, (now - start) & 0xFFFF

    def used_lengths(self, start: int, count: int) -> np.ndarray:
        idx = (start + np.arange(count)) & self.mask
        return self.used_ring[idx, 1]

    def check_in_order(self, start: int, count: int) -> None:
        idx = (start + np.arange(count)) & self.mask
        if count and not np.array_equal(self.used_ring[idx, 0], idx):
            raise RuntimeError("the back-end completed chains out of order")

    # ---- waiting --------------------------------------------------------------

    def quiet(self) -> None:
        """No interrupts while we poll: put used_event half a ring-index space away."""
        self.avail[2 + self.size] = (self.used_seen + 0x7FFF) & 0xFFFF

    def wait(self, timeout: float, batch: int = 1) -> bool:
        """Sleep until the device completes something (or ``timeout``); True if it did.

        The interrupt is asked for once ``batch`` more chains are used; progress seen
        before sleeping returns at once.
        """
        if self.used_idx() != self.used_seen:
            return True
        self.avail[2 + self.size] = (self.used_seen + max(batch, 1) - 1) & 0xFFFF
        if self.used_idx() != self.used_seen:  # it may have come before the arm
            self.quiet()
            return True
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        self.quiet()
        return self.used_idx() != self.used_seen

    def wait_for_room(self, timeout: float) -> bool:
        """``wait`` on a full TX ring: interrupt when 3/4 of the chains in flight are used."""
        return self.wait(timeout, batch=self.in_flight * 3 // 4)


class BenchFrontend(Frontend):
    """The test front-end for the control plane, with RX left empty for ``NumpyRing``."""

    def _refill_rx(self) -> int:
        return 0


class GuestRings:
    """A connected front-end with numpy rings on RX and TX and one buffer per descriptor."""

    def __init__(self, socket_path: str, *, queue_size: int = 256, tx_buf: int = 2048,
                 rx_buf: int = 2048, timeout: float = 5.0, offload: bool = False) -> None:
        pool = queue_size * (tx_buf + rx_buf)
        memory_size = max(64 << 20, ((pool + (4 << 20)) + 0xFFFFF) & ~0xFFFFF)
        features = DRIVER_FEATURES | (OFFLOAD_FEATURES if offload else 0)
        self.frontend = BenchFrontend(socket_path, memory_size=memory_size,
                                      queue_size=queue_size, timeout=timeout, features=features)
        # Offloads as far as the back-end offered them: TSO both ways, checksums left partial.
        self.tx_tso = False
        self.rx_tso = False
        fe = self.frontend
        try:
            fe.connect()
            fe.start()
            self.mem = np.frombuffer(fe.memory.map, dtype=np.uint8)
            rx_layout, tx_layout = fe.layouts
            base = (rx_layout.end + 0xFFFF) & ~0xFFFF
            self.rx = NumpyRing(self.mem, rx_layout, base, rx_buf, True, fe.kick_fds[0], fe.call_fds[0])
            self.tx = NumpyRing(self.mem, tx_layout, base + queue_size * rx_buf, tx_buf, False,
                                fe.kick_fds[1], fe.call_fds[1])
            acked = fe.acked_features
            self.tx_tso = bool(acked & VirtioFeature.NET_F_HOST_TSO4 and acked & VirtioFeature.NET_F_CSUM)
            self.rx_tso = bool(acked & VirtioFeature.NET_F_GUEST_TSO4)
        except BaseException:
            self.close()
            raise
        # Post every RX buffer at once; the device fills them in order.
        self.rx.publish(self.rx.size)
        os.eventfd_write(self.rx.kick_fd, 1)

    def close(self) -> None:
        # numpy views pin the mmap; drop them before the front-end unmaps it.
        for name in ("rx", "tx", "mem"):
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
        self.tx.desc["len"] = len(data)

    def reclaim_tx(self) -> int:
        start, count = self.tx.take_used()
        return count

    def write_tx(self, position: int, frame: bytes | bytearray | memoryview) -> None:
        """Copy ``frame`` into the buffer of the chain at avail position ``position``."""
        slot = self.tx.slot(position)
        length = VIRTIO_NET_HDR_LEN + len(frame)
        buf = self.tx.buffers[slot]
        buf[:VIRTIO_NET_HDR_LEN] = 0
        buf[VIRTIO_NET_HDR_LEN:length] = np.frombuffer(frame, dtype=np.uint8)
        self.tx.desc["len"][slot] = length

    def send_frames(self, frames: list[bytes], timeout: float = 5.0) -> None:
        """Queue frames on TX (waiting for room, bounded) and publish them."""
        import time

        deadline = time.monotonic() + timeout
        pending = 0
        for frame in frames:
            while self.tx.free - pending <= 0:
                self.tx.publish(pending)
                pending = 0
                self.reclaim_tx()
                if self.tx.free > 0:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("TX ring stayed full")
                self.tx.wait_for_room(0.05)
            self.write_tx(self.tx.avail_idx + pending, frame)
            pending += 1
        self.tx.publish(pending)
        self.reclaim_tx()

    # ---- RX ------------------------------------------------------------------

    def receive_frames(self) -> list[bytes]:
        """Frames completed on RX since the last call (copied out); buffers reposted."""
        start, count = self.rx.take_used()
        if not count:
            return []
        self.rx.check_in_order(start, count)
        frames = []
        buffers = self.rx.buffers
        mask = self.rx.mask
        lengths = self.rx.used_lengths(start, count)
        for i in range(count):
            frames.append(buffers[(start + i) & mask, VIRTIO_NET_HDR_LEN : int(lengths[i])].tobytes())
        self.rx.publish(count)
        return frames

    def receive_counts(self) -> tuple[int, int]:
        """Completed RX frames and their bytes (headers excluded), without copying; reposted."""
        start, count = self.rx.take_used()
        if not count:
            return 0, 0
        total = int(self.rx.used_lengths(start, count).sum(dtype=np.int64)) - count * VIRTIO_NET_HDR_LEN
        self.rx.publish(count)
        return count, total
