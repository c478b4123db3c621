"""Checks and conversions of command-line values for ``options`` (passt's command
line): each returns the converted value or raises ``UsageError`` with the one sentence
the user sees. Port-forward specs are fitted to the fd limit here too.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket


class UsageError(Exception):
    """A command-line mistake; str() is the one sentence shown to the user."""


def ip_address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def per_family(values: list[str], what: str, allow_none: bool = False
               ) -> tuple[str | None, str | None]:
    """passt's "one per family" options: (IPv4, IPv6) canonical strings; 'none' -> ('none',
    'none') when allowed; a second address of one family is a mistake."""
    found: dict[int, str] = {}
    for text in values:
        if allow_none and text == "none":
            found[4] = found[6] = "none"
            continue
        address = ip_address(text, what)
        if address.version in found and found[address.version] != str(address):
            raise UsageError(f"{what} is given twice for IPv{address.version}; passt takes "
                             "one address per family")
        found[address.version] = str(address)
    return found.get(4), found.get(6)


def netmask(text: str) -> str:
    # ipaddress takes both forms after the slash: "24" and "255.255.255.0".
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").netmask)
    except ValueError:
        raise UsageError(f"netmask {text!r} is neither a dotted mask nor a prefix length") from None


def upstream(text: str) -> tuple[str, int]:
    """``ADDR``, ``IPv4:PORT`` or ``[IPv6]:PORT`` (an IPv6 address with a port in brackets)."""
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") and rest[1:] else ("x" if rest else "")
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    host = host or text
    try:
        ipaddress.ip_address(host)
        number = int(port) if port else 53
    except ValueError:
        raise UsageError(f"DNS upstream {text!r} is not ADDR or ADDR:PORT") from None
    if not 0 < number < 65536:
        raise UsageError(f"DNS upstream port in {text!r} is out of range")
    return host, number


def mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) == 6 and all(len(x) == 2 for x in parts):
            return bytes(int(x, 16) for x in parts)
    except ValueError:
        pass
    raise UsageError(f"MAC address {text!r} is not of the form 52:54:00:12:34:56")


def interface(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise UsageError(f"{what}: there is no network interface {name!r} on this host") from None
    return name


def outbound_address(text: str | None) -> str | None:
    """passt's -o checks (no unspecified, broadcast or multicast address; for IPv6 no
    loopback, v4-mapped or v4-compatible one), and that this host has the address."""
    if text is None:
        return None
    address = ipaddress.ip_address(text)
    if address.version == 4:
        bad = (address.is_unspecified or address.is_multicast
               or address == ipaddress.IPv4Address("255.255.255.255"))
    else:
        bad = (address.is_unspecified or address.is_loopback or address.is_multicast
               or address.ipv4_mapped is not None or int(address) >> 32 == 0)
    if bad:
        raise UsageError(f"-o/--outbound {text} cannot be a source address (passt takes no "
                         "unspecified, broadcast or multicast address, nor IPv6 loopback, "
                         "v4-mapped or v4-compatible)")
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((text, 0))
        except OSError as error:
            raise UsageError(f"-o/--outbound {text}: this host has no such address "
                             f"({error.strerror})") from None
    return text


def byte_size(text: str | None, option: str, default: int, minimum: int) -> int:
    """A size in bytes, with an optional k, m or g suffix (powers of 1024)."""
    if text is None:
        return default
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) * scale < minimum:
        raise UsageError(f"{option} {text!r} is not a size of at least {minimum} bytes")
    return int(digits) * scale


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """The host's ephemeral port range, which passt's ``all`` leaves out."""
    from vhostnet.stack.config import DEFAULT_EPHEMERAL

    try:
        with open(path, encoding="ascii") as handle:
            first, last = (int(x) for x in handle.read().split())
        return range(first, last + 1)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The host's resolvers, as QEMU's user networking and passt use them by default."""
    found: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        ipaddress.ip_address(fields[1])
                    except ValueError:
                        continue
                    found.append((fields[1], 53))
    except OSError:
        pass
    return found


def socket_source(args: argparse.Namespace) -> None:
    """Check -s/-F: -F serves an already connected socket and implies --one-off."""
    if args.fd is not None:
        if args.socket is not None:
            raise UsageError("--fd and --socket exclude each other: serve one socket or the other")
        try:
            kind = socket.socket(fileno=os.dup(args.fd))
        except OSError:
            raise UsageError(f"--fd {args.fd} is not an open socket") from None
        family = kind.family
        kind.close()
        if family != socket.AF_UNIX:
            raise UsageError(f"--fd {args.fd} is not a UNIX domain socket")
        args.one_off = True
    elif args.socket == "":
        raise UsageError("--socket needs a path (an empty one is an unreachable abstract address)")


def forward_specs(specs: list[str], ephemeral: range, what: str):  # -> list[PortForward]
    from vhostnet.stack.config import parse_port_spec

    forwards = []
    try:
        for spec in specs:
            forwards.extend(parse_port_spec(spec, ephemeral))
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return forwards


def fit_forwards(tcp: list, udp: list, fd_limit: int, reserve: int) -> tuple[list, list, str | None]:
    """Keep ``all`` within the fd limit: ports named explicitly always stay; ports from
    ``all`` (optional) are kept lowest first while half the spare descriptors last, so
    flows keep the other half. Returns the forwards and a warning, or None."""
    explicit = [f for f in tcp + udp if not f.optional]
    optional = len(tcp) + len(udp) - len(explicit)
    room = max(0, (fd_limit - reserve - len(explicit)) // 2)
    if optional <= room:
        return tcp, udp, None
    keep_tcp = min(sum(f.optional for f in tcp), room // 2 if any(f.optional for f in udp)
                   else room)
    keep_udp = room - keep_tcp

    def trim(forwards: list, keep: int) -> list:
        kept = []
        for forward in forwards:
            if not forward.optional:
                kept.append(forward)
            elif keep > 0:
                kept.append(forward)
                keep -= 1
        return kept

    tcp, udp = trim(tcp, keep_tcp), trim(udp, keep_udp)
    warning = (f"'all' forwards {room} of {optional} ports (the lowest first): the fd limit "
               f"{fd_limit} holds no more; raise the hard limit (ulimit -Hn) to forward them all")
    return tcp, udp, warning
