"""Hand-built guest frames shared by the tests.

The builders here are written independently of the stack's emitters (plain
struct packing and a local checksum), so the tests do not trust the code under test.
"""

from __future__ import annotations

import struct

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("525600000002")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])


def checksum(data: bytes) -> int:
    """RFC 1071, written out plainly."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64,
         flags_fragment: int = 0x4000, ihl: int = 5, options: bytes = b"",
         total_length: int | None = None, bad_checksum: bool = False,
         ident: int = 0x1234) -> bytes:
    header_len = ihl * 4
    total = total_length if total_length is not None else header_len + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, flags_fragment, ttl,
                         proto, 0, src, dst) + options
    value = checksum(header[:header_len]) ^ (0x5555 if bad_checksum else 0)
    header = header[:10] + struct.pack("!H", value) + header[12:]
    return header + payload


def udp(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + payload
    value = checksum(pseudo + segment) or 0xFFFF
    return segment[:6] + struct.pack("!H", value) + segment[8:]


def guest_ipv4_frame(dst_ip: bytes, proto: int, payload: bytes, **kwargs) -> bytes:
    return eth(GATEWAY_MAC, GUEST_MAC, 0x0800, ipv4(GUEST_IP, dst_ip, proto, payload, **kwargs))


def guest_udp_frame(sport: int, dst_ip: bytes, dport: int, payload: bytes,
                    src_ip: bytes = GUEST_IP, dst_mac: bytes = GATEWAY_MAC) -> bytes:
    return eth(dst_mac, GUEST_MAC, 0x0800,
               ipv4(src_ip, dst_ip, 17, udp(src_ip, sport, dst_ip, dport, payload)))


def icmp_echo(icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def parse_udp_frame(frame: bytes) -> tuple[bytes, int, bytes, int, bytes]:
    """(src_ip, sport, dst_ip, dport, payload) of a frame sent to the guest, checksums verified."""
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert checksum(ip[:20]) == 0
    assert ip[9] == 17
    src, dst = ip[12:16], ip[16:20]
    total = struct.unpack("!H", ip[2:4])[0]
    segment = ip[20:total]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(segment))
    assert checksum(pseudo + segment) == 0
    sport, dport, length = struct.unpack("!HHH", segment[:6])
    assert length == len(segment)
    return src, sport, dst, dport, segment[8:]


BROADCAST = b"\xff" * 6


def arp_request(target_ip: bytes, sender_ip: bytes = GUEST_IP) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, sender_ip,
                       b"\0" * 6, target_ip)
    return eth(BROADCAST, GUEST_MAC, 0x0806, body)


# --- IPv6 -----------------------------------------------------------------------

GUEST_LINK_LOCAL = bytes.fromhex("fe80000000000000505400fffe123456")  # EUI-64 of GUEST_MAC
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
ALL_ROUTERS_MAC = bytes.fromhex("333300000002")


def l4_sum6(src: bytes, dst: bytes, next_header: int, message: bytes, at: int) -> bytes:
    """``message`` with its checksum (at offset ``at``) over the IPv6 pseudo-header filled in."""
    pseudo = src + dst + struct.pack("!I3xB", len(message), next_header)
    value = checksum(pseudo + message[:at] + b"\0\0" + message[at + 2:])
    return message[:at] + struct.pack("!H", value) + message[at + 2:]


def icmpv6(src: bytes, dst: bytes, message: bytes) -> bytes:
    return l4_sum6(src, dst, 58, message, 2)


def udp6(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return l4_sum6(src, dst, 17, segment, 6)


def ipv6_frame(src: bytes, dst: bytes, payload: bytes, hop_limit: int = 255,
               next_header: int = 58, dst_mac: bytes = ALL_ROUTERS_MAC) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, src, dst)
    return eth(dst_mac, GUEST_MAC, 0x86DD, header + payload)


def parse_ipv6_frame(frame: bytes) -> tuple[bytes, bytes, int, int, bytes]:
    """(src, dst, next header, hop limit, payload) of an IPv6 frame sent to the guest, with
    its ICMPv6 or UDP checksum verified."""
    assert frame[12:14] == b"\x86\xdd"
    first, length, next_header, hop_limit, src, dst = struct.unpack_from("!IHBB16s16s", frame, 14)
    assert first >> 28 == 6
    payload = frame[54:]
    assert len(payload) == length
    if next_header in (17, 58):
        pseudo = src + dst + struct.pack("!I3xB", length, next_header)
        assert checksum(pseudo + payload) == 0
    return src, dst, next_header, hop_limit, payload


GUEST_IP6 = bytes.fromhex("fec0000000000000505400fffe123456")  # SLAAC of GUEST_MAC in fec0::/64


def guest_udp6_frame(sport: int, dst: bytes, dport: int, payload: bytes,
                     src: bytes = GUEST_IP6) -> bytes:
    """A UDP datagram over IPv6 from the guest to the gateway MAC."""
    return ipv6_frame(src, dst, udp6(src, sport, dst, dport, payload), hop_limit=64,
                      next_header=17, dst_mac=GATEWAY_MAC)


def parse_udp6_frame(frame: bytes) -> tuple[bytes, int, bytes, int, bytes]:
    """(src, sport, dst, dport, payload) of a UDP-over-IPv6 frame for the guest, checked."""
    src, dst, next_header, _hops, segment = parse_ipv6_frame(frame)
    assert next_header == 17
    sport, dport, length, _sum = struct.unpack_from("!HHHH", segment)
    assert length == len(segment)
    return src, sport, dst, dport, segment[8:]
