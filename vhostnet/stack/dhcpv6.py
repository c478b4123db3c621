"""DHCPv6 server (RFC 8415) for the guest, a sans-IO UDP service on port 547.

One address to give: ``config.guest_ipv6`` (None: the guest uses SLAAC and IA_NAs
are answered with NoAddrsAvail, while DNS servers and the search list are still
given). With a lease pool (``leases``: several guests, or ``--dhcp-host``) the
address is the IPv6 lease of the client's MAC (``client_mac``: the Ethernet source of
the message; with several guests the MAC of the router's port), an address given is recorded as the guest's (``add_ipv6``), and the
Client FQDN option (39, RFC 4704) names the guest. With ``--bootfile`` the Boot File URL
(59, RFC 5970) names ``tftp://[gateway6]/FILE`` (``--bootfile-ipxe``'s file for a client
whose User Class says iPXE), which the TFTP server answers on IPv6. The server's DUID is DUID-LL of the gateway MAC; replies go from the
gateway's link-local address to the client's address and port.

Handled: Solicit -> Advertise (preference 255: the client need not wait for
others), or Reply with Rapid Commit; Request, Renew, Rebind -> Reply with the
IA_NAs; Confirm -> Reply, Success or NotOnLink; Information-request -> Reply;
Release, Decline -> Reply, Success. A message for another server (Server ID not
ours), without a Client ID where one is required, or of a server's type is
counted and dropped. Wire format: ``vhostnet.wire.dhcpv6``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from urllib.parse import quote

from vhostnet.stack.config import StackConfig, ip6_str
from vhostnet.stack.counters import Counters
from vhostnet.stack.leases import LeasePool, PoolExhausted
from vhostnet.wire.dhcpv6 import (
    ADVERTISE,
    CONFIRM,
    DECLINE,
    INFORMATION_REQUEST,
    OPT_BOOTFILE_URL,
    OPT_CLIENTID,
    OPT_DNS_SERVERS,
    OPT_DOMAIN_LIST,
    OPT_IA_NA,
    OPT_INFORMATION_REFRESH_TIME,
    OPT_PREFERENCE,
    OPT_RAPID_COMMIT,
    OPT_SERVERID,
    OPT_STATUS_CODE,
    OPT_USER_CLASS,
    REBIND,
    RELEASE,
    RENEW,
    REPLY,
    REQUEST,
    SERVER_PORT,
    SOLICIT,
    STATUS_NO_ADDRS_AVAIL,
    STATUS_NOT_ON_LINK,
    STATUS_SUCCESS,
    Dhcpv6Message,
    ia_na_value,
    iaaddr_option,
    status_option,
    status_value,
)
from vhostnet.wire.dns import encode_dns_name
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ipv6 import link_local_address

SendUdp6 = Callable[..., None]

DUID_LL = 3
HARDWARE_ETHERNET = 1
INFORMATION_REFRESH_SECONDS = 86400
OPT_CLIENT_FQDN = 39  # RFC 4704: flags, then the name in DNS wire form (maybe partial)
# Which types need which: (Server ID required?, Server ID forbidden?, Client ID required?)
_RULES = {SOLICIT: (False, True, True), REQUEST: (True, False, True),
          CONFIRM: (False, True, True), RENEW: (True, False, True), REBIND: (False, True, True),
          RELEASE: (True, False, True), DECLINE: (True, False, True),
          INFORMATION_REQUEST: (False, False, False)}


class Dhcpv6Server:
    """The UDP service answering guest DHCPv6 (``send_udp6(src, sport, dst, dport, payload)``)."""

    def __init__(self, config: StackConfig, counters: Counters, send_udp6: SendUdp6,
                 leases: LeasePool | None = None,
                 client_mac: Callable[[], bytes | None] = lambda: None) -> None:
        self.config = config
        self.counters = counters
        self._send_udp6 = send_udp6
        self._leases = leases
        self._client_mac = client_mac
        self.address = link_local_address(config.gateway_mac)
        self.duid = struct.pack("!HH6s", DUID_LL, HARDWARE_ETHERNET, config.gateway_mac)
        names = bytearray()
        for domain in config.search_domains:
            try:
                names += encode_dns_name(domain)
            except (ValueError, UnicodeError) as error:
                counters.log_once(f"dhcpv6.bad_domain.{domain}", f"DHCPv6: skipping {error}")
        self._configuration = [(OPT_DNS_SERVERS, b"".join(config.offered_dns6))]
        if names:
            self._configuration.append((OPT_DOMAIN_LIST, bytes(names)))

    # --- UdpService -------------------------------------------------------------

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        return dst_port == SERVER_PORT

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: memoryview, now: float) -> None:
        try:
            request = Dhcpv6Message.parse(payload)
        except MalformedPacket as error:
            self.counters.drop(f"dhcpv6.drop.{error.reason}", f"DHCPv6 message dropped: {error}")
            return
        self.counters.inc("dhcpv6.rx")
        reply = self.respond(request)
        if reply is not None:
            self.counters.inc("dhcpv6.tx")
            self._send_udp6(self.address, SERVER_PORT, src_ip, src_port, reply.emit())

    # --- protocol ------------------------------------------------------------------

    def respond(self, request: Dhcpv6Message) -> Dhcpv6Message | None:
        """The answer to ``request``, or None (nothing to send). Sans-IO core."""
        kind = request.msg_type
        rules = _RULES.get(kind)
        if rules is None:
            self.counters.drop("dhcpv6.drop.unexpected_type",
                               f"DHCPv6: message type {kind} from a client")
            return None
        server_id_required, server_id_forbidden, client_id_required = rules
        server_id = request.get(OPT_SERVERID)
        if (server_id is not None and (server_id_forbidden or server_id != self.duid)
                or server_id is None and server_id_required):
            self.counters.inc("dhcpv6.ignored.server_id")
            return None
        client_id = request.get(OPT_CLIENTID)
        if client_id is None and client_id_required:
            self.counters.drop("dhcpv6.drop.no_client_id", "DHCPv6: message without a Client ID")
            return None
        options: list[tuple[int, bytes]] = [(OPT_SERVERID, self.duid)]
        if client_id is not None:
            options.append((OPT_CLIENTID, client_id))
        reply_type = REPLY
        if kind == SOLICIT:
            if request.get(OPT_RAPID_COMMIT) is not None:
                options.append((OPT_RAPID_COMMIT, b""))
                self.counters.inc("dhcpv6.reply.rapid_commit")
            else:
                reply_type = ADVERTISE
                options.append((OPT_PREFERENCE, b"\xff"))
                self.counters.inc("dhcpv6.advertise")
            options += self._addresses(request, given=reply_type == REPLY)
        elif kind in (REQUEST, RENEW, REBIND):
            self.counters.inc(f"dhcpv6.reply.{_NAMES[kind]}")
            options += self._addresses(request, given=True)
        elif kind == CONFIRM:
            confirmed = self._confirm(request)
            if confirmed is None:
                return None
            options.append(confirmed)
        elif kind == INFORMATION_REQUEST:
            self.counters.inc("dhcpv6.reply.information")
            options.append((OPT_INFORMATION_REFRESH_TIME,
                            struct.pack("!I", INFORMATION_REFRESH_SECONDS)))
        else:  # Release, Decline: nothing to take back, one address is always the guest's
            self.counters.inc(f"dhcpv6.{_NAMES[kind]}")
            options.append((OPT_STATUS_CODE, status_value(STATUS_SUCCESS)))
            return Dhcpv6Message(REPLY, request.xid, options)
        options += self._configuration
        bootfile = self._bootfile_for(request)
        if bootfile:
            url = f"tftp://[{ip6_str(self.config.gateway6)}]/{quote(bootfile, safe='/')}"
            options.append((OPT_BOOTFILE_URL, url.encode("utf-8")))
        return Dhcpv6Message(reply_type, request.xid, options)

    def _bootfile_for(self, request: Dhcpv6Message) -> str | None:
        """The boot file to name, as DHCPv4 picks it: iPXE's own when its User Class says
        so (chain loading: the firmware's PXE gets iPXE, iPXE gets its script)."""
        user_class = request.get(OPT_USER_CLASS) or b""
        if self.config.bootfile_ipxe and b"iPXE" in user_class:
            return self.config.bootfile_ipxe
        return self.config.bootfile

    def _address_for_client(self, request: Dhcpv6Message, given: bool) -> bytes | None:
        """The guest's address, or (with a pool) the client MAC's IPv6 lease; an address
        ``given`` (in a Reply) is recorded as the guest's, with the client's FQDN as name."""
        mac = self._client_mac()
        if self._leases is None or mac is None:
            return self.config.guest_ipv6  # type: ignore[return-value]
        try:
            address = self._leases.lease_for(mac).ipv6
        except PoolExhausted as error:
            self.counters.drop("dhcpv6.drop.pool_exhausted", f"DHCPv6: no lease: {error}")
            return None
        if given and address is not None:
            self._leases.add_ipv6(mac, address)
            fqdn = request.get(OPT_CLIENT_FQDN)
            if fqdn is not None and len(fqdn) > 2 and 0 < fqdn[1] <= len(fqdn) - 2:
                self._leases.set_name(mac, fqdn[2:2 + fqdn[1]].decode("ascii", "replace"))
        return address

    def _addresses(self, request: Dhcpv6Message, given: bool) -> list[tuple[int, bytes]]:
        """One IA_NA answer per IA_NA asked: the guest's address, or NoAddrsAvail."""
        if not request.ia_nas():
            return []
        address = self._address_for_client(request, given)
        lifetime = self.config.lease_time
        answers = []
        for ia in request.ia_nas():
            if address is None:
                inner = status_option(STATUS_NO_ADDRS_AVAIL, "addresses by SLAAC only")
                answers.append((OPT_IA_NA, ia_na_value(ia.iaid, 0, 0, inner)))
                continue
            inner = iaaddr_option(address, lifetime, lifetime)  # type: ignore[arg-type]
            answers.append((OPT_IA_NA, ia_na_value(ia.iaid, lifetime // 2, lifetime * 4 // 5,
                                                   inner)))
        return answers

    def describe_binding(self) -> dict[str, object]:
        """What DHCPv6 hands out (control socket): stateless, every client gets the guest's
        address (None: SLAAC only) with this lifetime; no client is remembered."""
        address = self.config.guest_ipv6
        return {"address": None if address is None else ip6_str(address),
                "lifetime": self.config.lease_time, "server_duid": self.duid.hex()}

    def _confirm(self, request: Dhcpv6Message) -> tuple[int, bytes] | None:
        addresses = [a for ia in request.ia_nas() for a in ia.addresses]
        if not addresses:
            self.counters.inc("dhcpv6.ignored.empty_confirm")  # RFC 8415 18.3.3: no reply
            return None
        on_link = all(self.config.in_prefix6(a) for a in addresses)
        self.counters.inc("dhcpv6.reply.confirm" if on_link else "dhcpv6.reply.not_on_link")
        status = STATUS_SUCCESS if on_link else STATUS_NOT_ON_LINK
        return (OPT_STATUS_CODE, status_value(status))


_NAMES = {REQUEST: "request", RENEW: "renew", REBIND: "rebind", RELEASE: "release",
          DECLINE: "decline"}
