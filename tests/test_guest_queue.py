"""The guest's frame queue taking and giving many entries in one call (``extend``,
``popleft_many``), as a stream guest's TCP data (a frame per MSS) and its sender use it."""

from __future__ import annotations

from vhostnet._stream import FRAMES_PER_SEND, StreamSender

import vhostnet.guest_queue as guest_queue
from vhostnet.guest_queue import GuestBatch, GuestBatchPool, GuestFrameQueue
from vhostnet.stream import encode_frames


def frame(n: int, length: int = 80) -> bytes:
    return bytes([n & 0xFF]) * length


def built(pool: GuestBatchPool, frames: list[bytes]) -> GuestBatch:
    storage = pool.take()
    for f in frames:
        assert storage.append(f)
    return GuestBatch(storage)


def test_extend_is_append_of_each_bounded_counted_and_told_once(monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "MAX_PENDING_FRAMES", 5)
    queue = GuestFrameQueue()
    told: list[int] = []
    queue.listeners.append(lambda: told.append(len(queue)))
    queue.extend([])
    assert told == [] and queue.frames == 0
    queue.extend([frame(1), (frame(2), 7)])
    assert told == [2] and queue.frames == 2  # told once, with every entry already in
    queue.extend(frame(n) for n in range(3, 8))  # two past the bound: the oldest two go
    assert told == [2] and list(queue) == [frame(n) for n in range(3, 8)]
    assert queue.frames == 5 and queue.dropped == 2


def test_popleft_many_counts_recycles_and_tells_a_drained_backlog(monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_HIGH", 4)
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_LOW", 2)
    pool = GuestBatchPool(1500)
    queue = GuestFrameQueue()
    queue.recycle = pool.give
    drained: list[int] = []
    queue.drained_listeners.append(lambda: drained.append(queue.frames))
    batch = built(pool, [frame(1), frame(2), frame(3)])
    queue.extend([frame(0), batch, frame(4), frame(5)])
    assert queue.frames == 6 and queue.backlogged()
    queue.popleft_many(1)
    assert queue.frames == 5 and drained == []
    queue.popleft_many(2)  # the built batch (3 frames) and one more
    assert queue.frames == 1 and list(queue) == [frame(5)]
    assert drained == [1]  # once, after the whole call
    assert pool.take() is batch.batch  # handed back for reuse
    queue.popleft_many(0)
    assert queue.frames == 1


class CountingQueue(GuestFrameQueue):
    """A guest queue that counts its one-by-one pops."""

    def __init__(self) -> None:
        super().__init__()
        self.single_pops = 0

    def popleft(self):
        self.single_pops += 1
        return super().popleft()


def test_the_stream_sender_takes_what_a_send_carried_off_the_queue_in_one_call(pair) -> None:
    """A sendmsg of many TCP frames pops them with one ``popleft_many``, not one ``popleft``
    each (a Python frame per MSS of data); a built batch cut by the limit keeps its place."""
    ours, peer = pair
    pool = GuestBatchPool(1500)
    queue = CountingQueue()
    queue.recycle = pool.give
    frames = [frame(n) for n in range(40)]
    batch = built(pool, frames[30:])
    queue.extend([*frames[:30], batch])
    sent, count, _, _, error = StreamSender().send(ours.fileno(), queue, 35, 1 << 20, GuestBatch)
    assert (count, error) == (35, 0) and queue.single_pops == 0
    # (a built batch counts as many frames as it held when queued until it goes)
    assert list(queue) == [batch] and batch.start == 5 and queue.frames == 10
    sent2, count2, _, _, error2 = StreamSender().send(ours.fileno(), queue, FRAMES_PER_SEND,
                                                      1 << 20, GuestBatch)
    assert (count2, error2) == (5, 0) and not queue and queue.frames == 0
    assert queue.single_pops == 0
    wire = peer.recv(1 << 20)
    assert sent + sent2 == len(wire) and wire == encode_frames(frames)
