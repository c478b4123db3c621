"""``NetworkStack``: the dispatcher that receives guest frames and owns the engines.

Frames come in through ``receive_frame`` (one call per Ethernet frame from the
guest's TX ring); frames for the guest pile up in ``frames_to_guest``, which
the device drains into the RX ring after each event-loop callback.

Per-protocol work is delegated:

- ARP is answered here (it is a few lines): every address in the guest's subnet
  except the guest's own, plus the gateway and DNS addresses, is "at" the gateway MAC;
- IPv4 protocol handlers: whatever ``set_protocol_handler`` registers (ICMP, TCP);
- UDP: services first (``add_udp_service``: DHCP, DNS, TFTP), then the generic
  NAT (``udp_nat``), if one is set.

The engines are built and attached by the assembler (``vhostnet.network``),
which also runs their timers; they count into ``stack.stats``. Engines that
talk to host sockets keep a ``commands`` deque that their glue in
``vhostnet.hostio`` executes: ``stack.icmp``, ``stack.udp_nat``, ``stack.dns``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

from vhostnet.stack import ndp
from vhostnet.stack.config import StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.stack.dhcp import DhcpServer
from vhostnet.stack.dns import DnsForwarder
from vhostnet.stack.icmp import IcmpEngine
from vhostnet.stack.udp_nat import UdpNat
from vhostnet.wire import arp, ethernet
from vhostnet.wire.checksum import PROTO_TCP, PROTO_UDP
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.ipv6 import IPv6Packet
from vhostnet.wire.offload import (
    NO_OFFLOADS,
    TCP_CHECKSUM_OFFSET,
    UDP_CHECKSUM_OFFSET,
    partial_l4_checksum,
)
from vhostnet.wire.udp import UdpDatagram, emit_udp

log = logging.getLogger(__name__)

# Until the guest's MAC is known, frames for it go to the broadcast address (as passt
# does); every ARP_ASK_EVERY-th such frame is preceded by an ARP request for the guest's
# address, so a guest that stays silent still tells us its MAC: Linux drops TCP segments
# that arrive with a broadcast destination MAC.
ARP_ASK_EVERY = 8


class ProtocolHandler(Protocol):
    """An engine for one IPv4 protocol number (e.g. the TCP engine for 6)."""

    def handle_ipv4(self, packet: IPv4Packet, now: float) -> None: ...


class UdpService(Protocol):
    """A local UDP service (DHCP, DNS, TFTP), consulted before generic UDP NAT."""

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool: ...

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: memoryview, now: float) -> None: ...


class NetworkStack:
    """The sans-IO user-mode network: guest frames in, guest frames and host commands out."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        # Shared by the stack and its engines (ICMP, DHCP, DNS, UDP NAT count here too).
        self.stats = Counters(log)
        self.frames_to_guest: deque[bytes] = deque()
        # Learned from the guest's own frames; None until it has sent something.
        self.guest_mac: bytes | None = None
        self.guest_ipv4: bytes | None = None
        # What the guest's virtio-net driver negotiated for frames it receives (set by the device).
        self.guest_offloads = NO_OFFLOADS
        # Frames sent to the broadcast address because the guest's MAC was not known yet.
        self._broadcast_sent = 0
        self._protocol_handlers: dict[int, ProtocolHandler] = {}
        self._udp_services: list[UdpService] = []
        # The engines the assembler attached (None: that protocol is off).
        self.icmp: IcmpEngine | None = None
        self.dhcp: DhcpServer | None = None
        self.dns: DnsForwarder | None = None
        self.udp_nat: UdpNat | None = None  # UDP no service accepts; None: dropped

    # --- registration -----------------------------------------------------

    def set_protocol_handler(self, proto: int, handler: ProtocolHandler) -> None:
        """Route IPv4 packets of protocol ``proto`` to ``handler.handle_ipv4(packet, now)``."""
        self._protocol_handlers[proto] = handler

    def add_udp_service(self, service: UdpService) -> None:
        """Add a local UDP service; services are asked in registration order."""
        self._udp_services.append(service)

    # --- guest -> stack ----------------------------------------------------

    def receive_frame(self, frame: bytes | bytearray | memoryview, now: float, vnet: int = 0) -> None:
        """Handle one Ethernet frame from the guest. Never raises.

        ``vnet`` is the frame's virtio-net offload word (``offload.vnet_word``): a partial
        L4 checksum there is not verified.
        """
        try:
            self._receive_frame(frame, now, vnet)
        except Exception:  # a bug must cost one frame, not the whole back-end
            self.stats.inc("stack.drop.internal_error")
            self.stats.log_exception_once("stack.internal_error",
                                              "internal error handling a guest frame")

    def count_frames_taken(self, frames: int) -> None:
        """IPv4 frames a C fast path handled in place of ``receive_frame``: count them the same."""
        self.stats.inc("eth.rx", frames)
        self.stats.inc("ipv4.rx", frames)

    def _receive_frame(self, frame: bytes | bytearray | memoryview, now: float, vnet: int) -> None:
        try:
            eth = ethernet.EthernetFrame(frame)
        except MalformedPacket as error:
            self.stats.drop(f"eth.drop.{error.reason}", f"Ethernet frame dropped: {error}")
            return
        self.stats.inc("eth.rx")
        if ethernet.is_multicast(eth.src):
            self.stats.drop("eth.drop.bad_src", "frame with a multicast source MAC")
            return
        if not ethernet.is_multicast(eth.dst) and eth.dst != self.config.gateway_mac:
            self.stats.inc("eth.drop.not_for_us")
            return
        if eth.ethertype == ethernet.ETHERTYPE_IPV4:
            self._receive_ipv4(eth, now, vnet)
        elif eth.ethertype == ethernet.ETHERTYPE_ARP:
            self._receive_arp(eth)
        elif eth.ethertype == ethernet.ETHERTYPE_IPV6:
            self._receive_ipv6(eth)
        else:
            self.stats.inc("eth.drop.ethertype")

    def _receive_ipv6(self, eth: ethernet.EthernetFrame) -> None:
        # IPv4 only: the one answer is "no IPv6 router here" (see ndp.py).
        try:
            packet = IPv6Packet(eth.payload)
        except MalformedPacket:
            self.stats.inc("eth.drop.ipv6")
            return
        if not ndp.is_router_solicitation(packet):
            self.stats.inc("eth.drop.ipv6")
            return
        self.frames_to_guest.append(
            ndp.no_router_advertisement(packet, eth.src, self.config.gateway_mac))
        self.stats.inc("ndp.router_advertisement")

    def _learn(self, mac: bytes, ip: bytes) -> None:
        self.guest_mac = mac
        if ip != bytes(4) and ip not in (self.config.gateway, self.config.dns) and ip[0] < 224:
            self.guest_ipv4 = ip

    def _receive_arp(self, eth: ethernet.EthernetFrame) -> None:
        try:
            packet = arp.ArpPacket(eth.payload)
        except MalformedPacket as error:
            self.stats.drop(f"arp.drop.{error.reason}", f"ARP dropped: {error}")
            return
        self.stats.inc("arp.rx")
        self._learn(eth.src, packet.sender_ip)
        if packet.op != arp.OP_REQUEST:
            self.stats.inc("arp.learned")
            return
        if self._answers_arp_for(packet.target_ip):
            self.frames_to_guest.append(arp.arp_reply_frame(packet, self.config.gateway_mac))
            self.stats.inc("arp.reply")
        else:
            self.stats.inc("arp.ignored")

    def _answers_arp_for(self, target: bytes) -> bool:
        config = self.config
        if target in (config.gateway, config.dns):
            return True
        if target in (config.guest_ipv4, self.guest_ipv4):
            return False  # the guest's own address: stay silent so duplicate detection passes
        if not config.in_guest_subnet(target):
            return False
        host_bits = int.from_bytes(target, "big") & ~int.from_bytes(config.netmask, "big")
        return host_bits not in (0, ~int.from_bytes(config.netmask, "big") & 0xFFFFFFFF)

    def _receive_ipv4(self, eth: ethernet.EthernetFrame, now: float, vnet: int = 0) -> None:
        try:
            packet = IPv4Packet(eth.payload)
        except MalformedPacket as error:
            self.stats.drop(f"ipv4.drop.{error.reason}", f"IPv4 packet dropped: {error}")
            return
        self.stats.inc("ipv4.rx")
        if vnet:
            l4_start = ethernet.HEADER_LEN + packet.header_len
            if packet.proto == PROTO_TCP:
                packet.checksum_partial = partial_l4_checksum(vnet, l4_start, TCP_CHECKSUM_OFFSET)
            elif packet.proto == PROTO_UDP:
                packet.checksum_partial = partial_l4_checksum(vnet, l4_start, UDP_CHECKSUM_OFFSET)
        self._learn(eth.src, packet.src)
        if packet.proto == PROTO_UDP:
            self._receive_udp(packet, now)
            return
        handler = self._protocol_handlers.get(packet.proto)
        if handler is None:
            self.stats.inc("ipv4.drop.proto")
            return
        handler.handle_ipv4(packet, now)

    def _receive_udp(self, packet: IPv4Packet, now: float) -> None:
        try:
            datagram = UdpDatagram(packet.src, packet.dst, packet.payload,
                                   verify=not packet.checksum_partial)
        except MalformedPacket as error:
            self.stats.drop(f"udp.drop.{error.reason}", f"UDP datagram dropped: {error}")
            return
        self.stats.inc("udp.rx")
        for service in self._udp_services:
            if service.accepts(packet.dst, datagram.dst_port):
                service.handle_udp(packet.src, datagram.src_port, packet.dst, datagram.dst_port,
                                   datagram.payload, now)
                return
        if self.udp_nat is None:
            self.stats.inc("udp.drop.disabled")
            return
        self.udp_nat.handle_datagram(packet, datagram, now)

    # --- stack -> guest (also used by the engines) -------------------------

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
        """
        mac = dst_mac or self.guest_mac
        if mac is None:
            mac = self._broadcast_until_learned(dst)
        header = emit_ipv4_header(src, dst, proto, len(payload), ttl=ttl)
        frame = ethernet.emit_ethernet(mac, self.config.gateway_mac, ethernet.ETHERTYPE_IPV4,
                                       header + bytes(payload))
        self.frames_to_guest.append((frame, offload) if offload else frame)
        self.stats.inc("ipv4.tx")

    @property
    def gateway_mac(self) -> bytes:
        """Our own MAC on the guest link: the source of every frame we send."""
        return self.config.gateway_mac

    def send_ipv4_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        """Queue whole Ethernet frames carrying IPv4 for the guest, built by an engine for the
        learned ``guest_mac`` (e.g. TCP data, ``vhostnet.tcp.frames``); each entry is a frame
        or ``(frame, vnet word)``, as in ``frames_to_guest``."""
        append = self.frames_to_guest.append  # one by one: the device's queue watches append
        for frame in frames:
            append(frame)
        self.stats.inc("ipv4.tx", len(frames))

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

    # --- timers and statistics ----------------------------------------------

    def restore_counters(self, values: dict[str, int]) -> None:
        """Carry counters over from a migration source (added to ours)."""
        self.stats.restore(values)

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters of the stack and its engines (flat dotted names), with
        the flow gauges of the engines attached to it."""
        if self.udp_nat is not None:
            self.stats.set("udp.flows", self.udp_nat.flow_count())
        if self.icmp is not None:
            self.stats.set("icmp.flows", self.icmp.flow_count())
        return self.stats.snapshot()
