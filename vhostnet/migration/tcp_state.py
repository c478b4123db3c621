"""TCP connections across a migration: records out of the engine, parsed and checked on the way in.

A record carries what the guest side of a connection needs (4-tuple, wire
sequence numbers both ways, windows, MSS, window scales, the guest's bytes
not yet written to the host) and, under ``host``, the dump of its host
socket (``tcp_repair.SocketDump``) when the source could freeze it with
TCP_REPAIR. A record without ``host`` cannot continue: the destination sends
the guest an RST with the connection's own numbers, so it notices at once.

Which connections move: established ones, of either family, half-closed ones
too (the record's ``half_close`` flags; ``tcp_repair`` restores the host socket's
FIN). A connection closed both ways on the host (host EOF and our shutdown)
waits only for final ACKs: it is reset, as its socket (LAST_ACK, CLOSING,
TIME_WAIT) cannot be restored.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vhostnet.migration.state import checked_int
from vhostnet.migration.tcp_repair import SocketDump
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import HALF_SEQ, Flow, Phase, seq_diff
from vhostnet.tcp.handover import HALF_CLOSE_FLAGS, dump_flow
from vhostnet.wire.tcp import ACK, RST

MAX_RECORDS = 65536
MAX_TO_HOST_BYTES = 4 * 1024 * 1024
MAX_WINDOW = 1 << 30


def migratable(flow: Flow) -> bool:
    """Established, at most one direction closed on the host (see the module docstring)."""
    return flow.phase is Phase.ESTABLISHED and not (flow.host_shut and flow.host_eof)


def export_connections(engine: TcpEngine,
                       host_dumps: dict[int, dict[str, object]] | None = None) -> list[dict[str, object]]:
    """Records of the engine's connections that are past the handshake."""
    host_dumps = host_dumps or {}
    records = []
    for flow in engine.flows.values():
        if flow.phase in (Phase.CONNECTING, Phase.SYN_SENT, Phase.SYN_RCVD):
            continue
        records.append({**dump_flow(flow), "host": host_dumps.get(flow.flow_id)})
    return records


def _u32(value: object) -> int:
    return checked_int(value, "sequence number", 0, 0xFFFFFFFF)


def _port(value: object) -> int:
    return checked_int(value, "port", 1, 65535)


@dataclass(frozen=True)
class TcpRecord:
    """One checked record; wire sequence numbers."""

    guest_ip: bytes
    guest_port: int
    remote_ip: bytes
    remote_port: int
    snd_nxt: int
    rcv_nxt: int
    inbound: bool = False
    snd_una: int = 0
    snd_max: int = 0
    snd_wnd: int = 0
    snd_wscale: int = 0
    rcv_wscale: int = 0
    mss: int = 536
    to_host: bytes = b""
    host: SocketDump | None = None
    half_close: tuple[tuple[str, bool], ...] = ()  # HALF_CLOSE_FLAGS and their values

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        return (self.guest_ip, self.guest_port, self.remote_ip, self.remote_port)


def _parse_one(record: object) -> TcpRecord:
    if not isinstance(record, dict):
        raise ValueError("TCP record is not an object")
    guest_ip = ipaddress.ip_address(str(record["guest_ip"]))
    remote_ip = ipaddress.ip_address(str(record["remote_ip"]))
    if guest_ip.version != remote_ip.version:
        raise ValueError("guest and remote addresses are of different families")
    base = dict(guest_ip=guest_ip.packed, guest_port=_port(record["guest_port"]),
                remote_ip=remote_ip.packed, remote_port=_port(record["remote_port"]),
                snd_nxt=_u32(record["snd_nxt"]), rcv_nxt=_u32(record["rcv_nxt"]))
    if record.get("host") is None:
        return TcpRecord(**base)  # type: ignore[arg-type]
    # A connection that is to continue: everything must be there and consistent.
    host = SocketDump.from_record(record["host"])
    snd_una, snd_max = _u32(record["snd_una"]), _u32(record["snd_max"])
    in_flight = seq_diff(snd_max, snd_una)
    if not 0 <= in_flight < HALF_SEQ or not 0 <= seq_diff(base["snd_nxt"], snd_una) <= in_flight:
        raise ValueError("send sequence numbers are inconsistent")
    to_host = record["to_host"]
    if not isinstance(to_host, str) or len(to_host) > 2 * MAX_TO_HOST_BYTES:
        raise ValueError("to_host is not a hex string of a bounded size")
    inbound = record["inbound"]
    if not isinstance(inbound, bool):
        raise ValueError("inbound is not a boolean")
    if record["phase"] != Phase.ESTABLISHED.name:
        raise ValueError("only established connections carry a host socket")
    flags = record.get("half_close", {})
    if not isinstance(flags, dict) or not all(isinstance(flags.get(n, False), bool)
                                              for n in HALF_CLOSE_FLAGS):
        raise ValueError("half_close is not an object of booleans")
    return TcpRecord(
        **base,  # type: ignore[arg-type]
        inbound=inbound, snd_una=snd_una, snd_max=snd_max,
        snd_wnd=checked_int(record["snd_wnd"], "window", 0, MAX_WINDOW),
        snd_wscale=checked_int(record["snd_wscale"], "window scale", 0, 14),
        rcv_wscale=checked_int(record["rcv_wscale"], "window scale", 0, 14),
        mss=checked_int(record["mss"], "MSS", 64, 65535),
        to_host=bytes.fromhex(to_host), host=host,
        half_close=tuple((name, flags.get(name, False)) for name in HALF_CLOSE_FLAGS),
    )


def parse_records(records: object) -> list[TcpRecord]:
    """Check exported records; ``ValueError``/``KeyError``/``TypeError`` on a bad one."""
    if not isinstance(records, list):
        raise ValueError("TCP records are not a list")
    if len(records) > MAX_RECORDS:
        raise ValueError("too many TCP records")
    parsed = [_parse_one(record) for record in records]
    if len({record.key for record in parsed}) != len(parsed):
        raise ValueError("two TCP records for the same connection")
    return parsed


def reset_toward_guest(engine: TcpEngine, resets: list[TcpRecord]) -> int:
    """Send the guest one RST (with the connection's own numbers) per parsed record."""
    for record in resets:
        engine.tx.emit_without_flow(record.key, record.snd_nxt, record.rcv_nxt, RST | ACK)
        engine.stats.inc("tcp.rst_sent")
        engine.stats.inc("tcp.migration_reset")
    return len(resets)
