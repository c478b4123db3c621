"""The Ethernet switch between guest ports, driven with FrameBatches as a device would.

Learning, ageing, flooding and unicast, the compaction of the sender's batch to its
router's frames, full outgoing batches and hostile batches; then the offloads a
destination did not negotiate: checksums completed and TCP super-frames cut, each result
checked with the test's own checksum and header parsing (tests/support/frames.py).
"""

from __future__ import annotations

import logging
import os
import struct

import pytest

from tests.support.frames import GATEWAY_MAC, checksum, eth
from vhostnet.virtqueue import FrameBatch, Switch
from vhostnet.wire.offload import GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, vnet_word

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
MAC_C = bytes.fromhex("525400000003")
BROADCAST = b"\xff" * 6
MULTICAST = bytes.fromhex("333300000001")
LOCAL_ETHERTYPE = 0x88B5  # IEEE local experimental: plain payload, nothing parses it


def frame(dst: bytes, src: bytes, tag: int = 0, size: int = 60) -> bytes:
    """A frame whose payload starts with ``tag`` (to tell frames apart)."""
    return eth(dst, src, LOCAL_ETHERTYPE, struct.pack("!I", tag).ljust(size - 14, b"."))


def batch_of(*frames: bytes, vnets: tuple[int, ...] = ()) -> FrameBatch:
    batch = FrameBatch(max(len(frames), 1), 1 << 20)
    for i, data in enumerate(frames):
        assert batch.append(data, vnets[i] if i < len(vnets) else 0)
    return batch


def waiting(switch: Switch, port: int) -> list[bytes]:
    out = switch.outgoing(port)
    return [] if out is None else [bytes(out.frame(i)) for i in range(len(out))]


def kept(batch: FrameBatch) -> list[bytes]:
    return [bytes(batch.frame(i)) for i in range(len(batch))]


def send(switch: Switch, port: int, *frames: bytes, now: float = 0.0,
         vnets: tuple[int, ...] = ()) -> list[bytes]:
    """Switch ``frames`` from ``port``; the frames left for its router."""
    batch = batch_of(*frames, vnets=vnets)
    count = switch.switch_batch(port, batch, len(frames), now)
    assert count == len(batch)
    return kept(batch)


@pytest.fixture
def switch() -> Switch:
    sw = Switch(4, GATEWAY_MAC)
    assert [sw.add_port() for _ in range(3)] == [0, 1, 2]
    return sw


def drain(switch: Switch, *ports: int) -> None:
    for port in ports:
        out = switch.outgoing(port)
        if out is not None:
            switch.taken(port, len(out))


# ---- learning, forwarding, flooding ---------------------------------------------------


def test_unknown_unicast_floods_then_learned_unicast_goes_to_its_port_only(switch) -> None:
    to_b = frame(MAC_B, MAC_A, 1)
    assert send(switch, 0, to_b) == []
    assert waiting(switch, 1) == [to_b] and waiting(switch, 2) == [to_b]
    assert waiting(switch, 0) == []
    drain(switch, 1, 2)
    to_a = frame(MAC_A, MAC_B, 2)
    assert send(switch, 1, to_a) == []
    assert waiting(switch, 0) == [to_a] and waiting(switch, 2) == []
    again = frame(MAC_B, MAC_A, 3)
    send(switch, 0, again)
    assert waiting(switch, 1) == [again] and waiting(switch, 2) == []
    assert {(mac, port) for mac, port, _seen in switch.macs()} == {(MAC_A, 0), (MAC_B, 1)}
    counters = switch.counters()
    assert counters["switch.flooded"] == 1
    assert counters["switch.forwarded"] == 2
    assert counters["switch.learned"] == 2


def test_broadcast_and_multicast_flood_and_stay_for_the_router(switch) -> None:
    frames = [frame(BROADCAST, MAC_A, 1), frame(MULTICAST, MAC_A, 2)]
    assert send(switch, 0, *frames) == frames
    assert waiting(switch, 1) == frames and waiting(switch, 2) == frames
    assert waiting(switch, 0) == []  # never back to the sender
    assert switch.counters()["switch.to_router"] == 2


def test_compaction_keeps_order_and_only_gateway_broadcast_multicast(switch) -> None:
    send(switch, 1, frame(BROADCAST, MAC_B))  # B learned on port 1
    drain(switch, 0, 2)
    mixed = [frame(GATEWAY_MAC, MAC_A, 1), frame(MAC_B, MAC_A, 2), frame(BROADCAST, MAC_A, 3),
             frame(MAC_C, MAC_A, 4), frame(GATEWAY_MAC, MAC_A, 5), frame(MULTICAST, MAC_A, 6)]
    unswitched = frame(MAC_B, MAC_A, 7)
    batch = batch_of(*mixed, unswitched)
    assert switch.switch_batch(0, batch, len(mixed), 1.0) == 4
    # The frame past ``count`` was not switched: it closes up behind the kept ones.
    assert kept(batch) == [mixed[0], mixed[2], mixed[4], mixed[5], unswitched]
    assert waiting(switch, 1) == [mixed[1], mixed[2], mixed[3], mixed[5]]
    assert waiting(switch, 2) == [mixed[2], mixed[3], mixed[5]]


def test_a_frame_never_goes_back_to_its_port(switch) -> None:
    send(switch, 0, frame(BROADCAST, MAC_A), frame(BROADCAST, MAC_C))  # A and C on port 0
    drain(switch, 1, 2)
    assert send(switch, 0, frame(MAC_C, MAC_A)) == []
    assert all(waiting(switch, port) == [] for port in range(3))
    assert switch.counters()["switch.dropped.same_port"] == 1


def test_a_moved_mac_is_learned_again(switch) -> None:
    send(switch, 0, frame(BROADCAST, MAC_A))
    send(switch, 2, frame(BROADCAST, MAC_A))
    drain(switch, 0, 1, 2)
    send(switch, 1, frame(MAC_A, MAC_B, 9))
    assert waiting(switch, 2) == [frame(MAC_A, MAC_B, 9)] and waiting(switch, 0) == []
    assert switch.counters()["switch.moved"] == 1


def test_entries_age_out_unless_seen_again() -> None:
    sw = Switch(3, GATEWAY_MAC, ageing_seconds=10.0)
    for _ in range(3):
        sw.add_port()
    send(sw, 0, frame(BROADCAST, MAC_A), now=100.0)
    send(sw, 1, frame(BROADCAST, MAC_B), now=100.0)
    send(sw, 1, frame(BROADCAST, MAC_B), now=108.0)  # B seen again, A not
    drain(sw, 0, 1, 2)
    send(sw, 2, frame(MAC_B, MAC_C), frame(MAC_A, MAC_C), now=112.0)
    assert waiting(sw, 1) == [frame(MAC_B, MAC_C), frame(MAC_A, MAC_C)]  # B known, A flooded
    assert waiting(sw, 0) == [frame(MAC_A, MAC_C)]
    assert sw.counters()["switch.aged"] == 1
    assert {mac for mac, _port, _seen in sw.macs()} == {MAC_B, MAC_C}
    seen = {mac: when for mac, _port, when in sw.macs()}
    assert seen[MAC_B] == 108.0 and seen[MAC_C] == 112.0


def test_group_and_gateway_sources_are_dropped_and_never_learned(switch) -> None:
    bad = [frame(BROADCAST, MULTICAST), frame(MAC_B, GATEWAY_MAC), frame(GATEWAY_MAC, BROADCAST)]
    assert send(switch, 0, *bad) == []
    assert all(waiting(switch, port) == [] for port in range(3))
    assert switch.macs() == []
    assert switch.counters()["switch.dropped.bad_source"] == 3


def test_a_full_table_evicts_the_oldest_and_learns_the_newest() -> None:
    sw = Switch(2, GATEWAY_MAC)
    sw.add_port(), sw.add_port()
    macs = [b"\x52\x54" + i.to_bytes(4, "big") for i in range(6000)]
    for start in range(0, len(macs), 500):
        sources = [frame(GATEWAY_MAC, mac) for mac in macs[start:start + 500]]
        send(sw, 0, *sources, now=start / 1000)  # all younger than the ageing time
    counters = sw.counters()
    assert counters["switch.evicted"] > 0
    assert counters["switch.learned"] == 6000
    assert len(sw.macs()) <= 4096
    send(sw, 1, frame(macs[-1], MAC_B), now=6.0)
    assert waiting(sw, 0) == [frame(macs[-1], MAC_B)]  # the newest is known: not flooded
    assert sw.counters()["switch.flooded"] == 0


def test_ports_are_reused_and_removal_forgets_their_macs(switch) -> None:
    switch.add_port()
    with pytest.raises(RuntimeError):
        switch.add_port()
    send(switch, 1, frame(BROADCAST, MAC_B))
    drain(switch, 0, 2, 3)
    switch.remove_port(1)
    assert all(port != 1 for _mac, port, _seen in switch.macs())
    with pytest.raises(ValueError):
        switch.outgoing(1)
    assert switch.add_port() == 1
    assert waiting(switch, 1) == []
    send(switch, 0, frame(MAC_B, MAC_A))  # B forgotten: flooded
    assert waiting(switch, 1) == [frame(MAC_B, MAC_A)]
    assert waiting(switch, 3) == [frame(MAC_B, MAC_A)]


# ---- outgoing batches -----------------------------------------------------------------


def test_a_full_outgoing_batch_drops_and_counts_and_taken_keeps_order() -> None:
    sw = Switch(2, GATEWAY_MAC, outgoing_frames=4)
    sw.add_port(), sw.add_port()
    frames = [frame(BROADCAST, MAC_A, i) for i in range(6)]
    send(sw, 0, *frames)
    assert waiting(sw, 1) == frames[:4]
    assert sw.counters()["switch.dropped.outgoing_full"] == 2
    sw.taken(1, 1)
    assert waiting(sw, 1) == frames[1:4]
    send(sw, 0, frame(BROADCAST, MAC_A, 9))
    assert waiting(sw, 1) == [*frames[1:4], frame(BROADCAST, MAC_A, 9)]
    sw.taken(1, 4)
    assert sw.outgoing(1) is None
    with pytest.raises(ValueError):
        sw.taken(1, 1)


def test_the_byte_limit_of_an_outgoing_batch_counts_too() -> None:
    sw = Switch(2, GATEWAY_MAC, outgoing_bytes=1000)
    sw.add_port(), sw.add_port()
    send(sw, 0, *(frame(BROADCAST, MAC_A, i, size=400) for i in range(3)))
    assert len(waiting(sw, 1)) == 2
    assert sw.counters()["switch.dropped.outgoing_full"] == 1


# ---- hostile batches ------------------------------------------------------------------


def test_short_frames_and_bad_offsets_are_dropped_and_counted(switch, caplog) -> None:
    good = frame(BROADCAST, MAC_A)
    batch = batch_of(b"", b"\xff" * 13, good, good, good)
    _storage, offsets, lengths, _vnets = batch.arrays()
    offsets[3] = batch.buffer_bytes - 10  # runs past the storage
    lengths[4] = 0xFFFFFFFF
    with caplog.at_level(logging.WARNING, logger="vhostnet.virtqueue.switch"):
        assert switch.switch_batch(0, batch, 5, 0.0) == 1
        switch.switch_batch(0, batch_of(b""), 1, 0.0)
    assert kept(batch) == [good]
    counters = switch.counters()
    assert counters["switch.dropped.short"] == 3
    assert counters["switch.dropped.bad_offset"] == 2
    assert waiting(switch, 1) == [good]
    # One line per reason, not one per frame.
    assert sum("short" in record.getMessage() for record in caplog.records) == 1


def test_counts_and_ports_out_of_range(switch) -> None:
    batch = batch_of(frame(BROADCAST, MAC_A))
    assert switch.switch_batch(0, batch, 100, 0.0) == 1  # clamped to the batch
    with pytest.raises(ValueError):
        switch.switch_batch(0, batch, -1, 0.0)
    with pytest.raises(ValueError):
        switch.switch_batch(3, batch, 1, 0.0)  # not added
    with pytest.raises(ValueError):
        switch.switch_batch(-1, batch, 1, 0.0)
    with pytest.raises(ValueError):
        Switch(2, b"\x00" * 5)


# ---- offloads the destination did not negotiate ----------------------------------------

IP_A = bytes([10, 0, 2, 15])
IP_B = bytes([10, 0, 2, 16])
IP6_A = bytes.fromhex("fd00000000000000000000000000000a")
IP6_B = bytes.fromhex("fd00000000000000000000000000000b")
TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 7, 9)  # NOP NOP TS: a 32-byte header


def fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def pseudo_v4(length: int, proto: int = 6) -> bytes:
    return IP_A + IP_B + struct.pack("!BBH", 0, proto, length)


def pseudo_v6(length: int, proto: int = 6) -> bytes:
    return IP6_A + IP6_B + struct.pack("!I3xB", length, proto)


def tcp_partial(payload: bytes, pseudo: bytes, seq: int = 1000, flags: int = 0x18) -> bytes:
    """A TCP segment as a guest's driver leaves it for the device: the checksum field holds
    the folded pseudo-header sum (virtio NEEDS_CSUM)."""
    header = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (8 << 4), flags, 500, 0, 0)
    header += TIMESTAMPS
    partial = ~checksum(pseudo) & 0xFFFF
    return header[:16] + struct.pack("!H", partial) + header[18:] + payload


def tcp4_frame(payload: bytes, flags: int = 0x18, ident: int = 0x4000) -> bytes:
    segment = tcp_partial(payload, pseudo_v4(32 + len(payload)), flags=flags)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), ident, 0x4000, 64, 6, 0,
                         IP_A, IP_B)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return eth(MAC_B, MAC_A, 0x0800, header + segment)


def tcp6_frame(payload: bytes, flags: int = 0x18) -> bytes:
    segment = tcp_partial(payload, pseudo_v6(32 + len(payload)), flags=flags)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 6, 64, IP6_A, IP6_B)
    return eth(MAC_B, MAC_A, 0x86DD, header + segment)


def to_b(switch: Switch, data: bytes, vnet: int) -> list[tuple[bytes, int]]:
    """Switch one frame from port 0 to B (learned on port 1): what port 1 gets."""
    send(switch, 1, frame(BROADCAST, MAC_B))
    drain(switch, 0, 2)
    send(switch, 0, data, vnets=(vnet,))
    out = switch.outgoing(1)
    result = [] if out is None else [(bytes(out.frame(i)), out.vnet(i)) for i in range(len(out))]
    drain(switch, 1)
    return result


def test_partial_checksums_are_completed_for_a_port_without_csum(switch) -> None:
    data = tcp4_frame(os.urandom(333))
    word = vnet_word(NEEDS_CSUM, csum_start=34, csum_offset=16)
    [(out, vnet)] = to_b(switch, data, word)
    assert vnet == 0
    assert out[:50] == data[:50] and out[52:] == data[52:]  # only the checksum changed
    assert checksum(pseudo_v4(len(out) - 34) + out[34:]) == 0
    assert switch.counters()["switch.checksums_completed"] == 1


def test_partial_udp6_checksum_is_completed(switch) -> None:
    body = os.urandom(101)
    udp = struct.pack("!HHHH", 5353, 5353, 8 + len(body), ~checksum(pseudo_v6(109, 17)) & 0xFFFF)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(udp) + len(body), 17, 64, IP6_A, IP6_B)
    data = eth(MAC_B, MAC_A, 0x86DD, ip6 + udp + body)
    [(out, vnet)] = to_b(switch, data, vnet_word(NEEDS_CSUM, csum_start=54, csum_offset=6))
    assert vnet == 0
    assert checksum(pseudo_v6(109, 17) + out[54:]) == 0
    assert out[60:62] != b"\0\0"


def test_a_port_with_the_offloads_gets_the_frame_and_word_unchanged(switch) -> None:
    switch.set_port_offloads(1, csum=True, tso4=True, tso6=False)
    partial = tcp4_frame(b"x" * 100)
    word = vnet_word(NEEDS_CSUM, csum_start=34, csum_offset=16)
    assert to_b(switch, partial, word) == [(partial, word)]
    big = tcp4_frame(os.urandom(5000))
    gso = vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16)
    assert to_b(switch, big, gso) == [(big, gso)]
    assert switch.counters()["switch.segmented"] == 0


def test_a_checksum_position_outside_the_frame_is_dropped(switch) -> None:
    data = tcp4_frame(b"x" * 10)
    assert to_b(switch, data, vnet_word(NEEDS_CSUM, csum_start=34, csum_offset=len(data))) == []
    assert to_b(switch, data, vnet_word(NEEDS_CSUM, csum_start=4, csum_offset=2)) == []
    assert switch.counters()["switch.dropped.bad_offload"] == 2


def check_segments(segments: list[tuple[bytes, int]], original: bytes, ipv6: bool,
                   mss: int) -> bytes:
    """Every header of every segment checked against the super-frame; the payload rejoined."""
    l4 = 54 if ipv6 else 34
    headers = l4 + 32
    payload = b""
    flags = original[l4 + 13]
    for k, (seg, vnet) in enumerate(segments):
        last = k == len(segments) - 1
        assert vnet == 0
        chunk = seg[headers:]
        assert len(chunk) == (len(original) - headers - k * mss if last else mss)
        assert seg[:12] == original[:12]
        if ipv6:
            assert struct.unpack_from("!H", seg, 18)[0] == 32 + len(chunk)
            assert seg[14:18] == original[14:18] and seg[20:54] == original[20:54]
            pseudo = pseudo_v6(32 + len(chunk))
        else:
            ip = seg[14:34]
            assert checksum(ip) == 0
            total, ident = struct.unpack_from("!HH", ip, 2)
            assert total == 20 + 32 + len(chunk)
            assert ident == (struct.unpack_from("!H", original, 18)[0] + k) & 0xFFFF
            assert ip[6:10] == original[20:24] and ip[12:] == original[26:34]
            pseudo = pseudo_v4(32 + len(chunk))
        tcp = seg[l4:]
        assert checksum(pseudo + tcp) == 0
        assert struct.unpack_from("!I", tcp, 4)[0] == 1000 + k * mss
        expected = flags if last else flags & ~0x09
        assert tcp[13] == (expected if k == 0 else expected & ~0x80)
        assert tcp[:4] == original[l4:l4 + 4] and tcp[8:13] == original[l4 + 8:l4 + 13]
        assert tcp[14:16] == original[l4 + 14:l4 + 16] and tcp[18:32] == original[l4 + 18:headers]
        payload += chunk
    return payload


@pytest.mark.parametrize("ipv6", [False, True])
def test_a_super_frame_is_cut_for_a_port_without_tso(switch, ipv6: bool) -> None:
    body = os.urandom(5000)
    mss = 1448
    build, gso, start = (tcp6_frame, GSO_TCPV6, 54) if ipv6 else (tcp4_frame, GSO_TCPV4, 34)
    # Without TSO for this family (the other family's does not count).
    switch.set_port_offloads(1, csum=True, tso4=ipv6, tso6=not ipv6)
    data = build(body, flags=0x80 | 0x18 | 0x01)  # CWR PSH ACK FIN
    segments = to_b(switch, data, vnet_word(NEEDS_CSUM, gso, mss, start, 16))
    assert len(segments) == 4
    assert check_segments(segments, data, ipv6, mss) == body
    counters = switch.counters()
    assert (counters["switch.segmented"], counters["switch.segments"]) == (1, 4)


def test_a_super_frame_with_the_payload_of_one_segment_is_one_frame(switch) -> None:
    data = tcp4_frame(b"y" * 100)
    segments = to_b(switch, data, vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16))
    assert check_segments(segments, data, False, 1448) == b"y" * 100


def test_segments_that_do_not_fit_are_all_dropped() -> None:
    sw = Switch(3, GATEWAY_MAC, outgoing_frames=3)
    sw.add_port(), sw.add_port(), sw.add_port()
    assert to_b(sw, tcp4_frame(os.urandom(5000)), vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16)) == []
    assert sw.counters()["switch.dropped.outgoing_full"] == 1


def test_super_frames_that_are_not_plain_tcp_are_dropped(switch) -> None:
    data = tcp4_frame(os.urandom(3000))
    udp = data[:23] + b"\x11" + data[24:]
    assert to_b(switch, udp, vnet_word(NEEDS_CSUM, GSO_TCPV4, 1000, 34, 6)) == []
    assert to_b(switch, data, vnet_word(NEEDS_CSUM, 3, 1000, 34, 6)) == []  # GSO_UDP
    assert to_b(switch, data, vnet_word(NEEDS_CSUM, GSO_TCPV6, 1000, 34, 16)) == []  # not IPv6
    assert switch.counters()["switch.dropped.gso_unsupported"] == 3
    short = data[:40]
    assert to_b(switch, short, vnet_word(NEEDS_CSUM, GSO_TCPV4, 1000, 34, 16)) == []
    assert to_b(switch, data, vnet_word(NEEDS_CSUM, GSO_TCPV4, 0, 34, 16)) == []
    assert switch.counters()["switch.dropped.bad_offload"] == 2


def test_frames_waiting_for_a_port_that_renegotiates_its_offloads_are_dropped(switch) -> None:
    """A driver reset changes what the guest takes: a super-frame queued for a TSO guest
    must not reach it once it has said it takes no TSO."""
    switch.set_port_offloads(1, csum=True, tso4=True, tso6=False)
    send(switch, 1, frame(BROADCAST, MAC_B))  # B is learned on port 1
    big = tcp4_frame(os.urandom(5000))
    send(switch, 0, big, vnets=(vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16),))
    assert len(waiting(switch, 1)) == 1
    switch.set_port_offloads(1, csum=True, tso4=True, tso6=False)  # the same: nothing lost
    assert len(waiting(switch, 1)) == 1
    switch.set_port_offloads(1, csum=False, tso4=False, tso6=False)
    assert waiting(switch, 1) == []
    assert switch.counters()["switch.dropped.offloads_changed"] == 1
