"""Segments from the translator to the guest: SYN/SYN-ACK, ACK, RST, and our window.

``GuestOutput`` turns flow state into emitted segments and hands them to the
stack (``send_ipv4`` or ``send_ipv6``, by the length of the flow's addresses). It
decides nothing about the connection itself; the engine does. Data segments are
``vhostnet.tcp.sender``'s (built whole in C).
"""

from __future__ import annotations

from typing import Protocol

from vhostnet.stack.counters import Counters
from vhostnet.tcp._frames import control_frame
from vhostnet.tcp.flow import SEQ_MOD, Flow, Phase, Segment
from vhostnet.tcp.tally import EventCounts
from vhostnet.wire.checksum import PROTO_TCP
from vhostnet.wire.offload import IPV4_HEADER_LEN, IPV6_HEADER_LEN, GuestOffloads
from vhostnet.wire.tcp import ACK, RST, SYN, build_options, emit_segment


class GuestLink(Protocol):
    """Where segments go (the stack): IPv4 and IPv6 to the guest, and what its driver takes."""

    guest_offloads: GuestOffloads  # checksum/TSO offloads the guest accepts on receive
    # The guest's MAC once learned; until then data goes segment by segment
    # through send_ipv4 (to the broadcast address, with an ARP probe) or send_ipv6
    # (held for the guest's MAC).
    guest_mac: bytes | None
    gateway_mac: bytes  # our own MAC, the source of whole frames
    guest_ipv6: bytes | None  # the guest's global IPv6 address as learned (inbound forwards)

    def send_ipv4(self, src: bytes, dst: bytes, proto: int, payload: bytes, *,
                  offload: int = 0) -> None: ...

    def send_ipv6(self, src: bytes, dst: bytes, next_header: int, payload: bytes) -> None:
        """An IPv6 packet without offloads (its checksum complete)."""

    def send_ipv4_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        """Whole Ethernet frames for ``guest_mac``, each one or ``(frame, vnet word)``."""

    def send_ipv6_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        """``send_ipv4_frames`` for frames carrying IPv6."""


def is_ipv6(address: bytes) -> bool:
    """A flow's family, from the length of its addresses (4 or 16 bytes)."""
    return len(address) == 16


class GuestOutput:
    def __init__(self, output: GuestLink, stats: Counters, mtu: int) -> None:
        self.output = output
        self.stats = stats
        self.mtu = mtu
        # The MSS we advertise, by the length of the guest's address (4: IPv4, 16: IPv6).
        self.mss_limits = {4: mtu - IPV4_HEADER_LEN - 20, 16: mtu - IPV6_HEADER_LEN - 20}
        self.counts = EventCounts(stats)  # the engine's per-event counts (tcp/tally.py)
        self._syn_options: dict[tuple[int, int | None], bytes] = {}  # built once each

    def mss_limit(self, address: bytes) -> int:
        """The MSS we advertise: the guest's MTU minus the IP (by family) and TCP headers."""
        return self.mss_limits[len(address)]

    def window_bytes(self, flow: Flow) -> int:
        """What the host socket takes now beyond the guest bytes queued for it (0 or more)."""
        room = flow.host_space - len(flow.to_host)
        return room if room > 0 else 0

    def advertised_window(self, flow: Flow, syn: bool = False) -> int:
        """``window_bytes`` scaled for the window field (never scaled on a SYN)."""
        # Without calls (window_bytes, max, min): every segment to the guest carries it.
        room = flow.host_space - len(flow.to_host)
        if room <= 0:
            return 0
        room >>= 0 if syn else flow.rcv_wscale
        return room if room < 0xFFFF else 0xFFFF

    def emit(self, flow: Flow, flags: int, seq: int, ack: int | None = None,
             options: bytes = b"") -> None:
        """A segment without payload to the flow's guest side (data is ``sender.py``'s);
        ``ack`` None: the flow's ``rcv_nxt`` when ``flags`` has ACK (the owed ACK goes with
        it), else 0."""
        if ack is None:
            ack = 0
            if flags & ACK:
                ack = (flow.irs + flow.rcv_nxt) % SEQ_MOD  # flow.recv_seq(rcv_nxt), written out
                flow.rcv_acked = flow.rcv_nxt
                flow.ack_owed_at = None
        self.control(flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port, seq, ack,
                     flags, self.advertised_window(flow, syn=bool(flags & SYN)), options)

    def segment(self, flow: Flow, segment: bytes, offload: int = 0) -> None:
        """Hand one segment to the stack; ``offload`` is its vnet word when the guest takes
        offloads (IPv4 only: IPv6 segments go whole, their checksum complete)."""
        self._send(flow.remote_ip, flow.guest_ip, segment, offload)

    def _send(self, src: bytes, dst: bytes, segment: bytes, offload: int = 0) -> None:
        if is_ipv6(src):
            self.output.send_ipv6(src, dst, PROTO_TCP, segment)
        else:
            self.output.send_ipv4(src, dst, PROTO_TCP, segment, offload=offload)
        self.counts.segments_out += 1

    def syn(self, flow: Flow) -> None:
        """Our SYN (inbound forward) or SYN-ACK (outbound flow), with MSS and window scale."""
        key = (self.mss_limits[len(flow.guest_ip)], flow.rcv_wscale if flow.rcv_wscale else None)
        options = self._syn_options.get(key)
        if options is None:  # one per family and scaling: at most four
            options = self._syn_options[key] = build_options(*key)
        flags = SYN if flow.phase is Phase.SYN_SENT else SYN | ACK
        self.emit(flow, flags, seq=flow.send_seq(0), options=options)

    def ack(self, flow: Flow) -> None:
        self.emit(flow, ACK, seq=(flow.iss + flow.snd_nxt) % SEQ_MOD)  # send_seq(snd_nxt)

    def rst_for(self, flow: Flow, seg: Segment) -> None:
        """Reset answering an unacceptable ACK, without touching the flow (RFC 9293)."""
        self.emit(flow, RST, seq=seg.ack, ack=0)
        self.stats.inc("tcp.rst_sent")

    def ack_closed(self, key: tuple[bytes, int, bytes, int], seq: int, ack: int) -> None:
        """The final ACK again, for a retransmission of a connection that closed cleanly."""
        self.emit_without_flow(key, seq, ack, ACK)
        self.stats.inc("tcp.closed_straggler_acked")

    def answer_stray(self, key: tuple[bytes, int, bytes, int], seg: Segment) -> None:
        """RST for a segment that belongs to no flow (never in answer to a RST)."""
        if seg.flags & RST:
            self.stats.inc("tcp.drop.no_flow")
            return
        if seg.flags & ACK:
            self.emit_without_flow(key, seg.ack, 0, RST)
        else:
            self.emit_without_flow(key, 0, (seg.seq + seg.segment_len) & 0xFFFFFFFF, RST | ACK)
        self.stats.inc("tcp.rst_sent")
        self.stats.inc("tcp.rst_stray")

    def emit_without_flow(self, key: tuple[bytes, int, bytes, int], seq: int, ack: int,
                           flags: int) -> None:
        """A segment to the guest for a 4-tuple the engine keeps no flow for (window 0)."""
        guest_ip, guest_port, remote_ip, remote_port = key
        self.control(remote_ip, guest_ip, remote_port, guest_port, seq, ack, flags, 0)

    def control(self, src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int, seq: int,
                ack: int, flags: int, window: int, options: bytes = b"") -> None:
        """A segment without payload (ACK, FIN, RST, a SYN with its ``options``): built whole
        in C (ext/tcp_frames.pyx) once the guest's MAC is known, else through the stack."""
        output = self.output
        guest_mac = output.guest_mac
        if guest_mac is None:
            self._send(src_ip, dst_ip, emit_segment(src_ip, dst_ip, src_port, dst_port, seq,
                                                    ack, flags, window, b"", options))
            return
        frame = control_frame(guest_mac, output.gateway_mac, src_ip, dst_ip, src_port,
                              dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window,
                              options)
        if len(src_ip) == 16:
            output.send_ipv6_frames([frame])
        else:
            output.send_ipv4_frames([frame])
        self.counts.segments_out += 1
