"""``ToGuest``: the stack's send helpers, packets and frames for the guest (both families).

The engines (ICMP, DHCP, DNS, UDP NAT, TCP, NDP...) and the stack itself queue what they
send the guest through these: ``send_ipv4`` / ``send_ipv6`` (headers, fragments beyond the
guest's MTU, the guest's MAC or what to do without it), ``send_udp`` / ``send_udp6``,
``send_icmpv6_error``, and ``send_ipv4_frames`` / ``send_ipv6_frames`` for whole frames an
engine built. Everything lands on ``frames_to_guest``. ``NetworkStack`` (stack.py, the
dispatch of the guest's frames) inherits this class and sets up the state it uses.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from vhostnet.wire import arp, ethernet
from vhostnet.wire.checksum import PROTO_UDP
from vhostnet.wire.icmpv6 import emit_error, may_answer_with_error
from vhostnet.wire.ipv4 import MIN_HEADER_LEN, emit_ipv4_fragments, emit_ipv4_header
from vhostnet.wire.ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from vhostnet.wire.ipv6 import MAX_PAYLOAD as IPV6_MAX_PAYLOAD
from vhostnet.wire.ipv6 import (
    NEXT_HEADER_ICMPV6,
    NEXT_HEADER_UDP,
    IPv6Packet,
    emit_ipv6_fragments,
    emit_ipv6_header,
)
from vhostnet.wire.udp import emit_udp

if TYPE_CHECKING:
    from vhostnet.stack.config import StackConfig
    from vhostnet.stack.counters import Counters
    from vhostnet.stack.ndp import NdpEngine

# Until the guest's MAC is known, frames for it go to the broadcast address (as passt
# does); every ARP_ASK_EVERY-th such frame is preceded by an ARP request for the guest's
# address, so a guest that stays silent still tells us its MAC: Linux drops TCP segments
# that arrive with a broadcast destination MAC.
ARP_ASK_EVERY = 8
# IPv6 packets for a guest whose MAC is unknown wait (Linux takes no TCP, and no
# neighbour discovery answer, from a frame to the broadcast address): at most this many,
# with a Neighbour Solicitation every ARP_ASK_EVERY of them.
MAX_HELD_FOR_MAC = 64


class ToGuest:
    """Packets and frames for the guest onto ``frames_to_guest`` (mixed into ``NetworkStack``,
    which owns the state)."""

    # Set up by NetworkStack.__init__.
    config: StackConfig
    stats: Counters
    frames_to_guest: deque
    guest_mac: bytes | None
    ndp: NdpEngine | None
    _broadcast_sent: int
    _fragment_ident: int
    _held6_for_mac: deque[bytes]

    def send_ipv4(self, src: bytes, dst: bytes, proto: int, payload: bytes | bytearray | memoryview,
                  ttl: int = 64, dst_mac: bytes | None = None, offload: int = 0) -> None:
        """Queue an IPv4 packet for the guest, from ``src`` (any address we impersonate).

        ``dst_mac`` defaults to the learned guest MAC; until there is one the frame goes
        to the broadcast address at once, as passt sends it (a guest configured statically
        may say nothing before a host peer reaches a forwarded port), and the guest is asked
        by ARP every ``ARP_ASK_EVERY`` such frames ("ipv4.tx.broadcast", "arp.request_sent").
        ``offload`` is the frame's vnet word (``offload.py``) when its L4 checksum was left
        partial or unset for the guest (only as ``guest_offloads`` allow); the queue then
        holds ``(frame, offload)``.

        A packet without offload that does not fit the guest's MTU leaves as fragments
        (DF clear: we are its sender); one with offload is a GSO frame the guest segments.
        """
        mac = dst_mac or self.guest_mac
        if MIN_HEADER_LEN + len(payload) > 0xFFFF:
            self.stats.drop("ipv4.tx.drop.too_big", "datagram for the guest over 65535 bytes")
            return
        if offload or MIN_HEADER_LEN + len(payload) <= self.config.mtu:
            packets = [emit_ipv4_header(src, dst, proto, len(payload), ttl=ttl) + bytes(payload)]
        else:
            packets = emit_ipv4_fragments(src, dst, proto, payload, self.config.mtu,
                                          self.next_fragment_ident(), ttl=ttl)
            self._count_fragments(packets)
        if mac is None:
            mac = self._broadcast_until_learned(dst)
        for packet in packets:
            frame = ethernet.emit_ethernet(mac, self.config.gateway_mac,
                                           ethernet.ETHERTYPE_IPV4, packet)
            self.frames_to_guest.append((frame, offload) if offload else frame)
        self.stats.inc("ipv4.tx", len(packets))

    def _count_fragments(self, packets: list[bytes]) -> None:
        self.stats.inc("frag.tx_datagrams")
        self.stats.inc("frag.tx_fragments", len(packets))

    def next_fragment_ident(self) -> int:
        """A fresh 32-bit identification for a datagram we fragment (IPv4 uses its low 16
        bits; ``wire.ipv6.emit_ipv6_fragments`` all 32)."""
        self._fragment_ident = (self._fragment_ident + 1) & 0xFFFFFFFF
        return self._fragment_ident

    @property
    def gateway_mac(self) -> bytes:
        """Our own MAC on the guest link: the source of every frame we send."""
        return self.config.gateway_mac

    def send_ipv4_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        """Queue whole Ethernet frames carrying IPv4 for the guest, built by an engine for the
        learned ``guest_mac`` (e.g. TCP data, ``vhostnet.tcp.sender``); each entry is a frame
        or ``(frame, vnet word)``, as in ``frames_to_guest``."""
        self._queue_frames(frames, "ipv4.tx")

    def send_ipv6_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        """``send_ipv4_frames`` for frames carrying IPv6 (TCP data over IPv6)."""
        self._queue_frames(frames, "ipv6.tx")

    def _queue_frames(self, frames: list[bytes | tuple[bytes, int]], counter: str) -> None:
        # One call: the network's queue (vhostnet.guest_queue) bounds, counts and tells its
        # listeners in extend as in append.
        self.frames_to_guest.extend(frames)
        self.stats.inc(counter, len(frames))

    def _broadcast_until_learned(self, dst: bytes) -> bytes:
        """The destination MAC for a frame to a guest whose MAC is unknown: broadcast, with an
        ARP request for ``dst`` before every ``ARP_ASK_EVERY``-th such frame (no clock here)."""
        if self._broadcast_sent % ARP_ASK_EVERY == 0:
            request = arp.emit_arp(arp.OP_REQUEST, self.config.gateway_mac, self.config.gateway,
                                   bytes(6), dst)
            self.frames_to_guest.append(ethernet.emit_ethernet(
                ethernet.BROADCAST_MAC, self.config.gateway_mac, ethernet.ETHERTYPE_ARP, request))
            self.stats.inc("arp.request_sent")
        self._broadcast_sent += 1
        self.stats.inc("ipv4.tx.broadcast")
        return ethernet.BROADCAST_MAC

    def send_udp(self, src: bytes, sport: int, dst: bytes, dport: int,
                 payload: bytes | bytearray | memoryview, dst_mac: bytes | None = None) -> None:
        """Queue a UDP datagram (checksum filled in) for the guest."""
        self.send_ipv4(src, dst, PROTO_UDP, emit_udp(src, sport, dst, dport, payload),
                       dst_mac=dst_mac)

    def send_ipv6(self, src: bytes, dst: bytes, next_header: int,
                  payload: bytes | bytearray | memoryview, hop_limit: int = 64,
                  dst_mac: bytes | None = None) -> None:
        """Queue an IPv6 packet for the guest (``send_ipv4``'s twin, no offloads).

        ``dst_mac`` defaults to the learned guest MAC; without one the packet is held
        (at most ``MAX_HELD_FOR_MAC``) and the guest is asked by a Neighbour Solicitation,
        as ARP does for IPv4 ("ipv6.tx.drop.no_guest_mac" beyond that).
        """
        if len(payload) > IPV6_MAX_PAYLOAD:
            self.stats.drop("ipv6.tx.drop.too_big", "IPv6 datagram for the guest over 65535 bytes")
            return
        if IPV6_HEADER_LEN + len(payload) <= self.config.mtu:
            packets = [emit_ipv6_header(src, dst, next_header, len(payload), hop_limit)
                       + bytes(payload)]
        else:
            # Nothing can send the host side a Packet Too Big: we fragment (RFC 8200 4.5).
            packets = emit_ipv6_fragments(src, dst, next_header, payload, self.config.mtu,
                                          self.next_fragment_ident(), hop_limit=hop_limit)
            self._count_fragments(packets)
        mac = dst_mac or self.guest_mac
        for packet in packets:
            if mac is None:
                self._hold6_for_mac(dst, packet)
                continue
            self.frames_to_guest.append(ethernet.emit_ethernet(
                mac, self.config.gateway_mac, ethernet.ETHERTYPE_IPV6, packet))
            self.stats.inc("ipv6.tx")

    def _hold6_for_mac(self, dst: bytes, packet: bytes) -> None:
        if len(self._held6_for_mac) >= MAX_HELD_FOR_MAC:
            self.stats.drop("ipv6.tx.drop.no_guest_mac",
                            "IPv6 packet for the guest dropped: its MAC address is not known yet")
            return
        if len(self._held6_for_mac) % ARP_ASK_EVERY == 0 and self.ndp is not None:
            self.ndp.solicit(dst)
        self._held6_for_mac.append(packet)
        self.stats.inc("ipv6.tx.held_for_mac")

    def send_udp6(self, src: bytes, sport: int, dst: bytes, dport: int,
                  payload: bytes | bytearray | memoryview, dst_mac: bytes | None = None) -> None:
        """Queue a UDP datagram over IPv6 (checksum filled in) for the guest."""
        self.send_ipv6(src, dst, NEXT_HEADER_UDP, emit_udp(src, sport, dst, dport, payload),
                       dst_mac=dst_mac)

    def send_icmpv6_error(self, invoking: IPv6Packet, icmp_type: int, code: int,
                          rest: int = 0) -> bool:
        """Answer a guest packet with an ICMPv6 error (e.g. ``wire.icmpv6.emit_port_unreachable``'s
        destination unreachable / port unreachable for refused UDP, or packet too big), from
        the packet's destination; False (nothing sent) where RFC 4443 2.4 (e) forbids one."""
        if not may_answer_with_error(invoking):
            self.stats.inc("icmp6.error_suppressed")
            return False
        src = invoking.dst
        self.send_ipv6(src, invoking.src, NEXT_HEADER_ICMPV6,
                       emit_error(src, invoking, icmp_type, code, rest))
        self.stats.inc(f"icmp6.error_sent.{icmp_type}.{code}")
        return True
