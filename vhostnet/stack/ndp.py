"""Neighbour discovery (RFC 4861) and Router Advertisements for the guest's link.

``NdpEngine`` is the ICMPv6 handler for types 133-137, given checked messages by
the dispatcher (``NetworkStack``):

- Neighbour Solicitation: answered (Neighbour Advertisement with our MAC) for the
  gateway (global and link-local), the DNS address, the host-loopback address and
  every other address of the on-link prefix or fe80::/64 except the guest's own and
  (with a lease pool, ``leases``) those another guest holds, as ARP is answered. A duplicate address detection probe (source ::) is answered
  only for our own addresses; its target is learned as the guest's.
- Neighbour Advertisement: the guest's MAC and address are learned.
- Router Solicitation: answered with a Router Advertisement (config.ra): the
  prefix (on-link; autonomous for a /64, so the guest builds its address by
  SLAAC), router lifetime > 0 from the gateway's link-local address, the MTU,
  RDNSS and DNSSL (RFC 8106), M set when DHCPv6 gives an address, O when DHCPv6
  runs. The same advertisement goes to all nodes every ``config.ra_interval``
  seconds (``poll_timers``).

Without RA (config.ra False) a solicitation is counted and left unanswered; without
NDP (config.ndp False) Neighbour Solicitations are too. Wire formats:
``vhostnet.wire.ndp``, ``vhostnet.wire.icmpv6``.
"""

from __future__ import annotations

from typing import Protocol

from vhostnet.stack.config import StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.stack.leases import LeasePool
from vhostnet.wire.dns import encode_dns_name
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmpv6 import (
    NEIGHBOR_ADVERTISEMENT,
    NEIGHBOR_SOLICITATION,
    ROUTER_ADVERTISEMENT,
    ROUTER_SOLICITATION,
    Icmpv6Message,
    emit_icmpv6,
)
from vhostnet.wire.ipv6 import (
    NEXT_HEADER_ICMPV6,
    UNSPECIFIED,
    IPv6Packet,
    is_link_local,
    is_multicast,
    link_local_address,
    multicast_mac,
    solicited_node_address,
)
from vhostnet.wire.ndp import (
    ALL_NODES,
    HOP_LIMIT,
    NA_OVERRIDE,
    NA_ROUTER,
    NA_SOLICITED,
    OPT_SOURCE_LINK_ADDRESS,
    OPT_TARGET_LINK_ADDRESS,
    PREFIX_AUTONOMOUS,
    PREFIX_ON_LINK,
    RA_MANAGED,
    RA_OTHER,
    NdpMessage,
    dnssl_option,
    link_address_option,
    mtu_option,
    neighbor_advertisement_body,
    neighbor_solicitation_body,
    prefix_option,
    rdnss_option,
    router_advertisement_body,
)

# Prefix lifetimes, as QEMU's user networking advertises them (valid one day,
# preferred four hours); every advertisement renews them.
PREFIX_VALID_LIFETIME = 86400
PREFIX_PREFERRED_LIFETIME = 14400
SLAAC_PREFIX_LEN = 64


class Ipv6Link(Protocol):
    """What the engine needs of the dispatcher."""

    def send_ipv6(self, src: bytes, dst: bytes, next_header: int, payload: bytes,
                  hop_limit: int = 64, dst_mac: bytes | None = None) -> None: ...

    def learn_guest_ipv6(self, mac: bytes, address: bytes) -> None: ...

    def is_guest_ipv6(self, address: bytes) -> bool: ...


class NdpEngine:
    """NDP responder and router for the one guest (ICMPv6 types 133-137)."""

    def __init__(self, config: StackConfig, counters: Counters, link: Ipv6Link,
                 leases: LeasePool | None = None) -> None:
        self.config = config
        self.counters = counters
        self._link = link
        self._leases = leases
        self.link_local = link_local_address(config.gateway_mac)
        self._own = {config.gateway6, config.dns6, self.link_local}
        if config.map_host_loopback6 is not None:
            self._own.add(config.map_host_loopback6)
        self._advertisement = self._build_advertisement_body()
        self._next_advertisement: float | None = None

    # --- guest side ---------------------------------------------------------

    def handle_ndp(self, packet: IPv6Packet, message: Icmpv6Message, src_mac: bytes,
                   now: float) -> None:
        """One NDP message from the guest (checksum already verified)."""
        if packet.hop_limit != HOP_LIMIT:
            self.counters.drop("ndp.drop.hop_limit", "NDP message that crossed a router dropped")
            return
        try:
            ndp = NdpMessage(message)
            mac = ndp.link_address(OPT_SOURCE_LINK_ADDRESS if message.type != NEIGHBOR_ADVERTISEMENT
                                   else OPT_TARGET_LINK_ADDRESS)
        except MalformedPacket as error:
            self.counters.drop(f"ndp.drop.{error.reason}", f"NDP message dropped: {error}")
            return
        self.counters.inc("ndp.rx")
        if mac is not None and mac != src_mac:
            self.counters.inc("ndp.mac_mismatch")  # the Ethernet source is what reaches it
        if ndp.type == ROUTER_SOLICITATION:
            self._on_router_solicitation(packet, src_mac)
        elif ndp.type == NEIGHBOR_SOLICITATION:
            self._on_neighbor_solicitation(packet, ndp, src_mac)
        elif ndp.type == NEIGHBOR_ADVERTISEMENT:
            self._on_neighbor_advertisement(ndp, src_mac)
        else:  # a guest acting as a router (RA, redirect): not ours to follow
            self.counters.inc("ndp.drop.type")

    def _on_router_solicitation(self, packet: IPv6Packet, src_mac: bytes) -> None:
        if not self.config.ra:
            self.counters.inc("ndp.drop.ra_off")
            return
        if packet.src == UNSPECIFIED:
            self._advertise(ALL_NODES, multicast_mac(ALL_NODES))
        else:
            self._advertise(packet.src, src_mac)

    def _on_neighbor_solicitation(self, packet: IPv6Packet, ndp: NdpMessage,
                                  src_mac: bytes) -> None:
        target = ndp.target
        assert target is not None
        if is_multicast(target):
            self.counters.drop("ndp.drop.multicast_target", "NS for a multicast address")
            return
        if packet.src == UNSPECIFIED:  # duplicate address detection by the guest
            self.counters.inc("ndp.dad")
            if target not in self._own:
                self._link.learn_guest_ipv6(src_mac, target)
                return
        if not self.config.ndp:
            self.counters.inc("ndp.drop.ndp_off")
            return
        if not self._answers_for(target, src_mac):
            self.counters.inc("ndp.ignored")
            return
        if packet.src == UNSPECIFIED:  # the guest probes one of ours: it is in use
            dst, dst_mac, flags = ALL_NODES, multicast_mac(ALL_NODES), NA_ROUTER | NA_OVERRIDE
        else:
            dst, dst_mac = packet.src, src_mac
            flags = NA_ROUTER | NA_SOLICITED | NA_OVERRIDE
        body = neighbor_advertisement_body(target, flags, self.config.gateway_mac)
        self._send(target, dst, NEIGHBOR_ADVERTISEMENT, body, dst_mac)
        self.counters.inc("ndp.neighbor_advertisement")

    def _answers_for(self, target: bytes, src_mac: bytes) -> bool:
        if target in self._own:
            return True
        if self._link.is_guest_ipv6(target) or target == self.config.guest_ipv6:
            return False  # the guest's own: stay silent so its duplicate detection passes
        if self._leases is not None and self._leases.held_by_other(src_mac, target):
            self.counters.inc("ndp.ignored.other_guest")  # that guest answers for itself
            return False
        return is_link_local(target) or self.config.in_prefix6(target)

    def _on_neighbor_advertisement(self, ndp: NdpMessage, src_mac: bytes) -> None:
        target = ndp.target
        assert target is not None
        if target in self._own:
            self.counters.drop("ndp.drop.claims_ours",
                               "the guest advertises one of vhostnet's addresses")
            return
        self._link.learn_guest_ipv6(src_mac, target)
        self.counters.inc("ndp.learned")

    # --- toward the guest -----------------------------------------------------

    def solicit(self, address: bytes) -> None:
        """Ask the guest for ``address``'s MAC (a packet for it is waiting)."""
        group = solicited_node_address(address)
        body = neighbor_solicitation_body(address, self.config.gateway_mac)
        self._send(self.link_local, group, NEIGHBOR_SOLICITATION, body, multicast_mac(group))
        self.counters.inc("ndp.neighbor_solicitation")

    def _advertise(self, dst: bytes, dst_mac: bytes) -> None:
        self._send(self.link_local, dst, ROUTER_ADVERTISEMENT, self._advertisement, dst_mac)
        self.counters.inc("ndp.router_advertisement")

    def _send(self, src: bytes, dst: bytes, icmp_type: int, body: bytes, dst_mac: bytes) -> None:
        message = emit_icmpv6(src, dst, icmp_type, 0, body)
        self._link.send_ipv6(src, dst, NEXT_HEADER_ICMPV6, message, hop_limit=HOP_LIMIT,
                             dst_mac=dst_mac)

    def _build_advertisement_body(self) -> bytes:
        config = self.config
        flags = 0
        if config.dhcpv6:
            flags |= RA_OTHER
            if config.guest_ipv6 is not None or self._leases is not None:
                flags |= RA_MANAGED
        prefix_flags = PREFIX_ON_LINK
        if config.prefix6_len == SLAAC_PREFIX_LEN:
            prefix_flags |= PREFIX_AUTONOMOUS
        # RFC 8106 section 5.1: DNS lifetimes of at least three advertisement intervals.
        dns_lifetime = max(int(3 * config.ra_interval), config.ra_router_lifetime)
        options = (link_address_option(OPT_SOURCE_LINK_ADDRESS, config.gateway_mac)
                   + mtu_option(config.mtu)
                   + prefix_option(config.prefix6, config.prefix6_len, prefix_flags,
                                   PREFIX_VALID_LIFETIME, PREFIX_PREFERRED_LIFETIME)
                   + rdnss_option(config.offered_dns6, dns_lifetime))
        names = bytearray()
        for domain in config.search_domains:
            try:
                names += encode_dns_name(domain)
            except (ValueError, UnicodeError) as error:
                self.counters.log_once(f"ndp.bad_domain.{domain}", f"RA: skipping {error}")
        if names:
            options += dnssl_option(bytes(names), dns_lifetime)
        return router_advertisement_body(flags, config.ra_router_lifetime, options)

    # --- timers -------------------------------------------------------------------

    def poll_timers(self, now: float) -> None:
        """The periodic unsolicited advertisement to all nodes."""
        if not self.config.ra:
            return
        if self._next_advertisement is None:
            self._next_advertisement = now + self.config.ra_interval
            return
        if now >= self._next_advertisement:
            self._advertise(ALL_NODES, multicast_mac(ALL_NODES))
            self._next_advertisement = now + self.config.ra_interval

    def next_timer(self) -> float | None:
        return self._next_advertisement if self.config.ra else None
