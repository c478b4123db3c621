"""NetDevice: the virtio-net device behind one vhost-user connection.

The vhost-user handler (protocol state) calls the methods of this class when
QEMU sets up memory and rings; this class owns what those messages create:
the guest memory mappings, the kick/call eventfds, and the Cython virtqueues.
It moves frames between the rings and the network, which outlives it (the NAT
state survives a QEMU reconnect, as it does in passt).

Ring indices: 2k is the RX ring of queue pair k (device writes, guest reads),
2k+1 its TX ring (guest writes). With one queue pair (the default) that is rings
0 and 1; with ``queue_pairs`` N > 1 the device offers VIRTIO_NET_F_MQ and the
front-end may start up to 2N rings. Every ring is served on the event loop, each
TX ring drained in its turn. Frames for the guest go to the RX ring of the pair
the guest last sent that flow on (``FlowSteering``), pair 0 for flows it never sent.
That RX half (pending frames into the RX rings, direct RX) is ``RxFlush`` in device_rx.py.

Device state (vhost-user SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE, for live
migration) goes to the ``DeviceStateHandler`` the device is given; without one
the feature is not offered.

File descriptors: region, log and device-state fds are handed over and closed
here; kick and call eventfds stay owned by the handler and are only borrowed
(the handler withdraws them with ``ring_kick_fd(i, None)`` before closing).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vhostnet.device_rx import (
    MAX_PASSES_PER_WAKEUP,
    RX_QUEUE,
    TX_BATCH,
    TX_QUEUE,
    RxFlush,
    is_rx_ring,
)
from vhostnet.device_watch import RingWatchdog
from vhostnet.vhost_user import protocol as vu
from vhostnet.vhost_user.device_api import DeviceRefused
from vhostnet.virtqueue import AddressError, FlowSteering, FrameBatch, GuestMemory, Virtqueue

if TYPE_CHECKING:
    from vhostnet.capture import Capture
    from vhostnet.network import GuestSide, SwitchedFrames, TxKick
    from vhostnet.vhost_user.backend import VringConfig
    from vhostnet.vhost_user.codec import MemoryRegion

log = logging.getLogger(__name__)

# VHOST_USER's own bound on queue pairs (the back-end's rings table is sized by it).
MAX_QUEUE_PAIRS = 128

# Checksum and segmentation offloads both ways: a Linux guest then sends and
# receives TCP in segments of up to 64 KiB whatever its MTU, and neither side
# computes checksums that are never checked on the way (see stack/offload.py).
# TSO depends on the checksum feature of its direction (virtio 5.1.3.1).
OFFERED_FEATURES = (
    vu.VirtioFeature.VERSION_1
    | vu.VirtioFeature.NET_F_MRG_RXBUF
    | vu.VirtioFeature.RING_F_EVENT_IDX
    | vu.VirtioFeature.RING_F_INDIRECT_DESC
    | vu.VirtioFeature.NET_F_CSUM
    | vu.VirtioFeature.NET_F_GUEST_CSUM
    | vu.VirtioFeature.NET_F_HOST_TSO4
    | vu.VirtioFeature.NET_F_HOST_TSO6
    | vu.VirtioFeature.NET_F_GUEST_TSO4
    | vu.VirtioFeature.NET_F_GUEST_TSO6
    # Packed rings beside split ones: the front-end's packed=on decides (ext/virtq_packed.pxi).
    | vu.VirtioFeature.F_RING_PACKED
)


class DeviceStateHandler(Protocol):
    """Moves the device's state (the network's) in and out through a pipe from the front-end."""

    def begin(self, direction: int, phase: int, fd: int) -> bool:
        """SET_DEVICE_STATE_FD: take ``fd`` (always closed by the handler), start the transfer
        on a later loop turn (the front-end reads the reply first); False refuses it."""
        ...

    def check(self) -> bool:
        """CHECK_DEVICE_STATE: did the last transfer succeed?"""
        ...

    def close(self) -> None:
        """The connection is gone: stop any transfer and close its fd."""
        ...


class NetDevice(RxFlush, RingWatchdog):
    """Implements ``BackendDevice`` for a virtio-net device with ``queue_pairs`` queue pairs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, network: GuestSide,
                 device_state: DeviceStateHandler | None = None, *, queue_pairs: int = 1,
                 switched: SwitchedFrames | None = None) -> None:
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs must be between 1 and {MAX_QUEUE_PAIRS}")
        self.loop = loop
        self.network = network
        # Several guests: frames the switch queued for this port (None: one guest, no switch).
        self.switched = switched
        self.queue_pairs = queue_pairs
        # Multiqueue only: which pair each flow of the guest sends on (RX follows it).
        self.steering = FlowSteering() if queue_pairs > 1 else None
        # Called (once, on a later loop turn) when guest memory faulted under a
        # queue: the connection must end. Set by the server; cleared at close.
        self.on_memory_fault: Callable[[], None] | None = None
        self.memory = GuestMemory()
        self.features = 0
        self.mtu = network.config.mtu
        self.queues: dict[int, Virtqueue] = {}
        self.kick_fds: dict[int, int] = {}
        # TX rings whose kick the network's C reader takes (``GuestSide.tx_kick``): the ring,
        # and whether the kick needs nothing of this device's Python, kept up to date here.
        self._tx_kicks: dict[int, TxKick] = {}
        self.call_fds: dict[int, int] = {}
        self.enabled: dict[int, bool] = {}
        self.tx_batch = FrameBatch(TX_BATCH)
        self.rx_batch = FrameBatch(TX_BATCH)
        # Multiqueue RX: one batch per pair filled at once (made on first use).
        self._rx_batches: dict[int, FrameBatch] = {RX_QUEUE: self.rx_batch}
        # rx.flushes_deferred: RX flushes left to a later loop turn (frames not answering a
        # guest batch: host data, timers), as opposed to those done at the end of a kick.
        self.counters = {"tx.frames": 0, "tx.discarded": 0, "rx.frames": 0,
                         "rx.flushes_deferred": 0}
        # Counts of rings already stopped, by "vqN.name": a ring restarted by a guest
        # reboot or a device reset starts from zero, and its totals must not vanish.
        self._stopped_ring_counters: Counter[str] = Counter()
        # Dirty-page logging (migration source): the shared log memfd, and
        # per ring the LOG flag and used-ring GPA from SET_VRING_ADDR.
        self.log_mapping: mmap.mmap | None = None
        self.log_array: np.ndarray | None = None
        self.ring_log: dict[int, tuple[bool, int]] = {}
        self.device_state = device_state
        # -p/--pcap: frames both ways, per batch (nothing per frame when None).
        self._capture: Capture | None = None
        self._closed = False
        self._rx_scheduled = False
        self._usable_rx: dict[int, Virtqueue] | None = None  # (RxFlush's cache; None: stale)
        self._direct_rx_ring: Virtqueue | None = None  # (RxFlush's direct-RX cache)
        self._direct_rx_handle: tuple[object, object] | bool | None = None
        # A ring reported a guest memory fault (Virtqueue.on_fault): checked at the end of a
        # kick instead of asking every ring at every kick.
        self._fault_reported = False
        # For the UDP fast path's flow readers (``DirectRoute`` in ext/udp_reader.pxi): changes
        # whenever ``direct_rx()``'s answer may; and whether a direct write that met no ring
        # error needs no ``direct_rx_done`` (the watchdog is on), just its frames counted.
        self.direct_rx_generation = 0
        self.direct_rx_quiet = False
        self._init_watchdog()  # (kicks and interrupts a guest's memory ordering lost)
        # Last: the listener runs at once when frames already wait (connections restored
        # before a front-end came, or frames sent to the broadcast address meanwhile).
        network.add_output_listener(self._schedule_rx)
        network.set_direct_rx(self)

    @property
    def capture(self) -> Capture | None:
        """-p/--pcap: frames both ways, per batch (nothing per frame when None)."""
        return self._capture

    @capture.setter
    def capture(self, capture: Capture | None) -> None:
        self._capture = capture
        self._rx_rings_changed()  # (no direct writes with a capture; kicks in Python)

    def _kicks_changed(self) -> None:
        """Tell the TX kicks' C readers their ring (and its C queue, which they drain
        themselves) and whether they may do a kick without this device's Python (one queue
        pair, nothing captured, the ring enabled and whole): at every change of rings
        (``_rx_rings_changed``) and of the capture."""
        for index, kick in self._tx_kicks.items():
            queue = self.queues.get(index)
            kick.queue = queue
            kick.ring = None if queue is None else queue.kernel
            kick.ready = (queue is not None and not queue.broken and not self._closed
                          and self.enabled.get(index, False) and not self._fault_reported
                          and self._capture is None and self.steering is None
                          and self.switched is None)

    def _watching(self, on: bool) -> None:
        """The watchdog started or stopped watching (``RingWatchdog``): a kick's C reader
        starts it again when it is off, and so does ``direct_rx_done`` after a direct write
        (while it is on, the UDP fast path's readers need not call that: ``direct_rx_quiet``)."""
        self.direct_rx_quiet = on
        for kick in self._tx_kicks.values():
            kick.watched = on

    # ---- BackendDevice: negotiation -----------------------------------------

    def offered_features(self) -> int:
        if self.queue_pairs > 1:
            return int(OFFERED_FEATURES | vu.VirtioFeature.NET_F_MQ)
        return int(OFFERED_FEATURES)

    def features_set(self, features: int) -> None:
        was_logging = self._logging
        self.features = features
        if self._logging != was_logging:
            log.info("dirty-page logging %s", "on" if self._logging else "off")
        self.network.set_guest_offloads(
            csum=bool(features & vu.VirtioFeature.NET_F_GUEST_CSUM),
            tso4=bool(features & vu.VirtioFeature.NET_F_GUEST_TSO4),
            tso6=bool(features & vu.VirtioFeature.NET_F_GUEST_TSO6),
        )
        for queue in self.queues.values():
            queue.set_features(features)
        self._apply_log()

    def set_status(self, status: int) -> None:
        log.debug("device status 0x%x", status)

    def set_mtu(self, mtu: int) -> bool:
        if not 68 <= mtu <= 65535:
            return False
        self.mtu = mtu
        return True

    def send_rarp(self, mac: bytes) -> None:
        # After a migration QEMU asks the back-end to announce the guest on
        # the *network* side. Our network is the NAT stack, which only needs
        # to learn the MAC; there is no switch to update.
        self.network.learn_guest_mac(mac)

    def set_log_base(self, fd: int, size: int, offset: int) -> None:
        # QEMU sends a new log (and drops the old one) whenever guest memory
        # grows during migration; queues must switch before the old mapping goes.
        try:
            mapping = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.log_mapping = mapping
        self.log_array = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=offset)
        log.info("dirty log mapped: %d bytes (%d pages)", size, size * 8)
        self._apply_log()

    def ring_set_log(self, index: int, log_used: bool, log_guest_addr: int) -> None:
        self.ring_log[index] = (log_used, log_guest_addr)
        self._apply_log()

    @property
    def _logging(self) -> bool:
        return bool(self.features & vu.VirtioFeature.F_LOG_ALL)

    def _apply_log(self) -> None:
        """Point every running queue at the log, or stop logging, per current state."""
        array = self.log_array if self._logging else None
        for index, queue in self.queues.items():
            log_used, guest_addr = self.ring_log.get(index, (False, 0))
            queue.set_log(array, guest_addr, log_used)

    # ---- BackendDevice: device state (migration) ---------------------------------

    def supports_device_state(self) -> bool:
        return self.device_state is not None

    def device_state_fd(self, direction: int, phase: int, fd: int) -> bool:
        if self.device_state is None:  # never offered: the handler refuses it before this
            os.close(fd)
            return False
        return self.device_state.begin(direction, phase, fd)

    def check_device_state(self) -> bool:
        return self.device_state is not None and self.device_state.check()

    # ---- BackendDevice: memory ------------------------------------------------

    def region_added(self, region: MemoryRegion, fd: int) -> None:
        try:
            self.memory.add_region(
                region.guest_phys_addr, region.memory_size, region.userspace_addr,
                region.mmap_offset, fd,
            )
        except AddressError as error:
            raise DeviceRefused("bad_memory_region", str(error)) from None
        finally:
            os.close(fd)  # the mapping keeps the memory alive
        self._memory_changed()

    def region_removed(self, region: MemoryRegion) -> None:
        self.memory.remove_region(region.guest_phys_addr, region.memory_size, region.userspace_addr)
        self._memory_changed()

    def _memory_changed(self) -> None:
        for queue in self.queues.values():
            queue.memory_changed()
        self._rx_rings_changed()  # (a ring no longer mapped is broken now)

    # ---- BackendDevice: rings -------------------------------------------------

    def ring_kick_fd(self, index: int, fd: int | None) -> None:
        self._drop_kick(index)
        if fd is None:
            return  # NOFD: QEMU never does this for net; the ring would need polling
        # The guest may have kicked before we got the fd (it kicks RX before
        # DRIVER_OK), so the reader fires at once if the eventfd is readable.
        kick = None if is_rx_ring(index) else self.network.tx_kick(
            fd, self.tx_batch, TX_BATCH, fallback=partial(self._on_kick, index, False),
            rest=partial(self._kick_rest, index), busy=self._rings_busy,
            flush_rx=self._flush_rx, counters=self.counters, clock=time.monotonic)
        if kick is None:
            self.loop.add_reader(fd, self._on_kick, index, is_rx_ring(index))
        else:
            self._tx_kicks[index] = kick
            self._kicks_changed()
            kick.watched = self._watch_timer is not None
            self.loop.add_reader(fd, kick)
        self.kick_fds[index] = fd  # only once the loop watches it: _drop_kick unregisters
        # It may also never kick: a kick that went to the back-end before (the
        # source of a migration, or this one just before a stop) is lost, and with
        # EVENT_IDX the guest kicks again only once it passes the avail_event that
        # back-end left, so frames queued meanwhile would wait forever. Look at
        # the ring now, as if kicked (the handler starts a configured ring right
        # after this call, as passt and libvhost-user do on SET_VRING_KICK).
        self.loop.call_soon(self._on_kick, index, is_rx_ring(index))

    def ring_call_fd(self, index: int, fd: int | None) -> None:
        self.call_fds.pop(index, None)
        if fd is not None:
            self.call_fds[index] = fd
        queue = self.queues.get(index)
        if queue is not None:
            queue.call_fd = fd
            # The ring started (on a kick) before the front-end wired its interrupt:
            # QEMU first points the call fd at a "masked" notifier it never reads
            # and swaps in the guest's one while starting the device. An interrupt
            # raised meanwhile, the restart one included, went nowhere, and a
            # guest whose used_event lies behind waits forever: signal again.
            queue.signal_restart()

    def ring_enable(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled
        self._rx_rings_changed()
        if enabled and is_rx_ring(index):
            self._schedule_rx()

    def ring_start(self, index: int, ring: VringConfig) -> None:
        hdr_len = 12 if self.features & (vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.NET_F_MRG_RXBUF) else 10
        self.queues[index] = Virtqueue(
            self.memory, ring.num, ring.desc_uva, ring.avail_uva, ring.used_uva,
            base=ring.base,
            hdr_len=hdr_len,
            mrg_rxbuf=bool(self.features & vu.VirtioFeature.NET_F_MRG_RXBUF),
            event_idx=bool(self.features & vu.VirtioFeature.RING_F_EVENT_IDX),
            call_fd=self.call_fds.get(index),
            name=f"vq{index}",
            features=self.features,
        )
        self.queues[index].on_fault = self._ring_faulted
        self.enabled.setdefault(index, ring.enabled)
        self._rx_rings_changed()
        self.ring_log[index] = (ring.log, ring.log_guest_addr)
        self._apply_log()
        log.info("ring %d started (%s, size %d, base %#x, positions %s)", index,
                 "packed" if self.queues[index].packed else "split", ring.num, ring.base,
                 self.queues[index].positions())
        # After a migration or reconnect the guest may wait for an interrupt the
        # old back-end raised too late; its event index then lags behind used->idx
        # and no later notification would be due. One unconditional call wakes it.
        self.queues[index].signal_restart()
        self._check_memory_fault()
        # The guest runs here again (connections frozen for a migration carry on).
        self.network.device_started(time.monotonic())
        if is_rx_ring(index):
            self._schedule_rx()

    def ring_stop(self, index: int) -> int:
        queue = self.queues.pop(index, None)
        self._rx_rings_changed()
        self._drop_kick(index)
        if queue is None:
            # The handler only stops rings it started, and ring_start always
            # creates a queue; an answer here would be a made-up base, so let
            # the handler refuse GET_VRING_BASE (logged and counted) instead.
            raise LookupError(f"ring {index} is not running in the device")
        self._keep_ring_counters(index, queue)
        log.info("ring %d stopped at base %#x", index, queue.base)
        return queue.base

    def reset(self) -> None:
        # RESET_DEVICE: rings off, memory kept (QEMU does not resend it).
        for index in list(self.queues):
            self.ring_stop(index)
        self.enabled.clear()
        self._rx_rings_changed()

    # ---- counters ---------------------------------------------------------------

    def all_counters(self) -> dict[str, int]:
        """``device.*`` and ``vqN.*`` counts, stopped rings included (ring positions are not)."""
        merged = Counter({f"device.{name}": value for name, value in self.counters.items()})
        merged.update(self._stopped_ring_counters)  # Counter.update adds
        for index, queue in self.queues.items():
            merged.update(_ring_counts(index, queue))
        return dict(merged)

    def ring_positions(self) -> dict[str, int]:
        """Where each running ring stands, ours and the guest's: ``vqN.at.*``."""
        return {f"vq{index}.at.{name}": value
                for index, queue in self.queues.items()
                for name, value in queue.positions().items()}

    def _keep_ring_counters(self, index: int, queue: Virtqueue) -> None:
        self._stopped_ring_counters.update(_ring_counts(index, queue))

    # ---- data path --------------------------------------------------------------

    def _on_kick(self, index: int, rx: bool) -> None:
        """Ring ``index`` (an RX ring if ``rx``: told once, at registration) was kicked."""
        fd = self.kick_fds.get(index)
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("ring %d kick fd unusable (%s); ignoring it", index, exc)
            self._drop_kick(index)
            return
        if self._watch_timer is None:
            self._rings_busy()
        if rx:
            self._flush_rx()
        else:
            self._drain_tx(index)
        if self._fault_reported:
            self._check_memory_fault()

    def _kick_rest(self, index: int, first: tuple[int, bool, int | None]) -> None:
        """What a TX kick the network's C reader began (``TxKick``) left to Python: its drained
        batch ``first`` (frames, again, how many the UDP fast path sent: None, none tried) on."""
        self._drain_tx(index, first)
        if self._fault_reported:
            self._check_memory_fault()

    def _drain_tx(self, index: int = TX_QUEUE,
                  first: tuple[int, bool, int | None] | None = None) -> None:
        """Ring ``index``'s TX frames to the network, its host commands run, and the frames that
        made for the guest into the RX ring, all in this turn (a request's answer goes out
        before the loop polls again). Runs per kick: one frame of Python for the common case
        of one pass (the loop is spelled out here rather than split into helpers). ``first``:
        the first pass's drain, done by a ``TxKick`` (``_kick_rest``)."""
        queue = self.queues.get(index)
        if first is None and (queue is None or queue.broken):
            return
        network = self.network
        # The frames this makes go to the guest with the flush below, in this turn: no flush
        # scheduled for the next loop turn meanwhile (unless one already was).
        flush_claimed = not self._rx_scheduled
        self._rx_scheduled = True
        try:
            deliver = self.enabled.get(index, False)
            batch = self.tx_batch
            for _ in range(MAX_PASSES_PER_WAKEUP):
                if first is None:
                    count, again = queue.tx_drain_rearm(batch, TX_BATCH)  # (notified, re-armed)
                    udp_taken = None
                else:
                    (count, again, udp_taken), first = first, None
                if count:
                    if self._capture is not None:
                        self._capture.add_batch(batch, count)
                    if deliver:
                        if self.steering is not None:
                            self.steering.learn(batch, count, index // 2)
                        network.receive_batch(batch, count, time.monotonic(), udp_taken)
                        self.counters["tx.frames"] += count
                    else:
                        # Started but disabled: consume and discard (vhost-user spec).
                        self.counters["tx.discarded"] += count
                if not again or queue is None or queue.broken:
                    break
            else:
                # Still busy: come back after other callbacks had their turn.
                self.loop.call_soon(self._drain_tx, index)
            network.flush()
        finally:
            if flush_claimed:
                self._rx_scheduled = False
        # Answers the batch made (nothing waits: no ring work to do); ``_flush_rx_if_waiting``
        # written out, as this runs per kick.
        if network.frames_to_guest or self.switched is not None:
            self._flush_rx()

    def _flush_rx_if_waiting(self) -> None:
        if self.network.frames_to_guest or self.switched is not None:
            self._flush_rx()

    def _ring_faulted(self) -> None:
        """A ring reported a guest memory fault (``Virtqueue.on_fault``, under one of its
        calls): the end of the kick, or the caller that saw the ring break, acts on it."""
        self._fault_reported = True
        self._rx_rings_changed()

    def _check_memory_fault(self) -> None:
        """A queue caught SIGBUS (guest memory shrank): stop everything, end the connection.
        Called when a ring broke, at a ring start, and after a kick once a ring reported a
        fault; a ring that broke is no RX ring to write into directly any more."""
        self._rx_rings_changed()
        if self._closed:
            return
        for queue in self.queues.values():
            if queue.faulted:
                break
        else:
            return
        for index in list(self.kick_fds):
            self._drop_kick(index)  # no more kicks into a broken device
        if self.on_memory_fault is not None:
            self.loop.call_soon(self.on_memory_fault)
            self.on_memory_fault = None

    def _drop_kick(self, index: int) -> None:
        self._tx_kicks.pop(index, None)
        fd = self.kick_fds.pop(index, None)
        if fd is not None:
            self.loop.remove_reader(fd)

    # ---- life cycle ----------------------------------------------------------------

    def close(self) -> None:
        """The connection is gone: stop everything and release every fd and mapping."""
        if self._closed:
            return
        self._closed = True
        self._stop_watchdog()
        self.network.remove_output_listener(self._schedule_rx)
        self.network.set_direct_rx(None, self)
        for index, queue in self.queues.items():
            self._keep_ring_counters(index, queue)
        self.queues.clear()
        self._rx_rings_changed()
        for index in list(self.kick_fds):
            self._drop_kick(index)
        self.call_fds.clear()
        if self.device_state is not None:
            self.device_state.close()
        self.log_array = None
        self.log_mapping = None  # unmapped once the last view is gone
        self.memory.close()


def _ring_counts(index: int, queue: Virtqueue) -> dict[str, int]:
    return {f"vq{index}.{name}": value for name, value in queue.counters().items()}
