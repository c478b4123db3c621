"""ICMPv4 (RFC 792): a checked message view and the message builders.

The echo engine that answers and forwards guest pings is in ``vhostnet.stack.icmp``.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import internet_checksum, ones_complement_sum
from vhostnet.wire.errors import MalformedPacket

TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11
CODE_PORT_UNREACHABLE = 3
HEADER_LEN = 8


class EchoFields:
    """The identifier and sequence number an echo message carries in its ``rest`` word
    (ICMP and ICMPv6 alike)."""

    __slots__ = ()
    rest: bytes

    @property
    def echo_ident(self) -> int:
        return struct.unpack("!H", self.rest[0:2])[0]

    @property
    def echo_seq(self) -> int:
        return struct.unpack("!H", self.rest[2:4])[0]


class IcmpMessage(EchoFields):
    """Checked view of an ICMP message: at least 8 bytes, checksum verified."""

    __slots__ = ("type", "code", "rest", "body")

    def __init__(self, data: bytes | bytearray | memoryview, verify_checksum: bool = True) -> None:
        view = memoryview(data)
        if len(view) < HEADER_LEN:
            raise MalformedPacket("short", f"ICMP message of {len(view)} bytes")
        if verify_checksum and ones_complement_sum(view) != 0xFFFF:
            raise MalformedPacket("bad_checksum", "ICMP checksum")
        self.type: int = view[0]
        self.code: int = view[1]
        self.rest = bytes(view[4:8])
        self.body = view[HEADER_LEN:]



def emit_icmp(icmp_type: int, code: int, rest: bytes, body: bytes | bytearray | memoryview) -> bytes:
    """A complete ICMP message with its checksum; ``rest`` is the 4 bytes after the checksum."""
    message = bytearray(struct.pack("!BBH4s", icmp_type, code, 0, rest))
    message += body
    struct.pack_into("!H", message, 2, internet_checksum(message))
    return bytes(message)


def emit_echo(icmp_type: int, ident: int, seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    return emit_icmp(icmp_type, 0, struct.pack("!HH", ident, seq), payload)


def emit_port_unreachable(original_header: bytes, original_payload: bytes | memoryview) -> bytes:
    """Destination unreachable / port unreachable quoting the IP header and 8 payload bytes."""
    quote = bytes(original_header) + bytes(original_payload[:8])
    return emit_icmp(TYPE_DEST_UNREACHABLE, CODE_PORT_UNREACHABLE, bytes(4), quote)
