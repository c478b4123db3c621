"""Host -> guest TCP data peeked straight into the guest's RX buffers (ext/tcp_fast_rx.pxi over
the ring kernel's ext/rx_direct.pxd contract), with real sockets on loopback.

A scripted guest connects through the real ``Network`` (engine, glue, fast path) to a
listening socket; its RX ring is the real ring kernel over memfd guest memory, driven by
the test kit's guest ring driver (split and packed). The host peer writes; what lands in
the guest's buffers is parsed here independently: virtio-net header, Ethernet, IP and TCP
headers, checksums (full, DATA_VALID, partial + GSO) recomputed with a plain sum. Whatever
the mix of direct frames, frames through the Python path (ring full, frames already queued)
and retransmissions, the guest must see the byte stream exactly, each sequence number where
it belongs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import socket
import struct
import termios
import time

import numpy as np
import pytest

from tests.support.direct_rx import MSS, PAGE, connected, continuous, settle
from tests.support.guest_ram import RAM_BYTES
from tests.support.loop import run
from vhostnet.wire.tcp import ACK, FIN, PSH


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("offloads", ["none", "csum", "tso"])
def test_host_data_lands_in_the_guest_buffers(ram, family, ring, offloads) -> None:
    async def scenario(loop) -> None:
        mrg = offloads == "tso"  # large segments across several buffers (num_buffers)
        network, guest, peer = await connected(loop, ram, family, packed=ring == "packed",
                                               mrg=mrg, offloads=offloads)
        try:
            guest.rx.post(48, 4096 if mrg else 2048)
            data = os.urandom(200_000)
            peer.sendall(data)
            await guest.receive(len(data))
            peer.shutdown(socket.SHUT_WR)
            for _ in range(200):
                await asyncio.sleep(0.005)
                guest.collect()
                if any(s.flags & FIN for s in guest.segments):
                    break
            assert bytes(guest.stream) == data
            direct = [s for s in guest.segments if s.direct]
            assert sum(len(s.payload) for s in direct) >= len(data) // 2
            continuous(guest.segments, guest.peer_isn + 1, data)
            fin = next(s for s in guest.segments if s.flags & FIN)
            assert fin.seq == (guest.peer_isn + 1 + len(data)) & 0xFFFFFFFF
            if offloads == "tso":
                assert any(len(s.payload) > guest.mss for s in direct)
            else:
                assert max(len(s.payload) for s in direct) == guest.mss
            counters = network.counters()
            assert counters["tcp.direct_rx_segments"] == len(direct)
            assert counters["tcp.bytes_to_guest"] >= len(data)
            assert guest.rx.frames_written == len(direct)
            assert guest.rx.queue.counters()["rx_frames"] == len(direct)
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_guest_window_is_respected(ram) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, window=3000)
        try:
            guest.rx.post(32, 2048)
            data = os.urandom(10_000)
            peer.sendall(data)
            for expected in (3000, 6000, 9000, 10_000):
                for _ in range(40):
                    await asyncio.sleep(0.005)
                    guest.collect()
                # Nothing beyond the window, however long the guest waits.
                assert len(guest.stream) == expected
                assert all(s.direct for s in guest.segments if s.payload)
                guest.ack()
            continuous(guest.segments, guest.peer_isn + 1, data)
        finally:
            peer.close()
            network.close()
    run(scenario)


@pytest.mark.parametrize("way", ["direct", "python", "direct-packed"])
def test_one_ack_fills_the_whole_window_from_a_deep_socket(ram, way) -> None:
    # 500 KB wait in the host socket behind a 256-byte window; the guest's ACK opens 1 MiB:
    # one direct peek (one Python round) puts all of it in the ring, as 64 KiB segments,
    # published as it goes; the Python way reads PEEK_BUDGET at a time, all in the same turn.
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, offloads="tso", window=2, wscale=7,
                                               attach=way != "python", mrg=True,
                                               packed=way == "direct-packed")
        flow_id = next(iter(network.tcp.flows.values())).flow_id
        ours = socket.socket(fileno=os.dup(network.tcp_host.connected_fd(flow_id)))
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            size = 65536 + 256
            guest.rx.post(12, size)
            data = os.urandom(500_000)
            peer.setblocking(False)
            sent = 0
            for _ in range(400):
                if sent < len(data):
                    try:
                        sent += peer.send(data[sent:])
                    except BlockingIOError:
                        pass
                await asyncio.sleep(0.005)
                queued = struct.unpack("i", fcntl.ioctl(ours.fileno(), termios.FIONREAD,
                                                        b"\0" * 4))[0]
                if queued == len(data):
                    break
            assert queued == len(data)
            guest.collect()
            assert len(guest.stream) == 256  # the window
            guest.rx.post(len(guest.rx.free), size)
            peeks = network.counters().get("tcp.direct_rx_peeks", 0)
            guest.rx.queue.call_fd = interrupts = os.eventfd(0, os.EFD_NONBLOCK)
            guest.ack(window=8192)
            guest.rx.queue.call_fd = None
            os.close(interrupts)
            guest.collect()
            assert bytes(guest.stream) == data
            late = [s for s in guest.segments if s.payload][1:]
            if way != "python":
                assert network.counters()["tcp.direct_rx_peeks"] == peeks + 1
                assert all(s.direct for s in late)
                assert len(late) == -(-(len(data) - 256) // max(len(s.payload) for s in late))
                # Published (the guest interrupted) once past 256 KiB, then at the end: the
                # guest starts on the first frames while the rest is copied.
                assert guest.rx.queue.counters()["notifications"] == 2
                # One recvmsg fills several frames' buffers (256 KiB: four 64 KiB segments;
                # with mergeable buffers, which let the ring hand out several chains at once).
                assert network.tcp_fast.peeker.last_recvs == -(-len(late) // 4)
            continuous(guest.segments, guest.peer_isn + 1, data)
        finally:
            ours.close()
            peer.close()
            network.close()
    run(scenario)


def test_ring_full_falls_back_in_order_and_queued_frames_go_first(ram) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, attach=False)
        try:
            guest.rx.post(2, 2048)
            data = os.urandom(30_000)
            # Phase 1: no ring attached: the Python path.
            peer.sendall(data[:5000])
            await guest.receive(5000)
            assert not any(s.direct for s in guest.segments)
            phase1 = len([s for s in guest.segments if s.payload])
            network.set_direct_rx(guest.rx)
            # Phase 2: two buffers only: two direct frames, the rest through the frame queue.
            peer.sendall(data[5000:15_000])
            await settle(lambda: network.frames_to_guest)
            assert guest.rx.frames_written == 2
            # Phase 3: frames wait in the queue (the device has not flushed it): new data must
            # not overtake them, even with buffers back in the ring.
            guest.rx.post(32, 2048)
            peer.sendall(data[15_000:20_000])
            await settle(lambda: False, rounds=20)
            assert guest.rx.frames_written == 2
            guest.collect()
            later = [s.direct for s in guest.segments if s.payload][phase1:]
            assert later == [True] * 2 + [False] * (len(later) - 2) and len(later) > 5
            assert len(guest.stream) == 20_000
            guest.ack()
            # Phase 4: the queue is empty again: direct.
            peer.sendall(data[20_000:])
            await guest.receive(len(data))
            assert guest.rx.frames_written > 2
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_retransmissions_take_the_same_way_with_the_same_bytes(ram) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram)
        try:
            guest.rx.post(32, 2048)
            data = os.urandom(4000)
            peer.sendall(data)
            await guest.receive(len(data), ack=False)
            first = [s for s in guest.segments if s.payload]
            assert all(s.direct for s in first) and len(first) == 3
            # No ACK: the retransmission timer rewinds to the first unacknowledged byte.
            network.tcp.poll_timers(time.monotonic() + 5)
            network.flush()
            again = [s for s in guest.collect() if s.payload]
            assert again and all(s.direct for s in again)
            assert again[0].seq == first[0].seq and again[0].payload == first[0].payload
            assert network.counters()["tcp.retransmits"] == 1
            # The first segment acknowledged, then three duplicate ACKs: a fast retransmission
            # from the second.
            guest.stream = bytearray(data[:MSS])
            for _ in range(4):
                guest.ack()
            fast = [s for s in guest.collect() if s.payload]
            assert fast and fast[0].direct and fast[0].seq == first[1].seq
            continuous(guest.segments, guest.peer_isn + 1, data)
            guest.stream = bytearray(data)
            guest.ack()
            more = os.urandom(3000)
            peer.sendall(more)
            await guest.receive(len(data) + len(more))
            assert bytes(guest.stream) == data + more
            continuous(guest.segments, guest.peer_isn + 1, data + more)
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_direct_writes_mark_dirty_pages_while_logging(ram) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram)
        log = np.zeros(RAM_BYTES // PAGE // 8, dtype=np.uint8)
        try:
            guest.rx.queue.set_log(log, guest.rx.driver.used_gpa, True)
            # Every buffer starts 1 KiB before a page boundary: each frame's payload (not only
            # its headers) reaches into the next page.
            guest.rx.driver.next_buffer = 0x40C00
            guest.rx.post(16, 0x2000)  # and no other buffer has a header there
            data = os.urandom(6000)
            peer.sendall(data)
            await guest.receive(len(data), ack=False)
            assert guest.rx.frames_written >= 4
            bits = np.unpackbits(log, bitorder="little")
            dirty = {int(page) for page in np.nonzero(bits)[0]}
            expected = {guest.rx.driver.used_gpa // PAGE}
            for gpa, length in guest.rx.used_buffers:
                expected |= set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
            assert dirty == expected
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_frames_across_odd_sized_buffers_and_regions_keep_their_checksum(ram) -> None:
    """Merged buffers of an odd size: payload pieces start at odd offsets of the segment (the
    checksum is summed piece by piece); some buffers cross the region boundary at 1 MiB."""
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, mrg=True)
        guest.rx.driver.next_buffer = 0x100000 - 0x3000
        try:
            guest.rx.post(40, 1001)
            data = os.urandom(60_000)
            peer.sendall(data)
            await guest.receive(len(data))
            assert bytes(guest.stream) == data
            assert guest.rx.frames_written >= 10
            assert guest.rx.queue.counters()["rx_buffers"] > guest.rx.frames_written
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_the_reply_peeked_into_the_guest_carries_the_ack_of_its_request(ram) -> None:
    """Request/response through the fast path both ways: on a flow the guest opened, no
    request gets a pure ACK frame (the first one neither); the reply written straight into
    its buffers acknowledges the request."""
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram)
        try:
            guest.rx.post(32, 2048)
            sent = 0
            for index in range(4):
                request = f"request {index}".encode()
                guest.send(guest.frame(ACK | PSH, guest.next_seq, seq_offset=sent,
                                       payload=request))
                sent += len(request)
                got = bytearray()
                for _ in range(200):
                    got += peer.recv(4096) if select.select([peer], [], [], 0.005)[0] else b""
                    if len(got) == len(request):
                        break
                assert bytes(got) == request
                pure = [s for s in guest.collect() if not s.payload]
                assert pure == []
                reply = f"reply {index}".encode()
                peer.sendall(reply)
                await guest.receive(len(guest.stream) + len(reply), ack=False)
                data = [s for s in guest.segments if s.payload][-1]
                assert data.direct and data.payload == reply
                assert data.ack == (guest.isn + 1 + sent) & 0xFFFFFFFF
                guest.send(guest.frame(ACK, guest.next_seq, seq_offset=sent))
            counters = network.counters()
            assert counters["tcp.acks_on_replies"] == 4
            assert counters["tcp.fast_segments"] == 4  # the requests went the fast way
        finally:
            peer.close()
            network.close()
    run(scenario)
