"""``NetworkStack``: the dispatcher that receives guest frames and owns the engines.

Frames come in through ``receive_frame`` (one call per Ethernet frame from the
guest's TX ring); frames for the guest pile up in ``frames_to_guest``, which
the device drains into the RX ring after each event-loop callback.

Per-protocol work is delegated:

- ARP is answered here (it is a few lines): every address in the guest's subnet
  except the guest's own (and another guest's, with a lease pool), plus the gateway
  and DNS addresses, is "at" the gateway MAC;
- IPv4 protocol handlers: whatever ``set_protocol_handler`` registers (ICMP, TCP);
- UDP: services first (``add_udp_service``: DHCP, DNS, TFTP), then the generic
  NAT (``udp_nat``), if one is set;
- IPv4 fragments: reassembled (``stack.fragments``, see ``fragments.py``), then
  dispatched as above as if they had come whole. Toward the guest, ``send_ipv4``
  fragments what does not fit the guest's MTU.
- IPv6 (``_receive_ipv6``), by upper-layer protocol: ICMPv6 -> NDP (types 133-137,
  ``ndp``), echo requests (``icmp.handle_echo6``); UDP -> IPv6 services first
  (``add_udp6_service``: DHCPv6), then the handler ``set_ipv6_protocol_handler``
  registered for 17; any other protocol (TCP) -> its registered IPv6 handler. What
  finds no handler is counted (``ipv6.drop.proto``, ``udp6.drop.no_handler``) and dropped.
  IPv6 fragments are reassembled first (``stack.fragments``). ``send_ipv6`` is
  ``send_ipv4``'s twin and fragments likewise; the guest's IPv6 addresses are learned
  from its packets and NDP (``learn_guest_ipv6``, ``guest_ipv6``).

The send helpers (``send_ipv4``, ``send_ipv6``, ``send_udp``..., the frames for the guest)
are ``ToGuest``, in to_guest.py, which ``NetworkStack`` inherits.

The engines are built and attached by the assembler (``vhostnet.network``),
which also runs their timers; they count into ``stack.stats``. Engines that
talk to host sockets keep a ``commands`` deque that their glue in
``vhostnet.hostio`` executes: ``stack.icmp``, ``stack.udp_nat``, ``stack.dns``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Protocol

from vhostnet.stack.config import StackConfig, ip4_str, mac_str
from vhostnet.stack.counters import Counters, PlainCounts
from vhostnet.stack.dhcp import DhcpServer
from vhostnet.stack.dhcpv6 import Dhcpv6Server
from vhostnet.stack.dns import DnsForwarder
from vhostnet.stack.fragments import Reassembler
from vhostnet.stack.icmp import IcmpEngine
from vhostnet.stack.leases import LeasePool
from vhostnet.stack.ndp import NdpEngine
from vhostnet.stack.to_guest import ToGuest
from vhostnet.stack.udp_nat import UdpNat
from vhostnet.wire import arp, ethernet
from vhostnet.wire.checksum import PROTO_TCP, PROTO_UDP
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmpv6 import (
    ECHO_REQUEST,
    REDIRECT,
    ROUTER_SOLICITATION,
    Icmpv6Message,
)
from vhostnet.wire.ipv4 import (
    IPv4Packet,
)
from vhostnet.wire.ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from vhostnet.wire.ipv6 import (
    NEXT_HEADER_ICMPV6,
    NEXT_HEADER_UDP,
    UNSPECIFIED,
    IPv6Packet,
    is_link_local,
    is_multicast,
)
from vhostnet.wire.offload import (
    NO_OFFLOADS,
    TCP_CHECKSUM_OFFSET,
    UDP_CHECKSUM_OFFSET,
    partial_l4_checksum,
)
from vhostnet.wire.udp import UdpDatagram

log = logging.getLogger(__name__)

# Guest IPv6 addresses remembered (link-local, SLAAC, temporary ones...), newest last.
MAX_GUEST_IPV6_ADDRESSES = 16


class ProtocolHandler(Protocol):
    """An engine for one IPv4 protocol number (e.g. the TCP engine for 6)."""

    def handle_ipv4(self, packet: IPv4Packet, now: float) -> None: ...


class Ipv6ProtocolHandler(Protocol):
    """An engine for one IPv6 upper-layer protocol (UDP NAT and TCP over IPv6)."""

    def handle_ipv6(self, packet: IPv6Packet, now: float) -> None: ...


class Tcp6Handler(Protocol):
    """The TCP engine over IPv6: told whether the guest left the checksum partial (an
    IPv6 packet has no field for it, unlike ``IPv4Packet.checksum_partial``)."""

    def handle_ipv6(self, packet: IPv6Packet, now: float, checksum_partial: bool) -> None: ...


class UdpService(Protocol):
    """A local UDP service (DHCP, DNS, TFTP), consulted before generic UDP NAT."""

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool: ...

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: memoryview, now: float) -> None: ...


class ReceivedCounts(PlainCounts):
    """Guest frames received, by layer (every frame passes here: no call per count)."""

    NAMES = {"eth": "eth.rx", "ipv4": "ipv4.rx", "ipv6": "ipv6.rx"}
    __slots__ = tuple(NAMES)


class NetworkStack(ToGuest):
    """The sans-IO user-mode network: guest frames in, guest frames and host commands out."""

    def __init__(self, config: StackConfig, leases: LeasePool | None = None) -> None:
        self.config = config
        # Several guests (or --dhcp-host): their addresses and names; None: one guest.
        self.leases = leases
        # Shared by the stack and its engines (ICMP, DHCP, DNS, UDP NAT count here too).
        self.stats = Counters(log)
        # Frames received, by family: plain integers (every guest frame passes here).
        self._received = ReceivedCounts(self.stats)
        self.frames_to_guest: deque[bytes] = deque()
        # Learned from the guest's own frames; None until it has sent something.
        self.guest_mac: bytes | None = None
        self.guest_ipv4: bytes | None = None
        # Several guests: the MAC of the switch port this router serves (``serve_port``);
        # DHCP and DHCPv6 lease for it alone. None: one guest, leases by the client's MAC.
        self.port_mac: bytes | None = None
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
        # The guest's fragments (both families); its timers run on the network's list.
        self.fragments = Reassembler(self.stats)
        # Identification of the datagrams we fragment: a counter from a random start, so a
        # restarted or migrated back-end does not reuse the last one's (RFC 6864).
        self._fragment_ident = int.from_bytes(os.urandom(4), "big")
        # IPv6: the guest's addresses as learned (ordered, newest last), the newest global
        # one, packets held for its MAC, handlers and services, the engines (None: off).
        self.guest_ipv6_addresses: dict[bytes, None] = {}
        self.guest_ipv6: bytes | None = None
        self._held6_for_mac: deque[bytes] = deque()
        self._ipv6_handlers: dict[int, Ipv6ProtocolHandler] = {}
        self._udp6_services: list[UdpService] = []
        self.ndp: NdpEngine | None = None
        self.dhcpv6: Dhcpv6Server | None = None

    # --- registration -----------------------------------------------------

    def set_protocol_handler(self, proto: int, handler: ProtocolHandler) -> None:
        """Route IPv4 packets of protocol ``proto`` to ``handler.handle_ipv4(packet, now)``."""
        self._protocol_handlers[proto] = handler

    def add_udp_service(self, service: UdpService) -> None:
        """Add a local UDP service; services are asked in registration order."""
        self._udp_services.append(service)

    def set_ipv6_protocol_handler(self, next_header: int, handler: Ipv6ProtocolHandler) -> None:
        """Route IPv6 packets whose upper-layer protocol is ``next_header`` (UDP: those no
        IPv6 UDP service accepts) to ``handler.handle_ipv6(packet, now)``."""
        self._ipv6_handlers[next_header] = handler

    def add_udp6_service(self, service: UdpService) -> None:
        """Add a local UDP service on IPv6 (16-byte addresses), asked in registration order."""
        self._udp6_services.append(service)

    # --- guest -> stack ----------------------------------------------------

    def receive_frame(self, frame: bytes | bytearray | memoryview, now: float, vnet: int = 0) -> None:
        """Handle one Ethernet frame from the guest. Never raises.

        ``vnet`` is the frame's virtio-net offload word (``offload.vnet_word``): a partial
        L4 checksum there is not verified.
        """
        try:
            self._receive_frame(frame, now, vnet)
        except Exception:  # a bug must cost one frame, not the whole back-end
            self.internal_error()

    def internal_error(self) -> None:
        """Handling a guest frame raised (call from the ``except``): counted, logged once; the
        frame is lost, the back-end goes on."""
        self.stats.inc("stack.drop.internal_error")
        self.stats.log_exception_once("stack.internal_error",
                                      "internal error handling a guest frame")

    def _receive_frame(self, frame: bytes | bytearray | memoryview, now: float, vnet: int) -> None:
        try:
            eth = ethernet.EthernetFrame(frame)
        except MalformedPacket as error:
            self.stats.drop(f"eth.drop.{error.reason}", f"Ethernet frame dropped: {error}")
            return
        self._received.eth += 1
        if eth.src[0] & 1:  # ethernet.is_multicast, without its call (every frame)
            self.stats.drop("eth.drop.bad_src", "frame with a multicast source MAC")
            return
        if not eth.dst[0] & 1 and eth.dst != self.config.gateway_mac:
            self.stats.inc("eth.drop.not_for_us")
            return
        if eth.ethertype == ethernet.ETHERTYPE_IPV6:
            if self.config.ipv6:
                self._receive_ipv6(eth, now, vnet)
            else:
                self.stats.inc("eth.drop.ipv6")
        elif eth.ethertype not in (ethernet.ETHERTYPE_IPV4, ethernet.ETHERTYPE_ARP):
            self.stats.inc("eth.drop.ethertype")
        elif not self.config.ipv4:
            self.stats.inc("eth.drop.ipv4")
        elif eth.ethertype == ethernet.ETHERTYPE_IPV4:
            self._receive_ipv4(eth, now, vnet)
        else:
            self._receive_arp(eth)

    # --- the guest's addresses: this class owns them (and ``config.guest_ipv4``) -----

    def serve_port(self, mac: bytes) -> None:
        """Several guests: this router serves the switch port bound to ``mac`` (its guest's
        lease); DHCP and DHCPv6 lease for that MAC only from now on."""
        self.port_mac = bytes(mac)

    def move_guest_ipv4(self, mac: bytes, address: bytes) -> None:
        """DHCP acknowledged ``address`` to the guest at ``mac`` (``DhcpServer``'s
        ``on_acked``): one network per guest address, so with a lease pool (``--dhcp-host``)
        the network's guest address follows the lease (ARP, NAT and forwarded ports follow).
        The one writer of ``config.guest_ipv4`` after start-up."""
        if address == self.config.guest_ipv4:
            return
        self.stats.inc("dhcp.guest_address_moved")
        self.stats.log_once("dhcp.guest_address_moved",
                            f"DHCP: guest {mac_str(mac)} leases {ip4_str(address)}, "
                            "the network's guest address now")
        self.config.guest_ipv4 = address

    def restore_guest(self, mac: bytes | None, ipv4: bytes | None) -> None:
        """A migration's or restart's snapshot: the guest's MAC and IPv4 address as the
        source had learned them (its IPv6 addresses go through ``learn_guest_ipv6``)."""
        self.guest_mac = mac
        self.guest_ipv4 = ipv4

    def _learn(self, mac: bytes, ip: bytes) -> None:
        self._learn_mac(mac)
        if ip != bytes(4) and ip not in (self.config.gateway, self.config.dns) and ip[0] < 224:
            self.guest_ipv4 = ip

    def _learn_mac(self, mac: bytes) -> None:
        self.guest_mac = mac
        while self._held6_for_mac:
            self.frames_to_guest.append(ethernet.emit_ethernet(
                mac, self.config.gateway_mac, ethernet.ETHERTYPE_IPV6,
                self._held6_for_mac.popleft()))
            self.stats.inc("ipv6.tx")

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
        if self._answers_arp_for(packet.target_ip, eth.src):
            self.frames_to_guest.append(arp.arp_reply_frame(packet, self.config.gateway_mac))
            self.stats.inc("arp.reply")
        else:
            self.stats.inc("arp.ignored")

    def _answers_arp_for(self, target: bytes, asking: bytes) -> bool:
        config = self.config
        if target in (config.gateway, config.dns):
            return True
        if target in (config.guest_ipv4, self.guest_ipv4):
            return False  # the guest's own address: stay silent so duplicate detection passes
        if self.leases is not None and self.leases.held_by_other(asking, target):
            return False  # another guest's: it answers for itself
        if not config.in_guest_subnet(target):
            return False
        host_bits = int.from_bytes(target, "big") & ~int.from_bytes(config.netmask, "big")
        return host_bits not in (0, ~int.from_bytes(config.netmask, "big") & 0xFFFFFFFF)

    def _receive_ipv4(self, eth: ethernet.EthernetFrame, now: float, vnet: int = 0) -> None:
        try:
            packet = IPv4Packet(eth.payload, allow_fragments=True)
        except MalformedPacket as error:
            self.stats.drop(f"ipv4.drop.{error.reason}", f"IPv4 packet dropped: {error}")
            return
        self._received.ipv4 += 1
        if packet.more_fragments or packet.fragment_offset:  # is_fragment, without its call
            self._learn(eth.src, packet.src)
            whole = self.fragments.add_ipv4(packet, now)
            if whole is not None:
                self._dispatch_reassembled(whole, now)
            return
        if vnet:
            l4_start = ethernet.HEADER_LEN + packet.header_len
            if packet.proto == PROTO_TCP:
                packet.checksum_partial = partial_l4_checksum(vnet, l4_start, TCP_CHECKSUM_OFFSET)
            elif packet.proto == PROTO_UDP:
                packet.checksum_partial = partial_l4_checksum(vnet, l4_start, UDP_CHECKSUM_OFFSET)
        if eth.src != self.guest_mac or packet.src != self.guest_ipv4 or self._held6_for_mac:
            self._learn(eth.src, packet.src)  # else nothing to learn: the common case
        self._dispatch_ipv4(packet, now)

    def _dispatch_reassembled(self, whole: bytes, now: float) -> None:
        try:
            packet = IPv4Packet(whole)
        except MalformedPacket as error:  # a bad first header: checked only now
            self.stats.drop(f"ipv4.drop.{error.reason}", f"IPv4 packet dropped: {error}")
            return
        self._dispatch_ipv4(packet, now)

    def _dispatch_ipv4(self, packet: IPv4Packet, now: float) -> None:
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
        if self._offer_to_services(self._udp_services, packet.src, packet.dst, datagram, now):
            return
        if self.udp_nat is None:
            self.stats.inc("udp.drop.disabled")
            return
        self.udp_nat.handle_datagram(packet, datagram, now)

    # --- IPv6 ------------------------------------------------------------------

    def _receive_ipv6(self, eth: ethernet.EthernetFrame, now: float, vnet: int) -> None:
        try:
            packet = IPv6Packet(eth.payload)
        except MalformedPacket as error:
            self.stats.drop(f"ipv6.drop.{error.reason}", f"IPv6 packet dropped: {error}")
            return
        self._received.ipv6 += 1
        if is_multicast(packet.src):
            self.stats.drop("ipv6.drop.bad_src", "IPv6 packet with a multicast source")
            return
        if packet.fragment is not None:
            whole = self.fragments.add_ipv6(packet, now)
            if whole is None:
                return
            try:
                packet = IPv6Packet(whole)
            except MalformedPacket as error:
                self.stats.drop(f"ipv6.drop.{error.reason}", f"IPv6 packet dropped: {error}")
                return
            if packet.upper_protocol == NEXT_HEADER_ICMPV6 and _is_ndp(packet):
                # RFC 6980: neighbour discovery never arrives in fragments.
                self.stats.inc("ndp.drop.fragmented")
                return
        if packet.src != UNSPECIFIED:
            self.learn_guest_ipv6(eth.src, packet.src)
        proto = packet.upper_protocol
        if proto == NEXT_HEADER_ICMPV6:
            self._receive_icmpv6(eth, packet, now)
        elif proto == NEXT_HEADER_UDP:
            self._receive_udp6(packet, now, vnet)
        else:
            handler = self._ipv6_handlers.get(proto)
            if handler is None:
                self.stats.inc("ipv6.drop.proto")
                return
            if proto == PROTO_TCP:
                l4_start = ethernet.HEADER_LEN + IPV6_HEADER_LEN + (
                    len(packet.payload) - len(packet.upper_payload))
                partial = bool(vnet) and partial_l4_checksum(vnet, l4_start, TCP_CHECKSUM_OFFSET)
                tcp: Tcp6Handler = handler  # type: ignore[assignment]
                tcp.handle_ipv6(packet, now, checksum_partial=partial)
                return
            handler.handle_ipv6(packet, now)

    def _receive_icmpv6(self, eth: ethernet.EthernetFrame, packet: IPv6Packet,
                        now: float) -> None:
        try:
            message = Icmpv6Message(packet)
        except MalformedPacket as error:
            self.stats.drop(f"icmp6.drop.{error.reason}", f"ICMPv6 dropped: {error}")
            return
        if ROUTER_SOLICITATION <= message.type <= REDIRECT:
            if self.ndp is None:
                self.stats.inc("ndp.drop.off")
                return
            self.ndp.handle_ndp(packet, message, eth.src, now)
        elif message.type == ECHO_REQUEST and self.icmp is not None:
            self.icmp.handle_echo6(packet, message, now)
        else:
            self.stats.inc("icmp6.drop.type")

    def _receive_udp6(self, packet: IPv6Packet, now: float, vnet: int) -> None:
        l4_start = ethernet.HEADER_LEN + len(packet.payload) - len(packet.upper_payload) + 40
        partial = bool(vnet) and partial_l4_checksum(vnet, l4_start, UDP_CHECKSUM_OFFSET)
        try:
            datagram = UdpDatagram(packet.src, packet.dst, packet.upper_payload,
                                   verify=not partial)
        except MalformedPacket as error:
            self.stats.drop(f"udp6.drop.{error.reason}", f"UDP over IPv6 dropped: {error}")
            return
        self.stats.inc("udp6.rx")
        if self._offer_to_services(self._udp6_services, packet.src, packet.dst, datagram, now):
            return
        handler = self._ipv6_handlers.get(NEXT_HEADER_UDP)
        if handler is None:
            self.stats.inc("udp6.drop.no_handler")
            return
        handler.handle_ipv6(packet, now)

    def learn_guest_ipv6(self, mac: bytes, address: bytes) -> None:
        """The guest (at ``mac``) uses ``address``: from its packets, NDP and DAD probes."""
        self._learn_mac(mac)
        config = self.config
        if (is_multicast(address) or address == UNSPECIFIED
                or address in (config.gateway6, config.dns6, config.map_host_loopback6)):
            return
        known = self.guest_ipv6_addresses
        if address in known:
            return
        if len(known) >= MAX_GUEST_IPV6_ADDRESSES:
            del known[next(iter(known))]
        known[address] = None
        if not is_link_local(address):
            self.guest_ipv6 = address
        if self.leases is not None:
            self.leases.add_ipv6(mac, address)
        self.stats.inc("ipv6.guest_address_learned")

    def is_guest_ipv6(self, address: bytes) -> bool:
        """One of the guest's addresses, as learned."""
        return address in self.guest_ipv6_addresses

    @staticmethod
    def _offer_to_services(services: list[UdpService], src: bytes, dst: bytes,
                           datagram: UdpDatagram, now: float) -> bool:
        """Give ``datagram`` to the first local service (DHCP, DNS, TFTP...) that takes it."""
        for service in services:
            if service.accepts(dst, datagram.dst_port):
                service.handle_udp(src, datagram.src_port, dst, datagram.dst_port,
                                   datagram.payload, now)
                return True
        return False

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


def _is_ndp(packet: IPv6Packet) -> bool:
    """An ICMPv6 packet of one of the neighbour discovery types (133-137)."""
    body = packet.upper_payload
    return len(body) > 0 and ROUTER_SOLICITATION <= body[0] <= REDIRECT
