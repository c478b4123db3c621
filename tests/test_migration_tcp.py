"""TCP connections at a migration: exported with their numbers, reset toward the guest."""

from __future__ import annotations

import pytest

from vhostnet.migration.tcp_state import export_connections, parse_records, reset_toward_guest
from vhostnet.stack import ethernet
from vhostnet.stack.checksum import PROTO_TCP
from vhostnet.stack.config import StackConfig
from vhostnet.stack.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.tcp import TcpEngine
from vhostnet.stack.tcp_wire import ACK, RST, SYN, TcpSegment

GUEST_MAC = bytes.fromhex("525400123456")


def engine_with_stack() -> tuple[NetworkStack, TcpEngine, StackConfig]:
    config = StackConfig()
    stack = NetworkStack(config)
    engine = TcpEngine(config, stack, isn_source=lambda: 5000)
    stack.set_protocol_handler(PROTO_TCP, engine)
    return stack, engine, config


def guest_segment(stack, config, seq: int, ack: int, flags: int) -> None:
    segment = TcpSegment(40000, 8080, seq, ack, flags, 64240, b"", 1460 if flags & SYN else None,
                         7 if flags & SYN else None).emit(config.guest_ipv4, config.gateway)
    packet = emit_ipv4_header(config.guest_ipv4, config.gateway, PROTO_TCP, len(segment)) + segment
    stack.receive_frame(ethernet.emit_ethernet(config.gateway_mac, GUEST_MAC,
                                               ethernet.ETHERTYPE_IPV4, packet), 0.0)


def test_established_connection_is_exported_and_reset_with_its_numbers() -> None:
    stack, engine, config = engine_with_stack()
    guest_segment(stack, config, 111, 0, SYN)
    engine.on_connected(engine.commands[0].flow_id, 0.1)
    guest_segment(stack, config, 112, 5001, ACK)
    (record,) = export_connections(engine)
    assert (record["guest_port"], record["remote_port"], record["phase"]) == (40000, 8080, "ESTABLISHED")
    assert (record["snd_nxt"], record["rcv_nxt"]) == (5001, 112)

    destination, target, _ = engine_with_stack()
    destination.guest_mac = GUEST_MAC
    destination.frames_to_guest.clear()
    assert reset_toward_guest(target, parse_records([record])) == 1
    (frame,) = destination.frames_to_guest
    ip = IPv4Packet(ethernet.EthernetFrame(frame).payload)
    rst = TcpSegment.parse(ip.payload)
    assert rst.flags == RST | ACK and (rst.seq, rst.ack) == (5001, 112)
    assert (rst.src_port, rst.dst_port) == (8080, 40000)
    assert target.counters()["tcp.migration_reset"] == 1


@pytest.mark.parametrize("bad", [{"snd_nxt": -1}, {"guest_port": 0}, {"guest_ip": "x"}, {"rcv_nxt": "1"}])
def test_bad_records_are_refused(bad: dict) -> None:
    record = {"guest_ip": "10.0.2.15", "guest_port": 1, "remote_ip": "10.0.2.2", "remote_port": 2,
              "snd_nxt": 1, "rcv_nxt": 2, **bad}
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_records([record])
