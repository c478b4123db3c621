"""DHCPv6 (RFC 8415) through the stack: stateful with -a, stateless (SLAAC) without."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import (
    GATEWAY_MAC,
    GUEST_LINK_LOCAL,
    GUEST_MAC,
    ipv6_frame,
    parse_ipv6_frame,
    udp6,
)
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.wire.dhcpv6 import Dhcpv6Message, parse_ia_na
from vhostnet.wire.ipv6 import link_local_address


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


ALL_SERVERS = ip6("ff02::1:2")
CLIENT_DUID = struct.pack("!HH6s", 3, 1, GUEST_MAC)
SERVER_DUID = struct.pack("!HH6s", 3, 1, GATEWAY_MAC)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def ia_na(iaid: int = 7, addresses: tuple[bytes, ...] = ()) -> bytes:
    inner = b"".join(option(5, a + struct.pack("!II", 0, 0)) for a in addresses)
    return option(3, struct.pack("!III", iaid, 0, 0) + inner)


def message(kind: int, *options: bytes, xid: int = 0x123456) -> bytes:
    return bytes((kind,)) + xid.to_bytes(3, "big") + b"".join(options)


def exchange(stack: NetworkStack, payload: bytes) -> Dhcpv6Message | None:
    stack.frames_to_guest.clear()
    datagram = udp6(GUEST_LINK_LOCAL, 546, ALL_SERVERS, 547, payload)
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_SERVERS, datagram, hop_limit=1,
                                   next_header=17, dst_mac=bytes.fromhex("333300010002")), 0.0)
    if not stack.frames_to_guest:
        return None
    (frame,) = stack.frames_to_guest
    assert frame[:6] == GUEST_MAC
    src, dst, next_header, _, segment = parse_ipv6_frame(frame)
    assert (src, dst, next_header) == (link_local_address(GATEWAY_MAC), GUEST_LINK_LOCAL, 17)
    assert struct.unpack_from("!HH", segment) == (547, 546)
    reply = Dhcpv6Message.parse(segment[8:])
    assert reply.xid == 0x123456
    return reply


@pytest.fixture
def stateful() -> NetworkStack:
    return build_stack(StackConfig(guest_ipv6="2001:db8::15", prefix6="2001:db8::",
                                   dns6="2001:db8::3", search_domains=["example.org"]))


def assigned(reply: Dhcpv6Message) -> list[bytes]:
    return [a for ia in reply.ia_nas() for a in ia.addresses]


def test_solicit_advertise_request_reply(stateful: NetworkStack) -> None:
    advertise = exchange(stateful, message(1, option(1, CLIENT_DUID), ia_na(),
                                           option(6, b"\x00\x17\x00\x18")))
    assert advertise is not None and advertise.msg_type == 2
    assert advertise.get(2) == SERVER_DUID and advertise.get(1) == CLIENT_DUID
    assert advertise.get(7) == b"\xff"
    assert assigned(advertise) == [ip6("2001:db8::15")]
    assert advertise.get(23) == ip6("2001:db8::3")
    assert advertise.get(24) == b"\x07example\x03org\x00"
    reply = exchange(stateful, message(3, option(1, CLIENT_DUID), option(2, SERVER_DUID), ia_na()))
    assert reply is not None and reply.msg_type == 7
    (ia,) = reply.ia_nas()
    assert ia.iaid == 7 and 0 < ia.t1 < ia.t2 and ia.addresses == [ip6("2001:db8::15")]


def test_rapid_commit_answers_solicit_with_reply(stateful: NetworkStack) -> None:
    reply = exchange(stateful, message(1, option(1, CLIENT_DUID), option(14, b""), ia_na()))
    assert reply is not None and reply.msg_type == 7 and reply.get(14) == b""
    assert assigned(reply) == [ip6("2001:db8::15")]


@pytest.mark.parametrize("kind", [5, 6])  # Renew (with our Server ID), Rebind (without)
def test_renew_and_rebind_keep_the_address(stateful: NetworkStack, kind: int) -> None:
    server = (option(2, SERVER_DUID),) if kind == 5 else ()
    reply = exchange(stateful, message(kind, option(1, CLIENT_DUID), *server,
                                       ia_na(addresses=(ip6("2001:db8::15"),))))
    assert reply is not None and reply.msg_type == 7
    assert assigned(reply) == [ip6("2001:db8::15")]


@pytest.mark.parametrize(("address", "status"), [("2001:db8::15", 0), ("2001:db9::15", 4)])
def test_confirm_tells_on_link_from_not(stateful: NetworkStack, address: str, status: int) -> None:
    reply = exchange(stateful, message(4, option(1, CLIENT_DUID), ia_na(addresses=(ip6(address),))))
    assert reply is not None and reply.get(13)[:2] == struct.pack("!H", status)


def test_information_request_gets_dns_without_addresses(stateful: NetworkStack) -> None:
    reply = exchange(stateful, message(11, option(1, CLIENT_DUID)))
    assert reply is not None and reply.msg_type == 7
    assert reply.get(23) == ip6("2001:db8::3") and reply.get(32) is not None
    assert not reply.ia_nas()


def test_release_is_acknowledged(stateful: NetworkStack) -> None:
    reply = exchange(stateful, message(8, option(1, CLIENT_DUID), option(2, SERVER_DUID), ia_na()))
    assert reply is not None and reply.get(13) == b"\0\0"


def test_slaac_plan_has_no_address_to_give() -> None:
    stack = build_stack(StackConfig())
    reply = exchange(stack, message(1, option(1, CLIENT_DUID), ia_na()))
    assert reply is not None and reply.msg_type == 2
    (value,) = [v for code, v in reply.options if code == 3]
    ia = parse_ia_na(value)
    assert not ia.addresses
    assert value[12:14] == b"\x00\x0d" and value[16:18] == b"\x00\x02"  # NoAddrsAvail
    assert reply.get(23) == ip6("fec0::3")


@pytest.mark.parametrize(("payload", "counter"), [
    (message(3, option(1, CLIENT_DUID), option(2, b"\0\3\0\1other!"), ia_na()),
     "dhcpv6.ignored.server_id"),
    (message(1, option(1, CLIENT_DUID), option(2, SERVER_DUID)), "dhcpv6.ignored.server_id"),
    (message(1, ia_na()), "dhcpv6.drop.no_client_id"),
    (message(7, option(1, CLIENT_DUID)), "dhcpv6.drop.unexpected_type"),
    (message(1, option(1, CLIENT_DUID))[:-2], "dhcpv6.drop.truncated_option"),
    (message(1, option(1, CLIENT_DUID), option(3, b"\0\0")), "dhcpv6.drop.bad_ia_na"),
    (message(12, option(9, b"")), "dhcpv6.drop.relay"),
    (message(4, option(1, CLIENT_DUID)), "dhcpv6.ignored.empty_confirm"),
    (b"\x01", "dhcpv6.drop.short"),
])
def test_what_is_not_answered_is_counted(stateful: NetworkStack, payload: bytes,
                                         counter: str) -> None:
    assert exchange(stateful, payload) is None
    assert stateful.counters()[counter] == 1


def test_no_dhcpv6_leaves_udp_547_to_the_nat() -> None:
    stack = build_stack(StackConfig(dhcpv6=False))
    assert exchange(stack, message(1, option(1, CLIENT_DUID), ia_na())) is None
    assert stack.counters()["udp6.drop.no_route"] == 1


def test_a_boot_file_is_named_by_url_on_the_gateways_ipv6_address(tmp_path) -> None:
    stack = build_stack(StackConfig(tftp_root=str(tmp_path), bootfile="boot/first stage.efi",
                                    bootfile_ipxe="menu.ipxe"))
    reply = exchange(stack, message(1, option(1, CLIENT_DUID), ia_na()))
    assert reply is not None
    assert reply.get(59) == b"tftp://[fec0::2]/boot/first%20stage.efi"
    # iPXE says who it is in its User Class (RFC 8415 21.15: length-prefixed strings).
    ipxe = option(15, struct.pack("!H", 4) + b"iPXE")
    reply = exchange(stack, message(11, option(1, CLIENT_DUID), ipxe))
    assert reply is not None and reply.get(59) == b"tftp://[fec0::2]/menu.ipxe"


def test_no_boot_file_no_url(stateful: NetworkStack) -> None:
    reply = exchange(stateful, message(11, option(1, CLIENT_DUID)))
    assert reply is not None and reply.get(59) is None
