"""The RX half of ``NetDevice``: frames waiting for the guest into its RX rings.

Frames for the guest wait in the network's queue (single frames, (frame, vnet) pairs
and built ``GuestBatch``es) and, with several guests, in the switch's batch for this
port. ``RxFlush`` pushes them into the running RX rings: all into one ring, or with
multiqueue each flow into the RX ring of the pair the guest sends it on
(``FlowSteering``). It also hands an RX ring to the TCP and UDP fast paths for direct
writes (``direct_rx``): the one usable ring, or with several, for a flow, the ring of
the pair the guest sends that flow on. ``NetDevice`` (device.py, the vhost-user side: negotiation,
memory, kick/call fds, TX) inherits it; the attributes it uses are set up there.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostnet.guest_queue import GuestBatch
from vhostnet.virtqueue import FlowSteering, FrameBatch, Virtqueue

if TYPE_CHECKING:
    from vhostnet.capture import Capture
    from vhostnet.network import GuestSide, SwitchedFrames

RX_QUEUE = 0
TX_QUEUE = 1

# Frames handled per pass before yielding to the event loop, so that one busy
# guest cannot starve the vhost-user socket or host sockets (both directions).
TX_BATCH = 256
MAX_PASSES_PER_WAKEUP = 8


class RxFlush:
    """Pending frames into the RX rings (mixed into ``NetDevice``, which owns the state)."""

    # Set up by NetDevice.__init__.
    loop: asyncio.AbstractEventLoop
    network: GuestSide
    switched: SwitchedFrames | None
    queue_pairs: int
    steering: FlowSteering | None
    queues: dict[int, Virtqueue]
    enabled: dict[int, bool]
    rx_batch: FrameBatch
    _rx_batches: dict[int, FrameBatch]
    counters: dict[str, int]
    _capture: Capture | None  # (NetDevice.capture, read without its property per frame batch)
    direct_rx_generation: int
    _closed: bool
    _rx_scheduled: bool
    _usable_rx: dict[int, Virtqueue] | None
    _direct_rx_ring: Virtqueue | None
    _direct_rx_handle: tuple[object, object] | bool | None
    _rings_busy: Callable[[], None]  # (RingWatchdog's: a ring was written, watch the rings)
    _watch_timer: asyncio.TimerHandle | None  # (RingWatchdog's: None while it does not watch)

    def _check_memory_fault(self) -> None:
        raise NotImplementedError  # NetDevice's

    def _kicks_changed(self) -> None:
        raise NotImplementedError  # NetDevice's

    def _schedule_rx(self) -> None:
        if not self._rx_scheduled and not self._closed:
            self._rx_scheduled = True
            self.counters["rx.flushes_deferred"] += 1
            self.loop.call_soon(self._flush_rx)

    def _flush_rx(self) -> None:
        self._rx_scheduled = False
        rings = self._usable_rx_rings()
        if len(rings) > 1:
            self._flush_rx_steered(rings)
        elif rings:
            self._flush_rx_one(*rings.values())
        # None usable: frames wait in the network's queue (bounded there).
        if rings and self.switched is not None:
            self._flush_switched(next(iter(rings.values())))

    def _usable_rx_rings(self) -> dict[int, Virtqueue]:
        """Running, enabled, unbroken RX rings by queue pair, lowest pair first (read only).

        The running, enabled ones are kept until a ring starts, stops or is enabled or
        disabled (NetDevice sets ``_usable_rx`` to None then); a ring breaks by itself, so
        that is checked at every call."""
        rings = self._usable_rx
        if rings is None:
            rings = self._usable_rx = {
                index // 2: queue for index, queue in sorted(self.queues.items())
                if is_rx_ring(index) and self.enabled.get(index, False)}
        for queue in rings.values():
            if queue.broken:
                return {pair: ring for pair, ring in rings.items() if not ring.broken}
        return rings

    def _flush_rx_one(self, queue: Virtqueue) -> None:
        """Every pending frame to one RX ring, in order, as far as its buffers go."""
        pending = self.network.frames_to_guest
        batch = self.rx_batch
        while pending:
            if type(pending[0]) is GuestBatch:
                if self._push_built(queue, pending):
                    continue
                return
            batch.clear()
            taken = 0
            while taken < len(pending):
                if not _append(batch, pending[taken]):
                    break
                taken += 1
            pushed = self._push(queue, batch)
            if pushed < 0:
                return
            for _ in range(pushed):
                pending.popleft()
            if pushed < taken:
                # No more RX buffers: ask for a kick when the guest adds some,
                # and retry at once if it already did (the enable/recheck race).
                if queue.enable_kick():
                    continue
                break

    def _push_built(self, queue: Virtqueue, pending: deque) -> bool:
        """The head of ``pending``, a ``GuestBatch``, straight into the RX ring; True when all
        of it went in (the caller goes on with the next entry)."""
        head = pending[0]
        pushed = self._push(queue, head.batch, head.start)
        if pushed < 0:
            return False
        head.start += pushed
        if head.start >= head.batch.count:
            pending.popleft()
            return True
        # No more RX buffers: as in _flush_rx_one.
        return queue.enable_kick()

    def _flush_rx_steered(self, rings: dict[int, Virtqueue]) -> None:
        """Pending frames to the RX ring of their flow's pair (or the first usable one).

        Each pair's frames keep their order; a pair whose ring is out of buffers
        keeps its frames pending (in order, at the head) while the others go on.
        Built batches (``GuestBatch``) are taken apart into frames first here.
        """
        assert self.steering is not None
        pair_of = self.steering.pair_of
        pending = self.network.frames_to_guest
        pending.take_apart_built()  # (their storages go back to the network's pool)
        fallback = next(iter(rings))
        taken: dict[int, list] = {pair: [] for pair in rings}
        batches = {pair: self._rx_batch_of(pair) for pair in rings}
        for batch in batches.values():
            batch.clear()
        held: list = []         # frames of pairs out of buffers, kept in order
        blocked: set[int] = set()

        def push(pair: int) -> bool:
            """Push the pair's batch; False if its ring broke."""
            items, batch = taken[pair], batches[pair]
            pushed = self._push(rings[pair], batch)
            if pushed < 0:
                held.extend(items)
                return False
            if pushed < len(items):
                blocked.add(pair)
                held.extend(items[pushed:])
            items.clear()
            batch.clear()
            return True

        for _ in range(len(pending)):
            item = pending.popleft()
            pair = pair_of(item[0] if type(item) is tuple else item)
            if pair not in rings:
                pair = fallback
            if pair in blocked:
                held.append(item)
                continue
            if not _append(batches[pair], item):
                if not push(pair):
                    held.append(item)
                    break
                if pair in blocked or not _append(batches[pair], item):
                    held.append(item)
                    continue
            taken[pair].append(item)
        for pair in rings:
            if taken[pair] and not push(pair):
                break
        if held:
            pending.extendleft(reversed(held))
        # Out of buffers: a kick when the guest adds some; if it already did, go again.
        if any(rings[pair].enable_kick() for pair in blocked):
            self._schedule_rx()

    def _push(self, queue: Virtqueue, batch: FrameBatch, start: int = 0) -> int:
        """Frames ``start…`` of ``batch`` into an RX ring: how many went in, or -1 if the ring
        broke."""
        pushed = queue.rx_push(batch, start)
        if queue.broken:
            self._check_memory_fault()
            return -1
        if self._capture is not None:
            self._capture.add_batch(batch, pushed, start)
        self.counters["rx.frames"] += pushed
        if pushed:
            queue.notify()
            self._rings_busy()
        return pushed

    def _flush_switched(self, queue: Virtqueue) -> None:
        """Frames other guests sent to this one (the switch's batch for this port) into the
        first usable RX ring, as far as its buffers go; the rest wait in the switch."""
        switched = self.switched
        assert switched is not None
        for _ in range(MAX_PASSES_PER_WAKEUP):
            batch = switched.outgoing()
            if batch is None:
                return
            pushed = self._push(queue, batch)
            if pushed < 0:
                return
            if pushed:
                switched.taken(pushed)
            elif not queue.enable_kick():
                return  # out of buffers: the guest's next refill kicks us
        self._schedule_rx()  # more than a few batches: the rest on the next loop turn

    # ---- direct RX (``vhostnet.tcp.fast.DirectRx``): host TCP data straight into the ring -----

    def _rx_rings_changed(self) -> None:
        """A ring started, stopped, was enabled or disabled, or broke, or the device closed:
        the usable RX rings and the direct-RX handles are looked up again when next asked."""
        self._usable_rx = None
        self._direct_rx_ring = None
        self._direct_rx_handle = None
        self.direct_rx_generation += 1  # (the UDP flow readers' kept handle: asked again)
        self._kicks_changed()  # (the TX kicks' C readers: their ring, whether they may run)

    def direct_rx(self, flow: tuple[int, bytes, bytes, int, int] | None = None
                  ) -> tuple[object, object] | None:
        """The direct-write handle (``Virtqueue.direct_rx``) of the RX ring host data may go
        into now: the one usable ring; with several, that of the pair the guest sends
        ``flow`` (protocol, remote address, guest address, remote port, guest port) on, as
        ``_flush_rx_steered`` would pick it, and None without a flow (``direct_rx_by_flow``
        says so). None with no ring or a capture (it sees only frames pushed here). Runs per
        host read: kept until ``_rx_rings_changed`` (the capture is read each time)."""
        handle = self._direct_rx_handle
        if handle is None:
            handle = self._direct_rx_handle = self._find_direct_rx()
        if not handle or self._capture is not None:
            return None
        if handle is True:
            return None if flow is None else self._steered_direct_rx(flow)
        return handle  # type: ignore[return-value]

    def direct_rx_by_flow(self) -> bool:
        """Whether ``direct_rx`` wants the flow to pick a ring (several usable RX rings): a
        caller that names no flow by default asks again with one only then."""
        return self._direct_rx_handle is True

    def _find_direct_rx(self) -> tuple[object, object] | bool:
        """``direct_rx``'s answer: the one ring's handle, True for several (by flow), False
        for none."""
        if self._closed:
            return False
        rings = self._usable_rx_rings()
        if len(rings) > 1:
            return self.steering is not None
        if not rings:
            return False
        (ring,) = rings.values()
        self._direct_rx_ring = ring
        return ring.direct_rx()

    def _steered_direct_rx(self, flow: tuple[int, bytes, bytes, int, int]
                           ) -> tuple[object, object] | None:
        assert self.steering is not None
        rings = self._usable_rx_rings()
        proto, remote, guest, remote_port, guest_port = flow
        pair = self.steering.pair_of_flow(remote, guest, proto, remote_port, guest_port)
        if pair not in rings:
            if not rings:
                return None
            pair = next(iter(rings))  # as _flush_rx_steered's fallback
        ring = self._direct_rx_ring = rings[pair]
        return ring.direct_rx()  # (kept by the ring)

    def direct_rx_done(self, frames: int) -> None:
        self.counters["rx.frames"] += frames
        if frames and self._watch_timer is None:  # (``_rings_busy``'s test: once a reply)
            self._rings_busy()
        queue = self._direct_rx_ring
        if queue is None:
            queue = self.queues.get(RX_QUEUE)
        if queue is not None and queue.direct_rx_done():  # the ring broke under the write
            self._check_memory_fault()

    def _rx_batch_of(self, pair: int) -> FrameBatch:
        batch = self._rx_batches.get(pair)
        if batch is None:
            batch = self._rx_batches[pair] = FrameBatch(TX_BATCH)
        return batch


def is_rx_ring(index: int) -> bool:
    """Even rings are RX (2k: pair k's), odd ones TX."""
    return index % 2 == 0


def _append(batch: FrameBatch, item: bytes | tuple[bytes, int] | GuestBatch) -> bool:
    """One pending entry into ``batch``: a frame, or (frame, vnet) for one with offload
    fields (see GuestFrameQueue); False when the batch is full, or for a ``GuestBatch``
    (pushed by itself, ``_push_built``)."""
    if type(item) is GuestBatch:
        return False
    return batch.append(*item) if type(item) is tuple else batch.append(item)

