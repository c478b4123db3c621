"""ICMP echo engine for both families: ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) echo.

The message views and builders are in ``vhostnet.wire.icmp`` and ``vhostnet.wire.icmpv6``.
Echo requests to the gateway, the DNS address or the address mapped to the
host's loopback (and, for IPv6, the gateway's link-local address) are answered here.
Echo requests to any other destination go out through unprivileged "ping sockets" on the host (see ``vhostnet.hostio.icmp``): the engine queues commands, the glue
executes them and reports replies back with ``on_echo_reply``.

Commands (``IcmpEngine.commands``):

- ``IcmpOpen(flow_id, host_addr)``: open a ping socket connected to ``host_addr``
  (an IPv6 address text opens an ICMPv6 one);
- ``IcmpEchoSend(flow_id, seq, payload)``: send an echo request on it (the kernel
  picks the echo identifier; the engine maps replies back to the guest's one);
- ``IcmpClose(flow_id)``: close it (idle flow).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from vhostnet.stack.config import StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.wire.checksum import PROTO_ICMP
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, IcmpMessage, emit_echo
from vhostnet.wire.icmpv6 import ECHO_REPLY as ECHO_REPLY6
from vhostnet.wire.icmpv6 import Icmpv6Message, emit_echo6
from vhostnet.wire.ipv4 import IPv4Packet
from vhostnet.wire.ipv6 import NEXT_HEADER_ICMPV6, IPv6Packet, is_multicast, link_local_address

ECHO_FLOW_IDLE_TIMEOUT = 60.0

SendIPv4 = Callable[..., None]


@dataclass(frozen=True)
class IcmpOpen:
    flow_id: int
    host_addr: str


@dataclass(frozen=True)
class IcmpEchoSend:
    flow_id: int
    seq: int
    payload: bytes


@dataclass(frozen=True)
class IcmpClose:
    flow_id: int


@dataclass
class _EchoFlow:
    flow_id: int
    guest_ip: bytes
    guest_ident: int
    remote_ip: bytes
    last_active: float


class IcmpEngine:
    """Protocol handler for IPv4 protocol 1 (registered by ``NetworkStack``) and for ICMPv6
    echo requests (``handle_echo6``, called by its ICMPv6 dispatch); ``send_ipv6`` is
    needed for the latter."""

    def __init__(self, config: StackConfig, counters: Counters, send_ipv4: SendIPv4,
                 send_ipv6: SendIPv4 | None = None) -> None:
        self.config = config
        self.counters = counters
        self._send_ipv4 = send_ipv4
        self._send_ipv6 = send_ipv6
        local6 = {config.gateway6, config.dns6, link_local_address(config.gateway_mac)}
        if config.map_host_loopback6 is not None:
            local6.add(config.map_host_loopback6)
        self._local6 = local6
        self.commands: deque[IcmpOpen | IcmpEchoSend | IcmpClose] = deque()
        # False once the glue reports that the host forbids ping sockets.
        self.host_echo_available = True
        self._flows_by_key: dict[tuple[bytes, int, bytes], _EchoFlow] = {}
        # Ordered by last activity, oldest first, so expiry looks only at the front.
        self._flows: OrderedDict[int, _EchoFlow] = OrderedDict()
        self._next_flow_id = 1

    # --- guest side -------------------------------------------------------

    def handle_ipv4(self, packet: IPv4Packet, now: float) -> None:
        try:
            message = IcmpMessage(packet.payload)
        except MalformedPacket as error:
            self.counters.drop(f"icmp.drop.{error.reason}", f"ICMP from guest dropped: {error}")
            return
        self.counters.inc("icmp.rx")
        if message.type != TYPE_ECHO_REQUEST:
            self.counters.inc("icmp.drop.type")
            return
        # The host's loopback always answers echo, so the address mapped to it is
        # answered here too: no ping socket (and no ping_group_range) needed.
        if packet.dst in (self.config.gateway, self.config.dns, self.config.map_host_loopback):
            self.counters.inc("icmp.echo.local")
            reply = emit_echo(TYPE_ECHO_REPLY, message.echo_ident, message.echo_seq, message.body)
            self._send_ipv4(packet.dst, packet.src, PROTO_ICMP, reply)
            return
        self._forward_echo(packet.src, packet.dst, message,
                           self.config.host_destination(packet.dst, 0), now)

    def handle_echo6(self, packet: IPv6Packet, message: Icmpv6Message, now: float) -> None:
        """An ICMPv6 echo request from the guest (checksum verified by the dispatcher)."""
        self.counters.inc("icmp6.rx")
        if is_multicast(packet.dst):
            self.counters.inc("icmp6.drop.multicast")
            return
        if packet.dst in self._local6:
            self.counters.inc("icmp6.echo.local")
            self._reply6(packet.dst, packet.src, message.echo_ident, message.echo_seq,
                         message.body)
            return
        self._forward_echo(packet.src, packet.dst, message,
                           self.config.host_destination6(packet.dst, 0, packet.src), now)

    def _reply6(self, src: bytes, dst: bytes, ident: int, seq: int, body: memoryview) -> None:
        assert self._send_ipv6 is not None
        self._send_ipv6(src, dst, NEXT_HEADER_ICMPV6, emit_echo6(src, dst, ECHO_REPLY6, ident, seq,
                                                                 body))

    def _forward_echo(self, src: bytes, dst: bytes, message: IcmpMessage | Icmpv6Message,
                      target: tuple[str, int] | None, now: float) -> None:
        if not self.host_echo_available:
            self.counters.inc("icmp.drop.no_ping_socket")
            return
        if target is None:
            self.counters.inc("icmp.drop.no_route")
            return
        key = (src, message.echo_ident, dst)
        flow = self._flows_by_key.get(key)
        if flow is None:
            if len(self._flows) >= self.config.flow_limit:
                self.counters.drop("icmp.drop.flow_limit", "ICMP echo flow limit reached")
                return
            flow = _EchoFlow(self._next_flow_id, src, message.echo_ident, dst, now)
            self._next_flow_id += 1
            self._flows_by_key[key] = flow
            self._flows[flow.flow_id] = flow
            self.commands.append(IcmpOpen(flow.flow_id, target[0]))
        flow.last_active = now
        self._flows.move_to_end(flow.flow_id)
        self.counters.inc("icmp.echo.forwarded")
        self.commands.append(IcmpEchoSend(flow.flow_id, message.echo_seq, bytes(message.body)))

    # --- host side (called by the glue) -----------------------------------

    def on_echo_reply(self, flow_id: int, data: bytes, now: float) -> None:
        """A datagram from a ping socket: an ICMP(v6) message without the IP header.

        The kernel already checked the checksum and rewrote the identifier to
        the socket's own; the guest gets its original identifier back.
        """
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        try:
            message = IcmpMessage(data, verify_checksum=False)
        except MalformedPacket:
            self.counters.inc("icmp.drop.host_short")
            return
        ipv6 = len(flow.remote_ip) == 16
        if message.type != (ECHO_REPLY6 if ipv6 else TYPE_ECHO_REPLY):
            self.counters.inc("icmp.drop.host_type")
            return
        flow.last_active = now
        self._flows.move_to_end(flow_id)
        if ipv6:
            self.counters.inc("icmp6.echo.reply")
            self._reply6(flow.remote_ip, flow.guest_ip, flow.guest_ident, message.echo_seq,
                         message.body)
            return
        reply = emit_echo(TYPE_ECHO_REPLY, flow.guest_ident, message.echo_seq, message.body)
        self.counters.inc("icmp.echo.reply")
        self._send_ipv4(flow.remote_ip, flow.guest_ip, PROTO_ICMP, reply)

    def on_host_echo_unavailable(self, reason: str) -> None:
        """The glue could not open a ping socket: only local echo answers from now on."""
        self.host_echo_available = False
        self.counters.log_once("icmp.no_ping_socket",
                               f"ICMP echo beyond the gateway disabled: {reason}")
        for flow in list(self._flows.values()):
            self._remove(flow)

    # --- timers -----------------------------------------------------------

    def poll_timers(self, now: float) -> None:
        while self._flows:
            flow = next(iter(self._flows.values()))
            if now - flow.last_active < ECHO_FLOW_IDLE_TIMEOUT:
                break
            self._remove(flow)
            self.commands.append(IcmpClose(flow.flow_id))

    def next_timer(self) -> float | None:
        if not self._flows:
            return None
        return next(iter(self._flows.values())).last_active + ECHO_FLOW_IDLE_TIMEOUT

    def flow_count(self) -> int:
        return len(self._flows)

    def _remove(self, flow: _EchoFlow) -> None:
        self._flows.pop(flow.flow_id, None)
        self._flows_by_key.pop((flow.guest_ip, flow.guest_ident, flow.remote_ip), None)
