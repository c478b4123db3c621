"""The TCP engine plugged into the real NetworkStack: Ethernet frames in, frames out."""

from __future__ import annotations

from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Connect
from vhostnet.wire import ethernet
from vhostnet.wire.checksum import PROTO_TCP
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.tcp import ACK, SYN, TcpSegment

GUEST_MAC = bytes.fromhex("525400123456")


def test_guest_syn_frame_reaches_engine_and_syn_ack_frame_comes_back() -> None:
    config = StackConfig()
    stack = build_stack(config)
    engine = TcpEngine(config, stack)
    stack.set_protocol_handler(PROTO_TCP, engine)
    syn = TcpSegment(40000, 8080, 111, 0, SYN, 64240, b"", 1460, 7).emit(
        config.guest_ipv4, config.gateway
    )
    packet = emit_ipv4_header(config.guest_ipv4, config.gateway, PROTO_TCP, len(syn)) + syn
    frame = ethernet.emit_ethernet(config.gateway_mac, GUEST_MAC, ethernet.ETHERTYPE_IPV4, packet)
    stack.receive_frame(frame, 0.0)
    (connect,) = engine.commands
    assert connect == Connect(connect.flow_id, "127.0.0.1", 8080)  # gateway maps to loopback
    stack.frames_to_guest.clear()
    engine.on_connected(connect.flow_id, 0.1)
    (reply,) = stack.frames_to_guest
    ip = IPv4Packet(ethernet.EthernetFrame(reply).payload)
    assert (ip.src, ip.dst) == (config.gateway, config.guest_ipv4)
    syn_ack = TcpSegment.parse(ip.payload)
    assert syn_ack.flags == SYN | ACK and syn_ack.ack == 112 and syn_ack.dst_port == 40000
