"""DNS messages (RFC 1035): the header flags, the question section and names in wire form.

vhostnet does not resolve names itself: the forwarder in ``vhostnet.stack.dns``
relays queries and only needs to read the header, echo a question in a
SERVFAIL it builds, and encode domain names for the DHCP search list.
"""

from __future__ import annotations

import struct

HEADER_LEN = 12
FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_RD = 0x0100
FLAG_RA = 0x0080
RCODE_SERVFAIL = 2


def question_section(message: bytes) -> bytes | None:
    """The bytes of a single uncompressed question after the header, or None if not parseable."""
    offset = HEADER_LEN
    for _ in range(128):  # a name has at most 127 labels
        if offset >= len(message):
            return None
        length = message[offset]
        if length == 0:
            end = offset + 1 + 4  # root label, QTYPE, QCLASS
            return message[HEADER_LEN:end] if end <= len(message) else None
        if length > 63:
            return None  # compression pointer or reserved label type: not in a plain query
        offset += 1 + length
    return None


def servfail_for(query: bytes) -> bytes:
    """A SERVFAIL answer to ``query``: same id, opcode and RD, the question echoed if it parses."""
    query_id, flags, qdcount = struct.unpack_from("!HHH", query, 0)
    question = question_section(query) if qdcount == 1 else None
    reply_flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | RCODE_SERVFAIL
    header = struct.pack("!HHHHHH", query_id, reply_flags, 1 if question else 0, 0, 0, 0)
    return header + (question or b"")


def encode_dns_name(name: str) -> bytes:
    """RFC 1035 uncompressed wire form: length-prefixed labels ending with the root label."""
    labels = name.strip().rstrip(".").split(".")
    encoded = bytearray()
    for label in labels:
        raw = label.encode("idna") if not label.isascii() else label.encode("ascii")
        if not 1 <= len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in domain name {name!r}")
        encoded += bytes((len(raw),)) + raw
    encoded.append(0)
    if len(encoded) > 255:
        raise ValueError(f"domain name {name!r} is longer than 255 bytes")
    return bytes(encoded)
