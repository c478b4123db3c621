"""Offloads through the real NetworkStack and TcpEngine: partial checksums in, GSO/DATA_VALID out."""

from __future__ import annotations

import struct

import pytest

from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Send
from vhostnet.wire import ethernet
from vhostnet.wire.checksum import PROTO_TCP, PROTO_UDP, l4_checksum, pseudo_header_sum
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.offload import (
    DATA_VALID_WORD,
    GSO_TCPV4,
    NEEDS_CSUM,
    GuestOffloads,
    tcp_data_word,
    vnet_fields,
    vnet_word,
)
from vhostnet.wire.tcp import ACK, SYN, TcpSegment
from vhostnet.wire.udp import emit_udp

GUEST_MAC = bytes.fromhex("525400123456")
GPORT, RPORT = 40000, 8080
GUEST_ISN, OUR_ISN = 1000, 5000
PARTIAL_AT_TCP = vnet_word(NEEDS_CSUM, 0, 0, 34, 16)


def make() -> tuple[StackConfig, NetworkStack, TcpEngine]:
    config = StackConfig()
    stack = build_stack(config)
    engine = TcpEngine(config, stack, isn_source=lambda: OUR_ISN)
    stack.set_protocol_handler(PROTO_TCP, engine)
    return config, stack, engine


def frame_of(config: StackConfig, proto: int, l4: bytes) -> bytes:
    packet = emit_ipv4_header(config.guest_ipv4, config.gateway, proto, len(l4)) + l4
    return ethernet.emit_ethernet(config.gateway_mac, GUEST_MAC, ethernet.ETHERTYPE_IPV4, packet)


def tcp_frame(config, seq, ack, flags, payload=b"", *, partial=False, mss=None, wscale=None):
    segment = bytearray(TcpSegment(GPORT, RPORT, seq, ack, flags, 65535, payload, mss,
                                   wscale).emit(config.guest_ipv4, config.gateway))
    if partial:  # what a Linux guest with checksum offload sends: the pseudo-header sum only
        struct.pack_into("!H", segment, 16,
                         pseudo_header_sum(config.guest_ipv4, config.gateway, PROTO_TCP, len(segment)))
    return frame_of(config, PROTO_TCP, bytes(segment))


def establish(config, stack, engine):
    stack.receive_frame(tcp_frame(config, GUEST_ISN, 0, SYN, mss=1460, wscale=7), 0.0)
    (connect,) = engine.commands
    engine.commands.clear()
    engine.on_connected(connect.flow_id, 0.0, send_space=1 << 20)
    stack.frames_to_guest.clear()
    stack.receive_frame(tcp_frame(config, GUEST_ISN + 1, OUR_ISN + 1, ACK), 0.0)
    return engine.flows_by_id[connect.flow_id]


def test_partial_tcp_checksum_is_accepted_only_with_needs_csum():
    config, stack, engine = make()
    flow = establish(config, stack, engine)
    data = bytes(range(256)) * 200  # one 51 KB TSO segment
    frame = tcp_frame(config, GUEST_ISN + 1, OUR_ISN + 1, ACK, data, partial=True)
    stack.receive_frame(frame, 0.0)  # no vnet word: the partial checksum is wrong
    assert engine.counters()["tcp.drop.bad_checksum"] == 1
    assert not engine.commands
    stack.receive_frame(frame, 0.0, vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16))
    (send,) = engine.commands
    assert isinstance(send, Send) and bytes(send.data) == data and send.flow_id == flow.flow_id


def test_partial_checksum_elsewhere_is_still_verified():
    config, stack, engine = make()
    establish(config, stack, engine)
    frame = tcp_frame(config, GUEST_ISN + 1, OUR_ISN + 1, ACK, b"x" * 100, partial=True)
    stack.receive_frame(frame, 0.0, vnet_word(NEEDS_CSUM, 0, 0, 34, 6))  # UDP's offset
    assert engine.counters()["tcp.drop.bad_checksum"] == 1


def test_partial_udp_checksum_is_accepted():
    config, stack, _ = make()
    datagram = bytearray(emit_udp(config.guest_ipv4, 5000, config.gateway, 9, b"hello"))
    struct.pack_into("!H", datagram, 6, 0x1234)  # not the real checksum
    stack.receive_frame(frame_of(config, PROTO_UDP, bytes(datagram)), 0.0)
    assert stack.counters()["udp.drop.bad_checksum"] == 1
    stack.receive_frame(frame_of(config, PROTO_UDP, bytes(datagram)), 0.0,
                        vnet_word(NEEDS_CSUM, 0, 0, 34, 6))
    assert stack.counters()["udp.drop.bad_checksum"] == 1
    assert stack.counters()["udp.rx"] == 1


def host_data_to_guest(offloads: GuestOffloads, size: int):
    config, stack, engine = make()
    stack.guest_offloads = offloads
    flow = establish(config, stack, engine)
    engine.on_readable(flow.flow_id, 0.0)
    peek = engine.commands.popleft()
    data = bytes(i * 7 & 0xFF for i in range(size))
    engine.on_peeked(flow.flow_id, peek.offset, data[: peek.length], 0.0)
    return config, flow, list(stack.frames_to_guest), data[: peek.length]


def unpack(config, item):
    frame, vnet = item if isinstance(item, tuple) else (item, 0)
    packet = IPv4Packet(ethernet.EthernetFrame(frame).payload)
    assert packet.src == config.gateway and packet.dst == config.guest_ipv4
    return packet, TcpSegment.parse(packet.payload), vnet


def test_without_offloads_segments_are_mss_sized_and_checksummed():
    config, flow, frames, data = host_data_to_guest(GuestOffloads(), 10000)
    assert len(frames) == 7 and all(isinstance(f, bytes) for f in frames)
    for item in frames:
        packet, segment, _ = unpack(config, item)
        assert len(segment.payload) <= flow.mss
        assert l4_checksum(packet.src, packet.dst, PROTO_TCP, bytes(packet.payload)) == 0


def test_guest_csum_only_skips_checksum_and_says_data_valid():
    config, flow, frames, data = host_data_to_guest(GuestOffloads(csum=True), 10000)
    assert len(frames) == 7
    received = b""
    for item in frames:
        packet, segment, vnet = unpack(config, item)
        assert vnet == DATA_VALID_WORD and len(segment.payload) <= flow.mss
        received += segment.payload
    assert received == data


@pytest.mark.parametrize("size", [200_000, 1000])
def test_guest_tso_gets_large_segments_with_partial_checksums(size):
    config, flow, frames, data = host_data_to_guest(GuestOffloads(csum=True, tso4=True), size)
    received = b""
    for item in frames:
        packet, segment, vnet = unpack(config, item)
        assert packet.total_length <= 0xFFFF
        flags, gso_type, gso_size, start, offset = vnet_fields(vnet)
        assert (flags, start, offset) == (NEEDS_CSUM, 34, 16)
        large = len(segment.payload) > flow.mss
        assert (gso_type, gso_size) == ((GSO_TCPV4, flow.mss) if large else (0, 0))
        assert vnet == tcp_data_word(len(segment.payload), flow.mss)
        # The field holds the pseudo-header sum: summing the segment completes the checksum.
        field = struct.unpack_from("!H", packet.payload, 16)[0]
        assert field == pseudo_header_sum(packet.src, packet.dst, PROTO_TCP, len(packet.payload))
        received += segment.payload
    assert received == data
    assert (len(frames) > 1) == (size > 65495)
