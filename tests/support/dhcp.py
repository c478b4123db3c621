"""DHCP client messages built field by field (RFC 2131), shared by the DHCP tests."""

from __future__ import annotations

import struct

from tests.support.frames import GUEST_MAC

ZERO = bytes(4)
COOKIE = b"\x63\x82\x53\x63"
XID = 0xDEADBEEF


def dhcp_request(options: bytes, *, ciaddr: bytes = ZERO, flags: int = 0, op: int = 1,
                 htype: int = 1, cookie: bytes = COOKIE, end: bool = True) -> bytes:
    """A client message, built field by field (RFC 2131 figure 1)."""
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, 6, 0, XID, 0, flags, ciaddr,
                        ZERO, ZERO, ZERO, GUEST_MAC + bytes(10), b"", b"")
    return fixed + cookie + options + (b"\xff" if end else b"")


def opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def msg_type(kind: int) -> bytes:
    return opt(53, bytes((kind,)))
