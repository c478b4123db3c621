"""TCP segment wire format (RFC 9293): a checked view for parsing and ``emit_segment``.

``TcpSegmentView`` validates the lengths once in its constructor (fixed header,
data offset, option encoding); after that every field read is safe. It also
rejects flag combinations no real TCP sends (SYN+FIN, SYN+RST, FIN+RST, and
anything besides a SYN or RST that lacks ACK), so the engine never has to
reason about them. Failures raise ``MalformedPacket`` with a short ``reason``
that the engine turns into a drop counter.

``emit_segment`` builds a header (with options on SYN segments) plus payload
and fills in the checksum. It is on the hot path for host-to-guest data and is
kept as one plain function so a Cython version can replace it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostnet.wire.checksum import PROTO_TCP, l4_checksum, pseudo_header_sum
from vhostnet.wire.errors import MalformedPacket

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

HEADER_LEN = 20
MAX_HEADER_LEN = 60

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
# RFC 7323 caps the shift at 14 (a 1 GiB window); larger values are treated as 14.
MAX_WSCALE = 14

_HEADER = struct.Struct("!HHIIBBHHH")

# How emit_segment fills the checksum field (see offload.py for when each is allowed).
CSUM_FULL = 0  # the real checksum
CSUM_PARTIAL = 1  # the pseudo-header sum only; the guest completes it (virtio NEEDS_CSUM)
CSUM_NONE = 2  # zero; the guest was told the data is valid (virtio DATA_VALID)


def flags_problem(flags: int) -> str | None:
    """Why a flag combination is impossible, or None when it is acceptable.

    A SYN may come without ACK (it opens the connection), a RST may come without
    ACK (it answers a segment we never acknowledged); everything else a TCP
    sends after the handshake carries ACK, so a bare FIN or a segment with no
    flags at all is a scan or garbage.
    """
    if flags & SYN and flags & FIN:
        return "flags_syn_fin"
    if flags & SYN and flags & RST:
        return "flags_syn_rst"
    if flags & FIN and flags & RST:
        return "flags_fin_rst"
    if not flags & (SYN | RST | ACK):
        return "flags_no_ack"
    return None


@dataclass(frozen=True)
class TcpOptions:
    """The options this translator acts on; everything else (timestamps, SACK blocks) is ignored."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False


def parse_options(raw: bytes | memoryview) -> TcpOptions:
    """Walk the option list; raise ``MalformedPacket`` when an option overruns the header."""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    index = 0
    end = len(raw)
    while index < end:
        kind = raw[index]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            index += 1
            continue
        if index + 1 >= end:
            raise MalformedPacket("bad_options", "option kind without length")
        length = raw[index + 1]
        if length < 2 or index + length > end:
            raise MalformedPacket("bad_options", f"option {kind} length {length}")
        if kind == OPT_MSS:
            if length != 4:
                raise MalformedPacket("bad_options", "MSS option length")
            mss = (raw[index + 2] << 8) | raw[index + 3]
        elif kind == OPT_WSCALE:
            if length != 3:
                raise MalformedPacket("bad_options", "window scale option length")
            wscale = min(raw[index + 2], MAX_WSCALE)
        elif kind == OPT_SACK_PERMITTED:
            if length != 2:
                raise MalformedPacket("bad_options", "SACK-permitted option length")
            sack_permitted = True
        index += length
    return TcpOptions(mss, wscale, sack_permitted)


class TcpSegmentView:
    """A validated, read-only view over one TCP segment (header plus payload)."""

    __slots__ = (
        "_data",
        "src_port",
        "dst_port",
        "seq",
        "ack",
        "header_len",
        "flags",
        "window",
        "checksum",
        "options",
    )

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = data if type(data) is memoryview else memoryview(data).cast("B")
        if len(view) < HEADER_LEN:
            raise MalformedPacket("truncated", f"{len(view)} bytes, header needs {HEADER_LEN}")
        (
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            offset_byte,
            self.flags,
            self.window,
            self.checksum,
            _urgent,
        ) = _HEADER.unpack_from(view)
        self.header_len = (offset_byte >> 4) * 4
        if self.header_len < HEADER_LEN or self.header_len > len(view):
            raise MalformedPacket("bad_data_offset", f"header length {self.header_len}")
        flags = self.flags
        # The cases flags_problem names, tested here without its call (every segment): two of
        # SYN, FIN and RST, or none of SYN, RST and ACK.
        both = flags & (SYN | FIN | RST)
        if both & (both - 1) or not flags & (SYN | RST | ACK):
            raise MalformedPacket(flags_problem(flags) or "flags", f"flags 0x{flags:02x}")
        self.options = (
            parse_options(view[HEADER_LEN : self.header_len])
            if self.header_len > HEADER_LEN
            else TcpOptions()
        )
        self._data = view

    @property
    def payload(self) -> memoryview:
        return self._data[self.header_len :]

    @property
    def segment_len(self) -> int:
        """Sequence space the segment occupies: payload bytes plus one each for SYN and FIN."""
        return len(self._data) - self.header_len + (self.flags & SYN != 0) + (self.flags & FIN != 0)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def build_options(mss: int | None, wscale: int | None, sack_permitted: bool = False) -> bytes:
    """Encode SYN options, padded with NOPs to a multiple of four bytes."""
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return bytes(out)


def emit_segment(
    src_ip: bytes,
    dst_ip: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes | bytearray | memoryview = b"",
    options: bytes = b"",
    checksum: int = CSUM_FULL,
) -> bytes:
    """One complete TCP segment with its checksum over the pseudo-header of the addresses'
    family (CSUM_PARTIAL: IPv4 only).

    ``options`` must already be padded to a multiple of four (``build_options``).
    ``checksum``: CSUM_FULL, or CSUM_PARTIAL / CSUM_NONE for a guest that takes offloads.
    """
    header_len = HEADER_LEN + len(options)
    segment = bytearray(header_len + len(payload))
    _HEADER.pack_into(
        segment,
        0,
        src_port,
        dst_port,
        seq & 0xFFFFFFFF,
        ack & 0xFFFFFFFF,
        (header_len // 4) << 4,
        flags,
        min(window, 0xFFFF),
        0,
        0,
    )
    segment[HEADER_LEN:header_len] = options
    segment[header_len:] = payload
    if checksum == CSUM_FULL:
        value = l4_checksum(src_ip, dst_ip, PROTO_TCP, segment)
    elif checksum == CSUM_PARTIAL:
        value = pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, len(segment))
    else:
        value = 0
    segment[16] = value >> 8
    segment[17] = value & 0xFF
    return bytes(segment)


def segment_payload(
    src_ip: bytes,
    dst_ip: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    window: int,
    data: bytes | bytearray | memoryview,
    mss: int,
    checksum: int = CSUM_FULL,
) -> list[bytes]:
    """Cut ``data`` into ACK segments of at most ``mss`` bytes, the first at ``seq``; PSH on the last.

    The hot path of host-to-guest traffic, kept free of engine state so the
    Cython data path can replace it one for one. For a guest taking segmentation
    offload, ``mss`` is the large size (up to ``offload.MAX_TSO_PAYLOAD``).
    """
    view = memoryview(data)
    segments = []
    for start in range(0, len(view), mss):
        chunk = view[start : start + mss]
        flags = ACK | PSH if start + mss >= len(view) else ACK
        segments.append(
            emit_segment(src_ip, dst_ip, src_port, dst_port, seq + start, ack, flags, window, chunk,
                         checksum=checksum)
        )
    return segments


@dataclass
class TcpSegment:
    """A parsed segment, convenient for tests and for the control path."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TcpSegment:
        view = TcpSegmentView(data)
        return cls(
            view.src_port,
            view.dst_port,
            view.seq,
            view.ack,
            view.flags,
            view.window,
            bytes(view.payload),
            view.options.mss,
            view.options.wscale,
            view.options.sack_permitted,
        )

    def emit(self, src_ip: bytes, dst_ip: bytes) -> bytes:
        options = b""
        if self.mss is not None or self.wscale is not None or self.sack_permitted:
            options = build_options(self.mss, self.wscale, self.sack_permitted)
        return emit_segment(
            src_ip,
            dst_ip,
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            self.flags,
            self.window,
            self.payload,
            options,
        )
