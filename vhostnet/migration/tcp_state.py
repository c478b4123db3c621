"""TCP connections across a migration: records out of the engine, resets into the guest.

A record carries what a repaired socket and the guest side need: the
4-tuple, absolute sequence numbers both ways, windows, MSS, window scales and
the bytes queued toward the host. Without a repaired host socket on the
destination the connection cannot continue, so the guest gets an RST with
the right sequence numbers and learns that at once.
"""

from __future__ import annotations

import ipaddress

from ..stack.checksum import PROTO_TCP
from ..stack.config import ip4
from ..stack.tcp import TcpEngine
from ..stack.tcp_flow import Phase
from ..stack.tcp_wire import ACK, RST, emit_segment

MAX_RECORDS = 65536


def export_connections(engine: TcpEngine) -> list[dict[str, object]]:
    """Records of the engine's connections that are past the handshake."""
    records = []
    for flow in engine.flows.values():
        if flow.phase in (Phase.CONNECTING, Phase.SYN_SENT, Phase.SYN_RCVD):
            continue
        records.append({
            "guest_ip": str(ipaddress.IPv4Address(flow.guest_ip)), "guest_port": flow.guest_port,
            "remote_ip": str(ipaddress.IPv4Address(flow.remote_ip)), "remote_port": flow.remote_port,
            "inbound": flow.inbound, "phase": flow.phase.name,
            "snd_una": flow.send_seq(flow.snd_una), "snd_nxt": flow.send_seq(flow.snd_nxt),
            "rcv_nxt": flow.recv_seq(flow.rcv_nxt),
            "snd_wnd": flow.snd_wnd, "snd_wscale": flow.snd_wscale,
            "rcv_wscale": flow.rcv_wscale, "mss": flow.mss,
            "to_host": bytes(flow.to_host).hex(),
        })
    return records


def _u32(value: object) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError(f"bad sequence number {value!r}")
    return value


def _port(value: object) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"bad port {value!r}")
    return value


ResetTarget = tuple[bytes, int, bytes, int, int, int]


def parse_records(records: list[dict[str, object]]) -> list[ResetTarget]:
    """Check exported records; ``ValueError``/``KeyError``/``TypeError`` on a bad one."""
    if len(records) > MAX_RECORDS:
        raise ValueError("too many TCP records")
    return [(ip4(str(record["guest_ip"])), _port(record["guest_port"]),
             ip4(str(record["remote_ip"])), _port(record["remote_port"]),
             _u32(record["snd_nxt"]), _u32(record["rcv_nxt"])) for record in records]


def reset_toward_guest(engine: TcpEngine, resets: list[ResetTarget]) -> int:
    """Send the guest one RST (with the connection's own numbers) per parsed record."""
    for guest_ip, guest_port, remote_ip, remote_port, seq, ack in resets:
        segment = emit_segment(remote_ip, guest_ip, remote_port, guest_port, seq, ack,
                               RST | ACK, 0, b"", b"")
        engine.output.send_ipv4(remote_ip, guest_ip, PROTO_TCP, segment)
        engine.stats.inc("tcp.rst_sent")
        engine.stats.inc("tcp.migration_reset")
    return len(resets)
