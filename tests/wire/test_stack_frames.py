"""Checks of the hand-built frame builders in tests/support/frames.py."""

from __future__ import annotations

from tests.support.frames import (
    GATEWAY_IP,
    GUEST_IP,
    checksum,
    guest_udp_frame,
    ipv4,
    parse_udp_frame,
)


def test_checksum_of_checksummed_header_is_zero() -> None:
    header = ipv4(GUEST_IP, GATEWAY_IP, 17, b"")
    assert checksum(header) == 0
    assert checksum(ipv4(GUEST_IP, GATEWAY_IP, 17, b"", bad_checksum=True)) != 0


def test_udp_builder_round_trips_through_parser() -> None:
    frame = guest_udp_frame(1000, GATEWAY_IP, 2000, b"hello")
    assert parse_udp_frame(frame) == (GUEST_IP, 1000, GATEWAY_IP, 2000, b"hello")
