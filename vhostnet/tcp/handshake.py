"""Connection setup of the TCP translator: the guest's SYN and the host's connect() for flows
the guest opens, the host peer's accept() and our SYN for forwarded ports, and the handshake
segments up to ESTABLISHED (``TcpEngine``'s contract: vhostnet/tcp/engine.py).

``ConnectionSetup`` is one part of ``TcpEngine`` (a base class of it), split off along the
handshake: its methods work on the engine's state, declared below; once a flow is established
the engine's data path (``TcpEngine._segment_established``) takes every segment.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from typing import Any

from vhostnet.stack.counters import Counters
from vhostnet.tcp.flow import Connect, Flow, Phase, Segment, TcpCommand, TcpTimeouts
from vhostnet.tcp.output import GuestLink, GuestOutput, is_ipv6
from vhostnet.tcp.sender import GuestSender
from vhostnet.tcp.table import FlowTable
from vhostnet.tcp.tally import EventCounts
from vhostnet.tcp.timers import FlowTimers
from vhostnet.wire.tcp import ACK, RST, SYN

# Our window scale shift: 2^7 * 65535 ~ 8 MiB, enough for any host socket buffer.
OUR_WSCALE = 7
# The MSS to assume when the guest's SYN carries none (RFC 9293).
DEFAULT_MSS = 536


class ConnectionSetup:
    """The handshake half of ``TcpEngine``; see the module docstring."""

    # The engine's state these methods use (set by ``TcpEngine.__init__``).
    config: Any
    output: GuestLink
    timeouts: TcpTimeouts
    stats: Counters
    commands: deque[TcpCommand]
    table: FlowTable
    flows: dict[tuple[bytes, int, bytes, int], Flow]
    flows_by_id: dict[int, Flow]
    tx: GuestOutput
    counts: EventCounts
    sender: GuestSender
    _timers: FlowTimers
    look_ahead: float
    _isn: Callable[[], int]

    def add_flow(self, key: tuple[bytes, int, bytes, int], inbound: bool, phase: Phase) -> Flow:
        """A new flow in ``phase``; the caller sets its numbers and timers (``schedule``)."""
        return self.table.add(key, inbound, phase)

    def _abort(self, flow: Flow, send_rst: bool) -> None:
        raise NotImplementedError  # TcpEngine's

    def _segment_established(self, flow: Flow, seg: Segment, now: float) -> None:
        raise NotImplementedError  # TcpEngine's

    def _open_outbound(
        self, key: tuple[bytes, int, bytes, int], seg: Segment, now: float
    ) -> None:
        guest_ip, guest_port, remote_ip, remote_port = key
        if self.table.at_limit(now):
            self.tx.answer_stray(key, seg)
            return
        if is_ipv6(remote_ip):
            destination = self.config.host_destination6(remote_ip, remote_port, guest_ip)
        else:
            destination = self.config.host_destination(remote_ip, remote_port)
        if destination is None:
            self.stats.inc("tcp.unreachable")
            self.tx.answer_stray(key, seg)
            return
        flow = self.table.add(key, inbound=False, phase=Phase.CONNECTING)
        # The guest opened it: a client, whose first data is most likely a request the
        # host answers at once; its ACK waits for the answer (one frame less per exchange).
        flow.interactive = self.timeouts.ack_delay > 0
        flow.irs = seg.seq
        flow.rcv_nxt = flow.rcv_queued = 1
        self._take_syn_options(flow, seg)
        flow.syn_at = now + self.timeouts.syn
        flow.idle_at = now + self.timeouts.idle
        self.commands.append(Connect(flow.flow_id, destination[0], destination[1]))
        # Looked at by the look-ahead rather than at its SYN deadline: the events to come
        # set their deadlines without a push (tcp/timers.py).
        self._timers.look_by(flow, now + self.look_ahead)

    def _segment_connecting(self, flow: Flow, seg: Segment) -> None:
        # The guest only retransmits its SYN while we wait for connect(); nothing to answer yet.
        if seg.flags & RST:
            self._abort(flow, send_rst=False)

    def _segment_syn_rcvd(self, flow: Flow, seg: Segment, now: float) -> None:
        flags = seg.flags
        if flags & RST:
            self._abort(flow, send_rst=False)
            return
        if flags & SYN:
            self.tx.syn(flow)  # our SYN-ACK was lost
            return
        if not flags & ACK:
            return
        if flow.send_rel(seg.ack) != 1:
            self.tx.rst_for(flow, seg)
            return
        self._establish(flow, seg, now)
        self._segment_established(flow, seg, now)

    def _segment_syn_sent(self, flow: Flow, seg: Segment, now: float) -> None:
        flags = seg.flags
        acceptable = bool(flags & ACK) and flow.send_rel(seg.ack) == 1
        if flags & RST:
            if acceptable:
                self._abort(flow, send_rst=False)
            return
        if flags & (SYN | ACK) != SYN | ACK:
            return
        if not acceptable:
            self.tx.rst_for(flow, seg)
            return
        flow.irs = seg.seq
        flow.rcv_nxt = flow.rcv_queued = 1
        self._take_syn_options(flow, seg)
        self._establish(flow, seg, now)
        self.tx.ack(flow)
        self.sender.pump(flow, now)
        self.sender.maybe_send_fin(flow, now)

    def _establish(self, flow: Flow, seg: Segment, now: float) -> None:
        flow.phase = Phase.ESTABLISHED
        flow.snd_una = 1
        flow.snd_wnd = seg.window << flow.snd_wscale if not seg.flags & SYN else seg.window
        flow.rto_at = flow.syn_at = None
        flow.retries = 0
        flow.rto = self.timeouts.rto_initial
        self.counts.established += 1

    def on_connected(self, flow_id: int, now: float, send_space: int | None = None) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None or flow.phase is not Phase.CONNECTING:
            return
        if send_space is not None:
            flow.host_space = send_space
        flow.phase = Phase.SYN_RCVD
        flow.iss = self._isn() & 0xFFFFFFFF
        flow.snd_nxt = flow.snd_max = 1
        flow.rto = self.timeouts.rto_initial
        flow.rto_at = now + flow.rto
        flow.idle_at = now + self.timeouts.idle
        self.tx.syn(flow)
        self._timers.look_by(flow, now + self.look_ahead)  # the SYN-ACK's RTO

    def on_connect_failed(self, flow_id: int, errno: int, now: float) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        self.stats.inc("tcp.connect_failed")
        self._abort(flow, send_rst=True)

    def on_accepted(
        self,
        peer_host: str,
        peer_port: int,
        guest_port: int,
        now: float,
        send_space: int | None = None,
    ) -> int | None:
        """A host peer connected to a forwarded port: start a flow and send the guest a SYN.

        The peer's family picks the guest's address: an IPv4 peer (also as a v4-mapped
        address on a dual-stack listener) reaches the guest's IPv4 address, an IPv6 peer
        its IPv6 address (configured, else learned); None when the guest has none there.
        """
        if self.table.at_limit(now):
            return None
        remote_ip = self._guest_visible_address(peer_host)
        guest_ip = self._guest_address(is_ipv6(remote_ip))
        if guest_ip is None:
            self.stats.inc("tcp.drop.forward_no_guest_address")
            return None
        key = (guest_ip, guest_port, remote_ip, peer_port)
        if key in self.flows:
            self.stats.inc("tcp.drop.forward_tuple_busy")
            return None
        flow = self.table.add(key, inbound=True, phase=Phase.SYN_SENT)
        flow.mss = self.tx.mss_limits[len(guest_ip)]  # (mss_limit without its call)
        flow.iss = self._isn() & 0xFFFFFFFF
        flow.snd_nxt = flow.snd_max = 1
        flow.rto = self.timeouts.rto_initial
        flow.rto_at = now + flow.rto
        flow.syn_at = now + self.timeouts.syn
        flow.idle_at = now + self.timeouts.idle
        flow.rcv_wscale = OUR_WSCALE
        if send_space is not None:
            flow.host_space = send_space
        self.tx.syn(flow)
        self._timers.look_by(flow, now + self.look_ahead)  # see _open_outbound
        return flow.flow_id

    def _guest_visible_address(self, peer_host: str) -> bytes:
        # A loopback peer appears as the mapped loopback address (by default the
        # gateway), so the guest can answer it, as passt does.
        address = ipaddress.ip_address(peer_host.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            return address.packed
        if address.version == 6:
            return self.config.loopback_peer_address6
        return self.config.loopback_peer_address

    def _guest_address(self, ipv6: bool) -> bytes | None:
        """The guest's address of a family, for flows a host peer opens (None: none known)."""
        config = self.config
        if ipv6:
            return bytes(config.guest_ipv6 or self.output.guest_ipv6 or b"") or None
        return bytes(config.guest_ipv4) if config.ipv4 else None

    def _take_syn_options(self, flow: Flow, seg: Segment) -> None:
        options = seg.options
        mss, limit = options.mss or DEFAULT_MSS, self.tx.mss_limits[len(flow.guest_ip)]
        flow.mss = mss if mss < limit else limit  # (min and mss_limit without their calls)
        if options.wscale is not None:
            flow.snd_wscale = options.wscale
            flow.rcv_wscale = OUR_WSCALE
        else:
            # Scaling is used only when both SYNs carry the option (RFC 7323).
            flow.snd_wscale = flow.rcv_wscale = 0
        flow.snd_wnd = seg.window
