"""UDP NAT: guest UDP flows translated onto host UDP sockets (sans-IO core).

A flow is keyed by what the guest sees: (guest ip, guest port, remote ip,
remote port). Outbound flows (the guest sent first) get their own connected
host socket toward ``config.host_destination(remote)``; replies on it come back
to the guest from the original remote address. Inbound flows come from the
forwarded ports in ``config.udp_forwards``: a datagram from a host peer on a
listening socket becomes a datagram to the guest's ``guest_port``, from the
gateway address when the peer is on host loopback (as passt does) or from the
peer's own address otherwise; the guest's replies go back to that peer.

Commands for the glue (``UdpNat.commands``, executed by ``hostio.udp.UdpGlue.flush``):

- ``UdpOpen(flow_id, host_addr, host_port)``: new connected socket for an outbound flow;
- ``UdpBindPeer(flow_id, forward, peer_addr, peer_port)``: an inbound flow uses the
  listening socket of ``forward`` and sends to the peer;
- ``UdpSend(flow_id, payload)``: send on the flow;
- ``UdpClose(flow_id)``: the flow expired; close its socket (or forget the peer).

Events from the glue: ``on_host_datagram``, ``on_host_error``, ``on_forward_datagram``.

Both families: a flow's addresses are 4 bytes (IPv4) or 16 (IPv6), so the two never
share a key. IPv6 datagrams come through ``handle_ipv6`` (the stack's handler for UDP
over IPv6) and go to ``config.host_destination6``; replies leave by ``send_udp6`` and a
refused port becomes an ICMPv6 port unreachable (``send_icmpv6_error``). A forward's
host peer on IPv6 reaches the guest's IPv6 address, one on IPv4 (or IPv4-mapped) its
IPv4 address; loopback peers appear as the mapped address of their family. The flow
limit and the ``udp.*`` counters are shared; ``udp6.*`` counts what is IPv6's own.
"""

from __future__ import annotations

import errno
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from vhostnet.stack.config import PortForward, StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.wire.checksum import PROTO_ICMP
from vhostnet.wire.icmp import emit_port_unreachable
from vhostnet.wire.icmpv6 import CODE_PORT_UNREACHABLE, DEST_UNREACHABLE
from vhostnet.wire.ipv4 import IPv4Packet
from vhostnet.wire.ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from vhostnet.wire.ipv6 import IPv6Packet
from vhostnet.wire.udp import UdpDatagram

SendIPv4 = Callable[..., None]
SendUdp = Callable[..., None]
SendIcmpv6Error = Callable[..., object]


@dataclass(frozen=True)
class UdpOpen:
    flow_id: int
    host_addr: str
    host_port: int


@dataclass(frozen=True)
class UdpBindPeer:
    flow_id: int
    forward: PortForward
    peer_addr: str
    peer_port: int


@dataclass(frozen=True)
class UdpSend:
    flow_id: int
    payload: bytes


@dataclass(frozen=True)
class UdpClose:
    flow_id: int


UdpCommand = UdpOpen | UdpBindPeer | UdpSend | UdpClose
FlowKey = tuple[bytes, int, bytes, int]


@dataclass
class UdpFlow:
    flow_id: int
    guest_ip: bytes
    guest_port: int
    remote_ip: bytes  # as the guest sees it
    remote_port: int
    last_active: float
    inbound: bool
    # The guest's latest IP header + 8 bytes, quoted in ICMP port unreachable; for IPv6 the
    # packet up to the UDP header, its payload length cut to match (an ``IPv6Packet``).
    quote: tuple[bytes, bytes] | bytes | None = None

    @property
    def ipv6(self) -> bool:
        return len(self.guest_ip) == 16

    @property
    def key(self) -> FlowKey:
        return (self.guest_ip, self.guest_port, self.remote_ip, self.remote_port)


class UdpNat:
    """The generic UDP engine behind the UDP services (DHCP, DNS, TFTP)."""

    def __init__(self, config: StackConfig, counters: Counters, send_ipv4: SendIPv4,
                 send_udp: SendUdp, guest_ip: Callable[[], bytes], *,
                 send_udp6: SendUdp | None = None,
                 send_icmpv6_error: SendIcmpv6Error | None = None,
                 guest_ipv6: Callable[[], bytes | None] = lambda: None) -> None:
        self.config = config
        self.counters = counters
        self._send_ipv4 = send_ipv4
        self._send_udp = send_udp
        self._guest_ip = guest_ip
        self._send_udp6 = send_udp6
        self._send_icmpv6_error = send_icmpv6_error
        self._guest_ipv6 = guest_ipv6
        self.commands: deque[UdpCommand] = deque()
        self._by_key: dict[FlowKey, UdpFlow] = {}
        # Ordered by last activity, oldest first: expiry only looks at the front.
        self._flows: OrderedDict[int, UdpFlow] = OrderedDict()
        self._next_flow_id = 1
        # When a flow was last active on a path that does not touch it here (the fast path's
        # kernel stamps its flows' datagrams both ways): read where expiry and migration look
        # at a flow, instead of a touch per datagram. ``flow_id -> now`` of that last datagram.
        self.seen_elsewhere: Callable[[int], float] | None = None

    # --- guest side -------------------------------------------------------

    def handle_datagram(self, packet: IPv4Packet, datagram: UdpDatagram, now: float) -> None:
        flow = self._outbound_flow(packet.src, packet.dst, datagram, now)
        if flow is not None:
            flow.quote = (packet.header, bytes(packet.payload[:8]))
            self._send_to_host(flow, datagram)

    def handle_ipv6(self, packet: IPv6Packet, now: float) -> None:
        """A guest UDP datagram over IPv6 no IPv6 UDP service took (checked by the stack)."""
        datagram = UdpDatagram(packet.src, packet.dst, packet.upper_payload, verify=False)
        flow = self._outbound_flow(packet.src, packet.dst, datagram, now)
        if flow is not None:
            flow.quote = _quote6(packet)
            self._send_to_host(flow, datagram)

    def _outbound_flow(self, src: bytes, dst: bytes, datagram: UdpDatagram,
                       now: float) -> UdpFlow | None:
        key = (src, datagram.src_port, dst, datagram.dst_port)
        flow = self._by_key.get(key)
        if flow is None:
            destination = self._host_destination(src, dst, datagram.dst_port)
            if destination is None:
                self.counters.inc("udp6.drop.no_route" if len(dst) == 16 else "udp.drop.no_route")
                return None
            flow = self._new_flow(key, now, inbound=False)
            if flow is None:
                return None
            self.commands.append(UdpOpen(flow.flow_id, destination[0], destination[1]))
        self._touch(flow, now)
        return flow

    def _host_destination(self, src: bytes, dst: bytes, port: int) -> tuple[str, int] | None:
        if len(dst) == 16:
            return self.config.host_destination6(dst, port, src)
        return self.config.host_destination(dst, port)

    def _send_to_host(self, flow: UdpFlow, datagram: UdpDatagram) -> None:
        self.counters.inc("udp.tx_host")
        self.commands.append(UdpSend(flow.flow_id, bytes(datagram.payload)))

    def _send_to_guest(self, flow: UdpFlow, payload: bytes | memoryview) -> None:
        send = self._send_udp
        if flow.ipv6:
            if self._send_udp6 is None:
                self.counters.inc("udp6.drop.disabled")
                return
            send = self._send_udp6
        send(flow.remote_ip, flow.remote_port, flow.guest_ip, flow.guest_port, payload)

    # --- host side (called by the glue) -----------------------------------

    def on_host_datagram(self, flow_id: int, payload: bytes | memoryview, now: float) -> None:
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        self._touch(flow, now)
        self.counters.inc("udp.rx_host")
        self._send_to_guest(flow, payload)

    def on_host_error(self, flow_id: int, error: int, now: float) -> None:
        """A socket error on the flow; ECONNREFUSED becomes ICMP (or ICMPv6) port unreachable."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        if error == errno.ECONNREFUSED and flow.quote is not None:
            self.counters.inc("udp.port_unreachable")
            if isinstance(flow.quote, bytes):
                if self._send_icmpv6_error is not None:
                    self._send_icmpv6_error(IPv6Packet(flow.quote), DEST_UNREACHABLE,
                                            CODE_PORT_UNREACHABLE)
                return
            header, first_bytes = flow.quote
            self._send_ipv4(flow.remote_ip, flow.guest_ip, PROTO_ICMP,
                            emit_port_unreachable(header, first_bytes))
            return
        self.counters.inc("udp.host_error")
        self.counters.log_once(f"udp.host_error.{error}",
                               f"UDP flow socket error: {errno.errorcode.get(error, error)}")

    def on_forward_datagram(self, forward: PortForward, peer_addr: str, peer_port: int,
                            payload: bytes | memoryview, now: float) -> None:
        """A datagram arrived on the listening socket of ``forward`` from a host peer."""
        try:
            peer = ipaddress.ip_address(peer_addr.partition("%")[0])
        except ValueError:
            self.counters.inc("udp.drop.bad_peer")
            return
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # an IPv4 peer on a dual-stack listener
        if isinstance(peer, ipaddress.IPv4Address):
            guest_ip: bytes | None = self._guest_ip()
            presented = self.config.loopback_peer_address if peer.is_loopback else peer.packed
        else:
            guest_ip = self._guest_ipv6()
            presented = self.config.loopback_peer_address6 if peer.is_loopback else peer.packed
            if guest_ip is None:
                self.counters.drop("udp6.drop.no_guest_address",
                                   "UDP from an IPv6 peer dropped: the guest's IPv6 address "
                                   "is not known yet")
                return
        key = (guest_ip, forward.guest_port, presented, peer_port)
        flow = self._by_key.get(key)
        if flow is None:
            flow = self._new_flow(key, now, inbound=True)
            if flow is None:
                return
            self.commands.append(UdpBindPeer(flow.flow_id, forward, peer_addr, peer_port))
        self._touch(flow, now)
        self.counters.inc("udp.rx_forward")
        self._send_to_guest(flow, payload)

    # --- flows and timers -------------------------------------------------

    def _new_flow(self, key: FlowKey, now: float, inbound: bool) -> UdpFlow | None:
        if len(self._flows) >= self.config.flow_limit:
            self.counters.drop("udp.drop.flow_limit",
                               f"UDP flow limit ({self.config.flow_limit}) reached")
            return None
        flow = UdpFlow(self._next_flow_id, key[0], key[1], key[2], key[3], now, inbound)
        self._next_flow_id += 1
        self._by_key[key] = flow
        self._flows[flow.flow_id] = flow
        self.counters.inc("udp.flows_created")
        return flow

    def _touch(self, flow: UdpFlow, now: float) -> None:
        flow.last_active = now
        self._flows.move_to_end(flow.flow_id)

    def touch(self, flow_id: int, now: float) -> None:
        """The flow was active (datagrams sent by the fast path): push its expiry back."""
        flow = self._flows.get(flow_id)
        if flow is not None:
            self._touch(flow, now)

    def flow(self, flow_id: int) -> UdpFlow | None:
        return self._flows.get(flow_id)

    def flow_count(self) -> int:
        return len(self._flows)

    # --- migration --------------------------------------------------------

    def export_flows(self, now: float) -> list[dict[str, object]]:
        """Outbound flows as plain records (guest-side 4-tuple, idle seconds).

        Inbound flows belong to a forward's listener peer and are re-created
        by the next datagram, so only outbound ones travel.
        """
        return [
            {"guest_ip": str(ipaddress.ip_address(f.guest_ip)), "guest_port": f.guest_port,
             "remote_ip": str(ipaddress.ip_address(f.remote_ip)), "remote_port": f.remote_port,
             "idle": max(0.0, now - self._last_active(f))}
            for f in self._flows.values() if not f.inbound
        ]

    def _last_active(self, flow: UdpFlow) -> float:
        """The flow's last activity here or on the fast path, whichever is later."""
        if self.seen_elsewhere is None:
            return flow.last_active
        return max(flow.last_active, self.seen_elsewhere(flow.flow_id))

    def import_flows(self, records: list[dict[str, object]], now: float) -> int:
        """Re-create exported flows (new host sockets via ``UdpOpen``); returns how many.

        Every record is checked before any flow is created; a bad one raises
        ``ValueError`` and nothing changes.
        """
        keys = []
        for record in records:
            guest_ip = ipaddress.ip_address(str(record["guest_ip"]))
            remote_ip = ipaddress.ip_address(str(record["remote_ip"]))
            if guest_ip.version != remote_ip.version:
                raise ValueError(f"flow record mixes address families: {record!r}")
            key = (guest_ip.packed, _port(record["guest_port"]),
                   remote_ip.packed, _port(record["remote_port"]))
            idle = float(record.get("idle", 0.0))  # type: ignore[arg-type]
            keys.append((key, min(max(idle, 0.0), self.config.udp_idle_timeout)))
        created = 0
        for key, idle in keys:
            if key in self._by_key:
                continue
            destination = self._host_destination(key[0], key[2], key[3])
            if destination is None:
                continue
            flow = self._new_flow(key, now - idle, inbound=False)
            if flow is None:
                break
            self.commands.append(UdpOpen(flow.flow_id, destination[0], destination[1]))
            created += 1
        return created

    def poll_timers(self, now: float) -> None:
        timeout = self.config.udp_idle_timeout
        while self._flows:
            flow = next(iter(self._flows.values()))
            if now - flow.last_active < timeout:
                break
            seen = self._last_active(flow)
            if seen > flow.last_active:
                self._touch(flow, seen)  # active elsewhere since: back in line by that time
                continue
            del self._flows[flow.flow_id]
            del self._by_key[flow.key]
            self.counters.inc("udp.flows_expired")
            self.commands.append(UdpClose(flow.flow_id))

    def next_timer(self) -> float | None:
        # (The front's stamp from elsewhere can be later: then poll_timers finds it alive.)
        if not self._flows:
            return None
        return next(iter(self._flows.values())).last_active + self.config.udp_idle_timeout


def _quote6(packet: IPv6Packet) -> bytes:
    """What an ICMPv6 error about ``packet`` quotes: its header and extension headers with
    the UDP header (8 bytes are what the guest needs to find its socket), the payload length
    cut to match so the quote parses as an ``IPv6Packet``."""
    kept = len(packet.payload) - len(packet.upper_payload) + 8
    header = bytes(packet.header)
    return header[:4] + kept.to_bytes(2, "big") + header[6:IPV6_HEADER_LEN] + bytes(
        packet.payload[:kept])


def _port(value: object) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"bad port {value!r}")
    return value
