"""The queue of frames waiting for the guest's RX ring (or stream), owned by ``Network``.

``GuestFrameQueue`` holds frames for the guest: ``bytes``, ``(frame, vnet)`` tuples and
``GuestBatch`` entries (a ``FrameBatch`` of frames built in C, e.g. by the UDP fast path's
recvmmsg). It is bounded (the oldest go first), counts frames rather than entries, tells
its listeners when frames appear and when a backlog has drained (host UDP reading pauses
above ``GUEST_BACKLOG_HIGH`` frames), and hands a popped built batch's storage back to the
``GuestBatchPool`` it was taken from, so consumers read a built batch before popping it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice, repeat

from vhostnet.virtqueue import FrameBatch as FrameStorage

# Frames waiting for RX buffers. A guest that stops reading its RX ring must
# not make us grow without bound; beyond this the oldest are dropped (TCP
# retransmits, UDP is allowed to lose them).
MAX_PENDING_FRAMES = 8192

# Host UDP reading stops while more than HIGH frames wait for the guest and starts again
# at LOW: the host's socket buffers hold (or drop) the rest, at no cost here, as a full
# ring makes a NIC drop. LOW is several ring refills (256 buffers each) deep so that a
# refill never finds the queue empty while reading restarts: with 512/128 a front-end
# that polls its ring (dpdk-testpmd rxonly) got 30% fewer frames than with no pause.
GUEST_BACKLOG_HIGH = 2048
GUEST_BACKLOG_LOW = 1024
# Built-batch storages kept for reuse (each about 100 KB).
GUEST_BATCH_POOL = 16


class GuestFrameQueue(deque):
    """Frames for the guest; tells its listeners when it goes from empty to non-empty.

    An entry is a frame (bytes), ``(frame, vnet)`` for a frame with offload fields, or a
    ``GuestBatch`` of frames a C fast path built in place.

    Engines append to it from any callback (guest frame, host socket, timer);
    the device registers a listener and fills the RX ring on the next loop turn.

    Consumers take entries with ``popleft`` only once they are done with them: popping a
    ``GuestBatch`` (all its frames gone to the guest, or dropped) hands its storage back to
    ``recycle`` (the network's ``GuestBatchPool``), so read a built batch before popping it.
    ``frames`` counts the frames waiting (a built batch as many as it held when queued);
    ``backlogged`` tells host readers to stop above ``GUEST_BACKLOG_HIGH`` and arms the
    ``drained_listeners``, told once when no more than ``GUEST_BACKLOG_LOW`` wait. The count
    follows append, popleft, popleft_many, extend, extendleft and clear (the only mutations used
    on it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[], None]] = []
        self.drained_listeners: list[Callable[[], None]] = []
        self.recycle: Callable[[FrameStorage], None] | None = None
        self.dropped = 0  # frames dropped from the front for room
        self.frames = 0
        self._watching = False  # a reader stopped: tell the drained listeners at low water

    def append(self, frame: bytes) -> None:  # type: ignore[override]
        was_empty = not self
        if len(self) >= MAX_PENDING_FRAMES:
            self.dropped += _queued_frames(self[0])
            self.popleft()
        super().append(frame)
        self.frames += _counted_in(frame)
        if was_empty:
            for listener in self.listeners:
                listener()

    def extend(self, entries) -> None:  # type: ignore[override]
        """``append`` of each entry (the same bound, count and listeners) in one call: a TCP
        burst for a guest without segmentation offload (a stream guest) is a frame per MSS,
        some 45 per 64 KB, queued with no Python frame each."""
        entries = list(entries)
        if not entries:
            return
        was_empty = not self
        super().extend(entries)
        self.frames += _frames_in(entries, _counted_in)
        for _ in range(len(self) - MAX_PENDING_FRAMES):  # the oldest go, as append drops them
            self.dropped += _queued_frames(self[0])
            self.popleft()
        if was_empty:
            for listener in self.listeners:
                listener()

    def popleft(self):  # type: ignore[override]
        entry = super().popleft()
        if type(entry) is GuestBatch:
            self.frames -= entry.queued
            if self.recycle is not None:
                self.recycle(entry.batch)
        else:
            self.frames -= 1
        if self._watching and self.frames <= GUEST_BACKLOG_LOW:
            self._drained()
        return entry

    def popleft_many(self, count: int) -> None:
        """``popleft`` ``count`` entries, dropped, in one call (the stream's sender takes
        every frame a sendmsg carried at once: a frame per MSS of TCP data)."""
        taken = list(islice(self, count))
        deque(map(deque.popleft, repeat(self, len(taken))), maxlen=0)  # (a loop in C)
        self.frames -= _frames_in(taken, _queued_frames)
        if self.recycle is not None:
            for entry in taken:
                if type(entry) is GuestBatch:
                    self.recycle(entry.batch)
        if self._watching and self.frames <= GUEST_BACKLOG_LOW:
            self._drained()

    def extendleft(self, entries) -> None:  # type: ignore[override]
        entries = list(entries)
        super().extendleft(entries)
        self.frames += sum(map(_counted_in, entries))

    def clear(self) -> None:
        """Drop every entry (built batches are not recycled: a caller may still read them)."""
        super().clear()
        self.frames = 0
        if self._watching:
            self._drained()

    def take_apart_built(self) -> None:
        """Built batches into single frames, in place and in order (for a consumer without a
        kernel for them); their storages go back to ``recycle``."""
        if not any(type(entry) is GuestBatch for entry in self):
            return
        entries = list(self)
        frames = [frame for entry in entries
                  for frame in (entry.frames() if type(entry) is GuestBatch else (entry,))]
        super().clear()
        super().extend(frames)
        self.frames = len(frames)
        if self.recycle is not None:
            for entry in entries:
                if type(entry) is GuestBatch:
                    self.recycle(entry.batch)

    def backlogged(self) -> bool:
        """True while more than ``GUEST_BACKLOG_HIGH`` frames wait: a host reader should stop
        until the drained listeners are told (at ``GUEST_BACKLOG_LOW``)."""
        if self.frames <= GUEST_BACKLOG_HIGH:
            return False
        if not self:
            self.frames = 0  # a count gone astray must never stop reading for good
            return False
        self._watching = True
        return True

    def _drained(self) -> None:
        self._watching = False
        for listener in list(self.drained_listeners):
            listener()


class GuestBatch:
    """A ``frames_to_guest`` entry: frames ``start`` onward of ``batch`` (a FrameBatch) that a
    C fast path built in place (UDP answers of established flows, ``UdpFastSender.receive``).
    The device pushes them to the RX ring, the stream joins them into its send buffer, each
    in one kernel call; ``start`` moves on as a full ring or buffer takes part of them.
    ``queued``: the frames the queue counted for it."""

    __slots__ = ("batch", "start", "queued")

    def __init__(self, batch: FrameStorage) -> None:
        self.batch = batch
        self.start = 0
        self.queued = 0

    def frames(self) -> list[bytes]:
        """The frames not taken yet, as bytes (for a consumer without a kernel for them)."""
        return [bytes(self.batch.frame(i)) for i in range(self.start, self.batch.count)]


def _counted_in(entry) -> int:
    """The frames ``entry`` adds to a queue's count (a built batch remembers it)."""
    if type(entry) is GuestBatch:
        entry.queued = entry.batch.count - entry.start
        return entry.queued
    return 1


def _queued_frames(entry) -> int:
    return entry.queued if type(entry) is GuestBatch else 1


def _frames_in(entries: list, count: Callable[[object], int]) -> int:
    """The frames of ``entries`` by ``count`` (``_counted_in`` or ``_queued_frames``), with no
    Python call per entry when none is a built batch (a stream guest's TCP data)."""
    if GuestBatch in set(map(type, entries)):
        return sum(map(count, entries))
    return len(entries)


def new_guest_batch_storage(mtu: int) -> FrameStorage:
    """A FrameBatch for frames built toward the guest: 64 frames of up to 1514 bytes, or 16
    of the MTU's largest, whichever needs more room."""
    return FrameStorage(64, max(64 * (min(mtu, 1500) + 14), 16 * (mtu + 14)))


class GuestBatchPool:
    """Storages for frames built toward the guest (``new_guest_batch_storage``), reused: the
    guest's queue hands one back (``give``) once every frame of it went to the guest or was
    dropped; at most ``limit`` wait here, the rest are left to the garbage collector."""

    def __init__(self, mtu: int, limit: int = GUEST_BATCH_POOL) -> None:
        self.mtu = mtu
        self.limit = limit
        self.allocated = 0  # storages made (the rest of the takes were reuses)
        self._free: list[FrameStorage] = []
        self._bytes = new_guest_batch_storage(mtu).buffer_bytes

    def take(self) -> FrameStorage:
        """An empty storage: a returned one, or a new one."""
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return new_guest_batch_storage(self.mtu)

    def give(self, storage: FrameStorage) -> None:
        """``storage`` is free again (nothing reads its frames any more); one this pool did
        not make, or one already here, is ignored."""
        free = self._free
        if (len(free) >= self.limit or storage.capacity_frames != 64
                or storage.buffer_bytes != self._bytes
                or any(held is storage for held in free)):
            return
        storage.clear()
        free.append(storage)

    @property
    def free(self) -> int:
        return len(self._free)
