"""TCP connections at a migration: records with their numbers (and host sockets), checked on load."""

from __future__ import annotations

import asyncio

import pytest

from vhostnet.migration.snapshot import import_network
from vhostnet.migration.state import StateError, decode_state, encode_state
from vhostnet.migration.tcp_migrate import TcpMigration
from vhostnet.migration.tcp_repair import SocketDump
from vhostnet.migration.tcp_state import export_connections, parse_records, reset_toward_guest
from vhostnet.network import Network, build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.tcp.engine import TcpEngine
from vhostnet.wire import ethernet
from vhostnet.wire.checksum import PROTO_TCP
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.tcp import ACK, RST, SYN, TcpSegment

GUEST_MAC = bytes.fromhex("525400123456")


def engine_with_stack() -> tuple[NetworkStack, TcpEngine, StackConfig]:
    config = StackConfig()
    stack = build_stack(config)
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


# ---- records that carry a frozen host socket (TCP_REPAIR) -------------------------


def repaired_record(**changes: object) -> dict:
    host = SocketDump(("127.0.0.1", 40000), ("127.0.0.1", 8080), 7, 9, b"to peer", 3,
                      b"to guest", 65483, 7, 7, 7, 1234, (9, 100, 200, 300, 9)).to_record()
    record = {"guest_ip": "10.0.2.15", "guest_port": 40000, "remote_ip": "10.0.2.2",
              "remote_port": 8080, "inbound": False, "phase": "ESTABLISHED",
              "snd_una": 4294967290, "snd_nxt": 4294967295, "snd_max": 10, "rcv_nxt": 77,
              "snd_wnd": 65535, "snd_wscale": 7, "rcv_wscale": 7, "mss": 1460,
              "to_host": b"pending".hex(), "host": host}
    record.update(changes)
    return record


def test_a_record_with_a_host_socket_survives_the_blob() -> None:
    blob = encode_state({"tcp": [repaired_record()]})
    (parsed,) = parse_records(decode_state(blob)["tcp"])
    assert parsed.host is not None and parsed.host.recv_queue == b"to guest"
    assert (parsed.snd_una, parsed.snd_nxt, parsed.snd_max) == (4294967290, 4294967295, 10)
    assert parsed.to_host == b"pending" and parsed.key[1] == 40000


@pytest.mark.parametrize("change", [
    {"snd_max": 4294967200},  # snd_max before snd_una
    {"snd_nxt": 11},  # beyond snd_max
    {"to_host": "zz"}, {"mss": 5}, {"snd_wscale": 15}, {"inbound": "no"},
    {"phase": "SYN_SENT"}, {"host": {"local": ["127.0.0.1", 1]}}, {"host": "socket"},
    {"snd_una": None},
])
def test_corrupt_tcp_records_are_refused(change: dict) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_records([repaired_record(**change)])


def test_two_records_for_one_connection_are_refused() -> None:
    with pytest.raises(ValueError, match="same connection"):
        parse_records([repaired_record(), repaired_record()])


def test_a_blob_with_a_corrupt_tcp_record_changes_nothing() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(tcp_forwards=[]), loop)
    try:
        blob = encode_state({"guest": {"mac": "52:54:00:12:34:56", "ipv4": "10.0.2.15"},
                             "tcp": [repaired_record(), repaired_record(mss="big")]})
        with pytest.raises(StateError, match="invalid"):
            import_network(network, TcpMigration(network), blob, 0.0)
        assert network.stack.guest_mac is None and not network.tcp.flows
        assert network.tcp_host is not None and network.tcp_host.open_sockets == 0
    finally:
        network.close()
        loop.close()
