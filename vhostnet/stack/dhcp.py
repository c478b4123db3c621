"""DHCPv4 server (RFC 2131/2132) for the guest, as a sans-IO UDP service on port 67.

Without a lease pool there is one guest and one address to give: every client is
offered ``config.guest_ipv4``. With one (``leases``, a ``stack.leases.LeasePool``:
several guests, or ``--dhcp-host``), a client is offered its MAC's lease, its Host Name
option is recorded as its name, and the acknowledged address is reported
(``on_acked``: the stack makes it ``config.guest_ipv4``, the network's guest address
follows the lease). With several guests a router serves one switch port and leases for
its MAC only (``port_mac``): a request whose ``chaddr`` is another MAC is counted
(``dhcp.drop.foreign_chaddr``) and dropped. The server identifier is the gateway address.

Handled: DISCOVER -> OFFER (or ACK with rapid commit, RFC 4039), REQUEST ->
ACK / NAK (a REQUEST naming another server is ignored silently), INFORM -> ACK
without lease, RELEASE and DECLINE (noted, nothing sent), and plain BOOTP
(no option 53) -> BOOTREPLY with the same configuration options.

Reply addressing: NAKs, and replies to clients that set the broadcast flag or
have no address yet (ciaddr 0), go to 255.255.255.255 and the broadcast MAC;
otherwise the reply is unicast to ciaddr at the client's hardware address.

Malformed messages (short, wrong op/hardware type, truncated options, option
lengths that do not fit the option's meaning) are counted, logged once, dropped.
The message format itself (parse, options, emit) is ``vhostnet.wire.dhcp``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vhostnet.stack.config import StackConfig, ip4_str, mac_str
from vhostnet.stack.counters import Counters
from vhostnet.stack.leases import LeasePool, PoolExhausted
from vhostnet.wire.dhcp import (
    ACK,
    CLIENT_PORT,
    DECLINE,
    DISCOVER,
    FILE_FIELD_LEN,
    FLAG_BROADCAST,
    INFORM,
    NAK,
    OFFER,
    OP_REPLY,
    OP_REQUEST,
    OPT_BOOTFILE,
    OPT_CLASSLESS_ROUTES,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_RAPID_COMMIT,
    OPT_REBINDING_TIME,
    OPT_RENEWAL_TIME,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SEARCH,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    OPT_TFTP_SERVER,
    OPT_USER_CLASS,
    RELEASE,
    REQUEST,
    SERVER_PORT,
    DhcpMessage,
    classless_route,
)
from vhostnet.wire.dns import encode_dns_name
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ethernet import BROADCAST_MAC
from vhostnet.wire.ipv4 import BROADCAST

# RFC 4702 client FQDN (passt's --fqdn): flags with E set (the name in wire encoding),
# both RCODEs 255 as the RFC asks of a server.
OPT_CLIENT_FQDN = 81
MAX_HOSTNAME = 255  # a Host Name option holds at most this much
FQDN_FLAGS_E = 0x04

SendUdp = Callable[..., None]
AddressAcked = Callable[[bytes, bytes], None]
"""Told (client MAC, address) when a lease is acknowledged: ``NetworkStack.move_guest_ipv4``."""


class DhcpServer:
    """The UDP service answering guest DHCP on port 67.

    ``send_udp(src, sport, dst, dport, payload, dst_mac=...)`` is the stack's sender;
    ``on_acked(mac, address)`` hears of every acknowledged lease (the stack owns the guest's
    address and moves it); ``port_mac()`` is the MAC of the switch port this router
    serves (several guests: a request for another ``chaddr`` is dropped), None for one guest.
    """

    def __init__(self, config: StackConfig, counters: Counters, send_udp: SendUdp,
                 leases: LeasePool | None = None, *, on_acked: AddressAcked | None = None,
                 port_mac: Callable[[], bytes | None] = lambda: None) -> None:
        self.config = config
        self.counters = counters
        self._send_udp = send_udp
        self._leases = leases
        self._on_acked = on_acked
        self._port_mac = port_mac
        # The one lease: which hardware address holds it, until when (informational:
        # the address is the guest's whatever happens, but tests and logs use it).
        self.lease_holder: bytes | None = None
        self.lease_expiry: float | None = None
        self.lease_hostname: str | None = None  # the client's Host Name option, for people
        self._search_list = self._encode_search_list()
        self._fqdn = self._encode_fqdn()

    def _encode_fqdn(self) -> bytes:
        if not self.config.fqdn:
            return b""
        try:
            return encode_dns_name(self.config.fqdn)
        except (ValueError, UnicodeError) as error:
            self.counters.log_once("dhcp.bad_fqdn", f"DHCP: not sending the FQDN: {error}")
            return b""

    def _encode_search_list(self) -> bytes:
        encoded = bytearray()
        for domain in self.config.search_domains:
            try:
                encoded += encode_dns_name(domain)
            except (ValueError, UnicodeError) as error:
                self.counters.log_once(f"dhcp.bad_domain.{domain}", f"DHCP: skipping {error}")
        return bytes(encoded)

    # --- UdpService -------------------------------------------------------

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        return dst_port == SERVER_PORT

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: memoryview, now: float) -> None:
        try:
            request = DhcpMessage.parse(payload)
        except MalformedPacket as error:
            self.counters.drop(f"dhcp.drop.{error.reason}", f"DHCP message dropped: {error}")
            return
        if request.op != OP_REQUEST:
            self.counters.drop("dhcp.drop.not_request", "DHCP: BOOTREPLY from the guest dropped")
            return
        self.counters.inc("dhcp.rx")
        reply = self.respond(request, now)
        if reply is not None:
            self._send(request, reply)

    # --- protocol ---------------------------------------------------------

    def respond(self, request: DhcpMessage, now: float) -> DhcpMessage | None:
        """The reply to ``request`` (None when nothing is to be sent). Sans-IO core."""
        kind = request.message_type
        port_mac = self._port_mac()
        if port_mac is not None and request.chaddr != port_mac:
            # One guest per port: a router leases its port's MAC, whatever chaddr says.
            self.counters.drop("dhcp.drop.foreign_chaddr",
                               f"DHCP: request for {mac_str(request.chaddr)} from the guest at "
                               f"{mac_str(port_mac)} dropped (a guest leases its own MAC only)")
            return None
        if kind in (None, DISCOVER, REQUEST):
            address = self._address_for(request.chaddr)
            if address is None:
                return None
        if kind is None:
            self.counters.inc("dhcp.bootp")
            return self._reply(request, None, address, lease=False)
        if kind == DISCOVER:
            if OPT_RAPID_COMMIT in request.options:
                self.counters.inc("dhcp.ack.rapid_commit")
                self._grant(request, address, now)
                reply = self._reply(request, ACK, address, lease=True)
                reply.options[OPT_RAPID_COMMIT] = b""
                return reply
            self.counters.inc("dhcp.offer")
            return self._reply(request, OFFER, address, lease=True)
        if kind == REQUEST:
            return self._respond_to_request(request, address, now)
        if kind == INFORM:
            self.counters.inc("dhcp.inform")
            return self._reply(request, ACK, bytes(4), lease=False)
        if kind == RELEASE:
            self.counters.inc("dhcp.release")
            self._release(request)
            return None
        if kind == DECLINE:
            self.counters.inc("dhcp.decline")
            self.counters.log_once("dhcp.decline",
                                   f"DHCP: guest declined {ip4_str(self.config.guest_ipv4)} "
                                   "(another host on its link claims it)")
            self._release(request)
            return None
        self.counters.drop("dhcp.drop.unexpected_type", f"DHCP: message type {kind} from a client")
        return None

    def _address_for(self, mac: bytes) -> bytes | None:
        """The address for the client at ``mac``: the guest's, or its lease (None: the pool
        is exhausted, no answer)."""
        if self._leases is None:
            return self.config.guest_ipv4
        try:
            return self._leases.lease_for(mac).ipv4 or self.config.guest_ipv4
        except PoolExhausted as error:
            self.counters.drop("dhcp.drop.pool_exhausted", f"DHCP: no lease for "
                               f"{mac_str(mac)}: {error}")
            return None

    def _respond_to_request(self, request: DhcpMessage, address: bytes,
                            now: float) -> DhcpMessage | None:
        server_id = request.options.get(OPT_SERVER_ID)
        if server_id is not None and server_id != self.config.gateway:
            self.counters.inc("dhcp.ignored.other_server")
            return None
        wanted = request.options.get(OPT_REQUESTED_IP, request.ciaddr)
        if wanted != address:
            self.counters.inc("dhcp.nak")
            nak = DhcpMessage(OP_REPLY, request.xid, request.flags | FLAG_BROADCAST, bytes(4),
                              bytes(4), bytes(4), request.giaddr, request.chaddr)
            nak.options = {OPT_MESSAGE_TYPE: bytes((NAK,)), OPT_SERVER_ID: self.config.gateway}
            return nak
        self.counters.inc("dhcp.ack")
        self._grant(request, address, now)
        return self._reply(request, ACK, address, lease=True)

    def _grant(self, request: DhcpMessage, address: bytes, now: float) -> None:
        self.lease_holder = request.chaddr
        self.lease_expiry = now + self.config.lease_time
        name = request.options.get(OPT_HOSTNAME)
        self.lease_hostname = name[:MAX_HOSTNAME].decode("ascii", "replace") if name else None
        if self._leases is None:
            return
        if self.lease_hostname:
            self._leases.set_name(request.chaddr, self.lease_hostname)
        if self._on_acked is not None:
            self._on_acked(request.chaddr, address)

    def describe_lease(self, now: float) -> dict[str, object] | None:
        """The lease for people and tools (control socket): MAC, address, host name,
        seconds left; None without one."""
        if self.lease_holder is None or self.lease_expiry is None:
            return None
        return {"mac": mac_str(self.lease_holder), "address": ip4_str(self.config.guest_ipv4),
                "hostname": self.lease_hostname,
                "expires_in": round(max(0.0, self.lease_expiry - now))}

    def export_lease(self, now: float) -> dict[str, object] | None:
        """The current lease (client hardware address, seconds left) for a migration."""
        if self.lease_holder is None or self.lease_expiry is None:
            return None
        return {"holder": bytes(self.lease_holder).hex(), "remaining": max(0.0, self.lease_expiry - now)}

    def import_lease(self, record: dict[str, object] | None, now: float) -> None:
        """Restore an exported lease; ``ValueError`` for a malformed record."""
        if record is None:
            self.lease_holder = self.lease_expiry = None
            return
        holder = bytes.fromhex(str(record["holder"]))
        remaining = float(record["remaining"])  # type: ignore[arg-type]
        if len(holder) != 6 or not 0 <= remaining <= self.config.lease_time:
            raise ValueError("bad DHCP lease record")
        self.lease_holder = holder
        self.lease_expiry = now + remaining

    def _release(self, request: DhcpMessage) -> None:
        if self.lease_holder == request.chaddr:
            self.lease_holder = None
            self.lease_expiry = None

    def _bootfile_for(self, request: DhcpMessage) -> str | None:
        user_class = request.options.get(OPT_USER_CLASS, b"")
        if self.config.bootfile_ipxe and b"iPXE" in user_class:
            return self.config.bootfile_ipxe
        return self.config.bootfile

    def _reply(self, request: DhcpMessage, kind: int | None, yiaddr: bytes,
               lease: bool) -> DhcpMessage:
        config = self.config
        reply = DhcpMessage(OP_REPLY, request.xid, request.flags, request.ciaddr, yiaddr,
                            bytes(4), request.giaddr, request.chaddr)
        options: dict[int, bytes] = {}
        if kind is not None:
            options[OPT_MESSAGE_TYPE] = bytes((kind,))
            options[OPT_SERVER_ID] = config.gateway
        if lease and kind is not None:
            options[OPT_LEASE_TIME] = struct.pack("!I", config.lease_time)
            options[OPT_RENEWAL_TIME] = struct.pack("!I", config.lease_time // 2)
            options[OPT_REBINDING_TIME] = struct.pack("!I", config.lease_time * 7 // 8)
        options[OPT_SUBNET_MASK] = config.netmask
        options[OPT_ROUTER] = config.gateway
        if config.offered_dns:
            options[OPT_DNS] = b"".join(config.offered_dns)
        if config.assign_mtu:
            options[OPT_MTU] = struct.pack("!H", config.mtu)
        if config.hostname:
            options[OPT_HOSTNAME] = config.hostname.encode("utf-8")
        if self._fqdn:
            options[OPT_CLIENT_FQDN] = bytes((FQDN_FLAGS_E, 255, 255)) + self._fqdn
        if config.search_domains:
            options[OPT_DOMAIN_NAME] = config.search_domains[0].rstrip(".").encode("utf-8")
        if self._search_list:
            options[OPT_SEARCH] = self._search_list
        if not config.in_guest_subnet(config.gateway):
            # A router outside the subnet is unreachable without a host route to it first;
            # clients honouring option 121 ignore option 3 (RFC 3442), so both routes go here.
            options[OPT_CLASSLESS_ROUTES] = (classless_route(config.gateway, 32, bytes(4))
                                             + classless_route(bytes(4), 0, config.gateway))
        bootfile = self._bootfile_for(request)
        if bootfile:
            reply.siaddr = config.gateway
            encoded = bootfile.encode("utf-8")
            if len(encoded) < FILE_FIELD_LEN:
                reply.file = encoded
            options[OPT_TFTP_SERVER] = ip4_str(config.gateway).encode("ascii")
            options[OPT_BOOTFILE] = encoded
        reply.options = options
        return reply

    def _send(self, request: DhcpMessage, reply: DhcpMessage) -> None:
        is_nak = reply.message_type == NAK
        if is_nak or request.flags & FLAG_BROADCAST or request.ciaddr == bytes(4):
            dst_ip, dst_mac = BROADCAST, BROADCAST_MAC
        else:
            dst_ip, dst_mac = request.ciaddr, request.chaddr
        self.counters.inc("dhcp.tx")
        self._send_udp(self.config.gateway, SERVER_PORT, dst_ip, CLIENT_PORT, reply.emit(),
                       dst_mac=dst_mac)
