"""DHCPv4 / BOOTP messages (RFC 951, 2131, 2132): a parsed message, its options, and emitting.

``DhcpMessage.parse`` checks what the server relies on (fixed part present,
Ethernet hardware address, options that fit the message and, for the few whose
meaning fixes it, the right length) and raises ``MalformedPacket`` otherwise.
The server that answers the guest is ``vhostnet.stack.dhcp.DhcpServer``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vhostnet.wire.errors import MalformedPacket

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = b"\x63\x82\x53\x63"
FIXED_LEN = 236  # op .. file, before the magic cookie
MIN_REPLY_LEN = 300  # the BOOTP minimum (RFC 951: 64-byte vendor area)
OP_REQUEST = 1
OP_REPLY = 2
FLAG_BROADCAST = 0x8000
FILE_FIELD_LEN = 128

# Message types (option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

# Option codes used here.
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_RAPID_COMMIT = 80
OPT_SEARCH = 119
OPT_CLASSLESS_ROUTES = 121
OPT_END = 255

# Options whose value must have exactly this length to make sense.
_FIXED_OPTION_LENGTHS = {OPT_MESSAGE_TYPE: 1, OPT_REQUESTED_IP: 4, OPT_SERVER_ID: 4}

_FIXED_FORMAT = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")

@dataclass
class DhcpMessage:
    """Parsed representation of a DHCP/BOOTP message (repeated options concatenated, RFC 3396)."""

    op: int
    xid: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes  # the 6-byte MAC (hlen is checked to be 6)
    options: dict[int, bytes] = field(default_factory=dict)
    file: bytes = b""

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value else None

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> DhcpMessage:
        """Parse a client message; ``MalformedPacket`` for anything that cannot be trusted."""
        view = memoryview(data)
        if len(view) < FIXED_LEN:
            raise MalformedPacket("short", f"DHCP message of {len(view)} bytes")
        (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
         _sname, file) = _FIXED_FORMAT.unpack_from(view, 0)
        if htype != 1 or hlen != 6:
            raise MalformedPacket("bad_hardware", f"hardware type {htype} length {hlen}")
        message = cls(op, xid, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr[:6], file=file)
        # Without the cookie this is plain BOOTP whose vendor area we do not interpret.
        if bytes(view[FIXED_LEN : FIXED_LEN + 4]) == MAGIC_COOKIE:
            message.options = parse_options(view[FIXED_LEN + 4 :])
        return message

    def emit(self) -> bytes:
        """A reply message: fixed part, cookie, options, END, padded to 300 bytes."""
        fixed = _FIXED_FORMAT.pack(self.op, 1, 6, 0, self.xid, 0, self.flags, self.ciaddr,
                                   self.yiaddr, self.siaddr, self.giaddr, self.chaddr,
                                   b"", self.file)
        body = bytearray(fixed + MAGIC_COOKIE)
        for code, value in self.options.items():
            body += encode_option(code, value)
        body.append(OPT_END)
        if len(body) < MIN_REPLY_LEN:
            body += bytes(MIN_REPLY_LEN - len(body))
        return bytes(body)


def parse_options(view: memoryview) -> dict[int, bytes]:
    """Options area -> {code: value}; repeated codes are concatenated (RFC 3396)."""
    options: dict[int, bytes] = {}
    offset = 0
    while offset < len(view):
        code = view[offset]
        if code == OPT_PAD:
            offset += 1
            continue
        if code == OPT_END:
            break
        if offset + 1 >= len(view):
            raise MalformedPacket("truncated_option", f"option {code} has no length byte")
        length = view[offset + 1]
        end = offset + 2 + length
        if end > len(view):
            raise MalformedPacket("truncated_option", f"option {code} runs past the message")
        options[code] = options.get(code, b"") + bytes(view[offset + 2 : end])
        offset = end
    for code, expected in _FIXED_OPTION_LENGTHS.items():
        if code in options and len(options[code]) != expected:
            raise MalformedPacket("bad_option_length", f"option {code} of {len(options[code])} bytes")
    return options


def encode_option(code: int, value: bytes) -> bytes:
    """One option; values longer than 255 bytes are split into consecutive pieces (RFC 3396)."""
    if not value:
        return bytes((code, 0))
    pieces = bytearray()
    for start in range(0, len(value), 255):
        chunk = value[start : start + 255]
        pieces += bytes((code, len(chunk))) + chunk
    return bytes(pieces)


def classless_route(destination: bytes, prefix_length: int, router: bytes) -> bytes:
    """One RFC 3442 route: prefix width, the significant destination octets, the router."""
    significant = (prefix_length + 7) // 8
    return bytes((prefix_length,)) + destination[:significant] + router
