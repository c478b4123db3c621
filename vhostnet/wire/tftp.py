"""TFTP wire format (RFC 1350, options RFC 2347): a checked view plus parsed packets.

Every TFTP packet starts with a 2-byte opcode. ``TftpView`` validates the
length for that opcode once and then reads fields. The parsed classes
(``Request``, ``Data``, ``Ack``, ``Error``, ``OptionAck``) have ``parse`` and
``emit`` so the server and the tests speak in values, not byte offsets.

Strings on the wire are NUL-terminated. File names are decoded as UTF-8 with
``surrogateescape`` so that any byte sequence survives the round trip to a
host file name; modes and option names are ASCII and case-insensitive, so they
are lower-cased here, once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from vhostnet.wire.errors import MalformedPacket

TFTP_PORT = 69
DEFAULT_BLOCK_SIZE = 512
DATA_HEADER_LEN = 4  # opcode and block number before a DATA packet's bytes


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6  # RFC 2347


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TRANSFER_ID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8  # RFC 2347: a client or server declines the negotiated options


class TftpError(Exception):
    """A failure that becomes a TFTP ERROR packet: ``code`` and a human message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"TFTP error {int(code)}: {message}")
        self.code = ErrorCode(code)
        self.message = message


_OPCODE = struct.Struct("!H")
_OPCODE_AND_NUMBER = struct.Struct("!HH")

# The fixed part each opcode needs before anything else can be read: DATA,
# ACK and ERROR carry a 16-bit number after the opcode; requests and OACK
# are only strings.
_MIN_LENGTH = {
    Opcode.RRQ: 2,
    Opcode.WRQ: 2,
    Opcode.DATA: DATA_HEADER_LEN,
    Opcode.ACK: 4,
    Opcode.ERROR: 4,
    Opcode.OACK: 2,
}


class TftpView:
    """Checked view of one TFTP packet; raises ``MalformedPacket`` on construction.

    After construction ``opcode`` is a known ``Opcode`` and the buffer is long
    enough for ``number`` (block number or error code) where the opcode has one.
    """

    __slots__ = ("data", "opcode")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = bytes(data)
        if len(self.data) < 2:
            raise MalformedPacket("tftp_short", f"{len(self.data)} bytes, no opcode")
        (raw_opcode,) = _OPCODE.unpack_from(self.data)
        try:
            self.opcode = Opcode(raw_opcode)
        except ValueError:
            raise MalformedPacket("tftp_bad_opcode", f"opcode {raw_opcode}") from None
        if len(self.data) < _MIN_LENGTH[self.opcode]:
            raise MalformedPacket(
                "tftp_short", f"{self.opcode.name} of {len(self.data)} bytes"
            )

    @property
    def number(self) -> int:
        """Block number (DATA, ACK) or error code (ERROR)."""
        return _OPCODE_AND_NUMBER.unpack_from(self.data)[1]

    @property
    def body(self) -> bytes:
        """What follows the fixed part: strings for requests/OACK/ERROR, data for DATA."""
        return self.data[_MIN_LENGTH[self.opcode] :]


def _split_strings(body: bytes, what: str) -> list[bytes]:
    """Split a run of NUL-terminated strings; the last one must be terminated too."""
    if not body.endswith(b"\0"):
        raise MalformedPacket("tftp_unterminated", f"{what} lacks its NUL terminator")
    return body[:-1].split(b"\0")


def _ascii_lower(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise MalformedPacket("tftp_not_ascii", f"{what} is not ASCII") from None


def _parse_options(strings: list[bytes]) -> dict[str, str]:
    """Name/value pairs; a trailing unpaired name is ignored, the first of duplicates wins.

    Leniency here is deliberate: some boot ROMs pad requests with extra NULs,
    and an option the server cannot read is simply one it does not accept.
    """
    options: dict[str, str] = {}
    for index in range(0, len(strings) - 1, 2):
        try:
            name = strings[index].decode("ascii").lower()
            value = strings[index + 1].decode("ascii")
        except UnicodeDecodeError:
            continue  # not ASCII: unreadable, so not accepted (and could not be echoed)
        if name and name not in options:
            options[name] = value
    return options


def _emit_options(options: dict[str, str]) -> bytes:
    return b"".join(
        name.encode("ascii") + b"\0" + value.encode("ascii") + b"\0"
        for name, value in options.items()
    )


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ: file name, transfer mode (lower case) and options (names lower case)."""

    opcode: Opcode
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Request:
        return cls.from_view(TftpView(data))

    @classmethod
    def from_view(cls, view: TftpView) -> Request:
        if view.opcode not in (Opcode.RRQ, Opcode.WRQ):
            raise MalformedPacket("tftp_not_request", view.opcode.name)
        strings = _split_strings(view.body, "request")
        if len(strings) < 2:
            raise MalformedPacket("tftp_no_mode", "request has a file name but no mode")
        if not strings[0]:
            raise MalformedPacket("tftp_empty_filename", "request names no file")
        filename = strings[0].decode("utf-8", "surrogateescape")
        mode = _ascii_lower(strings[1], "mode")
        return cls(view.opcode, filename, mode, _parse_options(strings[2:]))

    def emit(self) -> bytes:
        name = self.filename.encode("utf-8", "surrogateescape")
        return (
            _OPCODE.pack(self.opcode)
            + name + b"\0"
            + self.mode.encode("ascii") + b"\0"
            + _emit_options(self.options)
        )


@dataclass(frozen=True)
class Data:
    """DATA: a 16-bit block number (wraps to 0 after 65535) and up to blksize bytes."""

    block: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Data:
        view = TftpView(data)
        if view.opcode != Opcode.DATA:
            raise MalformedPacket("tftp_not_data", view.opcode.name)
        return cls(view.number, view.body)

    def emit(self) -> bytes:
        return _OPCODE_AND_NUMBER.pack(Opcode.DATA, self.block & 0xFFFF) + self.payload


@dataclass(frozen=True)
class Ack:
    block: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Ack:
        view = TftpView(data)
        if view.opcode != Opcode.ACK:
            raise MalformedPacket("tftp_not_ack", view.opcode.name)
        return cls(view.number)

    def emit(self) -> bytes:
        return _OPCODE_AND_NUMBER.pack(Opcode.ACK, self.block & 0xFFFF)


@dataclass(frozen=True)
class Error:
    """ERROR: a code and a message. A missing terminator is tolerated on input."""

    code: int
    message: str

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Error:
        view = TftpView(data)
        if view.opcode != Opcode.ERROR:
            raise MalformedPacket("tftp_not_error", view.opcode.name)
        # The message is only for humans; a peer that forgets the NUL still
        # means "stop", so do not make the error itself an error.
        text = view.body.split(b"\0", 1)[0]
        return cls(view.number, text.decode("utf-8", "replace"))

    def emit(self) -> bytes:
        text = self.message.encode("ascii", "replace")
        return _OPCODE_AND_NUMBER.pack(Opcode.ERROR, int(self.code)) + text + b"\0"


@dataclass(frozen=True)
class OptionAck:
    """OACK (RFC 2347): the options the server accepted, with their final values."""

    options: dict[str, str]

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> OptionAck:
        view = TftpView(data)
        if view.opcode != Opcode.OACK:
            raise MalformedPacket("tftp_not_oack", view.opcode.name)
        return cls(_parse_options(_split_strings(view.body, "OACK")))

    def emit(self) -> bytes:
        return _OPCODE.pack(Opcode.OACK) + _emit_options(self.options)
