"""DNS messages shared by the DNS forwarder tests."""

from __future__ import annotations

import struct

QUESTION = b"\x07example\x04test\x00\x00\x01\x00\x01"


def query(query_id: int = 0x1234, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 0) + QUESTION


def answer_to(upstream_data: bytes) -> bytes:
    """What a resolver would send back: same id and question, one A record."""
    header = upstream_data[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 80])
    return header + QUESTION + record
