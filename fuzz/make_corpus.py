"""Write the seed corpus, fuzz/corpus/<target>/, from frames the tests already use.

    python -m fuzz.make_corpus

Seeds are small and valid, so mutations start deep inside each parser. The outputs
are committed; rerun this after changing a seed (it rewrites every seed file).
"""

from __future__ import annotations

import hashlib
import shutil
import struct

from fuzz import ring_target, stack_target, switch_target, vhost_target
from fuzz.run import CORPUS
from fuzz.targets import TARGETS
from testkit.guest_ring import RingLayout, pack_desc
from tests.support.dns import query
from tests.support.frames import (
    DNS_IP,
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    arp_request,
    eth,
    guest_ipv4_frame,
    guest_udp_frame,
    icmp_echo,
    ipv4,
    udp,
)
from tests.support.tftp import ack, rrq
from vhostnet.vhost_user import codec
from vhostnet.vhost_user.protocol import VERSION, Request, VirtioFeature
from vhostnet.wire import dhcp, dhcpv6, icmpv6, ipv6, tcp

ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
LINK_LOCAL = ipv6.link_local_address(GUEST_MAC)
SYN, ACK_FLAG = 0x02, 0x10


def router_solicitation() -> bytes:
    message = icmpv6.emit_icmpv6(LINK_LOCAL, ALL_ROUTERS, icmpv6.ROUTER_SOLICITATION, 0,
                                 bytes(4) + b"\x01\x01" + GUEST_MAC)
    return ipv6.emit_ipv6_header(LINK_LOCAL, ALL_ROUTERS, ipv6.NEXT_HEADER_ICMPV6,
                                 len(message), 255) + message


def with_hop_by_hop(packet: bytes) -> bytes:
    """``packet`` with an 8-byte hop-by-hop header (router alert) before its payload."""
    hop = bytes([packet[6], 0, 5, 2, 0, 0, 1, 0])
    payload = packet[ipv6.HEADER_LEN:]
    fixed = bytearray(packet[:ipv6.HEADER_LEN])
    struct.pack_into("!HB", fixed, 4, len(payload) + 8, ipv6.NEXT_HEADER_HOP_BY_HOP)
    return bytes(fixed) + hop + payload


def dhcp_discover() -> bytes:
    message = dhcp.DhcpMessage(dhcp.OP_REQUEST, 0x1234, dhcp.FLAG_BROADCAST, bytes(4), bytes(4),
                               bytes(4), bytes(4), GUEST_MAC + bytes(10),
                               {dhcp.OPT_MESSAGE_TYPE: b"\x01", 55: bytes([1, 3, 6, 15, 119])})
    return message.emit()


def tcp_syn(dst: bytes = GATEWAY_IP, port: int = 8080) -> bytes:
    return tcp.emit_segment(GUEST_IP, dst, 40000, port, 1000, 0, SYN, 65535,
                            options=tcp.build_options(1460, 7, True))


def eth_ipv6(packet: bytes) -> bytes:
    return eth(b"\x33\x33\x00\x00\x00\x02", GUEST_MAC, 0x86DD, packet)


UDP_TO_HOST = udp(GUEST_IP, 40000, GATEWAY_IP, 9, b"hello")
DHCP_FRAME = eth(b"\xff" * 6, GUEST_MAC, 0x0800, ipv4(
    bytes(4), b"\xff" * 4, 17, udp(bytes(4), 68, b"\xff" * 4, 67, dhcp_discover())))
STACK_FRAMES = [
    arp_request(GATEWAY_IP),
    guest_udp_frame(40000, GATEWAY_IP, 9, b"hello"),
    guest_udp_frame(40001, DNS_IP, 53, query()),
    guest_udp_frame(40002, GATEWAY_IP, 69, rrq("boot.bin", blksize=1024)),
    guest_ipv4_frame(GATEWAY_IP, 1, icmp_echo(8, 1, 1, b"ping")),
    guest_ipv4_frame(GATEWAY_IP, 6, tcp_syn()),
    DHCP_FRAME,
    eth_ipv6(router_solicitation()),
]

# --- the ring: one TX chain (header + frame) and one writable RX buffer -------------
RING_SIZE = 16


def ring_seed(options: int) -> bytes:
    layout = RingLayout.at(ring_target.RING_GPA, RING_SIZE)
    frame = bytes(12) + STACK_FRAMES[1]
    rings = bytearray(layout.end - ring_target.RING_GPA)
    descs = pack_desc(ring_target.BUFFER_GPA, len(frame), 0) + pack_desc(
        ring_target.BUFFER_GPA + 0x1000, 2048, 2)
    rings[:len(descs)] = descs
    avail = layout.avail_gpa - ring_target.RING_GPA
    struct.pack_into("<HHHH", rings, avail, 0, 2, 0, 1)
    return struct.pack("<BBH", 4, options, 0) + bytes(rings) + frame


# --- a vhost-user conversation as QEMU starts a net device ---------------------------
GUEST_UVA = 0x7F00_0000_0000
VHOST_RING = RingLayout.at(0x0, RING_SIZE)
KICKED, MEMFD, QUIET = vhost_target.EVENTFD_KICKED, vhost_target.MEMFD, vhost_target.EVENTFD_QUIET


def vhost_seed(ring: int) -> bytes:
    u64 = struct.Struct("<Q").pack
    region = codec.MemoryRegion(0, vhost_target.MEMFD_BYTES, GUEST_UVA, 0)
    addr = codec.VringAddr(ring, 0, GUEST_UVA + VHOST_RING.desc_gpa, GUEST_UVA + VHOST_RING.used_gpa,
                           GUEST_UVA + VHOST_RING.avail_gpa, 0)
    features = VirtioFeature.VERSION_1 | VirtioFeature.NET_F_MRG_RXBUF | VirtioFeature.RING_F_EVENT_IDX
    messages = [
        (Request.GET_FEATURES, VERSION, b"", []),
        (Request.SET_FEATURES, VERSION, u64(features), []),
        (Request.GET_PROTOCOL_FEATURES, VERSION, b"", []),
        (Request.SET_PROTOCOL_FEATURES, VERSION, u64(0x1 | 0x8), []),
        (Request.SET_OWNER, VERSION, b"", []),
        (Request.SET_MEM_TABLE, VERSION | 0x8, codec.MemoryTable((region,)).emit(), [MEMFD]),
        (Request.SET_VRING_NUM, VERSION, codec.VringState(ring, RING_SIZE).emit(), []),
        (Request.SET_VRING_ADDR, VERSION, addr.emit(), []),
        (Request.SET_VRING_BASE, VERSION, codec.VringState(ring, 0).emit(), []),
        (Request.SET_VRING_CALL, VERSION, u64(ring), [QUIET]),
        (Request.SET_VRING_KICK, VERSION, u64(ring), [KICKED]),
        (Request.SET_VRING_ENABLE, VERSION, codec.VringState(ring, 1).emit(), []),
        (Request.GET_VRING_BASE, VERSION, codec.VringState(ring, 0).emit(), []),
    ]
    memory = bytearray(0x2000)
    frame = bytes(12) + STACK_FRAMES[1]
    flags = 2 if ring == 0 else 0  # RX buffers are written by the device
    memory[0:16] = pack_desc(0x1000, 2048 if ring == 0 else len(frame), flags)
    struct.pack_into("<HHH", memory, VHOST_RING.avail_gpa, 0, 1, 0)
    memory[0x1000:0x1000 + len(frame)] = frame
    return vhost_target.encode(messages, bytes(memory))


def dhcpv6_solicit() -> bytes:
    """A Solicit with a client DUID (type 3, Ethernet), IA_NA, and Rapid Commit."""
    duid = struct.pack("!HH", 3, 1) + bytes.fromhex("525400123456")
    ia_na = struct.pack("!III", 1, 0, 0)
    return dhcpv6.Dhcpv6Message(dhcpv6.SOLICIT, 0x123456, [
        (dhcpv6.OPT_CLIENTID, duid), (dhcpv6.OPT_IA_NA, ia_na),
        (dhcpv6.OPT_RAPID_COMMIT, b"")]).emit()


def fragment_records() -> bytes:
    """A UDP datagram in two IPv4 fragments, as records of the fragments target."""
    payload = bytes(range(256)) * 8
    first = ipv4(GUEST_IP, GATEWAY_IP, 17, payload[:1480], flags_fragment=0x2000, ident=7)
    second = ipv4(GUEST_IP, GATEWAY_IP, 17, payload[1480:], flags_fragment=1480 // 8, ident=7)
    return b"".join(struct.pack("!BH", 0, len(p)) + p for p in (first, second))


# --- the switch: one batch from a port, raw and well-formed frames ---------------------


def switch_case(gates: int, sender: int, offloads: int, records: list[bytes]) -> bytes:
    return switch_target._CASE.pack(gates, sender, offloads) + b"".join(records)


def switch_raw(frame: bytes, vnet: int = 0, choices: int = 7, more: int = 0) -> bytes:
    return switch_target._RAW.pack(choices, more, len(frame), vnet) + frame


def switch_shaped(kind: int, sizes: int = 0x21, tcp_flags: int = 0x18, ttl: int = 64,
                  payload: int = 3000, gso: int = 1448, seed: int = 7) -> bytes:
    return switch_target._SHAPED.pack(kind, sizes, tcp_flags, ttl, payload, gso, seed)


def switch_seeds() -> list[bytes]:
    """Kinds: bit 0 IPv6, 1 UDP, 2 GSO, 3 partial checksum, 4-6 destination MAC (0-3 a
    port's, 4 the gateway: routed to the guest whose address the seed names), 7 an outside
    address. Offloads: 3 bits per port."""
    well_formed = switch_target.WELL_FORMED
    to_port1, to_gateway = 1 << 4, 4 << 4
    return [
        switch_case(0, 0, 0, [switch_raw(STACK_FRAMES[1], choices=0x09),
                              switch_raw(arp_request(GATEWAY_IP), choices=0x0D)]),
        switch_case(switch_target.KEEP_WAITING | 0x10, 1, 0x249,
                    [switch_raw(STACK_FRAMES[1], choices=0x08, more=1)]),
        switch_case(well_formed, 0, 0x1C0, [switch_shaped(to_port1 | 0x04),
                                            switch_shaped(to_port1 | 0x05)]),
        switch_case(well_formed, 0, 0x000, [switch_shaped(to_port1 | 0x0A, payload=500),
                                            switch_shaped(to_port1 | 0x08, payload=90)]),
        switch_case(well_formed | switch_target.RECONNECT, 3, 0x03F,
                    [switch_shaped(to_gateway | 0x04, ttl=9, seed=2),
                     switch_shaped(to_gateway, ttl=30, payload=200, seed=2),
                     switch_shaped(to_gateway | 0x01, ttl=2, seed=6),
                     switch_shaped(to_port1 | 0x06, payload=4000)]),
    ]


def seeds() -> dict[str, list[bytes]]:
    syn = tcp_syn()
    fixes = stack_target.FIX_IPV4_HEADER | stack_target.FIX_L4_CHECKSUM
    return {
        "ethernet": STACK_FRAMES[:2],
        "arp": [arp_request(GATEWAY_IP)[14:]],
        "ipv4": [b"\x00" + ipv4(GUEST_IP, GATEWAY_IP, 17, UDP_TO_HOST),
                 b"\x01" + ipv4(GUEST_IP, GATEWAY_IP, 6, syn, ihl=6, options=b"\x01" * 4)],
        "ipv6": [router_solicitation(), with_hop_by_hop(router_solicitation())],
        "icmp": [icmp_echo(8, 1, 1, b"ping")],
        "icmpv6": [router_solicitation(), with_hop_by_hop(router_solicitation())],
        "udp": [UDP_TO_HOST],
        "tcp": [syn, tcp.emit_segment(GUEST_IP, GATEWAY_IP, 40000, 8080, 1001, 5, ACK_FLAG,
                                      1000, b"data")],
        "dhcp": [dhcp_discover()],
        "dns": [query()],
        "tftp": [rrq("boot.bin", blksize=1024, tsize=0), ack(1),
                 b"\x00\x05\x00\x01no such file\x00"],
        "dhcpv6": [dhcpv6_solicit()],
        "fragments": [fragment_records()],
        "vhost_codec": [bytes([0]) + codec.Header(1, 1, 0).emit(),
                        bytes([5]) + codec.MemoryTable(
                            (codec.MemoryRegion(0, 0x1000, GUEST_UVA, 0),)).emit(),
                        bytes([3]) + codec.VringAddr(0, 0, 1, 2, 3, 4).emit()],
        "vhost_user": [vhost_seed(0), vhost_seed(1)],
        "ring": [ring_seed(0x10), ring_seed(0x1B)],
        "switch": switch_seeds(),
        "stack": [bytes([fixes, 4]) + frame for frame in STACK_FRAMES]
        + [bytes([stack_target.PARTIAL_L4_CHECKSUM, 0]) + STACK_FRAMES[1]],
    }


def main() -> None:
    all_seeds = seeds()
    missing = set(TARGETS) - set(all_seeds)
    if missing:
        raise SystemExit(f"no seeds for {sorted(missing)}")
    for name, items in all_seeds.items():
        folder = CORPUS / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for item in items:
            (folder / hashlib.sha1(item).hexdigest()[:16]).write_bytes(item)
    print(f"wrote {sum(map(len, all_seeds.values()))} seeds for {len(all_seeds)} targets")


if __name__ == "__main__":
    main()
