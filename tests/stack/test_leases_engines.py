"""The engines with a lease pool: DHCPv4, DHCPv6, ARP, NDP and DNS serve each MAC its own."""

from __future__ import annotations

import asyncio
import struct

from tests.stack.test_dhcp import parse_reply
from tests.stack.test_dhcpv6 import ALL_SERVERS, ia_na, message, option
from tests.stack.test_stack_ndp import advertisement, neighbor_solicitation, solicitation
from tests.support.dhcp import dhcp_request, msg_type, opt
from tests.support.dns import query
from tests.support.frames import (
    ALL_ROUTERS,
    DNS_IP,
    GUEST_LINK_LOCAL,
    GUEST_MAC,
    arp_request,
    guest_udp_frame,
    ipv6_frame,
    parse_ipv6_frame,
    parse_udp_frame,
    udp6,
)
from vhostnet.network import Network, build_stack
from vhostnet.stack.config import StackConfig, ip4, ip6
from vhostnet.stack.counters import Counters
from vhostnet.stack.dhcp import DhcpServer
from vhostnet.stack.leases import LeasePool, Reservation
from vhostnet.stack.stack import NetworkStack
from vhostnet.wire.dhcp import DhcpMessage
from vhostnet.wire.dhcpv6 import Dhcpv6Message

OTHER_MAC = bytes.fromhex("525400abcdef")
RESERVED_MAC = bytes.fromhex("5254000000aa")
HOSTNAME = 12


def with_pool(**fields) -> tuple[NetworkStack, LeasePool]:
    config = StackConfig(max_guests=4, dns_upstream=[("127.0.0.1", 53)], **fields)
    leases = config.lease_pool()
    return build_stack(config, leases), leases


def from_mac(frame: bytes, mac: bytes) -> bytes:
    """``frame`` as sent by the guest at ``mac`` (Ethernet source; ARP's sender too)."""
    frame = frame[:6] + mac + frame[12:]
    if frame[12:14] == b"\x08\x06":
        frame = frame[:22] + mac + frame[28:]
    return frame


def dhcp_frame(mac: bytes, options: bytes, chaddr: bytes | None = None) -> bytes:
    """A DHCP message from the client at ``mac`` (its ``chaddr``: ``mac`` unless given)."""
    request = dhcp_request(options)
    request = request[:28] + (chaddr or mac) + request[34:]
    return from_mac(guest_udp_frame(68, b"\xff" * 4, 67, request, src_ip=bytes(4),
                                    dst_mac=b"\xff" * 6), mac)


def dhcp(stack: NetworkStack, mac: bytes, options: bytes) -> tuple[bytes, dict[int, bytes]]:
    """One DHCP message from the client at ``mac``: (yiaddr, options) of the one reply."""
    stack.frames_to_guest.clear()
    stack.receive_frame(dhcp_frame(mac, options), now=10.0)
    (frame,) = stack.frames_to_guest
    fixed, reply_options, _ = parse_reply(parse_udp_frame(frame)[4])
    assert fixed[28:34] == mac
    return fixed[16:20], reply_options


def discover_request(stack: NetworkStack, mac: bytes, name: bytes | None = None) -> bytes:
    named = opt(HOSTNAME, name) if name else b""
    offered, options = dhcp(stack, mac, msg_type(1) + named)
    assert options[53] == b"\x02"
    acked, options = dhcp(stack, mac, msg_type(3) + opt(50, offered) + opt(54, ip4("10.0.2.2"))
                          + named)
    assert options[53] == b"\x05" and acked == offered
    return acked


def test_dhcp_gives_two_macs_two_stable_addresses() -> None:
    stack, leases = with_pool()
    first = discover_request(stack, GUEST_MAC)
    second = discover_request(stack, OTHER_MAC)
    assert (first, second) == (ip4("10.0.2.15"), ip4("10.0.2.16"))
    assert discover_request(stack, GUEST_MAC) == first  # again: the same lease
    assert discover_request(stack, OTHER_MAC) == second
    assert [lease.ipv4 for lease in leases.leases()] == [first, second]


def test_dhcp_naks_a_request_for_another_macs_lease() -> None:
    stack, _ = with_pool()
    discover_request(stack, GUEST_MAC)
    _, options = dhcp(stack, OTHER_MAC, msg_type(3) + opt(50, ip4("10.0.2.15")))
    assert options[53] == b"\x06"  # NAK


def test_a_reservation_wins_and_the_network_follows_it() -> None:
    stack, _ = with_pool(dhcp_hosts=[Reservation(RESERVED_MAC, ip4("10.0.2.80"), "db")])
    assert discover_request(stack, GUEST_MAC) == ip4("10.0.2.15")
    assert discover_request(stack, RESERVED_MAC) == ip4("10.0.2.80")
    # One network per guest: the acknowledged lease is its guest address now.
    assert stack.config.guest_ipv4 == ip4("10.0.2.80")
    assert stack.counters()["dhcp.guest_address_moved"] == 1


def test_the_stack_alone_moves_the_guest_address() -> None:
    """``move_guest_ipv4`` is the one writer of the network's guest address; DHCP reports an
    acknowledged lease to it (``on_acked``) and writes no address itself."""
    stack = build_stack(StackConfig())
    stack.move_guest_ipv4(RESERVED_MAC, ip4("10.0.2.80"))
    stack.move_guest_ipv4(RESERVED_MAC, ip4("10.0.2.80"))  # already there: no move
    assert stack.config.guest_ipv4 == ip4("10.0.2.80")
    assert stack.counters()["dhcp.guest_address_moved"] == 1
    config = StackConfig(dhcp_hosts=[Reservation(RESERVED_MAC, ip4("10.0.2.80"), "db")])
    acked: list[tuple[bytes, bytes]] = []
    server = DhcpServer(config, Counters(), lambda *args, **kwargs: None, config.lease_pool(),
                        on_acked=lambda mac, address: acked.append((mac, address)))
    request = dhcp_request(msg_type(3) + opt(50, ip4("10.0.2.80")))
    reply = server.respond(DhcpMessage.parse(request[:28] + RESERVED_MAC + request[34:]), 0.0)
    assert reply is not None and reply.message_type == 5
    assert acked == [(RESERVED_MAC, ip4("10.0.2.80"))]
    assert config.guest_ipv4 == ip4("10.0.2.15")  # the engine reported, the owner moves


def test_a_router_leases_for_its_ports_mac_only() -> None:
    """Several guests: a router serves one port; a DHCP request whose chaddr is another MAC
    is counted and dropped (no lease for it, the guest address stays)."""
    stack, leases = with_pool()
    stack.serve_port(GUEST_MAC)
    for kind in (msg_type(1), msg_type(3) + opt(50, ip4("10.0.2.15")), msg_type(1) + opt(80, b"")):
        stack.frames_to_guest.clear()
        stack.receive_frame(dhcp_frame(GUEST_MAC, kind, chaddr=OTHER_MAC), now=10.0)
        assert not stack.frames_to_guest
    assert stack.counters()["dhcp.drop.foreign_chaddr"] == 3
    assert leases.leases() == [] and stack.config.guest_ipv4 == ip4("10.0.2.15")
    assert discover_request(stack, GUEST_MAC) == ip4("10.0.2.15")
    assert [lease.mac for lease in leases.leases()] == [GUEST_MAC]


def test_dhcpv6_leases_for_the_ports_mac_whatever_the_source() -> None:
    stack, leases = with_pool()
    leases.lease_for(GUEST_MAC)  # fec0::100 is the port's guest's
    stack.serve_port(GUEST_MAC)
    duid = option(1, struct.pack("!HH6s", 3, 1, OTHER_MAC))
    reply = dhcpv6(stack, OTHER_MAC, message(1, duid, option(14, b""), ia_na()))
    assert [a for ia in reply.ia_nas() for a in ia.addresses] == [ip6("fec0::100")]
    assert [lease.mac for lease in leases.leases()] == [GUEST_MAC]


def test_without_a_pool_every_mac_gets_the_one_address() -> None:
    stack = build_stack(StackConfig())
    assert discover_request(stack, GUEST_MAC) == discover_request(stack, OTHER_MAC)


def test_the_host_name_option_names_the_guest() -> None:
    stack, leases = with_pool()
    address = discover_request(stack, OTHER_MAC, b"Web_1")
    assert leases.resolve("web-1.vhostnet.internal", 1) == [address]


def test_an_exhausted_pool_is_no_answer_counted() -> None:
    stack, _ = with_pool(dhcp_range=(ip4("10.0.2.100"), ip4("10.0.2.100")))
    discover_request(stack, GUEST_MAC)
    request = dhcp_request(msg_type(1))
    stack.frames_to_guest.clear()
    stack.receive_frame(from_mac(guest_udp_frame(68, b"\xff" * 4, 67,
                                                 request[:28] + OTHER_MAC + request[34:],
                                                 src_ip=bytes(4)), OTHER_MAC), now=1.0)
    assert not stack.frames_to_guest
    assert stack.counters()["dhcp.drop.pool_exhausted"] == 1


def dhcpv6(stack: NetworkStack, mac: bytes, payload: bytes) -> Dhcpv6Message:
    stack.frames_to_guest.clear()
    datagram = udp6(GUEST_LINK_LOCAL, 546, ALL_SERVERS, 547, payload)
    stack.receive_frame(from_mac(ipv6_frame(GUEST_LINK_LOCAL, ALL_SERVERS, datagram,
                                            hop_limit=1, next_header=17,
                                            dst_mac=bytes.fromhex("333300010002")), mac), 0.0)
    (frame,) = stack.frames_to_guest
    assert frame[:6] == mac
    return Dhcpv6Message.parse(parse_ipv6_frame(frame)[4][8:])


def test_dhcpv6_gives_each_mac_its_ipv6_lease_and_names_it() -> None:
    stack, leases = with_pool(dhcp_hosts=[Reservation(RESERVED_MAC, ip6("fec0::80"))])
    duid = option(1, struct.pack("!HH6s", 3, 1, OTHER_MAC))
    fqdn = option(39, b"\x01\x06laptop\x07example\x00")
    for mac, expected in ((OTHER_MAC, "fec0::100"), (RESERVED_MAC, "fec0::80")):
        reply = dhcpv6(stack, mac, message(1, duid, option(14, b""), ia_na(), fqdn))
        assert [a for ia in reply.ia_nas() for a in ia.addresses] == [ip6(expected)]
    advertise = dhcpv6(stack, OTHER_MAC, message(1, duid, ia_na()))
    assert [a for ia in advertise.ia_nas() for a in ia.addresses] == [ip6("fec0::100")]
    assert leases.resolve("laptop.vhostnet.internal", 28) == [ip6("fec0::100")]
    assert leases.held_by_other(RESERVED_MAC, ip6("fec0::100"))


def test_arp_is_not_answered_for_another_guests_address() -> None:
    stack, leases = with_pool()
    leases.lease_for(GUEST_MAC)
    other = leases.lease_for(OTHER_MAC).ipv4
    assert other is not None
    stack.receive_frame(from_mac(arp_request(other, sender_ip=bytes(4)), GUEST_MAC), now=0.0)
    assert not stack.frames_to_guest
    stack.receive_frame(from_mac(arp_request(ip4("10.0.2.99"), sender_ip=bytes(4)), GUEST_MAC),
                        now=0.0)
    assert len(stack.frames_to_guest) == 1  # an unused address still is
    # Without a pool the same question is answered (one guest: nobody else is there).
    alone = build_stack(StackConfig())
    alone.receive_frame(arp_request(other, sender_ip=bytes(4)), now=0.0)
    assert len(alone.frames_to_guest) == 1


def test_ndp_is_not_answered_for_another_guests_address() -> None:
    stack, leases = with_pool()
    leases.lease_for(GUEST_MAC)
    leases.lease_for(OTHER_MAC)
    leases.add_ipv6(OTHER_MAC, ip6("fec0::5054:ff:feab:cdef"))
    for target in (leases.lease_for(OTHER_MAC).ipv6, ip6("fec0::5054:ff:feab:cdef")):
        assert target is not None
        stack.receive_frame(neighbor_solicitation(target), now=0.0)
        assert not stack.frames_to_guest
    assert stack.counters()["ndp.ignored.other_guest"] == 2
    stack.receive_frame(neighbor_solicitation(ip6("fec0::1234")), now=0.0)
    assert len(stack.frames_to_guest) == 1


def test_router_advertisements_say_dhcpv6_gives_addresses_with_a_pool() -> None:
    stack, _ = with_pool()
    stack.receive_frame(ipv6_frame(GUEST_LINK_LOCAL, ALL_ROUTERS, solicitation()), now=0.0)
    assert advertisement(stack)[1][1] == 0xC0  # M and O: the IPv6 lease comes by DHCPv6


def test_ipv6_addresses_the_stack_learns_go_to_the_pool() -> None:
    stack, leases = with_pool()
    leases.lease_for(GUEST_MAC)
    guest = ip6("fec0::5054:ff:fe12:3456")
    stack.receive_frame(neighbor_solicitation(guest, src=bytes(16)), now=0.0)  # DAD
    assert leases.learned_ipv6(GUEST_MAC) == [guest]
    assert leases.mac_of(guest) == GUEST_MAC


def dns_query(name: bytes, qtype: int) -> bytes:
    question = b"".join(bytes((len(p),)) + p for p in name.split(b".")) + b"\0"
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + question + struct.pack(
        "!HH", qtype, 1)


def ask(stack: NetworkStack, name: bytes, qtype: int) -> tuple[int, list[bytes]] | None:
    """(RCODE, addresses) of the local answer, or None when the query went upstream."""
    stack.frames_to_guest.clear()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, dns_query(name, qtype)), now=0.0)
    if not stack.frames_to_guest:
        assert stack.dns is not None and stack.dns.commands
        stack.dns.commands.clear()
        return None
    (frame,) = stack.frames_to_guest
    answer = parse_udp_frame(frame)[4]
    query_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", answer)
    assert (query_id, qdcount) == (0x4242, 1) and flags & 0x8400 == 0x8400  # QR, AA
    offset = 12 + len(dns_query(name, qtype)) - 12
    addresses = []
    for _ in range(ancount):
        pointer, rtype, rclass, _ttl, length = struct.unpack_from("!HHHIH", answer, offset)
        assert (pointer, rtype, rclass) == (0xC00C, qtype, 1)
        addresses.append(answer[offset + 12 : offset + 12 + length])
        offset += 12 + length
    assert offset == len(answer)
    return flags & 0xF, addresses


def test_dns_answers_guest_names_and_the_host_locally() -> None:
    stack, leases = with_pool()
    lease = leases.lease_for(OTHER_MAC)
    leases.set_name(OTHER_MAC, "guest2")
    leases.add_ipv6(OTHER_MAC, lease.ipv6)
    assert ask(stack, b"guest2.vhostnet.internal", 1) == (0, [lease.ipv4])
    assert ask(stack, b"GUEST2.vhostnet.internal", 28) == (0, [lease.ipv6])
    assert ask(stack, b"host.vhostnet.internal", 1) == (0, [ip4("10.0.2.2")])
    assert ask(stack, b"host.vhostnet.internal", 28) == (0, [ip6("fec0::2")])
    assert ask(stack, b"guest2.vhostnet.internal", 16) == (0, [])  # no TXT: NOERROR, empty
    assert ask(stack, b"nobody.vhostnet.internal", 1) == (3, [])  # NXDOMAIN
    assert ask(stack, b"example.org", 1) is None  # upstream, as ever
    counters = stack.counters()
    assert (counters["dns.local.answer"], counters["dns.local.nxdomain"]) == (5, 1)


def test_dns_over_ipv6_answers_from_the_ipv6_dns_address() -> None:
    stack, leases = with_pool()
    leases.lease_for(OTHER_MAC)
    leases.set_name(OTHER_MAC, "guest2")
    src = ip6("fec0::5054:ff:fe12:3456")
    stack.receive_frame(ipv6_frame(src, ip6("fec0::3"), udp6(
        src, 33000, ip6("fec0::3"), 53, dns_query(b"guest2.vhostnet.internal", 1)),
        hop_limit=64, next_header=17, dst_mac=bytes.fromhex("525600000002")), now=0.0)
    frames = [f for f in stack.frames_to_guest if parse_ipv6_frame(f)[2] == 17]
    (frame,) = frames
    assert parse_ipv6_frame(frame)[0] == ip6("fec0::3")
    assert frame.endswith(ip4("10.0.2.15"))


def test_without_a_pool_our_domain_goes_upstream() -> None:
    stack = build_stack(StackConfig(dns_upstream=[("127.0.0.1", 53)]))
    assert ask(stack, b"host.vhostnet.internal", 1) is None
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query()), now=0.0)
    assert stack.dns is not None and len(stack.dns.commands) == 1


def test_one_guest_with_a_reservation_gets_it_through_the_network() -> None:
    """--max-guests 1 with --dhcp-host: the Network makes its own pool; the reserved MAC
    gets its address, and the network's guest address (forwarded ports) follows it."""
    loop = asyncio.new_event_loop()
    config = StackConfig(dhcp_hosts=[Reservation(RESERVED_MAC, ip4("10.0.2.80"), "db")])
    network = Network(config, loop)
    try:
        assert network.leases is not None and network.stack.leases is network.leases
        assert discover_request(network.stack, RESERVED_MAC) == ip4("10.0.2.80")
        assert network.config.guest_ipv4 == ip4("10.0.2.80")
        assert network.counters()["leases.count"] == 1
    finally:
        network.close()
        loop.close()
    plain = Network(StackConfig(), asyncio.new_event_loop())
    try:
        assert plain.leases is None and "leases.count" not in plain.counters()
    finally:
        plain.close()
        plain.loop.close()
