"""The migration state blob: versioned, self-describing, checked on load.

Layout (little endian)::

    magic "VHNETSTA" | u16 version | u16 section count | u32 body length
    section*: u8 name length | name (ASCII) | u32 payload length | payload
    u32 CRC-32 of everything before it

Sections are named so a newer writer can add some an older reader skips;
payloads are JSON documents (UTF-8). Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import json
import struct
import zlib

MAGIC = b"VHNETSTA"
VERSION = 2  # 2: TCP records may carry a frozen host socket ("host"); 1 is still read
READABLE_VERSIONS = (1, 2)
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_SECTIONS = 256

_HEADER = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")


class StateError(ValueError):
    """The blob is not a vhostnet state we can load; the message says why."""


def checked_int(value: object, what: str, low: int, high: int) -> int:
    """``value`` from a record if it is an integer (not a bool) in ``low..high``, else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not an integer in {low}..{high}")
    return value


def encode_state(sections: dict[str, object]) -> bytes:
    """Serialise ``sections`` (name -> JSON-compatible value) into one blob."""
    if len(sections) > MAX_SECTIONS:
        raise ValueError(f"too many sections ({len(sections)})")
    body = bytearray()
    for name, value in sections.items():
        raw_name = name.encode("ascii")
        if not 0 < len(raw_name) < 256:
            raise ValueError(f"bad section name {name!r}")
        payload = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        body += bytes([len(raw_name)]) + raw_name + _LENGTH.pack(len(payload)) + payload
    blob = _HEADER.pack(MAGIC, VERSION, len(sections), len(body)) + bytes(body)
    return blob + _CRC.pack(zlib.crc32(blob))


def decode_state(blob: bytes | bytearray | memoryview) -> dict[str, object]:
    """Parse and verify a blob; raise ``StateError`` for anything not exactly right."""
    data = bytes(blob)
    if len(data) > MAX_BLOB_BYTES:
        raise StateError(f"state blob too large ({len(data)} bytes)")
    if len(data) < _HEADER.size + _CRC.size:
        raise StateError(f"state blob truncated ({len(data)} bytes)")
    magic, version, count, body_length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a vhostnet state blob (bad magic)")
    if version not in READABLE_VERSIONS:
        raise StateError(f"state version {version} is not supported "
                         f"(this vhostnet reads {', '.join(map(str, READABLE_VERSIONS))})")
    expected = _HEADER.size + body_length + _CRC.size
    if len(data) != expected:
        raise StateError(f"state blob length {len(data)} does not match its header ({expected})")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise StateError("state blob checksum mismatch (corrupted)")
    if count > MAX_SECTIONS:
        raise StateError(f"state blob claims {count} sections")
    sections: dict[str, object] = {}
    offset, end = _HEADER.size, _HEADER.size + body_length
    for _ in range(count):
        if offset >= end:
            raise StateError("state blob has fewer sections than announced")
        name_length = data[offset]
        offset += 1
        if offset + name_length + _LENGTH.size > end:
            raise StateError("state section header runs past the end")
        try:
            name = data[offset : offset + name_length].decode("ascii")
        except UnicodeDecodeError:
            raise StateError("state section name is not ASCII") from None
        offset += name_length
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > end:
            raise StateError(f"state section {name!r} runs past the end")
        try:
            sections[name] = json.loads(data[offset : offset + length])
        except ValueError:
            raise StateError(f"state section {name!r} is not valid JSON") from None
        offset += length
    if offset != end:
        raise StateError("state blob has trailing bytes after its sections")
    return sections
