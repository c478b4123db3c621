"""Neighbour discovery (RFC 4861) messages and options, with RDNSS/DNSSL (RFC 8106).

``NdpMessage`` reads Router Solicitations, Neighbour Solicitations and Neighbour
Advertisements from a checked ``Icmpv6Message`` (the fixed part of each type, then
the options, each of a non-zero length that fits, RFC 4861 section 4.6). The
emitters build the bodies of the messages vhostnet sends; ``emit_icmpv6`` adds the
header and checksum. The engine is ``vhostnet.stack.ndp``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmpv6 import (
    NEIGHBOR_ADVERTISEMENT,
    NEIGHBOR_SOLICITATION,
    REDIRECT,
    ROUTER_ADVERTISEMENT,
    ROUTER_SOLICITATION,
    Icmpv6Message,
)

HOP_LIMIT = 255  # NDP messages must arrive with 255: proof they never crossed a router
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")

OPT_SOURCE_LINK_ADDRESS = 1
OPT_TARGET_LINK_ADDRESS = 2
OPT_PREFIX_INFORMATION = 3
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

# Router Advertisement flags (RFC 4861 section 4.2).
RA_MANAGED = 0x80
RA_OTHER = 0x40
# Prefix information flags (section 4.6.2).
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40
# Neighbour Advertisement flags (section 4.4), the top bits of the word after the checksum.
NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000

# Bytes of each type's fixed part after the 4-byte "rest" word: where its options start.
_FIXED_AFTER_REST = {ROUTER_SOLICITATION: 0, ROUTER_ADVERTISEMENT: 8,
                     NEIGHBOR_SOLICITATION: 16, NEIGHBOR_ADVERTISEMENT: 16, REDIRECT: 32}


class NdpMessage:
    """An NDP message: its type, ``target`` (NS, NA), NA ``flags`` and the ``options``
    as ``{type: [value, ...]}`` (values without the type and length bytes)."""

    __slots__ = ("type", "code", "flags", "target", "options")

    def __init__(self, message: Icmpv6Message) -> None:
        fixed = _FIXED_AFTER_REST.get(message.type)
        if fixed is None:
            raise MalformedPacket("not_ndp", f"ICMPv6 type {message.type}")
        if message.code != 0:
            raise MalformedPacket("bad_code", f"NDP code {message.code}")
        body = message.body
        if len(body) < fixed:
            raise MalformedPacket("short", f"NDP type {message.type} of {len(body) + 8} bytes")
        self.type = message.type
        self.code = message.code
        self.flags: int = struct.unpack("!I", message.rest)[0]
        self.target: bytes | None = bytes(body[:16]) if fixed >= 16 else None
        self.options = parse_options(body[fixed:])

    def link_address(self, option: int) -> bytes | None:
        """The MAC in the first source (1) or target (2) link-layer address option."""
        values = self.options.get(option)
        if not values:
            return None
        value = values[0]
        if len(value) < 6:
            raise MalformedPacket("bad_option_length", "link-layer address option")
        return value[:6]


def parse_options(view: memoryview) -> dict[int, list[bytes]]:
    """NDP options: type, length in 8-byte units (0 is invalid), value."""
    options: dict[int, list[bytes]] = {}
    offset = 0
    while offset < len(view):
        if offset + 2 > len(view):
            raise MalformedPacket("truncated_option", "NDP option without its length")
        kind, units = view[offset], view[offset + 1]
        end = offset + units * 8
        if units == 0 or end > len(view):
            raise MalformedPacket("bad_option_length", f"NDP option {kind} of {units} units")
        options.setdefault(kind, []).append(bytes(view[offset + 2:end]))
        offset = end
    return options


def emit_option(kind: int, value: bytes) -> bytes:
    """One option, padded with zeros to a multiple of 8 bytes."""
    length = -(-(len(value) + 2) // 8) * 8
    return bytes((kind, length // 8)) + value + bytes(length - 2 - len(value))


def link_address_option(kind: int, mac: bytes) -> bytes:
    return emit_option(kind, mac)


def prefix_option(prefix: bytes, length: int, flags: int, valid: int, preferred: int) -> bytes:
    return emit_option(OPT_PREFIX_INFORMATION,
                       struct.pack("!BBII4x16s", length, flags, valid, preferred, prefix))


def mtu_option(mtu: int) -> bytes:
    return emit_option(OPT_MTU, struct.pack("!2xI", mtu))


def rdnss_option(servers: Iterable[bytes], lifetime: int) -> bytes:
    return emit_option(OPT_RDNSS, struct.pack("!2xI", lifetime) + b"".join(servers))


def dnssl_option(encoded_names: bytes, lifetime: int) -> bytes:
    """``encoded_names``: the domains in DNS wire format, one after the other."""
    return emit_option(OPT_DNSSL, struct.pack("!2xI", lifetime) + encoded_names)


def router_advertisement_body(flags: int, router_lifetime: int, options: bytes,
                              hop_limit: int = 64) -> bytes:
    """Everything after the checksum: current hop limit, flags, router lifetime, reachable
    time and retransmission timer (both 0: unspecified), then ``options``."""
    return struct.pack("!BBHII", hop_limit, flags, router_lifetime, 0, 0) + options


def neighbor_advertisement_body(target: bytes, flags: int, mac: bytes) -> bytes:
    return (struct.pack("!I16s", flags, target)
            + link_address_option(OPT_TARGET_LINK_ADDRESS, mac))


def neighbor_solicitation_body(target: bytes, mac: bytes) -> bytes:
    return struct.pack("!4x16s", target) + link_address_option(OPT_SOURCE_LINK_ADDRESS, mac)
