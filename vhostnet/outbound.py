"""Outbound host sockets: the one place the sockets that carry guest traffic out are opened.

Every socket that leaves the host for the guest comes from ``open_outbound``: TCP
connects (tcp/host.py), UDP flows and DNS upstream queries (hostio/udp.py,
hostio/dns.py), ICMP ping sockets (hostio/icmp.py). As passt does, before it connects:

- ``-o/--outbound ADDR`` (one per family) binds it to that source address;
- ``--outbound-if4`` / ``--outbound-if6 IF`` binds it to that interface (SO_BINDTODEVICE).

The host's loopback (where ``--map-host-loopback`` leads) is never behind an outbound
interface: a socket bound to one gets EHOSTUNREACH from a connect to 127.0.0.1, so
sockets toward loopback get the source address but no interface.

SO_BINDTODEVICE needs no capability since Linux 5.7 on a socket not yet bound to a
device, so it still works after vhostnet dropped to nobody. On an older kernel it fails
with EPERM: that is logged (once a minute at most) and the socket goes out unbound to
the interface, as passt does. Any other failure (the interface or address went away)
fails that one flow.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from typing import Protocol

from vhostnet.vhost_user.ratelimit import limiter

log = logging.getLogger(__name__)


class OutboundSettings(Protocol):
    """What ``open_outbound`` reads (``StackConfig`` has it): sources as 4/16 bytes."""

    outbound_ipv4: bytes | None
    outbound_ipv6: bytes | None
    outbound_if4: str | None
    outbound_if6: str | None


def outbound_binding(settings: OutboundSettings, host: str) -> tuple[str | None, str | None]:
    """(source address, interface) a socket toward ``host`` is bound to; None: not bound."""
    ipv6, loopback = _kind_of(host)
    if ipv6:
        source, interface = settings.outbound_ipv6, settings.outbound_if6
    else:
        source, interface = settings.outbound_ipv4, settings.outbound_if4
    text = None if source is None else _address_text(bytes(source))
    return text, None if loopback else interface


def is_loopback(host: str) -> bool:
    """Whether an address in text (IPv4 or IPv6) is a loopback address."""
    return _kind_of(host)[1]


# A new TCP connection or UDP flow asks these every time, for a handful of addresses;
# ipaddress takes microseconds per parse.
@functools.lru_cache(maxsize=256)
def _kind_of(host: str) -> tuple[bool, bool]:
    """(IPv6, loopback) of an address in text."""
    address = ipaddress.ip_address(host.partition("%")[0])
    return address.version == 6, address.is_loopback


@functools.lru_cache(maxsize=16)
def _address_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def open_outbound(settings: OutboundSettings, host: str, kind: int = socket.SOCK_DGRAM,
                  proto: int = 0) -> socket.socket:
    """A non-blocking socket of ``kind``/``proto`` for traffic to ``host`` (IPv4 or IPv6
    text), bound as configured, not yet connected; ``OSError`` as socket() or bind()
    raise it (the socket is closed then)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    source, interface = outbound_binding(settings, host)
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)  # no FIONBIO ioctl
    try:
        if interface is not None:
            _bind_to_device(sock, interface)
        if source is not None:
            _bind_to_source(sock, source)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_to_device(sock: socket.socket, interface: str) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    except PermissionError:
        limiter.log(log, logging.WARNING, f"outbound.device.{interface}",
                    "cannot bind outbound sockets to interface %s: this kernel lets only "
                    "CAP_NET_RAW use SO_BINDTODEVICE (Linux 5.7 and later need no capability); "
                    "they go out by the routing table", interface)
    except OSError as error:
        limiter.log(log, logging.WARNING, f"outbound.device.{interface}.{error.errno}",
                    "cannot bind an outbound socket to interface %s (%s): that flow fails",
                    interface, error.strerror)
        raise


def _bind_to_source(sock: socket.socket, source: str) -> None:
    try:
        sock.bind((source, 0))
    except OSError as error:
        limiter.log(log, logging.WARNING, f"outbound.source.{source}.{error.errno}",
                    "cannot bind an outbound socket to source address %s (%s): that flow "
                    "fails", source, error.strerror)
        raise
