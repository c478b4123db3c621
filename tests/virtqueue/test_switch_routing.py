"""Routing through the gateway MAC in the switch kernel: a guest's frame to the gateway MAC
for another guest's address reaches that guest as a router would send it (its MAC, the
gateway's as source, TTL / hop limit one less, IPv4 header checksum right) instead of
staying for the sender's router; everything else to the gateway MAC stays as before."""

from __future__ import annotations

import struct

import pytest

from tests.support.frames import GATEWAY_MAC, checksum, eth, ipv4, udp, udp6
from tests.virtqueue.test_switch import MAC_A, MAC_B, MAC_C, drain, send, waiting
from vhostnet.virtqueue import Switch
from vhostnet.virtqueue.switch import ROUTE6_SLOTS
from vhostnet.wire.offload import NEEDS_CSUM, vnet_word

IP_A, IP_B, IP_C = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 16]), bytes([10, 0, 2, 17])
IP6_A = bytes.fromhex("fd00000000000000000000000000000f")
IP6_B = bytes.fromhex("fd000000000000000000000000000010")
IP6_B_SLAAC = bytes.fromhex("fd000000000000005054fffe00000002")


def udp4_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, ttl: int = 64) -> bytes:
    return eth(dst_mac, src_mac, 0x0800,
               ipv4(src, dst, 17, udp(src, 4000, dst, 5000, b"routed?"), ttl=ttl))


def udp6_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, hops: int = 64) -> bytes:
    payload = udp6(src, 4000, dst, 5000, b"routed?")
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, hops, src, dst)
    return eth(dst_mac, src_mac, 0x86DD, header + payload)


@pytest.fixture
def switch() -> Switch:
    sw = Switch(4, GATEWAY_MAC)
    assert [sw.add_port() for _ in range(3)] == [0, 1, 2]
    sw.set_port_route(0, MAC_A, IP_A, [IP6_A])
    sw.set_port_route(1, MAC_B, IP_B, [IP6_B, IP6_B_SLAAC])
    return sw


def test_an_ipv4_frame_to_the_gateway_for_another_guest_is_routed_to_it(switch) -> None:
    sent = udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_B)
    assert send(switch, 0, sent) == []  # not for A's router
    [got] = waiting(switch, 1)
    assert waiting(switch, 2) == []  # routed, not flooded
    assert got[:6] == MAC_B and got[6:12] == GATEWAY_MAC
    assert got[14 + 8] == 63  # TTL
    assert checksum(got[14:34]) == 0  # the header checksum still sums to zero
    assert got[12:22] + got[23:24] + got[26:] == sent[12:22] + sent[23:24] + sent[26:]
    assert switch.counters()["switch.routed"] == 1


@pytest.mark.parametrize("address", [IP6_B, IP6_B_SLAAC])
def test_an_ipv6_frame_to_the_gateway_for_another_guest_is_routed_to_it(switch,
                                                                        address) -> None:
    sent = udp6_frame(GATEWAY_MAC, MAC_A, IP6_A, address)
    assert send(switch, 0, sent) == []
    [got] = waiting(switch, 1)
    assert got[:6] == MAC_B and got[6:12] == GATEWAY_MAC and got[14 + 7] == 63
    assert got[12:21] + got[22:] == sent[12:21] + sent[22:]


def test_a_partial_checksum_is_completed_for_a_port_without_offload(switch) -> None:
    sent = udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_B)
    # The guest left the UDP checksum to the device: the pseudo-header sum in its field.
    pseudo = struct.pack("!4s4sBBH", IP_A, IP_B, 0, 17, len(sent) - 34)
    partial = bytearray(sent)
    partial[40:42] = struct.pack("!H", 0xFFFF - checksum(pseudo))
    assert send(switch, 0, bytes(partial), vnets=(vnet_word(NEEDS_CSUM, 0, 0, 34, 6),)) == []
    [got] = waiting(switch, 1)
    assert got[40:42] == sent[40:42]  # completed: the same as the one computed whole


@pytest.mark.parametrize("kept", [
    udp4_frame(GATEWAY_MAC, MAC_A, IP_A, bytes([10, 0, 2, 2])),   # the gateway itself
    udp4_frame(GATEWAY_MAC, MAC_A, IP_A, bytes([93, 184, 216, 34])),  # the outside
    udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_A),                  # its own address
    udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_C),                  # a port without a route
    udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_B, ttl=1),           # would expire
    udp6_frame(GATEWAY_MAC, MAC_A, IP6_A, IP6_B, hops=1),
    eth(GATEWAY_MAC, MAC_A, 0x0800, bytes([0x45]) + bytes(8)),  # too short for IPv4
], ids=["gateway", "outside", "own", "no-route", "ttl1", "hops1", "short"])
def test_other_frames_to_the_gateway_stay_for_the_senders_router(switch, kept) -> None:
    assert send(switch, 0, kept) == [kept]
    assert waiting(switch, 1) == [] and waiting(switch, 2) == []
    assert switch.counters()["switch.routed"] == 0


def test_a_route_goes_with_its_port_and_can_be_withdrawn(switch) -> None:
    to_b = udp4_frame(GATEWAY_MAC, MAC_A, IP_A, IP_B)
    switch.set_port_route(1, None)
    assert send(switch, 0, to_b) == [to_b]
    switch.set_port_route(1, MAC_B, IP_B)
    assert send(switch, 0, to_b) == []
    drain(switch, 1)
    switch.remove_port(1)
    assert send(switch, 0, to_b) == [to_b]
    assert switch.add_port() == 1  # a new guest on the port: no route until it binds
    assert send(switch, 0, to_b) == [to_b]
    switch.set_port_route(2, MAC_C, IP_B)  # the address moved to the guest on port 2
    assert send(switch, 0, to_b) == []
    assert waiting(switch, 2)[0][:6] == MAC_C


def test_a_route_refuses_malformed_addresses(switch) -> None:
    with pytest.raises(ValueError):
        switch.set_port_route(1, MAC_B[:5], IP_B)
    with pytest.raises(ValueError):
        switch.set_port_route(1, MAC_B, IP_B[:3])
    with pytest.raises(ValueError):
        switch.set_port_route(1, MAC_B, IP_B, [IP6_B] * (ROUTE6_SLOTS + 1))
    with pytest.raises(ValueError):
        switch.set_port_route(3, MAC_B, IP_B)  # not in use
