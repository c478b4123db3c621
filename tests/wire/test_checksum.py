"""The Internet checksum against a plain reference implementation of RFC 1071."""

from __future__ import annotations

import random

import pytest

from tests.support.checksum import reference_sum
from vhostnet.wire.checksum import (
    PROTO_TCP,
    PROTO_UDP,
    internet_checksum,
    l4_checksum,
    l4_checksum_ok,
    ones_complement_sum,
    pseudo_header_sum,
)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 19, 20, 21, 1499, 1500, 4095, 4096, 65535])
def test_sum_matches_reference_for_every_tail_length(length: int) -> None:
    rng = random.Random(length)
    data = bytes(rng.getrandbits(8) for _ in range(length))
    for initial in (0, 0xFFFF, 0x1234):
        assert ones_complement_sum(data, initial) == reference_sum(data, initial)


def test_accepts_every_buffer_kind() -> None:
    data = bytes(range(256)) * 3
    expected = reference_sum(data)
    assert ones_complement_sum(bytearray(data)) == expected
    assert ones_complement_sum(memoryview(data)[0:]) == expected
    assert ones_complement_sum(memoryview(data)[::2]) == reference_sum(data[::2])
    assert ones_complement_sum(memoryview(bytearray(data)).cast("H")) == expected


def test_rfc1071_style_ipv4_header() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861


def test_pseudo_header_and_l4_round_trip() -> None:
    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    pseudo = src + dst + bytes((0, PROTO_TCP)) + (40).to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, PROTO_TCP, 40) == reference_sum(pseudo)
    segment = bytearray(random.Random(1).getrandbits(8) for _ in range(40))
    segment[16:18] = b"\x00\x00"
    segment[16:18] = l4_checksum(src, dst, PROTO_TCP, segment).to_bytes(2, "big")
    assert l4_checksum_ok(src, dst, PROTO_TCP, segment)
    segment[30] ^= 0x01
    assert not l4_checksum_ok(src, dst, PROTO_TCP, segment)


def test_udp_zero_checksum_is_sent_as_ffff_and_accepted_as_absent() -> None:
    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    # Find a payload whose checksum computes to zero, so the 0xFFFF rule is exercised.
    for value in range(0x10000):
        datagram = bytearray(b"\x00\x35\x00\x35\x00\x0a\x00\x00") + value.to_bytes(2, "big")
        if internet_checksum(datagram, pseudo_header_sum(src, dst, PROTO_UDP, 10)) == 0:
            assert l4_checksum(src, dst, PROTO_UDP, datagram) == 0xFFFF
            break
    else:
        pytest.fail("no zero-checksum payload found")
    assert l4_checksum_ok(src, dst, PROTO_UDP, b"\x00\x35\x00\x35\x00\x08\x00\x00")


def test_the_one_c_sum_matches_reference_on_random_buffers() -> None:
    # The same inline sum (ext/netbytes.pxd) serves every kernel; odd lengths and
    # misaligned starts are where a word-at-a-time loop goes wrong.
    rng = random.Random(11)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 3000))
        start = rng.randrange(0, 4)
        initial = rng.randrange(0, 1 << 20)
        view = memoryview(data)[start:]
        assert ones_complement_sum(view, initial) == reference_sum(bytes(view), initial)


@pytest.mark.parametrize("family", [4, 16])
def test_segment_verification_in_one_c_call_matches_the_reference(family: int) -> None:
    # l4_checksum_ok takes bytes addresses and a memoryview segment (what the engine hands
    # it) to the one C call; every buffer kind and both families agree with the reference.
    rng = random.Random(family)
    for length in (20, 21, 40, 1460, 1461):
        src, dst = rng.randbytes(family), rng.randbytes(family)
        segment = bytearray(rng.randbytes(length))
        segment[16:18] = b"\x00\x00"
        segment[16:18] = l4_checksum(src, dst, PROTO_TCP, segment).to_bytes(2, "big")
        frame = memoryview(bytes(b"\xee" * 3 + segment))[3:]  # a slice, as the views give
        assert l4_checksum_ok(src, dst, PROTO_TCP, frame)
        assert l4_checksum_ok(src, dst, PROTO_TCP, bytes(segment))
        for corrupt in (0, length // 2, length - 1):
            bad = bytearray(segment)
            bad[corrupt] ^= 0x10
            assert not l4_checksum_ok(src, dst, PROTO_TCP, memoryview(bytes(bad)))
        wrong_src = bytes([src[0] ^ 1]) + src[1:]
        assert not l4_checksum_ok(wrong_src, dst, PROTO_TCP, frame)
