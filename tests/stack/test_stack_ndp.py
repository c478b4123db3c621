"""IPv6 on the link: a Router Solicitation gets "no router here", everything else is dropped."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import GATEWAY_MAC, GUEST_MAC, eth
from tests.support.frames import checksum as plain_checksum
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.wire.ipv6 import link_local_address

GUEST_LINK_LOCAL = ipaddress.IPv6Address("fe80::5054:ff:fe12:3456").packed
ALL_ROUTERS = ipaddress.IPv6Address("ff02::2").packed
ALL_ROUTERS_MAC = bytes.fromhex("333300000002")


def icmpv6(src: bytes, dst: bytes, message: bytes) -> bytes:
    pseudo = src + dst + struct.pack("!I3xB", len(message), 58)
    checksum = plain_checksum(pseudo + message)
    return message[:2] + struct.pack("!H", checksum) + message[4:]


def ipv6_frame(src: bytes, dst: bytes, payload: bytes, hop_limit: int = 255,
               next_header: int = 58, dst_mac: bytes = ALL_ROUTERS_MAC) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, src, dst)
    return eth(dst_mac, GUEST_MAC, 0x86DD, header + payload)


def solicitation(src: bytes = GUEST_LINK_LOCAL) -> bytes:
    message = struct.pack("!BBHI", 133, 0, 0, 0)
    if src != bytes(16):
        message += struct.pack("!BB6s", 1, 1, GUEST_MAC)
    return icmpv6(src, ALL_ROUTERS, message)


def test_link_local_address_is_modified_eui64() -> None:
    address = link_local_address(bytes.fromhex("525600000002"))
    assert ipaddress.IPv6Address(address) == ipaddress.IPv6Address("fe80::5056:ff:fe00:2")


def test_router_solicitation_gets_a_no_router_advertisement() -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    (frame,) = stack.frames_to_guest
    assert frame[:12] == GUEST_MAC + GATEWAY_MAC and frame[12:14] == b"\x86\xdd"
    first_word, length, next_header, hop_limit, src, dst = struct.unpack_from("!IHBB16s16s", frame, 14)
    assert first_word >> 28 == 6 and next_header == 58 and hop_limit == 255
    assert src == link_local_address(GATEWAY_MAC) and dst == GUEST_LINK_LOCAL
    message = frame[54:]
    assert len(message) == length == 16 + 8
    pseudo = src + dst + struct.pack("!I3xB", length, 58)
    assert plain_checksum(pseudo + message) == 0
    kind, code, _, cur_hop, flags, lifetime, reachable, retrans = struct.unpack_from("!BBHBBHII", message)
    assert (kind, code, cur_hop, flags, lifetime, reachable, retrans) == (134, 0, 0, 0, 0, 0, 0)
    assert message[16:] == b"\x01\x01" + GATEWAY_MAC
    assert stack.counters()["ndp.router_advertisement"] == 1


def test_solicitation_from_the_unspecified_address_is_answered_to_all_nodes() -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(ipv6_frame(bytes(16), ALL_ROUTERS, solicitation(bytes(16))), now=0.0)
    (frame,) = stack.frames_to_guest
    assert frame[:6] == bytes.fromhex("333300000001")
    assert frame[14 + 24:14 + 40] == ipaddress.IPv6Address("ff02::1").packed


@pytest.mark.parametrize("frame", [
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation(), hop_limit=64),  # crossed a router
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()[:2] + b"\0\0" + solicitation()[4:]),
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation(), next_header=17),
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation())[:60],  # truncated
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, icmpv6(GUEST_LINK_LOCAL, ALL_ROUTERS,
                                                     struct.pack("!BBHI", 135, 0, 0, 0) + bytes(16))),
    eth(ALL_ROUTERS_MAC, GUEST_MAC, 0x86DD, b"\x45" + bytes(60)),  # IPv4 inside an IPv6 frame
])
def test_other_ipv6_is_dropped_and_counted(frame: bytes) -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(frame, now=0.0)
    assert not stack.frames_to_guest
    assert stack.counters()["eth.drop.ipv6"] == 1
