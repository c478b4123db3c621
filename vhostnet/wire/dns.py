"""DNS messages (RFC 1035): the header flags, the question section and names in wire form.

vhostnet resolves only its guests' names itself: the forwarder in ``vhostnet.stack.dns``
relays other queries and needs to read the header and the question, build SERVFAIL and
local answers (``reply_to``: A/AAAA records or none, NOERROR or NXDOMAIN), and encode
domain names for the DHCP search list.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

HEADER_LEN = 12
FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AA = 0x0400
RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1


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


def read_question(message: bytes) -> tuple[str, int, int] | None:
    """(name, QTYPE, QCLASS) of a message's single question, the name dotted and without
    the root dot; None when there is not exactly one plain question."""
    if len(message) < HEADER_LEN or struct.unpack_from("!H", message, 4)[0] != 1:
        return None
    question = question_section(message)
    if question is None:
        return None
    labels, offset = [], 0
    while question[offset]:
        labels.append(question[offset + 1 : offset + 1 + question[offset]])
        offset += 1 + question[offset]
    qtype, qclass = struct.unpack_from("!HH", question, offset + 1)
    return b".".join(labels).decode("ascii", "replace"), qtype, qclass


def reply_to(query: bytes, rcode: int, addresses: Sequence[bytes] = (), ttl: int = 0,
             authoritative: bool = False) -> bytes:
    """An answer to ``query``: same id, opcode and RD, the question echoed if it parses, and
    one A (4-byte) or AAAA (16-byte) record per address, for the question's name."""
    query_id, flags, qdcount = struct.unpack_from("!HHH", query, 0)
    question = question_section(query) if qdcount == 1 else None
    records = [struct.pack("!HHHIH", 0xC000 | HEADER_LEN, TYPE_A if len(a) == 4 else TYPE_AAAA,
                           CLASS_IN, ttl, len(a)) + a for a in addresses] if question else []
    reply_flags = (FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | rcode
                   | (FLAG_AA if authoritative else 0))
    header = struct.pack("!HHHHHH", query_id, reply_flags, 1 if question else 0, len(records),
                         0, 0)
    return header + (question or b"") + b"".join(records)


def servfail_for(query: bytes) -> bytes:
    """A SERVFAIL answer to ``query``: same id, opcode and RD, the question echoed if it parses."""
    return reply_to(query, RCODE_SERVFAIL)


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
