"""Several guests (guests.py) without a daemon: ports bind to their guest's own Network by
source MAC, frames the switch queued wake the other port, Networks are kept by address and
bounded, forwards name their guest.

The switch and the lease pool are stand-ins playing their interfaces (the real ones are
tested in their own layers; tests/test_several_guests.py runs everything together)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.dhcp import dhcp_request, msg_type
from tests.support.frames import BROADCAST, GATEWAY_IP, GATEWAY_MAC, eth, ipv4, udp
from tests.support.hostio import port_is_free
from vhostnet.guests import Guests, forwards_by_guest
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig, ip4, parse_port_spec
from vhostnet.stream import StreamDevice
from vhostnet.virtqueue import FrameBatch

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")
MAC_C = bytes.fromhex("525400cc0003")


@dataclass
class StandInLease:
    mac: bytes
    ipv4: bytes | None
    ipv6: bytes | None = None
    name: str | None = None
    reserved: bool = False


class StandInPool:
    """Leases 10.0.2.15, .16, ... in order of first sight, stable per MAC."""

    def __init__(self) -> None:
        self.by_mac: dict[bytes, StandInLease] = {}

    def lease_for(self, mac: bytes) -> StandInLease:
        if mac not in self.by_mac:
            self.by_mac[mac] = StandInLease(mac, bytes([10, 0, 2, 15 + len(self.by_mac)]))
        return self.by_mac[mac]

    def leases(self) -> list[StandInLease]:
        return list(self.by_mac.values())

    def counters(self) -> dict[str, int]:
        return {"leases.count": len(self.by_mac)}


class StandInSwitch:
    """Learns sources; unicast to a learned MAC of another port is moved to that port's batch;
    everything else stays for the sender's router (enough to drive guests.py)."""

    def __init__(self, max_ports: int, gateway_mac: bytes) -> None:
        self.table: dict[bytes, int] = {}
        self.batches: dict[int, FrameBatch] = {}
        self.offloads: dict[int, tuple[bool, bool, bool]] = {}
        self.routes: dict[int, tuple[bytes | None, bytes | None, list[bytes]]] = {}
        self.next_port = 0

    def add_port(self) -> int:
        port, self.next_port = self.next_port, self.next_port + 1
        self.batches[port] = FrameBatch(16, 1 << 16)
        return port

    def remove_port(self, port: int) -> None:
        self.batches.pop(port)
        self.table = {mac: p for mac, p in self.table.items() if p != port}

    def set_port_offloads(self, port: int, *, csum: bool, tso4: bool, tso6: bool) -> None:
        self.offloads[port] = (csum, tso4, tso6)

    def set_port_route(self, port: int, mac: bytes | None, ipv4: bytes | None = None,
                       ipv6: list[bytes] = ()) -> None:
        self.routes[port] = (mac, ipv4, list(ipv6))

    def switch_batch(self, port: int, batch: FrameBatch, count: int, now: float) -> int:
        kept = []
        for index in range(count):
            frame = bytes(batch.frame(index))
            self.table[frame[6:12]] = port
            target = self.table.get(frame[:6])
            if target is not None and target != port:
                self.batches[target].append(frame)
            else:
                kept.append(frame)
        batch.clear()
        for frame in kept:
            batch.append(frame)
        return len(kept)

    def outgoing(self, port: int) -> FrameBatch | None:
        batch = self.batches.get(port)
        return batch if batch is not None and batch.count else None

    def taken(self, port: int, count: int) -> None:
        batch = self.batches[port]
        rest = [bytes(batch.frame(i)) for i in range(count, batch.count)]
        batch.clear()
        for frame in rest:
            batch.append(frame)

    def macs(self) -> list[tuple[bytes, int, float]]:
        return [(mac, port, 0.0) for mac, port in self.table.items()]

    def counters(self) -> dict[str, int]:
        return {"switch.forwarded": 0}


def arp_request_from(mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, sender_ip, b"\0" * 6,
                       target_ip)
    return eth(BROADCAST, mac, 0x0806, body)


def batch_of(*frames: bytes) -> FrameBatch:
    batch = FrameBatch(16, 1 << 16)
    for frame in frames:
        assert batch.append(frame)
    return batch


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def start(loop: asyncio.AbstractEventLoop, max_guests: int = 2,
          config: StackConfig | None = None) -> Guests:
    return Guests.start(config or StackConfig(tcp=False), StandInPool(),
                        StandInSwitch(max_guests, GATEWAY_MAC), max_guests,
                        lambda guest_config: Network(guest_config, loop))


def test_each_port_gets_its_own_network_by_source_mac(loop: asyncio.AbstractEventLoop) -> None:
    guests = start(loop)
    try:
        one, two = guests.open_port(), guests.open_port()
        assert guests.open_port() is None  # max_guests ports at most
        one.receive_batch(batch_of(arp_request_from(MAC_A, ip4("10.0.2.15"), GATEWAY_IP)), 1, 0.0)
        two.receive_batch(batch_of(arp_request_from(MAC_B, ip4("10.0.2.16"), GATEWAY_IP)), 1, 0.0)
        assert one.network is guests.first
        assert two.network is not None and two.network is not guests.first
        assert two.network.config.guest_ipv4 == ip4("10.0.2.16")
        # Each port told the switch where its guest is, for routing through the gateway.
        assert guests.switch.routes[two.port] == (MAC_B, ip4("10.0.2.16"), [])
        # Each router answered its own guest only: the reply is in its own queue.
        [reply_a] = list(one.frames_to_guest)
        [reply_b] = list(two.frames_to_guest)
        assert reply_a[:6] == MAC_A and reply_b[:6] == MAC_B
        assert guests.network_for_address("10.0.2.16") is two.network
        assert guests.network_for_address(None) is guests.first
        with pytest.raises(ValueError, match="no guest has address 10.0.2.99"):
            guests.network_for_address("10.0.2.99")
    finally:
        guests.close()


def test_frames_for_another_guest_wake_its_port(loop: asyncio.AbstractEventLoop) -> None:
    guests = start(loop)
    try:
        one, two = guests.open_port(), guests.open_port()
        woken: list[str] = []
        two.add_output_listener(lambda: woken.append("two"))
        two.receive_batch(batch_of(arp_request_from(MAC_B, ip4("10.0.2.16"), GATEWAY_IP)), 1, 0.0)
        woken.clear()
        to_b = eth(MAC_B, MAC_A, 0x0800, b"\x45" + bytes(40))
        one.receive_batch(batch_of(to_b), 1, 0.0)
        assert woken == ["two"]
        batch = two.outgoing()
        assert batch is not None and bytes(batch.frame(0)) == to_b
        two.taken(1)
        assert two.outgoing() is None and one.outgoing() is None
    finally:
        guests.close()


def test_a_guest_back_with_its_mac_finds_its_network(loop: asyncio.AbstractEventLoop) -> None:
    guests = start(loop)
    try:
        first = guests.open_port()
        first.learn_guest_mac(MAC_B)  # SEND_RARP binds as a first frame does
        network = first.network
        assert network is not None
        impostor = guests.open_port()
        impostor.learn_guest_mac(MAC_B)  # the same guest on two ports at once: refused
        assert impostor.network is None and guests.counts["mac_in_use"] == 1
        impostor.close()
        first.close()
        assert guests.counters()["guests.ports"] == 0
        again = guests.open_port()
        again.learn_guest_mac(MAC_B)
        assert again.network is network
    finally:
        guests.close()


def test_a_router_answers_dhcp_for_its_ports_mac_only(loop: asyncio.AbstractEventLoop) -> None:
    """One guest per port: the port bound to MAC_A gets no lease for another chaddr."""
    guests = start(loop)
    try:
        port = guests.open_port()
        for chaddr in (MAC_C, MAC_A):
            request = dhcp_request(msg_type(1))
            request = request[:28] + chaddr + request[34:]
            frame = eth(BROADCAST, MAC_A, 0x0800, ipv4(bytes(4), b"\xff" * 4, 17,
                                                      udp(bytes(4), 68, b"\xff" * 4, 67, request)))
            port.receive_batch(batch_of(frame), 1, 0.0)
        assert port.network is not None and port.network.stack.port_mac == MAC_A
        [offer] = list(port.frames_to_guest)  # for MAC_A's DISCOVER only
        assert offer[-300:].find(MAC_A) >= 0
        assert port.network.counters()["dhcp.drop.foreign_chaddr"] == 1
    finally:
        guests.close()


def test_networks_of_gone_guests_are_bounded(loop: asyncio.AbstractEventLoop) -> None:
    guests = start(loop, max_guests=2)
    try:
        made = []
        for index in range(6):
            port = guests.open_port()
            port.learn_guest_mac(bytes([0x52, 0x54, 0, 0, 1, index]))
            made.append(port.network)
            port.close()
        # 2 * max_guests kept: the first guest's and the newest; the oldest idle went.
        assert len(guests.networks) == 4
        assert guests.first in guests.networks.values()
        assert made[-1] in guests.networks.values() and made[1] not in guests.networks.values()
        assert guests.counts["networks_closed"] == 2
    finally:
        guests.close()


def test_command_line_forwards_go_to_the_guest_they_name(loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(50):  # two free ports side by side (another test's socket may hold one)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        if port_is_free(free + 1):
            break
    forwards = parse_port_spec(f"127.0.0.1/{free}:10.0.2.16/80,{free + 1}:22")
    config = StackConfig(tcp_forwards=forwards)
    split = forwards_by_guest(config)
    assert [f.host_port for f in split[None][0]] == [free + 1]
    assert [f.host_port for f in split["10.0.2.16"][0]] == [free]
    guests = start(loop, config=config)
    try:
        second = guests.network_for_address("10.0.2.16")
        assert [s.forward.host_port for s in second.forwards()] == [free]
        assert [s.forward.host_port for s in guests.first.forwards()] == [free + 1]
        port = guests.open_port()
        port.learn_guest_mac(MAC_A)  # the first lease: 10.0.2.15, the first guest
        other = guests.open_port()
        other.learn_guest_mac(MAC_C)  # the second: 10.0.2.16, the Network made at start
        assert port.network is guests.first and other.network is second
    finally:
        guests.close()


def test_a_stream_port_sends_switched_frames_length_prefixed(
        loop: asyncio.AbstractEventLoop) -> None:
    guests = start(loop)
    ours, theirs = socket.socketpair()
    try:
        one, two = guests.open_port(), guests.open_port()
        ours.setblocking(False)
        device = StreamDevice(loop, two, ours, switched=two)
        two.receive_batch(batch_of(arp_request_from(MAC_B, ip4("10.0.2.16"), GATEWAY_IP)), 1, 0.0)
        loop.run_until_complete(asyncio.sleep(0.05))
        theirs.settimeout(1.0)
        assert len(theirs.recv(65536)) == 4 + 42  # its router's ARP reply
        frames = [eth(MAC_B, MAC_A, 0x0800, bytes([0x45]) + bytes(n)) for n in (40, 300)]
        one.receive_batch(batch_of(*frames), 2, 0.0)
        loop.run_until_complete(asyncio.sleep(0.05))
        expected = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
        received = b""
        while len(received) < len(expected):
            received += theirs.recv(65536)
        assert received == expected
        assert device.counters["rx.frames"] == 3 and two.outgoing() is None
        device.close()
    finally:
        ours.close()
        theirs.close()
        guests.close()
