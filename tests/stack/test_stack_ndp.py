"""NDP and Router Advertisements on the guest link (RFC 4861, RFC 8106), through the stack."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import (
    ALL_ROUTERS,
    GATEWAY_MAC,
    GUEST_LINK_LOCAL,
    GUEST_MAC,
    arp_request,
    eth,
    icmpv6,
    ipv6_frame,
    parse_ipv6_frame,
)
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.wire.ipv6 import link_local_address


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


GATEWAY_LL = link_local_address(GATEWAY_MAC)
ALL_NODES = ip6("ff02::1")
UNSPECIFIED = bytes(16)


def solicitation(src: bytes = GUEST_LINK_LOCAL) -> bytes:
    message = struct.pack("!BBHI", 133, 0, 0, 0)
    if src != UNSPECIFIED:
        message += struct.pack("!BB6s", 1, 1, GUEST_MAC)
    return icmpv6(src, ALL_ROUTERS, message)


def neighbor_solicitation(target: bytes, src: bytes = GUEST_LINK_LOCAL) -> bytes:
    group = ip6("ff02::1:ff00:0")[:13] + target[13:]
    message = struct.pack("!BBHI16s", 135, 0, 0, 0, target)
    if src != UNSPECIFIED:
        message += struct.pack("!BB6s", 1, 1, GUEST_MAC)
    mac = bytes.fromhex("3333") + group[12:]
    return ipv6_frame(src, group, icmpv6(src, group, message), dst_mac=mac)


def options(data: bytes) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    while data:
        kind, units = data[0], data[1]
        assert units
        found.setdefault(kind, []).append(data[2:units * 8])
        data = data[units * 8:]
    return found


def advertisement(stack: NetworkStack) -> tuple[bytes, bytes, bytes]:
    """(destination, flags and lifetime part, options) of the one RA the stack queued."""
    (frame,) = stack.frames_to_guest
    src, dst, next_header, hop_limit, message = parse_ipv6_frame(frame)
    assert (src, next_header, hop_limit) == (GATEWAY_LL, 58, 255)
    assert frame[6:12] == GATEWAY_MAC
    assert message[:2] == b"\x86\x00"
    return dst, message[4:16], message[16:]


def test_router_solicitation_gets_the_prefix_mtu_and_dns() -> None:
    stack = build_stack(StackConfig(search_domains=["example.org"], mtu=1400))
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    dst, fixed, rest = advertisement(stack)
    assert dst == GUEST_LINK_LOCAL and stack.frames_to_guest[0][:6] == GUEST_MAC
    hop, flags, lifetime, _reachable, _retrans = struct.unpack("!BBHII", fixed)
    assert hop == 64 and lifetime > 0
    assert flags == 0x40  # O: DHCPv6 has DNS; no M: the address comes from SLAAC
    found = options(rest)
    assert found[1] == [GATEWAY_MAC]
    assert struct.unpack("!2xI", found[5][0]) == (1400,)
    length, prefix_flags, valid, preferred, prefix = struct.unpack("!BBII4x16s", found[3][0])
    assert (length, prefix_flags, prefix) == (64, 0xC0, ip6("fec0::"))
    assert valid >= preferred > 0
    rdnss_lifetime, server = struct.unpack("!2xI16s", found[25][0])
    assert server == ip6("fec0::3") and rdnss_lifetime > 0
    assert found[31][0][6:].startswith(b"\x07example\x03org\x00")
    assert stack.counters()["ndp.router_advertisement"] == 1


def test_managed_flag_when_dhcpv6_gives_the_address() -> None:
    stack = build_stack(StackConfig(guest_ipv6="2001:db8::15", prefix6="2001:db8::"))
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    _, fixed, rest = advertisement(stack)
    assert fixed[1] == 0xC0
    assert options(rest)[3][0][14:30] == ip6("2001:db8::")


def test_solicitation_from_the_unspecified_address_is_answered_to_all_nodes() -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(ipv6_frame(UNSPECIFIED, ALL_ROUTERS, solicitation(UNSPECIFIED)), now=0.0)
    dst, _, _ = advertisement(stack)
    assert dst == ALL_NODES and stack.frames_to_guest[0][:6] == bytes.fromhex("333300000001")


def test_advertisements_repeat_every_interval() -> None:
    stack = build_stack(StackConfig(ra_interval=30.0))
    assert stack.ndp is not None
    stack.ndp.poll_timers(100.0)  # starts the schedule
    assert not stack.frames_to_guest and stack.ndp.next_timer() == 130.0
    stack.ndp.poll_timers(129.0)
    assert not stack.frames_to_guest
    stack.ndp.poll_timers(130.0)
    dst, _, _ = advertisement(stack)
    assert dst == ALL_NODES and stack.ndp.next_timer() == 160.0


@pytest.mark.parametrize("frame", [
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation(), hop_limit=64),  # crossed a router
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()[:2] + b"\0\0" + solicitation()[4:]),
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation(), next_header=17),
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation())[:60],  # truncated
    ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS,  # an option of length 0
               icmpv6(GUEST_LINK_LOCAL, ALL_ROUTERS, struct.pack("!BBHI", 133, 0, 0, 0) + bytes(8))),
    eth(bytes.fromhex("333300000002"), GUEST_MAC, 0x86DD, b"\x45" + bytes(60)),  # IPv4 inside
])
def test_bad_solicitations_are_dropped_and_counted(frame: bytes) -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(frame, now=0.0)
    assert not stack.frames_to_guest
    assert any(name.split(".")[1] == "drop" for name in stack.counters())


def test_no_ra_leaves_solicitations_unanswered() -> None:
    stack = build_stack(StackConfig(ra=False))
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    assert not stack.frames_to_guest
    assert stack.counters()["ndp.drop.ra_off"] == 1


def test_ipv4_only_drops_every_ipv6_frame() -> None:
    stack = build_stack(StackConfig(ipv6=False))
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    stack.receive_frame(neighbor_solicitation(ip6("fec0::2")), now=0.0)
    assert not stack.frames_to_guest and stack.ndp is None and stack.dhcpv6 is None
    assert stack.counters()["eth.drop.ipv6"] == 2


def test_ipv6_only_drops_arp_and_serves_no_dhcpv4() -> None:
    stack = build_stack(StackConfig(ipv4=False))
    stack.receive_frame(arp_request(bytes([10, 0, 2, 2])), now=0.0)
    assert not stack.frames_to_guest and stack.dhcp is None
    assert stack.counters()["eth.drop.ipv4"] == 1


def neighbor_advertisement_for(stack: NetworkStack, target: bytes) -> tuple[bytes, int]:
    (frame,) = stack.frames_to_guest
    src, dst, _, hop_limit, message = parse_ipv6_frame(frame)
    assert message[0] == 136 and hop_limit == 255 and src == target
    flags, answered = struct.unpack_from("!I16s", message, 4)
    assert answered == target
    assert options(message[24:])[2] == [GATEWAY_MAC]
    return dst, flags


@pytest.mark.parametrize("target", ["fec0::2", "fec0::3", "fec0::1234", "fe80::99"])
def test_neighbor_solicitations_for_on_link_addresses_are_answered(target: str) -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(neighbor_solicitation(ip6(target)), now=0.0)
    dst, flags = neighbor_advertisement_for(stack, ip6(target))
    assert dst == GUEST_LINK_LOCAL and stack.frames_to_guest[0][:6] == GUEST_MAC
    assert flags == 0xE0000000  # router, solicited, override


def test_gateway_link_local_address_is_answered() -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(neighbor_solicitation(GATEWAY_LL), now=0.0)
    neighbor_advertisement_for(stack, GATEWAY_LL)


def test_duplicate_address_detection_passes_and_teaches_the_guest_address() -> None:
    stack = build_stack(StackConfig())
    guest = ip6("fec0::5054:ff:fe12:3456")
    stack.receive_frame(neighbor_solicitation(guest, src=UNSPECIFIED), now=0.0)
    assert not stack.frames_to_guest
    assert stack.guest_ipv6 == guest and stack.guest_mac == GUEST_MAC
    # From now on it is the guest's: solicitations for it stay unanswered.
    stack.receive_frame(neighbor_solicitation(guest), now=0.0)
    assert not stack.frames_to_guest
    assert stack.counters()["ndp.ignored"] == 1


def test_duplicate_address_detection_of_our_address_is_defended() -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(neighbor_solicitation(ip6("fec0::2"), src=UNSPECIFIED), now=0.0)
    dst, flags = neighbor_advertisement_for(stack, ip6("fec0::2"))
    assert dst == ALL_NODES and not flags & 0x40000000


def test_configured_guest_address_is_never_answered() -> None:
    stack = build_stack(StackConfig(guest_ipv6="fec0::15"))
    stack.receive_frame(neighbor_solicitation(ip6("fec0::15")), now=0.0)
    assert not stack.frames_to_guest


def test_no_ndp_leaves_neighbor_solicitations_unanswered() -> None:
    stack = build_stack(StackConfig(ndp=False))
    stack.receive_frame(neighbor_solicitation(ip6("fec0::2")), now=0.0)
    assert not stack.frames_to_guest


def test_neighbor_advertisement_from_the_guest_is_learned() -> None:
    stack = build_stack(StackConfig())
    guest = ip6("fec0::77")
    message = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, guest) + b"\x02\x01" + GUEST_MAC
    stack.receive_frame(ipv6_frame(guest, ALL_NODES, icmpv6(guest, ALL_NODES, message),
                                   dst_mac=bytes.fromhex("333300000001")), now=0.0)
    assert stack.guest_ipv6 == guest and stack.is_guest_ipv6(guest)
    assert stack.counters()["ndp.learned"] == 1


def test_packets_for_an_unknown_guest_are_held_and_the_guest_solicited() -> None:
    stack = build_stack(StackConfig())
    guest = ip6("fec0::15")
    stack.send_ipv6(ip6("fec0::2"), guest, 59, b"")
    (frame,) = stack.frames_to_guest
    src, dst, _, _, message = parse_ipv6_frame(frame)
    assert frame[:6] == bytes.fromhex("3333ff000015") and dst == ip6("ff02::1:ff00:15")
    assert src == GATEWAY_LL and message[0] == 135 and message[8:24] == guest
    stack.frames_to_guest.clear()
    stack.receive_frame(neighbor_solicitation(ip6("fec0::2"), src=guest), now=0.0)
    held, answer = stack.frames_to_guest
    assert held[:6] == GUEST_MAC and parse_ipv6_frame(held)[1] == guest
    assert parse_ipv6_frame(answer)[4][0] == 136
