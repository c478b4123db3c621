"""The host's interfaces as passt reads them: the default route's interface and an
interface's global address, from /proc/net and SIOCGIFADDR (no netlink needed).

passt copies its template interface's addresses into the guest; vhostnet keeps QEMU's
addresses, so what it takes from the template (-i, else --outbound-if4/6, else the
default route's interface) is where ``--map-guest-addr`` leads without ``-a``: the
host address passt would have given the guest.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct


def default_route_interface(version: int) -> str | None:
    """The interface of the host's first default route of IP ``version`` (passt's template
    interface when neither -i nor --outbound-if4/6 names one), from /proc/net."""
    try:
        if version == 4:
            with open("/proc/net/route", encoding="ascii") as handle:
                for line in handle.readlines()[1:]:
                    fields = line.split()
                    if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
                        return fields[0]
        else:
            with open("/proc/net/ipv6_route", encoding="ascii") as handle:
                for line in handle:
                    fields = line.split()
                    if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" \
                            and fields[9] != "lo":
                        return fields[9]
    except OSError:
        pass
    return None


SIOCGIFADDR = 0x8915


def host_address(name: str | None, version: int) -> str | None:
    """A global (not loopback, not link-local) address of the host's interface ``name``:
    for IPv4 its primary address (SIOCGIFADDR), for IPv6 the first in /proc/net/if_inet6."""
    if name is None:
        return None
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        if version == 4:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            found.append(ipaddress.IPv4Address(reply[20:24]))
        else:
            with open("/proc/net/if_inet6", encoding="ascii") as handle:
                found += [ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                          for fields in map(str.split, handle)
                          if len(fields) == 6 and fields[5] == name]
    except (OSError, ValueError):
        return None
    usable = [a for a in found if not (a.is_loopback or a.is_link_local or a.is_unspecified)]
    return str(usable[0]) if usable else None


def map_guest_to(mapped: str | None, assigned: str | None, template: str | None,
                 version: int) -> bytes | None:
    """Where --map-guest-addr leads on the host, as passt: the address -a gave the guest;
    without -a, the host's address on the template interface (``template``: -i, else
    --outbound-if4/6; else the default route's), which passt would have given the guest.
    None: the guest's own address (also when the template has no global address)."""
    if mapped in (None, "none") or assigned is not None:
        return None
    address = host_address(template or default_route_interface(version), version)
    return None if address is None else ipaddress.ip_address(address).packed
