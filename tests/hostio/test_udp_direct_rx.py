"""Host UDP datagrams received straight into the guest's RX buffers (ext/udp_rx.pxi over the
ring kernel's ext/rx_direct.pxd contract), with real sockets on loopback.

A scripted guest opens a UDP flow through the real ``Network`` to a host socket; its RX ring
is the real ring kernel over memfd guest memory (split and packed), driven by the test
kit's guest ring driver. The host answers; what lands in the guest's buffers must be the
exact frame built by hand here (headers, checksums), in order with what went through the
network's queue (frames already waiting, ring out of buffers, datagrams the buffers cannot
hold), none lost.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from tests.support.direct_rx import OFFLOADS, GuestRx, settle
from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    eth,
    guest_udp6_frame,
    guest_udp_frame,
    ipv4,
    udp,
    udp6,
)
from tests.support.guest_ram import DESC_F_WRITE, RAM_BYTES
from tests.support.loop import run
from tests.support.tcp import GATEWAY6, GUEST_IP6
from vhostnet.guest_queue import GuestBatch
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.offload import DATA_VALID_WORD

GUEST_PORT = 41000


def expected(family: int, port: int, payload: bytes) -> bytes:
    """The frame the guest must get for ``payload`` from the host's ``port``."""
    if family == 4:
        return eth(GUEST_MAC, GATEWAY_MAC, 0x0800,
                   ipv4(GATEWAY_IP, GUEST_IP, 17, udp(GATEWAY_IP, port, GUEST_IP, GUEST_PORT,
                                                      payload), ident=0))
    segment = udp6(GATEWAY6, port, GUEST_IP6, GUEST_PORT, payload)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 17, 64, GATEWAY6, GUEST_IP6)
    return eth(GUEST_MAC, GATEWAY_MAC, 0x86DD, header + segment)


def queued_frames(network: Network) -> list[bytes]:
    """Every frame waiting in the network's queue toward the guest, taken off it in order."""
    frames = []
    queue = network.frames_to_guest
    while queue:
        entry = queue[0]  # (read before popped: a popped batch's storage is recycled)
        if type(entry) is GuestBatch:
            frames += [bytes(entry.batch.frame(i)) for i in range(entry.start, entry.batch.count)]
        else:
            frames.append(bytes(entry[0] if isinstance(entry, tuple) else entry))
        queue.popleft()
    return frames


class Flow:
    """A guest UDP flow to a host socket on loopback, the RX ring attached."""

    def __init__(self, loop, ram, family: int, *, packed: bool = False, mrg: bool = False,
                 offloads: str = "none", mtu: int = 1500) -> None:
        csum, tso, features = OFFLOADS[offloads]
        self.family = family
        self.csum = csum
        self.network = Network(StackConfig(mtu=mtu), loop)
        self.network.set_guest_offloads(csum, tso, tso)
        self.rx = GuestRx(ram, packed=packed, mrg=mrg, features=features)
        self.host = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.host.bind(("::1" if family == 6 else "127.0.0.1", 0))
        self.host.settimeout(5)
        self.port = self.host.getsockname()[1]

    async def open(self) -> None:
        frame = (guest_udp_frame(GUEST_PORT, GATEWAY_IP, self.port, b"hello") if self.family == 4
                 else guest_udp6_frame(GUEST_PORT, GATEWAY6, self.port, b"hello", GUEST_IP6))
        batch = FrameBatch(4, 1 << 16)
        assert batch.append(frame)
        self.network.receive_batch(batch, 1, time.monotonic())
        self.network.flush()
        _, self.flow = await asyncio.get_running_loop().run_in_executor(
            None, self.host.recvfrom, 100)
        self.network.set_direct_rx(self.rx)

    async def answer(self, payloads: list[bytes]) -> None:
        """The host sends ``payloads``; the loop runs until the flow's socket is drained."""
        for payload in payloads:
            self.host.sendto(payload, self.flow)
        received = self.network.counters

        def drained() -> bool:
            counts = received()
            return counts.get("udp.rx_host", 0) + counts.get("udp.rx_fragmented", 0) \
                >= self.sent + len(payloads)
        await settle(drained)
        await asyncio.sleep(0.02)  # (and nothing more comes)
        self.sent += len(payloads)

    sent = 0

    def direct_frames(self) -> list[bytes]:
        """The frames in the guest's buffers; their headers say DATA_VALID (flags 2, nothing
        else) to a guest that negotiated receive checksums, nothing to one that did not (the
        frames' checksums are complete either way: ``expected`` has them)."""
        frames = []
        want = (b"\x02" if self.csum else b"\x00") + bytes(9)
        for header, frame in self.rx.take_frames():
            if not header:
                continue  # a refused buffer, handed back empty
            assert header[:10] == want
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.host.close()
        self.network.close()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("offloads", ["none", "csum"])
def test_datagrams_land_in_the_guest_buffers_exactly(ram, family, ring, offloads) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, family, packed=ring == "packed", offloads=offloads)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            payloads = [b"", b"x", b"odd!!", bytes(range(256)) * 4 + b"z",
                        bytes(1500 - 8 - (40 if family == 6 else 20))]  # the largest at MTU
            await flow.answer(payloads)
            assert flow.direct_frames() == [expected(family, flow.port, p) for p in payloads]
            assert not flow.network.frames_to_guest
            counters = flow.network.counters()
            assert counters["udp.rx_direct"] == len(payloads)
            assert counters["udp.rx_host"] == len(payloads)
            assert counters["ipv6.tx" if family == 6 else "ipv4.tx"] >= len(payloads)
            assert flow.rx.frames_written == len(payloads)
        finally:
            flow.close()
    run(scenario)


def test_frames_already_queued_go_first(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            flow.network.frames_to_guest.append(b"queued before")
            await flow.answer([b"a", b"b", b"c"])
            # Nothing may pass the waiting frame: all three the old way, behind it.
            assert flow.direct_frames() == []
            assert queued_frames(flow.network) == [b"queued before"] + [
                expected(4, flow.port, p) for p in (b"a", b"b", b"c")]
            await flow.answer([b"d"])  # the queue empty again: straight in
            assert flow.direct_frames() == [expected(4, flow.port, b"d")]
            assert flow.network.counters()["udp.rx_direct"] == 1
        finally:
            flow.close()
    run(scenario)


def test_a_new_guest_mac_is_in_the_next_frames(ram) -> None:
    """The kernel is told the guest's MAC once, and again when it changes (a guest that
    rebooted with another one): not asked per datagram, never stale."""
    other_mac = bytes.fromhex("525400aabbcc")

    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            await flow.answer([b"a"])
            assert flow.direct_frames() == [expected(4, flow.port, b"a")]
            flow.network.stack.guest_mac = other_mac
            await flow.answer([b"b"])
            assert flow.direct_frames() == [other_mac + expected(4, flow.port, b"b")[6:]]
        finally:
            flow.close()
    run(scenario)


@pytest.mark.parametrize("family", [4, 6])
def test_a_ring_out_of_buffers_mid_batch_leaves_the_rest_queued_in_order(ram, family) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, family)
        try:
            await flow.open()
            flow.rx.post(3, 2048)
            payloads = [b"answer %d" % i for i in range(8)]
            await flow.answer(payloads)
            frames = [expected(family, flow.port, p) for p in payloads]
            assert flow.direct_frames() == frames[:3]
            assert queued_frames(flow.network) == frames[3:]
            assert flow.network.counters()["udp.rx_direct"] == 3
            assert flow.network.counters()["udp.rx_host"] == 8
        finally:
            flow.close()
    run(scenario)


@pytest.mark.parametrize("offloads", ["none", "csum"])
def test_frames_built_the_old_way_say_data_valid_as_the_direct_ones(ram, offloads) -> None:
    """The frames the ring had no buffers for are built in a batch: to a guest with receive
    checksums they say DATA_VALID too, so the guest never sums their payloads either."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4, offloads=offloads)
        try:
            await flow.open()
            flow.rx.post(2, 2048)
            await flow.answer([b"answer %d" % i for i in range(6)])
            assert len(flow.direct_frames()) == 2  # (their headers checked there)
            entry = flow.network.frames_to_guest[0]
            assert type(entry) is GuestBatch
            vnets = entry.batch.arrays()[3][entry.start:entry.batch.count]
            assert list(vnets) == [DATA_VALID_WORD if flow.csum else 0] * 4
        finally:
            flow.close()
    run(scenario)


def test_a_datagram_the_buffer_cannot_hold_takes_the_old_way_and_the_rest_follow(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(8, 256)  # (no MRG_RXBUF: one buffer per frame)
            big = bytes(range(200)) * 3
            payloads = [b"small", big, b"after"]
            await flow.answer(payloads)
            assert flow.direct_frames() == [expected(4, flow.port, b"small")]
            # Whole, as the old path builds it (the device then drops it, counted, as before),
            # and what came after it stays behind it.
            assert queued_frames(flow.network) == [expected(4, flow.port, p)
                                                   for p in (big, b"after")]
            assert flow.network.counters()["udp.rx_direct"] == 1
        finally:
            flow.close()
    run(scenario)


def test_a_datagram_over_the_mtu_is_fragmented_as_before(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(8, 4096)  # room enough, but the MTU is 1500
            big = bytes(range(250)) * 12
            await flow.answer([b"first", big])
            assert flow.direct_frames() == [expected(4, flow.port, b"first")]
            fragments = queued_frames(flow.network)
            assert len(fragments) == 3 and all(len(f) <= 14 + 1500 for f in fragments)
            payload = b"".join(f[34:] for f in fragments)[8:]  # (UDP header in the first)
            assert payload == big
            assert flow.network.counters()["udp.rx_direct"] == 1
        finally:
            flow.close()
    run(scenario)


def test_buffers_outside_guest_memory_are_refused_and_counted(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            outside = RAM_BYTES + 0x100000
            assert flow.rx.driver.queue_chain([(outside, 2048, DESC_F_WRITE)], (outside, 2048))
            assert flow.rx.driver.queue_chain([(RAM_BYTES - 100, 2048, DESC_F_WRITE)],
                                              (RAM_BYTES - 100, 2048))
            flow.rx.post(4, 2048)
            await flow.answer([b"one", b"two"])
            assert flow.direct_frames() == [expected(4, flow.port, p) for p in (b"one", b"two")]
            counters = flow.rx.queue.counters()
            refused = sum(value for name, value in counters.items()
                          if name.startswith("address_"))
            assert refused == 2, counters
        finally:
            flow.close()
    run(scenario)


@pytest.mark.parametrize("family", [4, 6])
def test_direct_frames_are_counted_exactly_as_the_stack_counts_them(ram, family) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, family)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            names = ["udp.rx_host", "udp.rx_direct", "udp.fast_path_rx", "ipv4.tx", "ipv6.tx"]
            before = flow.network.counters()
            await flow.answer([b"a", b"bb", b"ccc"])
            after = flow.network.counters()
            grown = {name: after.get(name, 0) - before.get(name, 0) for name in names}
            assert grown == {"udp.rx_host": 3, "udp.rx_direct": 3, "udp.fast_path_rx": 3,
                             "ipv4.tx": 3 if family == 4 else 0,
                             "ipv6.tx": 3 if family == 6 else 0}
            assert len(flow.direct_frames()) == 3
        finally:
            flow.close()
    run(scenario)


def test_the_flows_expiry_follows_its_last_datagram_either_way(ram) -> None:
    """The kernel stamps the flow's fast-path datagrams (sent and received straight into the
    ring); the flow expires ``udp_idle_timeout`` after the last of them, not before."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            nat = flow.network.stack.udp_nat
            timeout = flow.network.stack.config.udp_idle_timeout
            await flow.open()
            flow.rx.post(16, 2048)
            await asyncio.sleep(0.1)
            answered_after = time.monotonic()
            await flow.answer([b"late answer"])
            assert len(flow.direct_frames()) == 1
            nat.poll_timers(answered_after + timeout - 0.01)
            assert nat.flow_count() == 1, "expired by its first datagram's time"
            # The guest sends later (its clock says so): the fast path takes it.
            later = answered_after + timeout - 1.0
            batch = FrameBatch(4, 1 << 16)
            assert batch.append(guest_udp_frame(GUEST_PORT, GATEWAY_IP, flow.port, b"again"))
            taken = flow.network.counters().get("udp.fast_path", 0)
            flow.network.receive_batch(batch, 1, later)
            assert flow.network.counters()["udp.fast_path"] == taken + 1
            nat.poll_timers(later + timeout - 0.01)
            assert nat.flow_count() == 1, "expired by the last received datagram's time"
            assert nat.export_flows(later + 2.0)[0]["idle"] == pytest.approx(2.0)
            nat.poll_timers(later + timeout)
            assert nat.flow_count() == 0
        finally:
            flow.close()
    run(scenario)


def test_a_datagram_handed_back_takes_the_one_received_with_it_along_in_order(ram) -> None:
    """Two datagrams come per receive: when the first cannot go into the ring, the second,
    already taken off the socket, goes back to Python behind it, then the rest follow."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(8, 256)  # (no MRG_RXBUF: one buffer per frame)
            big = bytes(range(200)) * 3
            payloads = [big, b"with it", b"after", b"last"]
            await flow.answer(payloads)
            assert flow.direct_frames() == []
            assert queued_frames(flow.network) == [expected(4, flow.port, p) for p in payloads]
            assert flow.network.counters().get("udp.rx_direct", 0) == 0
        finally:
            flow.close()
    run(scenario)


@pytest.mark.parametrize("family", [4, 6])
def test_the_second_datagram_of_a_receive_is_copied_across_merged_buffers(ram, family) -> None:
    """The second of each two lands behind the first and is copied into buffers of its own,
    here spread over several small mergeable buffers: the frames must be exact."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, family, mrg=True)
        try:
            await flow.open()
            flow.rx.post(64, 300)
            payloads = [bytes([i]) * (700 + 111 * i) for i in range(5)]
            await flow.answer(payloads)
            assert flow.direct_frames() == [expected(family, flow.port, p) for p in payloads]
            assert not flow.network.frames_to_guest
            assert flow.network.counters()["udp.rx_direct"] == len(payloads)
        finally:
            flow.close()
    run(scenario)
