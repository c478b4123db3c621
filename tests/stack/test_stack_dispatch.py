"""NetworkStack: ARP answers, learning, ICMP echo to the gateway, drops counted."""

from __future__ import annotations

import struct

import pytest

from tests.support.frames import (
    BROADCAST,
    DNS_IP,
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    arp_request,
    checksum,
    eth,
    guest_ipv4_frame,
    icmp_echo,
)
from tests.support.stack import poll_timers
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.wire.ipv4 import IPv4Packet


@pytest.fixture
def stack() -> NetworkStack:
    return build_stack(StackConfig())


def test_arp_request_for_gateway_gets_exact_reply(stack: NetworkStack) -> None:
    stack.receive_frame(arp_request(GATEWAY_IP), now=0.0)
    expected = (GUEST_MAC + GATEWAY_MAC + b"\x08\x06"
                + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
                + GATEWAY_MAC + GATEWAY_IP + GUEST_MAC + GUEST_IP)
    assert list(stack.frames_to_guest) == [expected]
    assert stack.counters()["arp.reply"] == 1
    assert stack.guest_mac == GUEST_MAC and stack.guest_ipv4 == GUEST_IP


@pytest.mark.parametrize("target", [DNS_IP, bytes([10, 0, 2, 77])])
def test_arp_answered_for_dns_and_other_subnet_addresses(stack: NetworkStack, target: bytes) -> None:
    stack.receive_frame(arp_request(target), now=0.0)
    (reply,) = stack.frames_to_guest
    assert reply[22:28] == GATEWAY_MAC and reply[28:32] == target


@pytest.mark.parametrize("target", [GUEST_IP, bytes([10, 0, 3, 1]), bytes([10, 0, 2, 255]),
                                    bytes([10, 0, 2, 0])])
def test_arp_not_answered_for_own_outside_or_broadcast(stack: NetworkStack, target: bytes) -> None:
    stack.receive_frame(arp_request(target, sender_ip=bytes(4)), now=0.0)
    assert not stack.frames_to_guest
    assert stack.counters()["arp.ignored"] == 1


def test_arp_reply_from_guest_is_only_learned(stack: NetworkStack) -> None:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, GUEST_MAC, bytes([10, 0, 2, 20]),
                       GATEWAY_MAC, GATEWAY_IP)
    stack.receive_frame(eth(GATEWAY_MAC, GUEST_MAC, 0x0806, body), now=0.0)
    assert not stack.frames_to_guest
    assert stack.guest_ipv4 == bytes([10, 0, 2, 20])
    assert stack.counters()["arp.learned"] == 1


def test_ping_gateway_is_answered_locally(stack: NetworkStack) -> None:
    stack.receive_frame(guest_ipv4_frame(GATEWAY_IP, 1, icmp_echo(8, 0x77, 3, b"abcdefgh")), 1.0)
    (reply,) = stack.frames_to_guest
    assert reply[:12] == GUEST_MAC + GATEWAY_MAC
    ip = reply[14:]
    assert checksum(ip[:20]) == 0
    assert ip[9] == 1 and ip[12:16] == GATEWAY_IP and ip[16:20] == GUEST_IP
    assert ip[20:] == icmp_echo(0, 0x77, 3, b"abcdefgh")


def test_ping_to_the_mapped_loopback_address_is_answered_locally() -> None:
    mapped = bytes([10, 0, 2, 100])
    stack = build_stack(StackConfig(map_host_loopback=mapped))
    stack.receive_frame(arp_request(mapped), now=0.0)
    stack.receive_frame(guest_ipv4_frame(mapped, 1, icmp_echo(8, 0x78, 4, b"loop")), 1.0)
    arp_reply, echo_reply = stack.frames_to_guest
    assert arp_reply[28:32] == mapped
    assert echo_reply[14 + 12:14 + 16] == mapped
    assert echo_reply[14 + 20:] == icmp_echo(0, 0x78, 4, b"loop")
    assert stack.counters()["icmp.echo.local"] == 1


def test_ping_disabled_with_icmp_false() -> None:
    stack = build_stack(StackConfig(icmp=False))
    stack.receive_frame(guest_ipv4_frame(GATEWAY_IP, 1, icmp_echo(8, 1, 1, b"")), 0.0)
    assert not stack.frames_to_guest
    assert stack.counters()["ipv4.drop.proto"] == 1


def test_ping_beyond_gateway_queues_host_commands(stack: NetworkStack) -> None:
    from vhostnet.stack.icmp import IcmpEchoSend, IcmpOpen

    stack.receive_frame(guest_ipv4_frame(bytes([192, 0, 2, 1]), 1, icmp_echo(8, 5, 1, b"x")), 0.0)
    stack.receive_frame(guest_ipv4_frame(bytes([192, 0, 2, 1]), 1, icmp_echo(8, 5, 2, b"y")), 0.0)
    assert stack.icmp is not None
    open_command, first, second = stack.icmp.commands
    assert open_command == IcmpOpen(1, "192.0.2.1")
    assert first == IcmpEchoSend(1, 1, b"x") and second == IcmpEchoSend(1, 2, b"y")
    # The host's reply carries the kernel's identifier; the guest gets its own back.
    stack.icmp.on_echo_reply(1, icmp_echo(0, 0x9999, 2, b"y"), 0.5)
    (reply,) = stack.frames_to_guest
    assert reply[14 + 12:14 + 16] == bytes([192, 0, 2, 1])
    assert reply[14 + 20:] == icmp_echo(0, 5, 2, b"y")
    poll_timers(stack, 1000.0)
    assert stack.icmp.flow_count() == 0


@pytest.mark.parametrize(
    ("frame", "counter"),
    [
        (b"\x00" * 10, "eth.drop.short"),
        (eth(GATEWAY_MAC, GUEST_MAC, 0x86DD, b"\x60" + b"\0" * 39), "ipv6.drop.truncated_extension"),
        (eth(BROADCAST, GUEST_MAC, 0x88CC, b"lldp"), "eth.drop.ethertype"),
        (eth(BROADCAST, BROADCAST, 0x0800, b""), "eth.drop.bad_src"),
        (eth(bytes.fromhex("020000000099"), GUEST_MAC, 0x0800, b""), "eth.drop.not_for_us"),
        (guest_ipv4_frame(GATEWAY_IP, 1, b"12345678", bad_checksum=True), "ipv4.drop.bad_checksum"),
        (guest_ipv4_frame(GATEWAY_IP, 1, b"12345678", ihl=4), "ipv4.drop.bad_ihl"),
        (guest_ipv4_frame(GATEWAY_IP, 1, b"1234567", flags_fragment=0x2001), "frag.drop.bad_length"),
        (guest_ipv4_frame(GATEWAY_IP, 1, b"1234", total_length=60), "ipv4.drop.bad_length"),
        (eth(GATEWAY_MAC, GUEST_MAC, 0x0800, b"\x45\0\0"), "ipv4.drop.short"),
        (guest_ipv4_frame(GATEWAY_IP, 47, b"gre"), "ipv4.drop.proto"),
        (guest_ipv4_frame(GATEWAY_IP, 1, b"\x08\0\0\0"), "icmp.drop.short"),
        (guest_ipv4_frame(GATEWAY_IP, 17, b"\0\1\0\2\0\x20\0\0"), "udp.drop.bad_length"),
        (eth(BROADCAST, GUEST_MAC, 0x0806, b"\0\1\x08\0\6\4"), "arp.drop.short"),
    ],
)
def test_malformed_frames_are_counted_and_dropped(stack: NetworkStack, frame: bytes,
                                                  counter: str) -> None:
    stack.receive_frame(frame, now=0.0)
    assert not stack.frames_to_guest
    assert stack.counters()[counter] == 1


def test_protocol_handler_receives_checked_packet(stack: NetworkStack) -> None:
    seen: list[IPv4Packet] = []

    class Recorder:
        def handle_ipv4(self, packet: IPv4Packet, now: float) -> None:
            seen.append(packet)

    stack.set_protocol_handler(6, Recorder())
    stack.receive_frame(guest_ipv4_frame(bytes([192, 0, 2, 9]), 6, b"segment", ttl=9), 2.0)
    (packet,) = seen
    assert (packet.src, packet.dst, packet.proto, packet.ttl) == (GUEST_IP, bytes([192, 0, 2, 9]), 6, 9)
    assert bytes(packet.payload) == b"segment"


def test_handler_exception_is_contained(stack: NetworkStack) -> None:
    class Broken:
        def handle_ipv4(self, packet: IPv4Packet, now: float) -> None:
            raise RuntimeError("bug")

    stack.set_protocol_handler(6, Broken())
    stack.receive_frame(guest_ipv4_frame(GATEWAY_IP, 6, b"x"), 0.0)
    assert stack.counters()["stack.drop.internal_error"] == 1


def test_send_ipv4_before_guest_mac_goes_to_broadcast_and_asks_by_arp(stack: NetworkStack) -> None:
    """A statically configured guest may be silent when a forwarded port gets traffic:
    the packet leaves at once to the broadcast address (as passt sends it), after an ARP
    request for the guest's address."""
    stack.send_ipv4(GATEWAY_IP, GUEST_IP, 17, b"payload", ttl=5)
    request, frame = stack.frames_to_guest
    assert request[:14] == BROADCAST + GATEWAY_MAC + b"\x08\x06"
    assert request[14:] == (struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
                            + GATEWAY_MAC + GATEWAY_IP + b"\0" * 6 + GUEST_IP)
    assert frame[:14] == BROADCAST + GATEWAY_MAC + b"\x08\x00"
    assert checksum(frame[14:34]) == 0
    packet = IPv4Packet(frame[14:])
    assert (packet.src, packet.dst, packet.proto, packet.ttl) == (GATEWAY_IP, GUEST_IP, 17, 5)
    assert bytes(packet.payload) == b"payload"
    counters = stack.counters()
    assert counters["ipv4.tx.broadcast"] == 1 and counters["arp.request_sent"] == 1


def test_learned_mac_replaces_broadcast_at_once(stack: NetworkStack) -> None:
    from vhostnet.stack.to_guest import ARP_ASK_EVERY

    for _ in range(2 * ARP_ASK_EVERY):
        stack.send_ipv4(GATEWAY_IP, GUEST_IP, 17, b"x")
    frames = list(stack.frames_to_guest)
    # nothing is held or dropped: every packet left, with an ARP request every few
    assert len(frames) == 2 * ARP_ASK_EVERY + 2
    assert all(f[:6] == BROADCAST for f in frames)
    assert [f[12:14] for f in frames].count(b"\x08\x06") == 2
    assert stack.counters()["ipv4.tx.broadcast"] == 2 * ARP_ASK_EVERY
    reply = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, GUEST_MAC, GUEST_IP,
                        GATEWAY_MAC, GATEWAY_IP)
    stack.receive_frame(eth(GATEWAY_MAC, GUEST_MAC, 0x0806, reply), 0.0)
    stack.frames_to_guest.clear()  # the learned MAC does not resend what already left
    stack.send_ipv4(GATEWAY_IP, GUEST_IP, 17, b"y")
    (frame,) = stack.frames_to_guest
    assert frame[:12] == GUEST_MAC + GATEWAY_MAC
    assert stack.counters()["ipv4.tx.broadcast"] == 2 * ARP_ASK_EVERY


def test_ipv6_held_for_the_mac_leaves_with_the_first_ipv4_frame_after_a_restore() -> None:
    # restore_guest sets the MAC without sending what waits for it; the guest's next frame
    # from that very MAC and address (nothing new to learn) still lets the held packet go.
    stack = build_stack(StackConfig(ipv6=True))
    guest6 = bytes.fromhex("fd00000000000000000000000000000f")
    stack.send_ipv6(stack.config.gateway6, guest6, 17, b"held")
    held = [f for f in stack.frames_to_guest if f[12:14] == b"\x86\xdd" and f.endswith(b"held")]
    assert not held  # no MAC yet: held (a neighbour solicitation may have gone instead)
    stack.restore_guest(GUEST_MAC, GUEST_IP)
    stack.frames_to_guest.clear()
    stack.receive_frame(guest_ipv4_frame(GATEWAY_IP, 200, b"x"), now=0.0)  # no handler
    (frame,) = stack.frames_to_guest
    assert frame[:12] == GUEST_MAC + GATEWAY_MAC and frame.endswith(b"held")
