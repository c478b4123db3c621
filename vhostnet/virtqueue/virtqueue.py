"""The Python face of one virtqueue, split or packed: construction, memory changes, logging.

The per-frame work happens in the Cython kernel (``_virtq.SplitQueue`` or
``_virtq.PackedQueue``, from ext/virtq.pyx) with the GIL released; this class only sets it up and turns its
error counters into log lines, once per reason per queue, outside the kernel.

Memory changes: the kernel keeps its own copy of the region table (with
references that keep the mappings alive). After the ``GuestMemory`` table
changes, call ``memory_changed()``; it rebuilds the kernel's table in place
(ring positions are kept). If a ring is no longer mapped the queue becomes
``broken`` and is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from vhostnet.virtqueue import _virtq
from vhostnet.virtqueue._virtq import FrameBatch
from vhostnet.virtqueue.memory import AddressError, GuestMemory

__all__ = ["MAX_FRAME_BYTES", "PACKED_FRESH_BASE", "VIRTIO_F_RING_PACKED", "Virtqueue",
           "WATCH_MOVED", "WATCH_RESIGNALLED", "WATCH_TX_WAITING"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MAX_FRAME_BYTES: int = _virtq.MAX_FRAME_BYTES

# The feature bit that makes a ring packed (virtio 1.1, bit 34).
VIRTIO_F_RING_PACKED = 1 << 34
# A packed ring's base before the guest used it: both positions at slot 0, wrap counters 1.
PACKED_FRESH_BASE = 0x80008000

# Virtqueue.watch's answer bits.
WATCH_MOVED = 1         # the ring moved since the last look
WATCH_RESIGNALLED = 2   # an interrupt the guest asked for and did not get was raised now
WATCH_TX_WAITING = 4    # a TX ring holds chains no kick announced


class Virtqueue:
    """A started virtqueue of a virtio-net device, packed if ``features`` has RING_PACKED.

    ``hdr_len`` is the virtio-net header length (12 with VERSION_1 or MRG_RXBUF, 10 for
    legacy without it). ``base`` is SET_VRING_BASE's value: the next avail index (split),
    or both positions with their wrap counters (packed, see ``PACKED_FRESH_BASE``); for a
    packed ring ``avail_uva``/``used_uva`` are the driver and device event areas. Raises
    ``AddressError`` if a ring is not inside one mapped region, ``ValueError`` for a bad
    size, header length or ring alignment. ``features`` are the negotiated virtio bits: TX
    headers asking for an offload not negotiated are refused (counted), RX frames carry
    offload fields (``FrameBatch.append(frame, vnet)``) only when negotiated.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        base: int = 0,
        hdr_len: int = 12,
        mrg_rxbuf: bool = False,
        event_idx: bool = False,
        call_fd: int | None = None,
        name: str = "vq",
        features: int = 0,
    ) -> None:
        self.name = name
        self._memory = memory
        self._rings = (desc_uva, avail_uva, used_uva)
        self.packed = bool(features & VIRTIO_F_RING_PACKED)
        self._direct: tuple[object, object] | None = None
        # Called once guest memory faulted under one of this queue's calls (its owner then
        # ends the connection; checked only then, not after every call).
        self.on_fault: Callable[[], None] | None = None
        kernel = _virtq.PackedQueue if self.packed else _virtq.SplitQueue
        self._kernel = kernel(
            size, hdr_len, mrg_rxbuf, event_idx, -1 if call_fd is None else call_fd, base
        )
        # Header offloads (checksum, segmentation) are honoured only as far as negotiated.
        self._kernel.set_features(features)
        try:
            self._install_memory()
        except LookupError as error:
            raise AddressError(
                f"{name}: rings desc {desc_uva:#x} avail {avail_uva:#x} used {used_uva:#x} "
                f"(size {size}) are not inside mapped memory"
            ) from error
        self._generation = memory.generation

    def _install_memory(self) -> None:
        table = [(r.gpa, r.uva, r.size, r.data) for r in self._memory.regions]
        self._kernel.set_memory(table, *self._rings)

    def memory_changed(self) -> None:
        """Pick up a changed region table (cheap no-op if the generation did not move)."""
        if self._memory.generation == self._generation:
            return
        self._generation = self._memory.generation
        try:
            self._install_memory()
        except (LookupError, ValueError):
            log.error("%s: rings are no longer in mapped memory; queue stopped", self.name)
            self._kernel.mark_broken()
            self._reported(None)  # (the memory may also have faulted under the ring check)

    # The data path: each call releases the GIL inside.

    def tx_drain(self, batch: FrameBatch, max_frames: int) -> int:
        """Move up to ``max_frames`` guest TX frames into ``batch``; returns how many."""
        return self._reported(self._kernel.tx_drain(batch, max_frames))

    def tx_drain_rearm(self, batch: FrameBatch, max_frames: int) -> tuple[int, bool]:
        """A kick's ring work in one call: ``batch`` emptied, up to ``max_frames`` frames
        moved into it (``tx_drain``), the guest notified of the used chains if it asks
        (``notify``) and, when fewer came, kicks asked for again (``enable_kick``). Returns
        (frames, whether to drain again: the batch was full or buffers came meanwhile).
        Runs per kick: ``_reported``'s test is written out here."""
        kernel = self._kernel
        result = kernel.tx_drain_rearm(batch, max_frames)
        if kernel.has_new_errors:
            self._log_new_errors()
        return result

    def rx_push(self, batch: FrameBatch, start: int = 0) -> int:
        """Write frames ``start…`` of ``batch`` into guest RX buffers.

        Returns how many frames were consumed: delivered, or dropped because they can never
        fit (counted). The rest wait for the guest to post buffers.
        """
        return self._reported(self._kernel.rx_push(batch, start))

    def direct_rx(self) -> tuple[object, object]:
        """(kernel queue, capsule): for a C kernel that writes frames straight into this RX
        ring's buffers (the ``RxDirectApi`` of ext/rx_direct.pxd, GIL released, one interrupt
        per call). Keep the tuple (it keeps the kernel queue alive) and call
        ``direct_rx_done()`` after using it."""
        if self._direct is None:
            self._direct = (self._kernel, _virtq.rx_direct_handle(self._kernel))
        return self._direct

    @property
    def kernel(self) -> object:
        """The C queue itself, for a C reader that drains this ring with no Python frame
        between (the UDP fast path's ``TxKick``: ``tx_drain_rearm`` on it, then
        ``direct_rx_done()`` here whenever its ``has_new_errors`` is set)."""
        return self._kernel

    def direct_rx_done(self) -> bool:
        """After a direct write (or a drain of ``kernel``): log the kinds of bad guest input
        met for the first time. Returns whether the ring is broken now (one call for both:
        this runs per write)."""
        kernel = self._kernel
        if kernel.has_new_errors:
            self._log_new_errors()
        return kernel.broken

    def notify(self) -> bool:
        """Signal the call eventfd if the guest wants an interrupt for what was just used."""
        return self._reported(self._kernel.notify())

    def signal_restart(self) -> bool:
        """Interrupt the guest once at a ring start: an interrupt may have been lost meanwhile."""
        return self._reported(self._kernel.signal_restart())

    def enable_kick(self) -> bool:
        """Ask the guest for kicks again; True if buffers arrived meanwhile (drain again)."""
        return self._reported(self._kernel.enable_kick())

    def watch(self, tx: bool) -> int:
        """The notification watchdog's look at this ring (``NetDevice``'s, while rings are busy).

        A guest whose memory barriers do not reach us (QEMU before 8.1 under TCG with one
        vCPU elides them) can lose a kick or an interrupt: its store of avail->idx and our
        store of avail_event pass each other, and each side reads the other's old value.
        Returns ``WATCH_*`` bits: the ring moved since the last look; the interrupt the
        guest asks for now (over every chain since the last one raised) was raised; for a
        TX ring (``tx``), chains wait that no kick announced (drain them).
        """
        return self._reported(self._kernel.watch(tx))

    def disable_kick(self) -> None:
        """Tell the guest kicks are not needed while we are draining anyway."""
        self._reported(self._kernel.disable_kick())

    def set_features(self, features: int) -> None:
        """The negotiated feature bits changed (SET_FEATURES on a running ring)."""
        self._kernel.set_features(features)

    def set_log(self, log_array, log_guest_addr: int = 0, log_used: bool = False) -> None:
        """Dirty-page logging: a writable uint8 buffer (the shared log) or None to stop."""
        self._kernel.set_log(log_array, log_guest_addr, log_used)

    @property
    def call_fd(self) -> int | None:
        fd = self._kernel.call_fd
        return None if fd < 0 else fd

    @call_fd.setter
    def call_fd(self, fd: int | None) -> None:
        self._kernel.call_fd = -1 if fd is None else fd

    @property
    def size(self) -> int:
        return self._kernel.size

    @property
    def last_avail_idx(self) -> int:
        return self._kernel.last_avail_idx

    @property
    def base(self) -> int:
        """What GET_VRING_BASE answers: the next avail index (split) or both packed positions."""
        return self._kernel.base

    @property
    def used_idx(self) -> int:
        return self._kernel.used_idx

    @property
    def broken(self) -> bool:
        return self._kernel.broken

    @property
    def faulted(self) -> bool:
        """Guest memory vanished under a copy (SIGBUS caught): the connection must close."""
        return self._kernel.faulted

    def counters(self) -> dict[str, int]:
        return self._kernel.counters()

    def positions(self) -> dict[str, int]:
        """Ring indices, ours and the guest's (avail, used, event indices, flags)."""
        return self._reported(self._kernel.positions())

    def _reported(self, result: _T) -> _T:
        """``result``, after logging the kinds of bad guest input the kernel met for the first time."""
        if self._kernel.has_new_errors:
            self._log_new_errors()
        return result

    def _log_new_errors(self) -> None:
        counts = self._kernel.counters()
        faulted = False
        for reason in self._kernel.take_new_errors():
            if reason == "guest_memory_fault":
                faulted = True
                log.error(
                    "%s: guest memory vanished under a copy (SIGBUS: the front-end shrank its "
                    "memory file); closing the connection", self.name
                )
            elif reason == "avail_idx_jump":
                log.error(
                    "%s: guest avail index jumped past the ring size; queue stopped", self.name
                )
            else:
                log.warning(
                    "%s: refused a guest buffer (%s); further ones are only counted (%d so far)",
                    self.name,
                    reason,
                    counts[reason],
                )
        if faulted and self.on_fault is not None:
            self.on_fault()
