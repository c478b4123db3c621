"""DHCPv4 server: every message type, every option, addressing, and garbage input."""

from __future__ import annotations

import struct

import pytest

from tests.support.dhcp import COOKIE, XID, ZERO, dhcp_request, msg_type, opt
from tests.support.frames import GUEST_MAC, guest_udp_frame, parse_udp_frame
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack

BROADCAST = b"\xff" * 4


def parse_reply(payload: bytes) -> tuple[bytes, dict[int, bytes], list[int]]:
    """(fixed part, options, option order) of a server reply."""
    assert payload[236:240] == COOKIE
    options: dict[int, bytes] = {}
    order: list[int] = []
    offset = 240
    while payload[offset] != 255:
        code, length = payload[offset], payload[offset + 1]
        options[code] = options.get(code, b"") + payload[offset + 2 : offset + 2 + length]
        order.append(code)
        offset += 2 + length
    assert all(b == 0 for b in payload[offset + 1 :])  # only padding after END
    return payload[:236], options, order


def exchange(stack: NetworkStack, message: bytes, src_ip: bytes = ZERO,
             dst_ip: bytes = BROADCAST) -> list[tuple[bytes, bytes, bytes, dict[int, bytes]]]:
    """Send ``message`` from the guest; return (dst_mac, dst_ip, fixed, options) per reply."""
    stack.receive_frame(guest_udp_frame(68, dst_ip, 67, message, src_ip=src_ip,
                                        dst_mac=b"\xff" * 6), now=100.0)
    replies = []
    while stack.frames_to_guest:
        frame = stack.frames_to_guest.popleft()
        src, sport, dst, dport, payload = parse_udp_frame(frame)
        assert (src, sport, dport) == (bytes([10, 0, 2, 2]), 67, 68)
        assert len(payload) >= 300
        fixed, options, _ = parse_reply(payload)
        replies.append((frame[:6], dst, fixed, options))
    return replies


@pytest.fixture
def stack() -> NetworkStack:
    return build_stack(StackConfig(hostname="guest1", search_domains=["example.test", "lab"]))


def test_discover_gets_offer_with_every_option(stack: NetworkStack) -> None:
    ((mac, dst, fixed, options),) = exchange(stack, dhcp_request(msg_type(1)))
    assert (mac, dst) == (b"\xff" * 6, BROADCAST)  # client has no address yet
    assert fixed[0] == 2 and struct.unpack("!I", fixed[4:8])[0] == XID
    assert fixed[16:20] == bytes([10, 0, 2, 15])  # yiaddr
    assert fixed[28:34] == GUEST_MAC
    assert options[53] == b"\x02"
    assert options[54] == bytes([10, 0, 2, 2])
    assert options[51] == struct.pack("!I", 86400)
    assert options[58] == struct.pack("!I", 43200)
    assert options[59] == struct.pack("!I", 75600)
    assert options[1] == bytes([255, 255, 255, 0])
    assert options[3] == bytes([10, 0, 2, 2])
    assert options[6] == bytes([10, 0, 2, 3])
    assert options[26] == struct.pack("!H", 1500)
    assert options[12] == b"guest1"
    assert options[15] == b"example.test"
    assert options[119] == b"\x07example\x04test\x00\x03lab\x00"
    assert 121 not in options and 66 not in options and 80 not in options
    assert stack.dhcp is not None and stack.dhcp.lease_holder is None  # an offer is no lease


def test_request_gets_ack_and_records_lease(stack: NetworkStack) -> None:
    request = dhcp_request(msg_type(3) + opt(50, bytes([10, 0, 2, 15])) + opt(54, bytes([10, 0, 2, 2])))
    ((_, _, fixed, options),) = exchange(stack, request)
    assert options[53] == b"\x05" and fixed[16:20] == bytes([10, 0, 2, 15])
    assert stack.dhcp.lease_holder == GUEST_MAC and stack.dhcp.lease_expiry == 100.0 + 86400


def test_renewing_client_gets_unicast_ack(stack: NetworkStack) -> None:
    guest = bytes([10, 0, 2, 15])
    ((mac, dst, fixed, options),) = exchange(stack, dhcp_request(msg_type(3), ciaddr=guest),
                                             src_ip=guest, dst_ip=bytes([10, 0, 2, 2]))
    assert (mac, dst) == (GUEST_MAC, guest)
    assert options[53] == b"\x05"


def test_broadcast_flag_forces_broadcast(stack: NetworkStack) -> None:
    guest = bytes([10, 0, 2, 15])
    ((mac, dst, fixed, _),) = exchange(stack, dhcp_request(msg_type(3), ciaddr=guest, flags=0x8000),
                                       src_ip=guest)
    assert (mac, dst) == (b"\xff" * 6, BROADCAST)
    assert fixed[10:12] == b"\x80\x00"  # flags echoed


def test_request_for_wrong_address_gets_nak(stack: NetworkStack) -> None:
    ((mac, dst, fixed, options),) = exchange(stack, dhcp_request(msg_type(3) + opt(50, bytes([10, 0, 2, 99]))))
    assert (mac, dst) == (b"\xff" * 6, BROADCAST)
    assert options == {53: b"\x06", 54: bytes([10, 0, 2, 2])}
    assert fixed[16:20] == ZERO
    assert stack.counters()["dhcp.nak"] == 1


def test_request_for_other_server_is_ignored(stack: NetworkStack) -> None:
    request = dhcp_request(msg_type(3) + opt(50, bytes([10, 0, 2, 15])) + opt(54, bytes([10, 0, 2, 1])))
    assert exchange(stack, request) == []
    assert stack.counters()["dhcp.ignored.other_server"] == 1


def test_inform_gets_ack_without_lease(stack: NetworkStack) -> None:
    guest = bytes([10, 0, 2, 15])
    ((mac, dst, fixed, options),) = exchange(stack, dhcp_request(msg_type(8), ciaddr=guest),
                                             src_ip=guest)
    assert (mac, dst) == (GUEST_MAC, guest)
    assert options[53] == b"\x05"
    assert fixed[16:20] == ZERO and fixed[12:16] == guest
    assert not {51, 58, 59} & options.keys()
    assert options[6] == bytes([10, 0, 2, 3])


@pytest.mark.parametrize(("kind", "counter"), [(7, "dhcp.release"), (4, "dhcp.decline")])
def test_release_and_decline_clear_lease_silently(stack: NetworkStack, kind: int, counter: str) -> None:
    exchange(stack, dhcp_request(msg_type(3) + opt(50, bytes([10, 0, 2, 15]))))
    assert stack.dhcp.lease_holder == GUEST_MAC
    assert exchange(stack, dhcp_request(msg_type(kind) + opt(54, bytes([10, 0, 2, 2])))) == []
    assert stack.dhcp.lease_holder is None
    assert stack.counters()[counter] == 1


def test_bootp_request_gets_bootreply(stack: NetworkStack) -> None:
    ((mac, _, fixed, options),) = exchange(stack, dhcp_request(b""))
    assert fixed[0] == 2 and fixed[16:20] == bytes([10, 0, 2, 15])
    assert 53 not in options and 51 not in options
    assert options[1] == bytes([255, 255, 255, 0]) and options[3] == bytes([10, 0, 2, 2])


def test_bootp_without_cookie_gets_bootreply(stack: NetworkStack) -> None:
    ((_, _, fixed, _),) = exchange(stack, dhcp_request(b"", cookie=bytes(4), end=False) + bytes(59))
    assert fixed[16:20] == bytes([10, 0, 2, 15])


def test_rapid_commit(stack: NetworkStack) -> None:
    ((_, _, _, options),) = exchange(stack, dhcp_request(msg_type(1) + opt(80, b"")))
    assert options[53] == b"\x05" and options[80] == b""
    assert stack.dhcp.lease_holder == GUEST_MAC


def test_bootfile_and_ipxe() -> None:
    stack = build_stack(StackConfig(bootfile="pxelinux.0", bootfile_ipxe="boot.ipxe"))
    ((_, _, fixed, options),) = exchange(stack, dhcp_request(msg_type(1)))
    assert fixed[20:24] == bytes([10, 0, 2, 2])  # siaddr: the TFTP server
    assert fixed[108:236].rstrip(b"\0") == b"pxelinux.0"
    assert options[66] == b"10.0.2.2" and options[67] == b"pxelinux.0"
    ((_, _, fixed, options),) = exchange(stack, dhcp_request(msg_type(1) + opt(77, b"iPXE")))
    assert options[67] == b"boot.ipxe" and fixed[108:236].rstrip(b"\0") == b"boot.ipxe"


def test_classless_routes_when_gateway_outside_subnet() -> None:
    config = StackConfig(guest_ipv4="10.0.2.15", netmask="255.255.255.255", gateway="10.0.2.2",
                         mtu=9000)
    ((_, _, _, options),) = exchange(build_stack(config), dhcp_request(msg_type(1)))
    assert options[121] == bytes([32, 10, 0, 2, 2, 0, 0, 0, 0, 0, 10, 0, 2, 2])
    assert options[26] == struct.pack("!H", 9000)


def test_long_search_list_is_split_into_pieces() -> None:
    domains = [f"d{i:02d}.example-with-a-long-label.test" for i in range(12)]
    stack = build_stack(StackConfig(search_domains=domains))
    stack.receive_frame(guest_udp_frame(68, BROADCAST, 67, dhcp_request(msg_type(1)),
                                        src_ip=ZERO, dst_mac=b"\xff" * 6), 0.0)
    _, _, _, _, payload = parse_udp_frame(stack.frames_to_guest.popleft())
    _, options, order = parse_reply(payload)
    assert order.count(119) >= 2
    assert options[119].count(b"\x04test\x00") == 12


@pytest.mark.parametrize(
    ("message", "counter"),
    [
        (dhcp_request(msg_type(1))[:200], "dhcp.drop.short"),
        (dhcp_request(msg_type(1), htype=6), "dhcp.drop.bad_hardware"),
        (dhcp_request(msg_type(1), op=2), "dhcp.drop.not_request"),
        (dhcp_request(msg_type(1) + b"\x0c\x20abc", end=False), "dhcp.drop.truncated_option"),
        (dhcp_request(msg_type(1) + b"\x0c", end=False), "dhcp.drop.truncated_option"),
        (dhcp_request(opt(53, b"\x01\x01")), "dhcp.drop.bad_option_length"),
        (dhcp_request(msg_type(3) + opt(50, b"\x0a\x00")), "dhcp.drop.bad_option_length"),
        (dhcp_request(msg_type(2)), "dhcp.drop.unexpected_type"),
        (dhcp_request(msg_type(200)), "dhcp.drop.unexpected_type"),
    ],
)
def test_garbage_is_dropped_and_counted(stack: NetworkStack, message: bytes, counter: str) -> None:
    assert exchange(stack, message) == []
    assert stack.counters()[counter] == 1


def test_dhcp_disabled() -> None:
    stack = build_stack(StackConfig(dhcp=False, udp=False))
    assert exchange(stack, dhcp_request(msg_type(1))) == []
    assert stack.counters()["udp.drop.disabled"] == 1
