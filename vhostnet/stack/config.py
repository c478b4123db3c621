"""Configuration of the user-mode network, with QEMU user-networking defaults.

Addresses inside the stack are 4-byte (IPv4) or 16-byte (IPv6) ``bytes``;
``StackConfig`` also accepts their text forms for convenience and converts them
once, in ``__post_init__``.

Port forwarding specs follow passt's ``-t``/``-u`` syntax (see ``parse_port_spec``).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from vhostnet.stack.leases import (
    DEFAULT_DOMAIN,
    DEFAULT_IPV6_HOST,
    DEFAULT_MAX_LEASES,
    LeasePool,
    Reservation,
)
from vhostnet.wire.ethernet import mac_bytes, mac_str  # noqa: F401 (the stack's MAC helpers)
from vhostnet.wire.ipv6 import in_prefix

MIN_MTU = 576
MAX_GUESTS = 64
MAX_MTU = 65520
DNS_PORT = 53
HOST_LOOPBACK = "127.0.0.1"
HOST_LOOPBACK6 = "::1"


def ip4(text: str) -> bytes:
    """Dotted quad -> 4 bytes; ``ValueError`` for anything else (no inet_aton shortcuts)."""
    return ipaddress.IPv4Address(text).packed


def ip4_str(address: bytes) -> str:
    """4 bytes -> dotted quad."""
    return str(ipaddress.IPv4Address(bytes(address)))


@dataclass(frozen=True)
class PortForward:
    """One forwarded port: host_addr:host_port on the host reaches guest_port in the guest."""

    host_addr: str
    host_port: int
    guest_port: int
    # Bound on this host interface only (passt's ``ADDR%IF/``): SO_BINDTODEVICE.
    host_if: str | None = None
    # The guest-side address the connection goes to (passt's ``:toaddr/``); None: the guest's.
    guest_addr: str | None = None
    # From ``all`` (or a spec of exclusions only): a port the host already uses is skipped,
    # as passt forwards "all unbound ports"; a port named explicitly must bind.
    optional: bool = False
    # The spec named no bind address: the port is forwarded on every address of both
    # families, as passt binds by default (one dual-stack ``[::]`` socket); ``host_addr``
    # then holds the IPv4 wildcard. Not part of equality: a forward compares by where it binds.
    dual_stack: bool = field(default=False, compare=False)


# Linux's IP_FREEBIND (socket module constant from Python 3.12 only).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def listener_options(forward: PortForward, freebind: bool) -> list[tuple[int, int, int | bytes]]:
    """The setsockopt() calls a forwarded port's listener needs before bind (data only):
    SO_BINDTODEVICE for ``%IF``, IP_FREEBIND for --freebind."""
    options: list[tuple[int, int, int | bytes]] = []
    if forward.host_if:
        options.append((socket.SOL_SOCKET, socket.SO_BINDTODEVICE, forward.host_if.encode()))
    if freebind:
        options.append((socket.SOL_IP, IP_FREEBIND, 1))
    return options


def ip6(text: str) -> bytes:
    """IPv6 text -> 16 bytes; ``ValueError`` for anything else."""
    return ipaddress.IPv6Address(text).packed


def ip6_str(address: bytes) -> str:
    return str(ipaddress.IPv6Address(bytes(address)))


def _as_ip6(value: bytes | str, name: str) -> bytes:
    if isinstance(value, str):
        return ip6(value)
    if len(value) != 16:
        raise ValueError(f"{name} must be 16 bytes or an IPv6 address")
    return bytes(value)


def _as_ip4(value: bytes | str, name: str) -> bytes:
    if isinstance(value, str):
        return ip4(value)
    if len(value) != 4:
        raise ValueError(f"{name} must be 4 bytes or a dotted quad")
    return bytes(value)


@dataclass
class StackConfig:
    """Everything the stack engines need to know about the virtual network."""

    guest_ipv4: bytes = ip4("10.0.2.15")
    netmask: bytes = ip4("255.255.255.0")
    gateway: bytes = ip4("10.0.2.2")
    dns: bytes = ip4("10.0.2.3")
    mtu: int = 1500
    # Locally administered (bit 1 of the first octet set), so it cannot clash with a real NIC.
    gateway_mac: bytes = bytes.fromhex("525600000002")
    # The guest-side address whose traffic goes to the host's loopback (passt's
    # --map-host-loopback); the default "gateway" means the gateway address, None
    # maps nothing.
    map_host_loopback: bytes | str | None = "gateway"
    dhcp: bool = True
    icmp: bool = True
    tcp: bool = True
    udp: bool = True
    hostname: str | None = None
    search_domains: list[str] = field(default_factory=list)
    dns_upstream: list[tuple[str, int]] = field(default_factory=list)
    tcp_forwards: list[PortForward] = field(default_factory=list)
    udp_forwards: list[PortForward] = field(default_factory=list)
    tftp_root: str | None = None
    bootfile: str | None = None
    bootfile_ipxe: str | None = None
    lease_time: int = 86400
    flow_limit: int = 65536
    udp_idle_timeout: float = 180.0
    # DNS servers offered by DHCP (passt's -D); None: the DNS forwarder address ``dns``.
    dhcp_dns: list[bytes] | None = None
    # False for passt's ``-m 0``: DHCP does not tell the guest an MTU.
    assign_mtu: bool = True
    # DHCP option 81 (client FQDN), passt's --fqdn.
    fqdn: str | None = None
    # passt's --map-guest-addr: guest traffic to this address goes to the guest's own
    # address on the host side.
    map_guest_addr: bytes | None = None
    # passt's -o/--outbound, --outbound-if4, -i, --freebind: kept (see README's table).
    outbound_ipv4: bytes | None = None
    outbound_if4: str | None = None
    interface: str | None = None
    freebind: bool = False
    # --- IPv6, and which families are on (QEMU user-networking defaults) -----------
    # ipv4 / ipv6: False drops every frame of that family (ARP and DHCPv4 with IPv4;
    # NDP, RA and DHCPv6 with IPv6), counted as eth.drop.ipv4 / eth.drop.ipv6.
    ipv4: bool = True
    ipv6: bool = True
    # The guest's address: None, SLAAC (the guest picks it in prefix6); an address is
    # also given by DHCPv6 (IA_NA).
    guest_ipv6: bytes | str | None = None
    # The on-link prefix advertised by RA (autonomous flag set only for a /64).
    prefix6: bytes | str = "fec0::"
    prefix6_len: int = 64
    gateway6: bytes | str = "fec0::2"
    dns6: bytes | str = "fec0::3"
    # The guest-side IPv6 address that reaches the host's ::1; "gateway" (the default)
    # means gateway6, None maps nothing.
    map_host_loopback6: bytes | str | None = "gateway"
    ndp: bool = True  # answer Neighbour Solicitations (and learn from NDP)
    ra: bool = True  # answer Router Solicitations and advertise every ra_interval seconds
    dhcpv6: bool = True
    # DNS servers RA (RDNSS) and DHCPv6 offer (passt's -D for IPv6); None: ``dns6``.
    dhcp_dns6: list[bytes] | None = None
    # passt's -o/--outbound, --outbound-if6, --map-guest-addr for IPv6: kept (see the
    # README's table), not used yet.
    outbound_ipv6: bytes | None = None
    outbound_if6: str | None = None
    map_guest_addr6: bytes | None = None
    ra_interval: float = 60.0
    ra_router_lifetime: int = 1800  # seconds; also the RDNSS/DNSSL and prefix lifetimes' base
    # --- several guests (issue 16; see stack/leases.py) ------------------------------
    max_guests: int = 1  # front-ends served at once (--max-guests)
    # --dhcp-range FIRST[-LAST] (None: the first -a address, then the rest of the subnet).
    dhcp_range: tuple[bytes, bytes | None] | None = None
    dhcp_hosts: list[Reservation] = field(default_factory=list)  # --dhcp-host
    dns_domain: str = DEFAULT_DOMAIN  # NAME.<dns_domain> resolves to the guest NAME
    max_leases: int = DEFAULT_MAX_LEASES

    def __post_init__(self) -> None:
        self._check_ipv6()
        self.guest_ipv4 = _as_ip4(self.guest_ipv4, "guest_ipv4")
        self.netmask = _as_ip4(self.netmask, "netmask")
        self.gateway = _as_ip4(self.gateway, "gateway")
        self.dns = _as_ip4(self.dns, "dns")
        if self.map_host_loopback == "gateway":
            self.map_host_loopback = self.gateway
        elif self.map_host_loopback is not None:
            self.map_host_loopback = _as_ip4(self.map_host_loopback, "map_host_loopback")
            if self.map_host_loopback in (self.guest_ipv4, self.dns):
                raise ValueError("the host loopback address must differ from the guest and DNS addresses")
        if isinstance(self.gateway_mac, str):
            self.gateway_mac = mac_bytes(self.gateway_mac)
        if len(self.gateway_mac) != 6 or self.gateway_mac[0] & 1:
            raise ValueError("gateway_mac must be a 6-byte unicast MAC address")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU must be between {MIN_MTU} and {MAX_MTU}, not {self.mtu}")
        mask = int.from_bytes(self.netmask, "big")
        inverted = ~mask & 0xFFFFFFFF
        if inverted & (inverted + 1):
            raise ValueError(f"netmask {ip4_str(self.netmask)} is not contiguous")
        if self.gateway == self.guest_ipv4:
            raise ValueError("the gateway address must differ from the guest address")
        if self.lease_time <= 0:
            raise ValueError("lease_time must be positive")
        if self.flow_limit <= 0:
            raise ValueError("flow_limit must be positive")
        if self.udp_idle_timeout <= 0:
            raise ValueError("udp_idle_timeout must be positive")
        if self.dhcp_dns is not None:
            self.dhcp_dns = [_as_ip4(x, "dhcp_dns") for x in self.dhcp_dns]
        if self.map_guest_addr is not None:
            self.map_guest_addr = _as_ip4(self.map_guest_addr, "map_guest_addr")
        if not 1 <= self.max_guests <= MAX_GUESTS:
            raise ValueError(f"--max-guests {self.max_guests} is outside 1..{MAX_GUESTS}")
        if self.dhcp_range is not None:
            first, last = self.dhcp_range
            last = last or (int.from_bytes(self.subnet_broadcast, "big") - 1).to_bytes(4, "big")
            self.dhcp_range = (first, last)
            for address in self.dhcp_range:
                if not self.in_guest_subnet(address):
                    raise ValueError(f"--dhcp-range address {ip4_str(address)} is outside the "
                                     "guest subnet")

    @property
    def uses_lease_pool(self) -> bool:
        """Several guests, or one with a --dhcp-host reservation: addresses come from a
        ``LeasePool`` (``lease_pool``); otherwise the one guest gets ``guest_ipv4``."""
        return self.max_guests > 1 or bool(self.dhcp_hosts)

    def lease_pool(self) -> LeasePool:
        """A ``LeasePool`` for this network: the first -a address (or --dhcp-range) on, the
        IPv6 -a address (or prefix::100) on; vhostnet's own addresses excluded; ``host``
        names the host's loopback mapping. ``ValueError`` for a reservation that cannot be."""
        own = [self.gateway, self.dns, self.map_host_loopback, self.map_guest_addr,
               self.gateway6, self.dns6, self.map_host_loopback6, self.map_guest_addr6]
        first6: bytes | None = None
        if self.ipv6:
            host_part = DEFAULT_IPV6_HOST if self.prefix6_len <= 120 else 1
            first6 = bytes(self.guest_ipv6 or (  # type: ignore[arg-type]
                int.from_bytes(self.prefix6, "big") | host_part).to_bytes(16, "big"))
        host = [bytes(a) for a in (self.map_host_loopback, self.map_host_loopback6)  # type: ignore[arg-type]
                if a is not None]
        return LeasePool(first_ipv4=self.guest_ipv4, prefix_len=self.prefix_length,
                         excluded=[bytes(a) for a in own if a is not None],  # type: ignore[arg-type]
                         range_ipv4=self.dhcp_range,  # type: ignore[arg-type]
                         first_ipv6=first6,
                         prefix6_len=self.prefix6_len, reservations=self.dhcp_hosts,
                         domain=self.dns_domain, host_names={"host": host} if host else {},
                         max_leases=self.max_leases)

    @property
    def offered_dns(self) -> list[bytes]:
        """The DNS servers DHCP offers: passt's -D list, or the forwarder address."""
        return [self.dns] if self.dhcp_dns is None else list(self.dhcp_dns)

    def _check_ipv6(self) -> None:
        if self.guest_ipv6 is not None:
            self.guest_ipv6 = _as_ip6(self.guest_ipv6, "guest_ipv6")
        self.prefix6 = _as_ip6(self.prefix6, "prefix6")
        self.gateway6 = _as_ip6(self.gateway6, "gateway6")
        self.dns6 = _as_ip6(self.dns6, "dns6")
        if self.dhcp_dns6 is not None:
            self.dhcp_dns6 = [_as_ip6(x, "dhcp_dns6") for x in self.dhcp_dns6]
        if not 1 <= self.prefix6_len <= 128:
            raise ValueError(f"IPv6 prefix length {self.prefix6_len} is outside 1..128")
        # Host bits of the prefix are cleared: "2001:db8::15/64" advertises 2001:db8::/64.
        shift = 128 - self.prefix6_len
        self.prefix6 = ((int.from_bytes(self.prefix6, "big") >> shift) << shift).to_bytes(16, "big")
        if self.map_host_loopback6 == "gateway":
            self.map_host_loopback6 = self.gateway6
        elif self.map_host_loopback6 is not None:
            self.map_host_loopback6 = _as_ip6(self.map_host_loopback6, "map_host_loopback6")
            if self.map_host_loopback6 in (self.guest_ipv6, self.dns6):
                raise ValueError("the IPv6 host loopback address must differ from the guest "
                                 "and DNS addresses")
        if self.gateway6 == self.guest_ipv6:
            raise ValueError("the IPv6 gateway address must differ from the guest address")
        if self.ra_interval <= 0 or not 0 < self.ra_router_lifetime <= 9000:
            raise ValueError("ra_interval must be positive, ra_router_lifetime 1..9000 s")
        if not (self.ipv4 or self.ipv6):
            raise ValueError("IPv4 and IPv6 cannot both be off")

    @property
    def offered_dns6(self) -> list[bytes]:
        """The DNS servers RA and DHCPv6 offer: passt's -D list for IPv6, or the forwarder."""
        return [self.dns6] if self.dhcp_dns6 is None else list(self.dhcp_dns6)  # type: ignore[list-item]

    def in_prefix6(self, address: bytes) -> bool:
        """True for an address of the advertised on-link prefix."""
        return in_prefix(address, self.prefix6, self.prefix6_len)  # type: ignore[arg-type]

    def dns_tcp_upstream(self, ipv6: bool) -> tuple[str, int] | None:
        """Where the guest's DNS over TCP to the DNS address of one family goes: the first
        upstream of that family, else the first upstream at all (the host socket takes either
        family, and the UDP answers through that address come from any upstream, so a
        truncated answer's retry over TCP must reach one too); None without an upstream."""
        same_family = [u for u in self.dns_upstream if (":" in u[0]) == ipv6]
        return (same_family or self.dns_upstream or [None])[0]

    def host_destination6(self, dst_ip: bytes, dst_port: int) -> tuple[str, int] | None:
        """Where a guest's flow to IPv6 ``dst_ip:dst_port`` goes on the host, or None
        (``host_destination``'s rules for IPv6): the mapped address -> ::1; the gateway and
        the DNS address are virtual (DNS port 53 -> ``dns_tcp_upstream``); multicast,
        link-local, loopback, unspecified and the guest's own prefix never leave the link."""
        if dst_ip == self.map_host_loopback6:
            return (HOST_LOOPBACK6, dst_port)
        if dst_ip == self.gateway6:
            return None
        if dst_ip == self.dns6:
            return self.dns_tcp_upstream(ipv6=True) if dst_port == DNS_PORT else None
        address = ipaddress.IPv6Address(dst_ip)
        if (address.is_multicast or address.is_link_local or address.is_loopback
                or address.is_unspecified or self.in_prefix6(dst_ip)):
            return None
        return (str(address), dst_port)

    @property
    def loopback_peer_address(self) -> bytes:
        """How a peer on the host's loopback appears to the guest (passt does the same)."""
        return bytes(self.map_host_loopback or self.gateway)

    @property
    def loopback_peer_address6(self) -> bytes:
        """``loopback_peer_address`` for a peer on the host's IPv6 loopback (::1)."""
        return bytes(self.map_host_loopback6 or self.gateway6)  # type: ignore[arg-type]

    @property
    def prefix_length(self) -> int:
        return bin(int.from_bytes(self.netmask, "big")).count("1")

    def in_guest_subnet(self, address: bytes) -> bool:
        mask = int.from_bytes(self.netmask, "big")
        return (int.from_bytes(address, "big") & mask) == (
            int.from_bytes(self.guest_ipv4, "big") & mask
        )

    @property
    def subnet_broadcast(self) -> bytes:
        mask = int.from_bytes(self.netmask, "big")
        net = int.from_bytes(self.guest_ipv4, "big") & mask
        return (net | (~mask & 0xFFFFFFFF)).to_bytes(4, "big")

    def host_destination(self, dst_ip: bytes, dst_port: int) -> tuple[str, int] | None:
        """Where a guest's outbound flow to ``dst_ip:dst_port`` goes on the host, or None.

        - the ``map_host_loopback`` address (by default the gateway) -> the host's 127.0.0.1;
        - the ``map_guest_addr`` address -> the guest's own address, on the host;
        - the gateway address, when it is not that address -> None: it is virtual,
          like the DNS address, and nothing answers behind it;
        - the DNS address, port 53 -> ``dns_tcp_upstream`` (None without an upstream);
          other ports of the DNS address lead nowhere, it is a virtual address;
        - broadcast, multicast, 0.0.0.0/8 and 127.0.0.0/8 -> None (never leave the guest link,
          and the guest must not reach host loopback except through the gateway mapping);
        - anything else -> itself.
        """
        if dst_ip == self.map_host_loopback:
            return (HOST_LOOPBACK, dst_port)
        if dst_ip == self.map_guest_addr:
            return (ip4_str(self.guest_ipv4), dst_port)
        if dst_ip == self.gateway:
            return None
        if dst_ip == self.dns:
            return self.dns_tcp_upstream(ipv6=False) if dst_port == DNS_PORT else None
        first = dst_ip[0]
        if first == 0 or first == 127 or first >= 224 or dst_ip == self.subnet_broadcast:
            return None
        return (ip4_str(dst_ip), dst_port)


# --- passt-style port specs -------------------------------------------------

ALL_PORTS = range(1, 65536)
# Linux's default ip_local_port_range: the ports ``all`` leaves alone (passt forwards
# "all unbound, non-ephemeral ports"); the command line passes the host's own range.
DEFAULT_EPHEMERAL = range(32768, 61000)
DEFAULT_BIND_ADDRESS = "0.0.0.0"


def _parse_port(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port {text!r} in port spec {spec!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in port spec {spec!r}")
    return port


def _parse_range(text: str, spec: str) -> range:
    first, dash, last = text.partition("-")
    start = _parse_port(first, spec)
    end = _parse_port(last, spec) if dash else start
    if end < start:
        raise ValueError(f"empty port range {text!r} in port spec {spec!r}")
    return range(start, end + 1)


def _parse_address(text: str, what: str, spec: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"bad {what} {text!r} in port spec {spec!r}") from None


def _split_bind(text: str, spec: str) -> tuple[str | None, str | None, str]:
    """``[ADDR][%IF]/PORTS`` -> (address or None, interface, ports). The bind part is what precedes
    the first slash when it is an address or starts with '%'; otherwise that slash
    belongs to a ``:toaddr/`` inside PORTS."""
    head, slash, rest = text.partition("/")
    address, percent, interface = head.partition("%")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]  # [::1]/PORTS: an IPv6 address in brackets
    if not slash or not (percent or _is_address(address)):
        return None, None, text
    if percent and not interface:
        raise ValueError(f"empty interface name after '%' in port spec {spec!r}")
    return (_parse_address(address, "bind address", spec) if address else None,
            interface or None, rest)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_port_spec(spec: str, ephemeral: range = DEFAULT_EPHEMERAL) -> list[PortForward]:
    """Parse a passt ``-t``/``-u`` port spec into forwards, in ascending host-port order.

    Syntax (comma-separated items, optionally prefixed once by ``[ADDR][%IF]/``):

    - ``none``: no forwards.  ``all[:toaddr]``: every port outside ``ephemeral`` to the
      same guest port, skipped where the host already binds it (``optional``);
    - ``P`` or ``A-B``: the same port numbers on host and guest;
    - ``P:Q``, ``A-B:C-D``, ``P:toaddr/Q``: host ports to other guest ports (ranges of
      equal length), optionally at another guest-side address;
    - ``~P`` or ``~A-B``: exclude host ports; a spec made only of exclusions means
      "all (non-ephemeral) ports except these" (as in passt);
    - ``ADDR/...``, ``%IF/...``, ``ADDR%IF/...``: bind on ADDR (IPv4, IPv6, or IPv6 in
      brackets: ``[::1]/22``), on interface IF only, instead of every address of both
      families (``dual_stack``).
    """
    text = spec.strip()
    if not text:
        raise ValueError("empty port spec")
    if text == "none":
        return []
    bind_address, interface, text = _split_bind(text, spec)
    dual_stack = bind_address is None
    address = bind_address or DEFAULT_BIND_ADDRESS
    everything = [port for port in ALL_PORTS if port not in ephemeral]
    mapping: dict[int, tuple[int, str | None, bool]] = {}
    excluded: set[int] = set()
    has_positive = False
    all_to: str | None = None
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in port spec {spec!r}")
        if item == "all" or item.startswith("all:"):
            has_positive = True
            all_to = _parse_address(item[4:], "guest address", spec) if item[3:] else None
            for port in everything:
                mapping.setdefault(port, (port, all_to, True))
            continue
        if item.startswith("~"):
            excluded.update(_parse_range(item[1:], spec))
            continue
        has_positive = True
        host_text, colon, guest_text = item.partition(":")
        to_address = None
        if "/" in guest_text:
            to_text, _, guest_text = guest_text.rpartition("/")
            to_address = _parse_address(to_text, "guest address", spec)
        host_ports = _parse_range(host_text, spec)
        guest_ports = _parse_range(guest_text, spec) if colon and guest_text else host_ports
        if colon and not guest_text and to_address is None:
            raise ValueError(f"missing guest port after ':' in {item!r} of {spec!r}")
        if len(guest_ports) != len(host_ports):
            raise ValueError(f"host and guest ranges differ in length in {item!r} of {spec!r}")
        for host_port, guest_port in zip(host_ports, guest_ports, strict=True):
            target = (guest_port, to_address, False)
            previous = mapping.get(host_port)
            if previous is not None and not previous[2] and previous != target:
                raise ValueError(f"host port {host_port} forwarded twice in port spec {spec!r}")
            mapping[host_port] = target
    if not has_positive:
        mapping = {port: (port, None, True) for port in everything}
    return [
        PortForward(address, host_port, guest_port, interface, to_address, optional, dual_stack)
        for host_port, (guest_port, to_address, optional) in sorted(mapping.items())
        if host_port not in excluded
    ]
