"""TCP wire format: checked view, options, flag sanity, emit with checksum."""

from __future__ import annotations

import struct

import pytest

from vhostnet.wire.checksum import PROTO_TCP, l4_checksum_ok
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpSegment,
    TcpSegmentView,
    build_options,
    emit_segment,
    flags_problem,
    parse_options,
)

SRC = bytes([10, 0, 2, 15])
DST = bytes([10, 0, 2, 2])


def raw_header(flags: int, data_offset_words: int = 5, extra: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", 1, 2, 3, 4, data_offset_words << 4, flags, 5, 0, 0) + extra


def test_emit_then_parse_round_trip_with_options_and_valid_checksum() -> None:
    segment = TcpSegment(40000, 80, 0xFFFFFFF0, 7, SYN | ACK, 29200, b"", 1460, 7, True)
    raw = segment.emit(SRC, DST)
    assert l4_checksum_ok(SRC, DST, PROTO_TCP, raw)
    parsed = TcpSegment.parse(raw)
    assert parsed == segment


def test_payload_and_sequence_space() -> None:
    raw = emit_segment(SRC, DST, 1, 2, 100, 200, ACK | PSH | FIN, 1000, b"hello")
    view = TcpSegmentView(raw)
    assert bytes(view.payload) == b"hello"
    assert view.segment_len == 6  # five bytes plus the FIN
    assert (view.seq, view.ack, view.window) == (100, 200, 1000)


def test_window_field_is_clamped_to_16_bits() -> None:
    raw = emit_segment(SRC, DST, 1, 2, 0, 0, ACK, 10**6)
    assert TcpSegmentView(raw).window == 0xFFFF


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00" * 19, "truncated"),
        (raw_header(ACK, data_offset_words=4), "bad_data_offset"),
        (raw_header(ACK, data_offset_words=6), "bad_data_offset"),  # says 24 bytes, has 20
        (raw_header(ACK, 6, bytes((1, 1, 1, 2))), "bad_options"),  # kind without length byte
        (raw_header(ACK, 6, bytes((3, 1, 0, 0))), "bad_options"),  # length below 2
        (raw_header(ACK, 6, bytes((2, 3, 5, 0))), "bad_options"),  # MSS with length 3
        (raw_header(SYN | FIN), "flags_syn_fin"),
        (raw_header(SYN | RST), "flags_syn_rst"),
        (raw_header(FIN | RST | ACK), "flags_fin_rst"),
        (raw_header(0), "flags_no_ack"),
        (raw_header(FIN), "flags_no_ack"),
        (raw_header(PSH), "flags_no_ack"),
    ],
)
def test_bad_segments_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as caught:
        TcpSegmentView(data)
    assert caught.value.reason == reason


@pytest.mark.parametrize("flags", [SYN, SYN | ACK, RST, RST | ACK, ACK, ACK | FIN, ACK | PSH])
def test_ordinary_flag_combinations_are_fine(flags: int) -> None:
    assert flags_problem(flags) is None


def test_the_view_refuses_exactly_the_flag_combinations_flags_problem_names() -> None:
    # The view tests the flags inline (every guest segment); all 256 values agree.
    for flags in range(256):
        problem = flags_problem(flags)
        if problem is None:
            assert TcpSegmentView(raw_header(flags)).flags == flags
        else:
            with pytest.raises(MalformedPacket) as caught:
                TcpSegmentView(raw_header(flags))
            assert caught.value.reason == problem


def test_options_with_nops_timestamps_and_end() -> None:
    timestamps = bytes((8, 10)) + bytes(8)
    raw = build_options(1400, 3, True) + timestamps + bytes((0, 0))
    options = parse_options(raw)
    assert (options.mss, options.wscale, options.sack_permitted) == (1400, 3, True)


def test_window_scale_above_14_is_capped() -> None:
    assert parse_options(bytes((3, 3, 20, 1))).wscale == 14


def test_options_padded_to_whole_words() -> None:
    for mss, wscale, sack in [(1460, None, False), (1460, 7, False), (None, 7, True)]:
        assert len(build_options(mss, wscale, sack)) % 4 == 0
