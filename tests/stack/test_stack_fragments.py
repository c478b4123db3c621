"""Fragments through the whole stack: the guest's fragments reassembled and dispatched
(UDP NAT, ICMP echo to the gateway), and what we send the guest fragmented to its MTU."""

from __future__ import annotations

import struct

import pytest

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    arp_request,
    checksum,
    eth,
    icmp_echo,
    ipv4,
    udp,
)
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.stack.fragments import Reassembler
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.udp_nat import UdpOpen, UdpSend
from vhostnet.wire.ipv4 import IPv4Packet

REMOTE = bytes([192, 0, 2, 10])
MTU = 1500


def guest_fragments(dst: bytes, proto: int, payload: bytes, ident: int,
                    step: int = 1480) -> list[bytes]:
    """The guest's fragments of ``payload``, as its kernel would cut them (test helper)."""
    frames = []
    for start in range(0, len(payload), step):
        more = 0x2000 if start + step < len(payload) else 0
        packet = ipv4(GUEST_IP, dst, proto, payload[start:start + step],
                      flags_fragment=more | start // 8, ident=ident)
        frames.append(eth(GATEWAY_MAC, GUEST_MAC, 0x0800, packet))
    return frames


def reassemble(frames: list[bytes], dst_mac: bytes = GUEST_MAC) -> IPv4Packet:
    """Our fragments for the guest, checked one by one and put back together by the
    reassembler (its own tests make it a trustworthy judge)."""
    reassembler = Reassembler(Counters())
    whole = None
    for frame in frames:
        assert frame[:12] == dst_mac + GATEWAY_MAC and frame[12:14] == b"\x08\x00"
        assert len(frame) - 14 <= MTU
        assert checksum(frame[14:34]) == 0
        flags_fragment = struct.unpack_from("!H", frame, 14 + 6)[0]
        assert not flags_fragment & 0x4000, "DF set on a fragment"
        whole = reassembler.add_ipv4(IPv4Packet(frame[14:], allow_fragments=True), 0.0)
    assert whole is not None, "the fragments do not make a whole datagram"
    return IPv4Packet(whole)


@pytest.fixture
def stack() -> NetworkStack:
    stack = build_stack(StackConfig(mtu=MTU))
    stack.receive_frame(arp_request(GATEWAY_IP), 0.0)  # the guest's MAC is known
    stack.frames_to_guest.clear()
    return stack


def test_fragmented_udp_from_the_guest_reaches_the_nat_whole(stack: NetworkStack) -> None:
    body = bytes(range(256)) * 15 + b"4000-byte datagram!!"[:40]
    for frame in guest_fragments(REMOTE, 17, udp(GUEST_IP, 4000, REMOTE, 7, body), ident=77):
        stack.receive_frame(frame, 1.0)
    assert stack.udp_nat is not None
    assert list(stack.udp_nat.commands) == [UdpOpen(1, "192.0.2.10", 7), UdpSend(1, body)]
    counters = stack.counters()
    assert counters["frag.reassembled"] == 1 and counters["frag.rx"] == 3
    assert counters["ipv4.rx"] == 3 and counters["udp.rx"] == 1


def test_large_udp_for_the_guest_leaves_in_fragments(stack: NetworkStack) -> None:
    body = bytes(range(251)) * 16  # 4016 bytes
    stack.send_udp(REMOTE, 7, GUEST_IP, 4000, body)
    stack.send_udp(REMOTE, 7, GUEST_IP, 4000, body)
    frames = list(stack.frames_to_guest)
    assert len(frames) == 6
    first, second = reassemble(frames[:3]), reassemble(frames[3:])
    assert first.ident != second.ident, "each datagram needs its own identification"
    assert bytes(first.payload) == udp(REMOTE, 7, GUEST_IP, 4000, body)
    counters = stack.counters()
    assert counters["frag.tx_datagrams"] == 2 and counters["frag.tx_fragments"] == 6
    assert counters["ipv4.tx"] == 6


def test_small_packets_still_leave_whole_with_df(stack: NetworkStack) -> None:
    stack.send_udp(REMOTE, 7, GUEST_IP, 4000, bytes(MTU - 28))
    (frame,) = stack.frames_to_guest
    assert struct.unpack_from("!H", frame, 14 + 6)[0] == 0x4000
    assert "frag.tx_datagrams" not in stack.counters()


def test_too_large_for_ipv4_is_dropped_and_counted(stack: NetworkStack) -> None:
    stack.send_ipv4(REMOTE, GUEST_IP, 17, bytes(65516))
    assert not stack.frames_to_guest
    assert stack.counters()["ipv4.tx.drop.too_big"] == 1


def test_fragments_for_an_unknown_mac_all_go_to_the_broadcast_address() -> None:
    stack = build_stack(StackConfig(mtu=MTU))
    stack.send_udp(REMOTE, 7, GUEST_IP, 4000, bytes(3000))
    arp = [f for f in stack.frames_to_guest if f[12:14] == b"\x08\x06"]
    frames = [f for f in stack.frames_to_guest if f[12:14] == b"\x08\x00"]
    assert len(arp) == 1 and len(frames) == 3  # one ARP probe, then the datagram's fragments
    assert bytes(reassemble(frames, dst_mac=b"\xff" * 6).payload)[8:] == bytes(3000)


def test_large_echo_to_the_gateway_is_reassembled_and_answered_in_fragments(
        stack: NetworkStack) -> None:
    """ping -s 3000: 3008 bytes of ICMP, in three fragments each way."""
    body = bytes(range(256)) * 11 + bytes(184)  # 3000 bytes
    for frame in guest_fragments(GATEWAY_IP, 1, icmp_echo(8, 0x77, 3, body), ident=0x99):
        stack.receive_frame(frame, 1.0)
    frames = list(stack.frames_to_guest)
    assert len(frames) == 3
    reply = reassemble(frames)
    assert (reply.src, reply.dst, reply.proto) == (GATEWAY_IP, GUEST_IP, 1)
    assert bytes(reply.payload) == icmp_echo(0, 0x77, 3, body)
    assert stack.counters()["icmp.echo.local"] == 1


def test_hostile_fragments_through_the_stack_are_counted(stack: NetworkStack) -> None:
    datagram = udp(GUEST_IP, 4000, REMOTE, 7, bytes(3000))
    first, second, third = guest_fragments(REMOTE, 17, datagram, ident=5)
    overlapping = guest_fragments(REMOTE, 17, datagram, ident=5, step=1472)[1]
    for frame in (first, overlapping, second, third):
        stack.receive_frame(frame, 1.0)
    counters = stack.counters()
    assert counters["frag.drop.overlap"] == 1
    assert "frag.reassembled" not in counters and not stack.udp_nat.commands
    assert "stack.drop.internal_error" not in counters
