"""The reassembler (``vhostnet.stack.fragments``): both families, in order and not, and
hostile fragments: overlaps, duplicates, too many, never completed, floods, tiny first
fragments, offsets beyond 65535, empty fragments. Every case is counted, memory stays
under its cap, nothing raises."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from tests.support.frames import GATEWAY_IP, GUEST_IP, checksum, ipv4, udp
from vhostnet.stack.counters import Counters
from vhostnet.stack.fragments import FRAGMENT_OVERHEAD, FragmentLimits, Reassembler
from vhostnet.wire.ipv4 import IPv4Packet
from vhostnet.wire.ipv6 import IPv6Packet, emit_ipv6_header

SRC6 = ipaddress.IPv6Address("fd00::15").packed
DST6 = ipaddress.IPv6Address("fd00::2").packed
DATAGRAM = udp(GUEST_IP, 4000, GATEWAY_IP, 7, bytes(range(256)) * 15 + b"tail")  # 3852 bytes


def frag4(payload: bytes, offset: int, more: bool, ident: int = 0x4242, proto: int = 17,
          options: bytes = b"") -> IPv4Packet:
    """An IPv4 fragment built by the test helper (not by the code under test)."""
    flags = (0x2000 if more else 0) | offset // 8
    data = ipv4(GUEST_IP, GATEWAY_IP, proto, payload, flags_fragment=flags, ident=ident,
                ihl=5 + len(options) // 4, options=options)
    return IPv4Packet(data, allow_fragments=True)


def split(payload: bytes, step: int) -> list[tuple[int, bytes, bool]]:
    return [(start, payload[start:start + step], start + step < len(payload))
            for start in range(0, len(payload), step)]


def frag6(payload: bytes, offset: int, more: bool, ident: int = 0x42424242,
          upper: int = 17, before: bytes = b"", before_kind: int | None = None) -> IPv6Packet:
    """An IPv6 fragment; ``before`` is an extension header placed ahead of the fragment
    header (whose type is ``before_kind``)."""
    fragment = struct.pack("!BxHI", upper, offset | int(more), ident)
    body = before + fragment + payload
    first = 44 if before_kind is None else before_kind
    return IPv6Packet(emit_ipv6_header(SRC6, DST6, first, len(body)) + body)


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def reassembler(counters: Counters) -> Reassembler:
    return Reassembler(counters)


def drops(counters: Counters) -> dict[str, int]:
    return {name: value for name, value in counters.snapshot().items()
            if name.startswith("frag.drop.")}


# --- IPv4 -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_ipv4_reassembles_in_any_order(reassembler: Reassembler, counters: Counters,
                                       order: str) -> None:
    pieces = split(DATAGRAM, 1480)
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(5).shuffle(pieces)
    results = [reassembler.add_ipv4(frag4(data, start, more), now=1.0)
               for start, data, more in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    whole = IPv4Packet(results[-1])  # a plain, checked packet: no fragment fields left
    assert bytes(whole.payload) == DATAGRAM
    assert (whole.src, whole.dst, whole.proto, whole.ident) == (GUEST_IP, GATEWAY_IP, 17, 0x4242)
    assert whole.total_length == 20 + len(DATAGRAM) and checksum(whole.header) == 0
    assert counters.get("frag.reassembled") == 1 and counters.get("frag.rx") == len(pieces)
    assert reassembler.in_progress() == 0 and reassembler.buffered_bytes == 0
    assert not drops(counters)


def test_ipv4_header_of_the_first_fragment_is_kept_with_its_options(
        reassembler: Reassembler) -> None:
    options = b"\x94\x04\x00\x00"  # router alert, copied on fragmentation
    reassembler.add_ipv4(frag4(DATAGRAM[1480:], 1480, False), 0.0)
    whole = IPv4Packet(reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True, options=options),
                                            0.0))
    assert whole.header_len == 24 and whole.header[20:] == options
    assert bytes(whole.payload) == DATAGRAM[:1480] + DATAGRAM[1480:]


def test_datagrams_with_different_keys_do_not_mix(reassembler: Reassembler) -> None:
    a, b = DATAGRAM, bytes(reversed(DATAGRAM))
    assert reassembler.add_ipv4(frag4(a[:1480], 0, True, ident=1), 0.0) is None
    assert reassembler.add_ipv4(frag4(b[:1480], 0, True, ident=2), 0.0) is None
    assert reassembler.add_ipv4(frag4(a[:1480], 0, True, ident=1, proto=1), 0.0) is None
    assert bytes(IPv4Packet(reassembler.add_ipv4(frag4(b[1480:], 1480, False, ident=2),
                                                 0.0)).payload) == b
    assert bytes(IPv4Packet(reassembler.add_ipv4(frag4(a[1480:], 1480, False, ident=1),
                                                 0.0)).payload) == a
    assert reassembler.in_progress() == 1  # the ICMP one, still waiting


# --- IPv6 -------------------------------------------------------------------------------

def test_ipv6_reassembles_and_removes_the_fragment_header(reassembler: Reassembler,
                                                          counters: Counters) -> None:
    pieces = split(DATAGRAM, 1448)
    random.Random(6).shuffle(pieces)
    results = [reassembler.add_ipv6(frag6(data, start, more), 2.0) for start, data, more in pieces]
    whole = IPv6Packet(results[-1])
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert whole.fragment is None and whole.next_header == 17 and whole.upper_protocol == 17
    assert bytes(whole.upper_payload) == DATAGRAM and whole.payload_length == len(DATAGRAM)
    assert (whole.src, whole.dst) == (SRC6, DST6)
    assert counters.get("frag.reassembled") == 1 and not drops(counters)


def test_ipv6_unfragmentable_headers_stay_and_their_chain_skips_the_fragment_header(
        reassembler: Reassembler) -> None:
    destination_options = bytes((44, 0, 1, 4)) + bytes(4)  # next header: the fragment header
    assert reassembler.add_ipv6(frag6(DATAGRAM[:1440], 0, True, before=destination_options,
                                      before_kind=60), 0.0) is None
    whole = IPv6Packet(reassembler.add_ipv6(frag6(DATAGRAM[1440:], 1440, False,
                                                  before=destination_options, before_kind=60),
                                            0.0))
    assert whole.next_header == 60 and whole.extensions == ((60, 0, 8),)
    assert whole.upper_protocol == 17 and bytes(whole.upper_payload) == DATAGRAM


def test_ipv6_atomic_fragment_is_returned_at_once(reassembler: Reassembler,
                                                  counters: Counters) -> None:
    whole = IPv6Packet(reassembler.add_ipv6(frag6(b"\x80\0\0\0rest", 0, False, upper=58), 0.0))
    assert whole.upper_protocol == 58 and bytes(whole.upper_payload) == b"\x80\0\0\0rest"
    assert counters.get("frag.atomic") == 1 and reassembler.in_progress() == 0


def test_ipv6_and_ipv4_with_same_numbers_are_separate(reassembler: Reassembler) -> None:
    assert reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True, ident=9), 0.0) is None
    assert reassembler.add_ipv6(frag6(DATAGRAM[:1480], 0, True, ident=9), 0.0) is None
    assert reassembler.in_progress() == 2


def test_add_ipv6_takes_fragments_only(reassembler: Reassembler) -> None:
    with pytest.raises(ValueError):
        reassembler.add_ipv6(IPv6Packet(emit_ipv6_header(SRC6, DST6, 17, 0)), 0.0)


# --- hostile fragments --------------------------------------------------------------------

def test_overlap_drops_the_whole_datagram_ipv4(reassembler: Reassembler,
                                               counters: Counters) -> None:
    assert reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True), 0.0) is None
    assert reassembler.add_ipv4(frag4(DATAGRAM[1472:2952], 1472, True), 0.0) is None
    assert counters.get("frag.drop.overlap") == 1 and reassembler.in_progress() == 0
    # What would have completed it now starts a new datagram that never completes.
    assert reassembler.add_ipv4(frag4(DATAGRAM[1480:], 1480, False), 0.0) is None
    assert counters.get("frag.reassembled") == 0


@pytest.mark.parametrize("overlap", [(8, 16), (0, 1448 * 2), (1440, 1456)])
def test_overlap_drops_the_whole_datagram_ipv6_rfc5722(reassembler: Reassembler,
                                                       counters: Counters,
                                                       overlap: tuple[int, int]) -> None:
    assert reassembler.add_ipv6(frag6(DATAGRAM[:1448], 0, True), 0.0) is None
    start, end = overlap
    assert reassembler.add_ipv6(frag6(DATAGRAM[start:end], start, True), 0.0) is None
    assert counters.get("frag.drop.overlap") == 1 and reassembler.in_progress() == 0
    assert reassembler.buffered_bytes == 0


def test_exact_duplicate_is_dropped_alone(reassembler: Reassembler, counters: Counters) -> None:
    reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True), 0.0)
    reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True), 0.0)
    whole = reassembler.add_ipv4(frag4(DATAGRAM[1480:], 1480, False), 0.0)
    assert bytes(IPv4Packet(whole).payload) == DATAGRAM
    assert counters.get("frag.drop.duplicate") == 1


def test_inconsistent_ends_drop_the_datagram(reassembler: Reassembler,
                                             counters: Counters) -> None:
    reassembler.add_ipv4(frag4(DATAGRAM[2960:], 2960, False), 0.0)
    reassembler.add_ipv4(frag4(DATAGRAM[1480:2000], 1480, False), 0.0)  # a second, other end
    assert counters.get("frag.drop.inconsistent") == 1 and reassembler.in_progress() == 0
    reassembler.add_ipv4(frag4(DATAGRAM[1480:2960], 1480, True), 0.0)
    reassembler.add_ipv4(frag4(DATAGRAM[8:1480], 8, False), 0.0)  # an end before a piece
    assert counters.get("frag.drop.inconsistent") == 2


def test_too_many_fragments(counters: Counters) -> None:
    reassembler = Reassembler(counters, FragmentLimits(max_fragments=8))
    for index in range(9):
        reassembler.add_ipv4(frag4(bytes(8), index * 8, True), 0.0)
    assert counters.get("frag.drop.too_many") == 1 and reassembler.in_progress() == 0


def test_never_completed_datagrams_time_out(reassembler: Reassembler,
                                            counters: Counters) -> None:
    reassembler.add_ipv4(frag4(DATAGRAM[:1480], 0, True), now=100.0)
    reassembler.add_ipv6(frag6(DATAGRAM[:1448], 0, True), now=105.0)
    assert reassembler.next_timer() == 130.0
    reassembler.poll_timers(129.9)
    assert reassembler.in_progress() == 2
    reassembler.poll_timers(130.0)  # IPv4: 30 s
    assert counters.get("frag.drop.timeout") == 1 and reassembler.next_timer() == 165.0
    reassembler.poll_timers(165.0)  # IPv6: 60 s
    assert counters.get("frag.drop.timeout") == 2
    assert reassembler.next_timer() is None and reassembler.buffered_bytes == 0
    # The rest of the datagram, too late, does not complete anything.
    assert reassembler.add_ipv4(frag4(DATAGRAM[1480:], 1480, False), 170.0) is None


def test_flood_of_identifications_stays_under_the_caps(counters: Counters) -> None:
    limits = FragmentLimits(max_datagrams=16, max_bytes=64 * 1024)
    reassembler = Reassembler(counters, limits)
    peak_bytes = peak_datagrams = 0
    for ident in range(2000):
        reassembler.add_ipv4(frag4(bytes(1480), 1480 * (ident % 40), True, ident=ident),
                             now=ident * 0.001)
        reassembler.add_ipv6(frag6(bytes(1448), 0, True, ident=ident), now=ident * 0.001)
        peak_bytes = max(peak_bytes, reassembler.buffered_bytes)
        peak_datagrams = max(peak_datagrams, reassembler.in_progress())
    assert peak_bytes <= limits.max_bytes and peak_datagrams <= limits.max_datagrams
    evicted = counters.get("frag.drop.memory")
    assert evicted == 4000 - reassembler.in_progress()
    # A legitimate datagram still gets through afterwards: the oldest make room for it.
    for start, data, more in split(DATAGRAM, 1480):
        whole = reassembler.add_ipv4(frag4(data, start, more, ident=0xFFFF), now=3.0)
    assert bytes(IPv4Packet(whole).payload) == DATAGRAM


def test_byte_cap_evicts_older_datagrams(counters: Counters) -> None:
    charge = 1480 + FRAGMENT_OVERHEAD
    reassembler = Reassembler(counters, FragmentLimits(max_bytes=3 * charge))
    for ident in range(3):
        reassembler.add_ipv4(frag4(bytes(1480), 0, True, ident=ident), float(ident))
    assert reassembler.buffered_bytes == 3 * charge
    reassembler.add_ipv4(frag4(bytes(1480), 0, True, ident=3), 3.0)
    assert reassembler.buffered_bytes == 3 * charge and counters.get("frag.drop.memory") == 1
    reassembler.poll_timers(30.5)  # ident 0 was the one evicted: only 1 (at 1.0) is due
    assert counters.get("frag.drop.timeout") == 0
    reassembler.poll_timers(31.0)
    assert counters.get("frag.drop.timeout") == 1


def test_one_datagram_larger_than_the_byte_cap_is_dropped(counters: Counters) -> None:
    reassembler = Reassembler(counters, FragmentLimits(max_bytes=2000))
    reassembler.add_ipv4(frag4(bytes(1480), 0, True), 0.0)
    reassembler.add_ipv4(frag4(bytes(1480), 1480, True), 0.0)
    assert counters.get("frag.drop.memory") == 1 and reassembler.buffered_bytes == 0


def test_tiny_first_fragments(reassembler: Reassembler, counters: Counters) -> None:
    tcp_header_start = bytes(8)  # a first TCP fragment of 8 bytes: flags in the next one
    assert reassembler.add_ipv4(frag4(tcp_header_start, 0, True, proto=6), 0.0) is None
    assert reassembler.add_ipv6(frag6(b"\0\1\0", 0, True, upper=17), 0.0) is None
    assert counters.get("frag.drop.tiny_first") == 2 and reassembler.in_progress() == 0


def test_offsets_beyond_65535(reassembler: Reassembler, counters: Counters) -> None:
    assert reassembler.add_ipv4(frag4(bytes(1480), 0, True), 0.0) is None
    assert reassembler.add_ipv4(frag4(bytes(16), 8191 * 8, False), 0.0) is None
    assert reassembler.add_ipv6(frag6(bytes(16), 0xFFF8, False), 0.0) is None
    assert counters.get("frag.drop.too_big") == 2 and reassembler.in_progress() == 0


def test_options_of_the_first_fragment_cannot_push_past_65535(reassembler: Reassembler,
                                                              counters: Counters) -> None:
    """Each fragment alone fits with its own 20-byte header; the rebuilt packet with the
    first fragment's 60-byte header would not."""
    last_start = 65512
    assert reassembler.add_ipv4(frag4(bytes(3), last_start, False), 0.0) is None
    for start in range(0, last_start, 1480 * 8 // 8):
        piece = bytes(min(1480, last_start - start))
        reassembler.add_ipv4(frag4(piece, start, True, options=bytes(40) if start == 0 else b""),
                             0.0)
    assert counters.get("frag.drop.too_big") == 1 and counters.get("frag.reassembled") == 0


def test_empty_and_misaligned_fragments(reassembler: Reassembler, counters: Counters) -> None:
    assert reassembler.add_ipv4(frag4(b"", 1480, True), 0.0) is None
    assert reassembler.add_ipv4(frag4(b"", 1480, False), 0.0) is None
    assert reassembler.add_ipv6(frag6(b"", 8, True), 0.0) is None
    assert reassembler.add_ipv4(frag4(bytes(13), 1480, True), 0.0) is None
    assert reassembler.add_ipv6(frag6(bytes(13), 8, True), 0.0) is None
    assert drops(counters) == {"frag.drop.empty": 3, "frag.drop.bad_length": 2}
    assert reassembler.in_progress() == 0


def test_random_garbage_never_raises_and_never_passes_the_caps(counters: Counters) -> None:
    limits = FragmentLimits(max_datagrams=8, max_bytes=32 * 1024, max_fragments=16)
    reassembler = Reassembler(counters, limits)
    rng = random.Random(1234)
    for step in range(5000):
        length = rng.choice((0, 1, 7, 8, 16, 24, 1480))
        offset = rng.randrange(0, 8192) * 8 if rng.random() < 0.3 else rng.randrange(0, 8) * 8
        more, ident = rng.random() < 0.8, rng.randrange(4)
        if rng.random() < 0.5:
            reassembler.add_ipv4(frag4(bytes(length), offset, more, ident=ident), step * 0.01)
        else:
            reassembler.add_ipv6(frag6(bytes(length), offset, more, ident=ident), step * 0.01)
        reassembler.poll_timers(step * 0.01)
        assert reassembler.buffered_bytes <= limits.max_bytes
        assert reassembler.in_progress() <= limits.max_datagrams
    snapshot = counters.snapshot()
    assert snapshot["frag.rx"] == 5000
    assert sum(drops(counters).values()) > 0
