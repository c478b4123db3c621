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
import os
import socket
import struct
import time

import numpy as np
import pytest

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    checksum,
    eth,
    ipv4,
    ipv6_frame,
)
from tests.support.guest_ram import (
    DESC_F_WRITE,
    RAM_BYTES,
    SPLIT_LAYOUT,
    Driver,
    GuestRam,
    PackedDriver,
)
from tests.support.loop import run
from tests.support.tcp import GATEWAY6, GUEST_IP6
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.vhost_user.protocol import VirtioFeature
from vhostnet.virtqueue import FrameBatch, Virtqueue
from vhostnet.virtqueue.virtqueue import PACKED_FRESH_BASE, VIRTIO_F_RING_PACKED
from vhostnet.wire.offload import DATA_VALID, NEEDS_CSUM
from vhostnet.wire.tcp import ACK, FIN, SYN, build_options, emit_segment

GUEST_PORT = 42000
MSS = 1460
PAGE = 0x1000
OFFLOADS = {  # name: (guest_offloads csum, tso, feature bits)
    "none": (False, False, 0),
    "csum": (True, False, VirtioFeature.NET_F_GUEST_CSUM),
    "tso": (True, True, VirtioFeature.NET_F_GUEST_CSUM | VirtioFeature.NET_F_GUEST_TSO4
            | VirtioFeature.NET_F_GUEST_TSO6),
}



class GuestRx:
    """The guest's RX ring (the ring kernel over memfd RAM) as the device would offer it."""

    def __init__(self, ram: GuestRam, packed: bool = False, mrg: bool = False,
                 features: int = 0, size: int = 64) -> None:
        self.ram = ram
        self.mrg = mrg
        driver_class = PackedDriver if packed else Driver
        self.driver = driver_class(ram, size=size, buffer_gpa=0x40000)
        if packed:
            features |= VIRTIO_F_RING_PACKED
        self.queue = Virtqueue(ram.memory, size, *self.driver.ring_uvas,
                               base=PACKED_FRESH_BASE if packed else 0, hdr_len=12,
                               mrg_rxbuf=mrg, features=features)
        self.free: list[tuple[int, int]] = []  # (gpa, size) of buffers the guest has back
        self.frames_written = 0
        self.used_buffers: list[tuple[int, int]] = []  # (gpa, length written), in order

    # DirectRx, as NetDevice implements it
    def direct_rx(self):
        return self.queue.direct_rx()

    def direct_rx_done(self, frames: int) -> None:
        self.frames_written += frames
        self.queue.direct_rx_done()

    def post(self, count: int, size: int) -> None:
        """``count`` fresh buffers of ``size`` bytes (then recycled ones first)."""
        for _ in range(count):
            if self.free and self.free[-1][1] == size:
                gpa, _ = self.free.pop()
            else:
                gpa = self.driver.alloc(size)
                assert gpa + size <= RAM_BYTES
            assert self.driver.queue_chain([(gpa, size, DESC_F_WRITE)], (gpa, size))
        self.ring_posted = size

    def take_frames(self) -> list[tuple[bytes, bytes]]:
        """(virtio-net header, frame) of every frame written since the last call; its buffers
        go back to the free list."""
        frames = []
        pending: list[bytes] = []
        header = b""
        want = 0
        for (gpa, size), length in self.driver.collect_used():
            self.used_buffers.append((gpa, length))
            data = self.ram.read(gpa, length)
            self.free.append((gpa, size))
            if not pending:
                header, data = data[:12], data[12:]
                want = struct.unpack_from("<H", header, 10)[0] if self.mrg else 1
                assert want >= 1
            pending.append(data)
            if len(pending) == want:
                frames.append((header, b"".join(pending)))
                pending = []
        assert not pending, "a frame's buffers were not all used"
        return frames


class Segment:
    def __init__(self, seq: int, flags: int, payload: bytes, window: int, direct: bool):
        self.seq, self.flags, self.payload, self.window, self.direct = (
            seq, flags, payload, window, direct)


def parse_direct(header: bytes, frame: bytes, mss: int) -> Segment:
    """A frame from the guest's RX buffer, every header and checksum checked here."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "<BBHHHH", header)
    assert frame[:6] == GUEST_MAC and frame[6:12] == GATEWAY_MAC
    if frame[12:14] == b"\x08\x00":
        ip = frame[14:34]
        assert ip[0] == 0x45 and ip[9] == 6 and ip[8] == 64 and checksum(ip) == 0
        total = struct.unpack_from("!H", ip, 2)[0]
        assert total == len(frame) - 14
        segment = frame[34:]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(segment))
        l4_start, gso_kind = 34, 1
    else:
        assert frame[12:14] == b"\x86\xdd"
        ip = frame[14:54]
        assert ip[0] >> 4 == 6 and ip[6] == 6 and ip[7] == 64
        assert struct.unpack_from("!H", ip, 4)[0] == len(frame) - 54
        segment = frame[54:]
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(segment), 6)
        l4_start, gso_kind = 54, 4
    sport, dport, seq, ack, offset, tcp_flags, window, field = struct.unpack_from(
        "!HHIIBBHH", segment)
    assert offset >> 4 == 5 and dport == GUEST_PORT
    payload = segment[20:]
    if flags == 0:
        assert checksum(pseudo + segment) == 0, "bad TCP checksum"
        assert gso_type == 0
    elif flags == DATA_VALID:
        assert gso_type == 0 and field == 0
    else:
        assert flags == NEEDS_CSUM and csum_start == l4_start and csum_offset == 16
        assert field == ~checksum(pseudo) & 0xFFFF  # the pseudo-header sum, for the guest
        # Completed as the guest does (the sum from csum_start on): then it must verify.
        completed = segment[:16] + struct.pack("!H", checksum(segment)) + segment[18:]
        assert checksum(pseudo + completed) == 0, "bad partial TCP checksum"
        if len(payload) > mss:
            assert gso_type == gso_kind and gso_size == mss and hdr_len == l4_start + 20
        else:
            assert gso_type == 0
    return Segment(seq, tcp_flags, payload, window, direct=True)


def parse_queued(entry) -> Segment | None:
    frame = entry[0] if isinstance(entry, tuple) else entry
    start = 54 if frame[12:14] == b"\x86\xdd" else 34
    if len(frame) < start + 20:
        return None
    sport, dport, seq, ack, offset, tcp_flags, window = struct.unpack_from(
        "!HHIIBBH", frame, start)
    if dport != GUEST_PORT:
        return None
    return Segment(seq, tcp_flags, bytes(frame[start + (offset >> 4) * 4:]), window, False)


class Guest:
    """One guest connection to a host listener, reading both ways frames reach it."""

    def __init__(self, network: Network, rx: GuestRx, port: int, family: int, window: int):
        self.network, self.rx, self.port, self.family = network, rx, port, family
        self.isn = 7_000_000
        self.peer_isn = 0
        self.window = window
        self.stream = bytearray()   # in-order bytes received
        self.segments: list[Segment] = []
        self.mss = MSS

    def frame(self, flags: int, ack: int, window: int | None = None) -> bytes:
        options = build_options(MSS, None) if flags & SYN else b""  # no window scale: raw bytes
        window = self.window if window is None else window
        seq = (self.isn + (0 if flags & SYN else 1)) & 0xFFFFFFFF
        if self.family == 4:
            segment = emit_segment(GUEST_IP, GATEWAY_IP, GUEST_PORT, self.port, seq, ack, flags,
                                   window, b"", options)
            return eth(GATEWAY_MAC, GUEST_MAC, 0x0800, ipv4(GUEST_IP, GATEWAY_IP, 6, segment))
        segment = emit_segment(GUEST_IP6, GATEWAY6, GUEST_PORT, self.port, seq, ack, flags,
                               window, b"", options)
        return ipv6_frame(GUEST_IP6, GATEWAY6, segment, hop_limit=64, next_header=6,
                          dst_mac=GATEWAY_MAC)

    def send(self, frame: bytes) -> None:
        batch = FrameBatch(4, 1 << 16)
        assert batch.append(frame)
        self.network.receive_batch(batch, 1, time.monotonic())
        self.network.flush()

    @property
    def next_seq(self) -> int:
        return (self.peer_isn + 1 + len(self.stream)) & 0xFFFFFFFF

    def ack(self, window: int | None = None) -> None:
        self.send(self.frame(ACK, self.next_seq, window))

    def collect(self) -> list[Segment]:
        """New segments from the ring and from the frame queue (in that order: the fast path
        only writes while the queue is empty); in-order payload joins the stream."""
        got = [parse_direct(header, frame, self.mss) for header, frame in self.rx.take_frames()]
        queue = self.network.frames_to_guest
        while queue:
            segment = parse_queued(queue.popleft())
            if segment is not None:
                got.append(segment)
        for segment in got:
            if segment.flags & SYN:
                continue
            offset = (segment.seq - self.peer_isn - 1) & 0xFFFFFFFF
            end = offset + len(segment.payload)
            if offset <= len(self.stream) < end:
                self.stream += segment.payload[len(self.stream) - offset:]
            elif end > len(self.stream):
                raise AssertionError(f"hole: segment at {offset}, stream at {len(self.stream)}")
        self.segments += got
        return got

    async def connect(self) -> None:
        self.send(self.frame(SYN, 0, 65535))
        for _ in range(300):
            synacks = [s for s in self.collect() if s.flags == SYN | ACK]
            if synacks:
                self.peer_isn = synacks[0].seq
                self.ack()
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no SYN-ACK")

    async def receive(self, total: int, *, ack: bool = True, rounds: int = 500) -> None:
        """Collect (acknowledging, with buffers recycled) until ``total`` bytes arrived."""
        for _ in range(rounds):
            await asyncio.sleep(0.005)
            self.collect()
            if ack:
                self.ack()
            self.rx.post(len(self.rx.free), self.rx.ring_posted)
            if len(self.stream) >= total:
                return
        raise AssertionError(f"stuck at {len(self.stream)} of {total} bytes")


async def connected(loop, ram: GuestRam, family: int = 4, *, packed: bool = False,
                    mrg: bool = False, offloads: str = "none", window: int = 65535,
                    attach: bool = True):
    """(network, guest, peer socket) with the RX ring attached (``attach``)."""
    listener = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    listener.bind(("::1" if family == 6 else "127.0.0.1", 0))
    listener.listen(4)
    csum, tso, features = OFFLOADS[offloads]
    network = Network(StackConfig(), loop)
    network.set_guest_offloads(csum, tso, tso)
    rx = GuestRx(ram, packed=packed, mrg=mrg, features=features)
    guest = Guest(network, rx, listener.getsockname()[1], family, window)
    await guest.connect()
    peer, _ = listener.accept()
    listener.close()
    guest.mss = next(iter(network.tcp.flows.values())).mss  # the engine's, by family
    if attach:
        network.set_direct_rx(rx)
    return network, guest, peer


@pytest.fixture
def ram():
    guest_ram = GuestRam(SPLIT_LAYOUT)
    yield guest_ram
    guest_ram.close()


def continuous(segments: list[Segment], first: int, data: bytes) -> None:
    """Data segments, as sent (retransmissions included), each carry the data at their seq."""
    for segment in segments:
        if segment.payload:
            offset = (segment.seq - first) & 0xFFFFFFFF
            assert data[offset:offset + len(segment.payload)] == segment.payload


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


async def settle(done, rounds: int = 200) -> None:
    """Let the loop run until ``done()`` or ``rounds`` turns of 5 ms."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)
        if done():
            return


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
