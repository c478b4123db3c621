"""A scripted guest for the direct RX tests (tests/tcp/test_tcp_direct_rx.py,
test_tcp_fast_acks.py): its RX ring is the real ring kernel over memfd guest memory,
driven by the test kit's guest ring driver; what lands in its buffers is parsed here
independently (virtio-net header, Ethernet, IP and TCP headers, checksums recomputed with a
plain sum). It connects through the real ``Network`` to a listening socket on loopback and
answers with ACK frames.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

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
    Driver,
    GuestRam,
    PackedDriver,
)
from tests.support.tcp import GATEWAY6, GUEST_IP6
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.vhost_user.protocol import VirtioFeature
from vhostnet.virtqueue import FrameBatch, Virtqueue
from vhostnet.virtqueue.virtqueue import PACKED_FRESH_BASE, VIRTIO_F_RING_PACKED
from vhostnet.wire.offload import DATA_VALID, NEEDS_CSUM
from vhostnet.wire.tcp import ACK, SYN, build_options, emit_segment

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
        # As NetDevice keeps them: frames written, the handle's generation (one ring, never
        # changed), and whether a clean direct write may skip ``direct_rx_done`` (its
        # watchdog on; a test turns it on).
        self.counters = {"rx.frames": 0}
        self.direct_rx_generation = 0
        self.direct_rx_quiet = False
        self.used_buffers: list[tuple[int, int]] = []  # (gpa, length written), in order

    # DirectRx, as NetDevice implements it (one ring: the flow named, if any, goes there)
    def direct_rx(self, flow: tuple[int, bytes, bytes, int, int] | None = None):
        return self.queue.direct_rx()

    def direct_rx_by_flow(self) -> bool:
        return False

    def direct_rx_done(self, frames: int) -> None:
        self.counters["rx.frames"] += frames
        self.queue.direct_rx_done()

    @property
    def frames_written(self) -> int:
        return self.counters["rx.frames"]

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
    def __init__(self, seq: int, flags: int, payload: bytes, window: int, direct: bool,
                 ack: int = 0):
        self.seq, self.flags, self.payload, self.window, self.direct = (
            seq, flags, payload, window, direct)
        self.ack = ack


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
    return Segment(seq, tcp_flags, payload, window, direct=True, ack=ack)


def parse_queued(entry) -> Segment | None:
    frame = entry[0] if isinstance(entry, tuple) else entry
    start = 54 if frame[12:14] == b"\x86\xdd" else 34
    if len(frame) < start + 20:
        return None
    sport, dport, seq, ack, offset, tcp_flags, window = struct.unpack_from(
        "!HHIIBBH", frame, start)
    if dport != GUEST_PORT:
        return None
    return Segment(seq, tcp_flags, bytes(frame[start + (offset >> 4) * 4:]), window, False,
                   ack)


class Guest:
    """One guest connection to a host listener, reading both ways frames reach it."""

    def __init__(self, network: Network, rx: GuestRx, port: int, family: int, window: int,
                 wscale: int | None = None):
        self.network, self.rx, self.port, self.family = network, rx, port, family
        self.wscale = wscale  # offered in the SYN (None: raw windows)
        self.isn = 7_000_000
        self.peer_isn = 0
        self.window = window
        self.stream = bytearray()   # in-order bytes received
        self.segments: list[Segment] = []
        self.mss = MSS

    def frame(self, flags: int, ack: int, window: int | None = None, *, seq_offset: int = 0,
              options: bytes = b"", payload: bytes = b"") -> bytes:
        """A segment (without data unless ``payload``); ``seq_offset`` moves it off the
        expected sequence number."""
        if flags & SYN:
            options = build_options(MSS, self.wscale)
        window = self.window if window is None else window
        seq = (self.isn + (0 if flags & SYN else 1) + seq_offset) & 0xFFFFFFFF
        if self.family == 4:
            segment = emit_segment(GUEST_IP, GATEWAY_IP, GUEST_PORT, self.port, seq, ack, flags,
                                   window, payload, options)
            return eth(GATEWAY_MAC, GUEST_MAC, 0x0800, ipv4(GUEST_IP, GATEWAY_IP, 6, segment))
        segment = emit_segment(GUEST_IP6, GATEWAY6, GUEST_PORT, self.port, seq, ack, flags,
                               window, payload, options)
        return ipv6_frame(GUEST_IP6, GATEWAY6, segment, hop_limit=64, next_header=6,
                          dst_mac=GATEWAY_MAC)

    def send(self, frame: bytes) -> None:
        self.send_batch([frame])

    def send_batch(self, frames: list[bytes]) -> None:
        """``frames`` as one TX batch (as one drain of the TX ring hands them over)."""
        batch = FrameBatch(max(4, len(frames)), 1 << 16)
        for frame in frames:
            assert batch.append(frame)
        self.network.receive_batch(batch, len(frames), time.monotonic())
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
                    attach: bool = True, wscale: int | None = None):
    """(network, guest, peer socket) with the RX ring attached (``attach``); ``window`` is the
    raw field, scaled by ``wscale`` when the guest offers one."""
    listener = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    listener.bind(("::1" if family == 6 else "127.0.0.1", 0))
    listener.listen(4)
    csum, tso, features = OFFLOADS[offloads]
    network = Network(StackConfig(), loop)
    network.set_guest_offloads(csum, tso, tso)
    rx = GuestRx(ram, packed=packed, mrg=mrg, features=features)
    guest = Guest(network, rx, listener.getsockname()[1], family, window, wscale)
    await guest.connect()
    peer, _ = listener.accept()
    listener.close()
    guest.mss = next(iter(network.tcp.flows.values())).mss  # the engine's, by family
    if attach:
        network.set_direct_rx(rx)
    return network, guest, peer


def continuous(segments: list[Segment], first: int, data: bytes) -> None:
    """Data segments, as sent (retransmissions included), each carry the data at their seq."""
    for segment in segments:
        if segment.payload:
            offset = (segment.seq - first) & 0xFFFFFFFF
            assert data[offset:offset + len(segment.payload)] == segment.payload


async def settle(done, rounds: int = 200) -> None:
    """Let the loop run until ``done()`` or ``rounds`` turns of 5 ms."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)
        if done():
            return
