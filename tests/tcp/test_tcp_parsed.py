"""Guest TCP segments the C fast path does not take come back parsed (ext/tcp_fast_parse.pxi)
and reach ``TcpEngine.handle_segment`` without the wire views and the stack's dispatch.

The kernel's ``ParsedSegment`` must say what ``TcpSegmentView`` says of the same bytes, and
leave to the stack every frame the stack would treat otherwise (bad input is counted and
logged there). Through ``Network.receive_batch``, the segments keep their batch order with the
frames the stack handles, and a source address the stack has not learned goes through it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from vhostnet.tcp._fast import TcpFastPath as Kernel

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_IP6,
    GUEST_MAC,
    arp_request,
    eth,
    guest_ipv4_frame,
    ipv4,
    ipv6_frame,
)
from tests.support.loop import run
from tests.support.tcp import GATEWAY6
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.offload import NEEDS_CSUM, vnet_word
from vhostnet.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegmentView, build_options, emit_segment

PARTIAL = vnet_word(NEEDS_CSUM, 0, 0, 34, 16)  # TCP checksum left to the "device" (IPv4)
TIMESTAMPS = bytes([1, 1, 8, 10]) + bytes(8)  # NOP NOP TS: an option the engine ignores


def segment(family: int, flags: int, *, payload: bytes = b"", options: bytes = b"",
            seq: int = 1000, ack: int = 0, window: int = 4096, sport: int = 40000,
            src: bytes | None = None) -> bytes:
    """The TCP segment (checksum over the pseudo-header of ``family``) from the guest."""
    if src is None:
        src = GUEST_IP if family == 4 else GUEST_IP6
    dst = GATEWAY_IP if family == 4 else GATEWAY6
    return emit_segment(src, dst, sport, 80, seq, ack, flags, window, payload, options)


def frame_of(family: int, tcp: bytes, src: bytes | None = None, **ip) -> bytes:
    if family == 4:
        if src is None:
            return guest_ipv4_frame(GATEWAY_IP, 6, tcp, **ip)
        return eth(GATEWAY_MAC, GUEST_MAC, 0x0800, ipv4(src, GATEWAY_IP, 6, tcp, **ip))
    return ipv6_frame(src or GUEST_IP6, GATEWAY6, tcp, hop_limit=64, next_header=6,
                      dst_mac=GATEWAY_MAC)


def take(frames: list[tuple[bytes, int]], ipv4: bool = True, ipv6: bool = True):
    """(handled flags, parsed segments) of one take_batch over ``frames`` (no flow registered)."""
    kernel = Kernel()
    kernel.set_macs(GATEWAY_MAC, GUEST_MAC)
    kernel.set_parse(ipv4, ipv6)
    batch = FrameBatch(16, 1 << 16)
    for frame, vnet in frames:
        assert batch.append(frame, vnet)
    storage, offsets, lengths, vnets = batch.arrays()
    handled = np.zeros(len(offsets), dtype=np.uint8)
    assert kernel.take_batch(storage, offsets, lengths, vnets, handled, batch.count) == 0
    return handled[:batch.count].tolist(), kernel.last_parsed


SEGMENTS = {
    "syn_options": dict(flags=SYN, options=build_options(1460, 7, sack_permitted=True)),
    "syn_big_wscale": dict(flags=SYN, options=bytes([3, 3, 20, 0])),  # capped at 14
    "syn_no_options": dict(flags=SYN),
    "synack_timestamps": dict(flags=SYN | ACK, options=build_options(536, None) + TIMESTAMPS,
                              ack=77),
    "ack": dict(flags=ACK, ack=0xFFFFFFFF, window=0),
    "fin_with_data": dict(flags=FIN | ACK | PSH, payload=b"last words", ack=5),
    "rst": dict(flags=RST, seq=0xFFFFFFF0),
    "data_timestamps": dict(flags=ACK, payload=bytes(range(200)), options=TIMESTAMPS),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_a_parsed_segment_says_what_the_wire_view_says(family: int, name: str) -> None:
    tcp = segment(family, **SEGMENTS[name])
    handled, parsed = take([(frame_of(family, tcp), 0)])
    assert handled == [2] and len(parsed) == 1
    got, view = parsed[0], TcpSegmentView(tcp)
    assert got.index == 0
    assert (got.src, got.dst) == ((GUEST_IP, GATEWAY_IP) if family == 4 else (GUEST_IP6, GATEWAY6))
    for field in ("src_port", "dst_port", "seq", "ack", "flags", "window", "header_len",
                  "segment_len"):
        assert getattr(got, field) == getattr(view, field), field
    assert got.payload == bytes(view.payload)
    for field in ("mss", "wscale", "sack_permitted"):
        assert getattr(got.options, field) == getattr(view.options, field), field


def test_a_partial_checksum_is_not_verified_and_segments_keep_their_order() -> None:
    bad_sum = bytearray(segment(4, SYN, options=build_options(1460, 7)))
    bad_sum[16] ^= 0xFF
    frames = [(frame_of(4, segment(4, ACK, seq=1)), 0), (frame_of(4, bytes(bad_sum)), PARTIAL),
              (frame_of(6, segment(6, FIN | ACK, seq=3)), 0)]
    handled, parsed = take(frames)
    assert handled == [2, 2, 2]
    assert [(seg.index, seg.seq) for seg in parsed] == [(0, 1), (1, 1000), (2, 3)]


def corrupt(tcp: bytes) -> bytes:
    data = bytearray(tcp)
    data[-1] ^= 0x5A
    return bytes(data)


LEFT_TO_THE_STACK = {
    "bad_checksum": lambda f: frame_of(f, corrupt(segment(f, ACK, payload=b"xy"))),
    "syn_fin": lambda f: frame_of(f, segment(f, SYN | FIN)),
    "no_ack": lambda f: frame_of(f, segment(f, PSH, payload=b"x")),
    "bad_option": lambda f: frame_of(f, segment(f, SYN, options=bytes([2, 3, 5, 0]))),
    "ip_options": lambda f: frame_of(f, segment(f, SYN), ihl=6, options=bytes(4)) if f == 4
    else ipv6_frame(GUEST_IP6, GATEWAY6, bytes([6, 0, 1, 4, 0, 0, 0, 0]) + segment(f, SYN),
                    hop_limit=64, next_header=0, dst_mac=GATEWAY_MAC),
    "not_for_the_gateway": lambda f: bytes(6) + frame_of(f, segment(f, SYN))[6:],
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", sorted(LEFT_TO_THE_STACK))
def test_what_the_stack_must_judge_is_left_to_it(family: int, case: str) -> None:
    handled, parsed = take([(LEFT_TO_THE_STACK[case](family), 0)])
    assert handled == [0] and parsed == []


def test_a_multicast_ipv6_source_is_left_to_the_stack() -> None:
    # (The stack drops it. An IPv4 source is checked at delivery: one the stack has not
    # learned as the guest's goes to it, test_an_unlearned_source_address_...)
    multicast = bytes.fromhex("ff02" + "00" * 13 + "01")
    handled, parsed = take([(frame_of(6, segment(6, SYN, src=multicast), src=multicast), 0)])
    assert handled == [0] and parsed == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_family_not_parsed_is_left_to_the_stack(family: int) -> None:
    frame = frame_of(family, segment(family, SYN))
    handled, parsed = take([(frame, 0)], ipv4=family != 4, ipv6=family != 6)
    assert handled == [0] and parsed == []
    handled, parsed = take([(frame, 0)])
    assert handled == [2] and len(parsed) == 1


# ------------------------------------------------------------------ through the Network


def send(network: Network, frames: list[bytes]) -> None:
    batch = FrameBatch(16, 1 << 16)
    for frame in frames:
        assert batch.append(frame, 0)
    network.receive_batch(batch, batch.count, 1.0)


def learned_network(loop) -> Network:
    """A network whose stack knows the guest's MAC and IPv4 address (from an ARP request)."""
    network = Network(StackConfig(), loop)
    send(network, [arp_request(GATEWAY_IP)])
    assert network.stack.guest_mac == GUEST_MAC and network.stack.guest_ipv4 == GUEST_IP
    return network


class StackSpy:
    """Counts the frames the stack receives (the real method still runs)."""

    def __init__(self, network: Network) -> None:
        self.frames = 0
        receive = network.stack.receive_frame

        def counted(frame, now, vnet=0):
            self.frames += 1
            receive(frame, now, vnet)
        network.stack.receive_frame = counted


def test_segments_not_taken_reach_the_engine_without_the_stack() -> None:
    async def scenario(loop) -> None:
        network = learned_network(loop)
        spy = StackSpy(network)
        send(network, [frame_of(4, segment(4, SYN, options=build_options(1460, 7), sport=4001)),
                       frame_of(4, segment(4, SYN, sport=4002))])
        assert spy.frames == 0
        flows = {flow.guest_port: flow for flow in network.tcp.flows.values()}
        assert sorted(flows) == [4001, 4002]
        assert (flows[4001].mss, flows[4001].snd_wscale) == (1460, 7)
        counters = network.counters()
        assert counters["tcp.parsed_segments"] == 2 and counters["tcp.segments_in"] == 2
        assert counters["eth.rx"] == 3 and counters["ipv4.rx"] == 2  # (the ARP request: eth)
        network.close()
    run(scenario)


def test_parsed_segments_keep_their_order_with_frames_the_stack_takes() -> None:
    async def scenario(loop) -> None:
        network = learned_network(loop)
        # The SYN carries IP options (the stack's way), the RST after it is parsed: in batch
        # order the RST aborts the flow the SYN opened; the other way round, a flow would stay.
        syn = frame_of(4, segment(4, SYN), ihl=6, options=bytes(4))
        send(network, [syn, frame_of(4, segment(4, RST, seq=1001))])
        assert network.tcp.flows == {}
        assert network.counters()["tcp.parsed_segments"] == 1
        network.close()
    run(scenario)


def test_an_unlearned_source_address_goes_through_the_stack_which_learns_it() -> None:
    async def scenario(loop) -> None:
        network = learned_network(loop)
        spy = StackSpy(network)
        other = bytes([10, 0, 2, 77])
        send(network, [frame_of(4, segment(4, SYN, src=other), src=other)])
        assert spy.frames == 1
        assert network.stack.guest_ipv4 == other
        assert [flow.guest_ip for flow in network.tcp.flows.values()] == [other]
        assert network.counters().get("tcp.parsed_segments", 0) == 0
        network.close()
    run(scenario)


def test_an_engine_error_costs_one_segment_counted_and_the_batch_goes_on() -> None:
    async def scenario(loop) -> None:
        network = learned_network(loop)
        engine = network.tcp
        handle = engine.handle_segment
        calls = []

        def failing_once(src, dst, seg, now):
            calls.append(seg.src_port)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            handle(src, dst, seg, now)
        engine.handle_segment = failing_once
        send(network, [frame_of(4, segment(4, SYN, sport=4001)),
                       frame_of(4, segment(4, SYN, sport=4002))])
        assert calls == [4001, 4002]
        assert [flow.guest_port for flow in engine.flows.values()] == [4002]
        assert network.counters()["stack.drop.internal_error"] == 1
        network.close()
    run(scenario)


def test_a_bad_checksum_is_still_counted_by_the_engine_on_the_stack_path() -> None:
    async def scenario(loop) -> None:
        network = learned_network(loop)
        send(network, [frame_of(4, corrupt(segment(4, SYN)))])
        assert network.tcp.flows == {}
        assert network.counters()["tcp.drop.bad_checksum"] == 1
        network.close()
    run(scenario)


def test_mutated_frames_are_parsed_only_as_the_wire_views_read_them() -> None:
    # Bounded and seeded: random bytes flipped in valid segments (both families, options, data).
    # A frame marked PARSED must be one the stack's views accept with the same fields and a
    # checksum that verifies; the kernel must never read outside a frame (no crash).
    from vhostnet.wire.checksum import PROTO_TCP, l4_checksum, l4_checksum_ok
    from vhostnet.wire.errors import MalformedPacket
    from vhostnet.wire.ipv4 import IPv4Packet
    rng = random.Random(14)
    bases = [(family, segment(family, **SEGMENTS[name]))
             for family in (4, 6) for name in sorted(SEGMENTS)]
    parsed_count = 0
    for _ in range(3000):
        family, tcp = rng.choice(bases)
        if rng.random() < 0.5:
            # The TCP header and options mutated, the checksum made right again: judged on them.
            mutated = bytearray(tcp)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(0, min(len(mutated), 60))] = rng.randrange(256)
            mutated[16:18] = b"\0\0"
            src = GUEST_IP if family == 4 else GUEST_IP6
            value = l4_checksum(src, GATEWAY_IP if family == 4 else GATEWAY6, PROTO_TCP, mutated)
            mutated[16:18] = value.to_bytes(2, "big")
            frame = bytearray(frame_of(family, bytes(mutated)))
        else:
            frame = bytearray(frame_of(family, tcp))
            for _ in range(rng.randint(1, 3)):
                frame[rng.randrange(12, len(frame))] = rng.randrange(256)
        if rng.random() < 0.2:
            frame = frame[:rng.randrange(14, len(frame) + 1)]
        handled, parsed = take([(bytes(frame), 0)])
        if not parsed:
            continue
        parsed_count += 1
        seg = parsed[0]
        if frame[12:14] == b"\x08\x00":
            packet = IPv4Packet(bytes(frame[14:]))  # (raises if the kernel took a bad header)
            assert packet.proto == 6 and packet.header_len == 20 and not packet.is_fragment
            src, dst, data = packet.src, packet.dst, packet.payload
        else:
            assert frame[20] == 6 and frame[22] != 0xFF
            src, dst = bytes(frame[22:38]), bytes(frame[38:54])
            data = memoryview(bytes(frame[54:54 + int.from_bytes(frame[18:20], "big")]))
        assert (seg.src, seg.dst) == (src, dst)
        assert l4_checksum_ok(src, dst, PROTO_TCP, data)
        try:
            view = TcpSegmentView(data)
        except MalformedPacket as error:
            raise AssertionError(f"parsed a segment the view refuses: {error}") from None
        for field in ("src_port", "dst_port", "seq", "ack", "flags", "window", "segment_len"):
            assert getattr(seg, field) == getattr(view, field), field
        assert seg.payload == bytes(view.payload)
        assert (seg.mss, seg.wscale, seg.sack_permitted) == (
            view.options.mss, view.options.wscale, view.options.sack_permitted)
    assert parsed_count > 500  # (header mutations with their checksum made right: many parse)
