"""Host UDP toward the guest without waste: built-batch storages reused once consumed
(``GuestBatchPool``, handed back by ``GuestFrameQueue.popleft``), and host sockets left
unread while the guest's queue is backlogged (``UdpGlue`` backpressure), real sockets on
loopback.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time

import pytest
from vhostnet._stream import StreamSender

import vhostnet.guest_queue as guest_queue
from tests.support.frames import GATEWAY_IP, GUEST_MAC, guest_udp_frame
from tests.support.loop import run
from tests.support.udp_fast import batch_of
from vhostnet.guest_queue import GuestBatch, GuestBatchPool, GuestFrameQueue
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.stream import encode_frames
from vhostnet.virtqueue import FrameBatch

FRAME = guest_udp_frame(4000, GATEWAY_IP, 53, b"payload")


def pool_and_queue(limit: int = 16) -> tuple[GuestBatchPool, GuestFrameQueue]:
    pool, queue = GuestBatchPool(1500, limit), GuestFrameQueue()
    queue.recycle = pool.give
    return pool, queue


def filled(pool: GuestBatchPool, frames: int = 3) -> FrameBatch:
    storage = pool.take()
    assert storage.count == 0
    for _ in range(frames):
        assert storage.append(FRAME)
    return storage


# --- the pool and the queue, without sockets ----------------------------------------------


def test_a_queued_batch_is_never_handed_out_again_and_a_consumed_one_is() -> None:
    pool, queue = pool_and_queue()
    first, second = filled(pool), filled(pool)
    queue.append(GuestBatch(first))
    queue.append(GuestBatch(second))
    third = pool.take()
    assert third is not first and third is not second and pool.allocated == 3
    pool.give(third)  # taken but not used
    # The device took the first batch in part: still queued, still not free.
    queue[0].start = 2
    assert pool.take() is third
    assert queue.popleft().batch is first  # now all of it went
    reused = pool.take()
    assert reused is first and reused.count == 0  # emptied for the next read
    assert pool.take() is not second  # the second is still queued
    assert pool.allocated == 4


def test_the_pool_is_bounded_and_takes_only_its_own_kind_once() -> None:
    pool, _queue = pool_and_queue(limit=4)
    storages = [pool.take() for _ in range(6)]
    for storage in storages:
        pool.give(storage)
    assert pool.free == 4
    pool2, _ = pool_and_queue(limit=4)
    own = pool2.take()
    pool2.give(own)
    pool2.give(own)  # twice: kept once
    pool2.give(FrameBatch(256))  # not a guest-batch storage
    assert pool2.free == 1
    assert pool2.take() is own and pool2.take() is not own


def test_batches_dropped_for_room_or_taken_apart_go_back_to_the_pool(monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "MAX_PENDING_FRAMES", 2)
    pool, queue = pool_and_queue()
    dropped = filled(pool, 5)
    queue.append(GuestBatch(dropped))
    queue.append(b"single")
    queue.append(b"newest")  # the oldest entry, the batch, makes room
    assert queue.dropped == 5 and queue.frames == 2
    assert pool.free == 1 and pool.take() is dropped
    # A consumer without a kernel for built batches takes them apart: frames stay in order.
    monkeypatch.setattr(guest_queue, "MAX_PENDING_FRAMES", 8)
    apart = filled(pool, 2)
    queue.append(GuestBatch(apart))
    queue.popleft()
    queue.take_apart_built()
    assert list(queue) == [b"newest", FRAME, FRAME] and queue.frames == 3
    assert pool.free == 1 and pool.take() is apart


def test_backlog_counts_frames_and_tells_the_drained_listeners_once_at_low_water(
        monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_HIGH", 8)
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_LOW", 3)
    pool, queue = pool_and_queue()
    drained: list[int] = []
    queue.drained_listeners.append(lambda: drained.append(queue.frames))
    queue.append(GuestBatch(filled(pool, 5)))
    queue.append(GuestBatch(filled(pool, 3)))
    assert queue.frames == 8 and not queue.backlogged()
    queue.append(b"one more")
    assert queue.backlogged()
    queue.append(b"two more")
    queue.popleft()  # 5 frames: 5 wait, above low water
    assert drained == []
    queue.popleft()
    assert drained == [2]
    queue.popleft()
    assert drained == [2]  # once per backlog
    queue.extend([b"x"] * 9)
    assert queue.backlogged()
    queue.clear()  # dropping everything drains too
    assert drained == [2, 0]


# --- through the network, real sockets ------------------------------------------------------


async def until(condition, seconds: float = 2.0) -> None:
    """Let the loop run until ``condition()`` (bounded)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class Established:
    """A network with the guest's MAC known and one outbound UDP flow on the fast path to
    ``server`` (its first datagram sent), and the host address answers go to."""

    def __init__(self, loop) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        port = self.server.getsockname()[1]
        self.network = Network(StackConfig(), loop)
        self.network.stack.guest_mac = GUEST_MAC
        self.network.receive_batch(
            batch_of([(guest_udp_frame(4000, GATEWAY_IP, port, b"q"), 0)]), 1, 0.0)
        self.network.flush()
        _, self.peer = self.server.recvfrom(100)
        assert self.network.udp_fast.flows == 1
        self.queue = self.network.frames_to_guest
        self.queue.clear()

    def answer(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.server.sendto(payload, self.peer)

    def payloads(self) -> list[bytes]:
        """What waits for the guest, as UDP payloads (fast-path frames: IPv4, no options)."""
        return [frame[42:] for entry in self.queue
                for frame in (entry.frames() if type(entry) is GuestBatch else (entry,))]

    def close(self) -> None:
        self.network.close()
        self.server.close()


def test_storages_are_reused_across_reads_once_the_guest_took_them() -> None:
    async def scenario(loop) -> None:
        flow = Established(loop)
        queue = flow.queue
        try:
            # Two reads the guest has not taken yet: two storages, distinct.
            flow.answer([b"a"])
            await until(lambda: len(queue) == 1)
            flow.answer([b"b"])
            await until(lambda: len(queue) == 2)
            held = [entry.batch for entry in queue]
            assert held[0] is not held[1]
            while queue:
                queue.popleft()  # as the device does once the ring took every frame
            seen = set()
            for round_ in range(6):
                flow.answer([b"r%d" % round_])
                await until(lambda: len(queue) == 1)
                assert flow.payloads() == [b"r%d" % round_]
                seen.add(id(queue[0].batch))
                queue.popleft()
            # Every later read built into one of the two storages handed back.
            assert seen <= {id(batch) for batch in held}
            assert flow.network.counters()["guest.rx_batches_allocated"] == 2
        finally:
            flow.close()

    run(scenario)


def test_a_backlogged_queue_leaves_datagrams_in_the_host_socket_until_it_drains(
        monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_HIGH", 8)
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_LOW", 2)

    async def scenario(loop) -> None:
        flow = Established(loop)
        queue, glue = flow.queue, flow.network.udp_glue
        try:
            first = [b"first %d" % i for i in range(10)]
            flow.answer(first)
            await until(lambda: queue.frames == 10)
            later = [b"later %d" % i for i in range(5)]
            flow.answer(later)
            await until(lambda: glue.paused_sockets == 1)
            await asyncio.sleep(0.05)
            # Not read: still in the host's socket buffer, none of it queued.
            assert glue.paused_sockets == 1
            assert flow.payloads() == first
            assert flow.network.counters()["udp.rx_paused"] == 1
            # Other traffic to the guest still queues (only host UDP reading waits).
            queue.append(b"from the stack")
            assert queue[-1] == b"from the stack" and glue.paused_sockets == 1
            queue.popleft()  # the guest took the backlog: below low water, reading resumes
            assert queue.popleft() == b"from the stack"
            await until(lambda: queue.frames == 5)
            assert glue.paused_sockets == 0
            assert flow.payloads() == later  # in order, none lost
            assert flow.network.counters()["udp.rx_paused"] == 1
        finally:
            flow.close()

    run(scenario)


@pytest.mark.parametrize("how", ["expired", "closed"])
def test_a_socket_closed_while_paused_is_not_read_again(monkeypatch, how) -> None:
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_HIGH", 1)
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_LOW", 0)

    async def scenario(loop) -> None:
        flow = Established(loop)
        queue, glue = flow.queue, flow.network.udp_glue
        try:
            flow.answer([b"1", b"2"])
            await until(lambda: queue.frames == 2)
            flow.answer([b"3"])
            await until(lambda: glue.paused_sockets == 1)
            if how == "expired":
                flow.network.poll_timers(time.monotonic() + 10_000.0)
                flow.network.flush()
            else:
                flow.network.close()
            assert glue.paused_sockets == 0
            queue.clear()  # drained: nothing left to resume, no reader on a closed fd
            await asyncio.sleep(0.02)
            assert queue.frames == 0
        finally:
            flow.close()

    run(scenario)


def test_the_stream_sender_hands_back_only_storages_it_sent_whole() -> None:
    """Short sends cut batches and frames; every storage the queue hands back is scribbled
    over at once, and the peer still gets every frame intact and in order."""
    pool, queue = pool_and_queue()
    frames = [FRAME[:14] + bytes([n]) * (1000 + 37 * n) for n in range(48)]
    for start in range(0, len(frames), 12):
        storage = pool.take()
        for frame in frames[start:start + 12]:
            assert storage.append(frame)
        queue.append(GuestBatch(storage))
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender, wire, cuts = StreamSender(), b"", 0
    try:
        for _ in range(10_000):
            if not queue and not sender.cut_bytes:
                break
            _sent, _count, _, _, error = sender.send(ours.fileno(), queue, 7, 1 << 20,
                                                     GuestBatch)
            assert error in (0, errno.EAGAIN)
            cuts += sender.cut_bytes > 0
            while pool.free:  # handed back: a new read fills it with something else
                reused = pool.take()
                reused.append(b"\xee" * 1500)
                reused.arrays()[0][:] = 0xEE
            try:
                wire += peer.recv(1 << 20)
            except BlockingIOError:
                pass
        assert cuts > 0, "no send was cut: the test did not test a batch taken in part"
        assert wire == encode_frames(frames)
        assert pool.allocated == 4 and queue.frames == 0
    finally:
        ours.close()
        peer.close()


def test_an_empty_queue_is_never_backlogged_whatever_its_count_says(monkeypatch) -> None:
    monkeypatch.setattr(guest_queue, "GUEST_BACKLOG_HIGH", 1)
    _pool, queue = pool_and_queue()
    queue.frames = 100  # as if some mutation had not been counted
    assert not queue.backlogged() and queue.frames == 0
