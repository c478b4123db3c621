"""DHCPv6 (RFC 8415) messages between client and server: a checked view and an emitter.

A message is a type, a 3-byte transaction id and options (2-byte code, 2-byte
length). ``Dhcpv6Message.parse`` checks that every option fits, that the
options the server reads have the length their meaning fixes, and that an
IA_NA's own options fit too; relay messages (RELAY-FORW/REPL) are refused.
The server is ``vhostnet.stack.dhcpv6``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vhostnet.wire.errors import MalformedPacket

CLIENT_PORT = 546
SERVER_PORT = 547
ALL_SERVERS = bytes.fromhex("ff020000000000000000000000010002")  # ff02::1:2

(SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE, RECONFIGURE,
 INFORMATION_REQUEST, RELAY_FORW, RELAY_REPL) = range(1, 14)

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_USER_CLASS = 15
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_INFORMATION_REFRESH_TIME = 32
OPT_BOOTFILE_URL = 59  # RFC 5970: where a network-booting client finds its file

STATUS_SUCCESS = 0
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NOT_ON_LINK = 4

MAX_DUID_LEN = 130  # RFC 8415 section 11.1: 2 bytes of type and at most 128 of value
_IA_NA_FIXED = struct.Struct("!III")
_IAADDR_FIXED = struct.Struct("!16sII")
_FIXED_LENGTHS = {OPT_ELAPSED_TIME: 2, OPT_RAPID_COMMIT: 0, OPT_PREFERENCE: 1}


@dataclass
class IaNa:
    """An identity association for non-temporary addresses: IAID, T1, T2 and the
    addresses its IAADDR options name."""

    iaid: int
    t1: int = 0
    t2: int = 0
    addresses: list[bytes] = field(default_factory=list)


@dataclass
class Dhcpv6Message:
    """A message: ``options`` as a list of ``(code, value)`` in order (codes may repeat)."""

    msg_type: int
    xid: int
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, code: int) -> bytes | None:
        """The value of the first option ``code``, or None."""
        for kind, value in self.options:
            if kind == code:
                return value
        return None

    def ia_nas(self) -> list[IaNa]:
        return [parse_ia_na(value) for kind, value in self.options if kind == OPT_IA_NA]

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Dhcpv6Message:
        view = memoryview(data)
        if len(view) < 4:
            raise MalformedPacket("short", f"DHCPv6 message of {len(view)} bytes")
        msg_type = view[0]
        if msg_type in (RELAY_FORW, RELAY_REPL):
            raise MalformedPacket("relay", "DHCPv6 relay messages are not served")
        options = parse_options(view[4:])
        for code, value in options:
            expected = _FIXED_LENGTHS.get(code)
            if expected is not None and len(value) != expected:
                raise MalformedPacket("bad_option_length", f"option {code} of {len(value)} bytes")
            if code in (OPT_CLIENTID, OPT_SERVERID) and not 2 < len(value) <= MAX_DUID_LEN:
                raise MalformedPacket("bad_duid", f"DUID of {len(value)} bytes")
            if code == OPT_IA_NA:
                parse_ia_na(value)  # checked now: the server reads it later
        return cls(msg_type, int.from_bytes(view[1:4], "big"), options)

    def emit(self) -> bytes:
        body = bytearray(bytes((self.msg_type,)) + self.xid.to_bytes(3, "big"))
        for code, value in self.options:
            body += encode_option(code, value)
        return bytes(body)


def parse_options(view: memoryview) -> list[tuple[int, bytes]]:
    options: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise MalformedPacket("truncated_option", "DHCPv6 option header runs past the message")
        code, length = struct.unpack_from("!HH", view, offset)
        end = offset + 4 + length
        if end > len(view):
            raise MalformedPacket("truncated_option", f"DHCPv6 option {code} runs past the message")
        options.append((code, bytes(view[offset + 4:end])))
        offset = end
    return options


def parse_ia_na(value: bytes) -> IaNa:
    if len(value) < _IA_NA_FIXED.size:
        raise MalformedPacket("bad_ia_na", f"IA_NA of {len(value)} bytes")
    iaid, t1, t2 = _IA_NA_FIXED.unpack_from(value)
    ia = IaNa(iaid, t1, t2)
    for code, inner in parse_options(memoryview(value)[_IA_NA_FIXED.size:]):
        if code == OPT_IAADDR:
            if len(inner) < _IAADDR_FIXED.size:
                raise MalformedPacket("bad_iaaddr", f"IAADDR of {len(inner)} bytes")
            ia.addresses.append(inner[:16])
    return ia


def encode_option(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"DHCPv6 option {code} of {len(value)} bytes")
    return struct.pack("!HH", code, len(value)) + value


def status_value(status: int, message: str = "") -> bytes:
    """A Status Code option's value."""
    return struct.pack("!H", status) + message.encode("utf-8")


def status_option(status: int, message: str = "") -> bytes:
    """A Status Code option, whole (code and length included: to go inside an IA)."""
    return encode_option(OPT_STATUS_CODE, status_value(status, message))


def ia_na_value(iaid: int, t1: int, t2: int, inner: bytes) -> bytes:
    """An IA_NA option's value: IAID, T1, T2, then its options (already encoded)."""
    return _IA_NA_FIXED.pack(iaid, t1, t2) + inner


def iaaddr_option(address: bytes, preferred: int, valid: int) -> bytes:
    return encode_option(OPT_IAADDR, _IAADDR_FIXED.pack(address, preferred, valid))
