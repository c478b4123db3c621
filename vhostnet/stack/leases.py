"""The address and name book of the guests on one vhostnet (sans-IO, no clock, no I/O).

``LeasePool`` gives every guest MAC its addresses and remembers its name:

- IPv4: a ``Reservation`` (``--dhcp-host MAC,ADDR[,NAME]``) first, else the MAC's earlier
  lease, else the next free address: the first ``-a`` address, then the following ones of
  the subnet (wrapping round), or ``--dhcp-range FIRST[-LAST]`` alone; the gateway, DNS and
  mapped addresses (``excluded``) and every address reserved for another MAC are skipped.
- IPv6: the same, from the first IPv6 ``-a`` address (or ``prefix::100``) onwards within
  its prefix. Addresses the guest is seen using (SLAAC, DAD, DHCPv6) are added with
  ``add_ipv6`` (a few per MAC, newest kept).
- Names: one DNS label per MAC, from a reservation or the guest's DHCP host name (option 12)
  or DHCPv6 client FQDN (option 39), sanitised and lower-cased; a name another MAC holds is
  refused (``leases.name_refused``). ``resolve`` answers ``NAME.<domain>`` and the
  ``host_names`` (``host.<domain>``) for the DNS forwarder.

Leases never expire (a guest keeps its addresses across reconnects and QEMU restarts); at
most ``max_leases`` MACs hold one, the next raises ``PoolExhausted`` (``leases.exhausted``).
``snapshot``/``restore`` carry the leases (not the reservations, which come from the
command line) as JSON-able data, for migration and --state-file.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from vhostnet.wire.ethernet import mac_bytes, mac_str

TYPE_A = 1
TYPE_AAAA = 28
DEFAULT_DOMAIN = "vhostnet.internal"
DEFAULT_MAX_LEASES = 4096
# Host part of the first IPv6 lease when no IPv6 -a address is given (prefix::100).
DEFAULT_IPV6_HOST = 0x100
# Addresses a guest is seen using, per MAC (link-local, SLAAC, temporary, DHCPv6).
MAX_LEARNED_IPV6 = 8
MAX_LABEL = 63
_NOT_LABEL = re.compile(r"[^a-z0-9-]+")


class PoolExhausted(Exception):
    """Every address of the pool is leased (or ``max_leases`` MACs hold one)."""


class NxDomain(list):
    """``resolve``'s answer for a name under our domain that no guest holds: empty like a
    NOERROR answer without data, but its type says NXDOMAIN (``isinstance(a, NxDomain)``)."""


@dataclass(frozen=True)
class Reservation:
    """``--dhcp-host MAC,ADDR[,NAME]``: ``address`` (4 or 16 bytes) is this MAC's only."""

    mac: bytes
    address: bytes
    name: str | None = None


@dataclass
class Lease:
    """A MAC's addresses and name (a copy: changing it changes nothing in the pool)."""

    mac: bytes
    ipv4: bytes | None
    ipv6: bytes | None
    name: str | None
    reserved: bool


@dataclass
class _Entry:
    mac: bytes
    ipv4: bytes | None = None
    ipv6: bytes | None = None
    name: str | None = None
    reserved: bool = False
    reserved_name: bool = False
    learned6: list[bytes] | None = None

    def view(self) -> Lease:
        return Lease(self.mac, self.ipv4, self.ipv6, self.name, self.reserved)


def sanitise_name(text: str) -> str | None:
    """A guest's host name as one DNS label: its first label, lower-cased, characters
    outside a-z, 0-9 and '-' replaced by '-', no leading or trailing '-', at most 63
    characters; None when nothing is left."""
    label = text.strip().split(".", 1)[0].lower()
    label = _NOT_LABEL.sub("-", label).strip("-")[:MAX_LABEL].strip("-")
    return label or None


class _Range:
    """Candidate addresses of one family in pool order: ``first`` up to ``last``, then (for
    a whole subnet) from the subnet's first host address up to just before ``first``."""

    def __init__(self, first: int, last: int, wrap_from: int | None, width: int) -> None:
        self.first, self.last, self.wrap_from, self.width = first, last, wrap_from, width

    def candidates(self) -> Iterable[bytes]:
        yield from (n.to_bytes(self.width, "big") for n in range(self.first, self.last + 1))
        if self.wrap_from is not None:
            yield from (n.to_bytes(self.width, "big") for n in range(self.wrap_from, self.first))


def _subnet_range(first: bytes, prefix_len: int) -> _Range:
    bits = len(first) * 8
    network = ipaddress.ip_network((first, prefix_len), strict=False)
    low, high = int(network.network_address), int(network.broadcast_address)
    if bits == 128 and prefix_len < 128:
        low += 1  # not the subnet-router anycast address
    elif prefix_len < 31:
        low, high = low + 1, high - 1  # neither the network nor the broadcast address
    start = int.from_bytes(first, "big")
    return _Range(start, high, low if low < start else None, len(first))


class LeasePool:
    """Leases, reservations and names of every guest MAC (see the module's description)."""

    def __init__(self, *, first_ipv4: bytes, prefix_len: int, excluded: Iterable[bytes],
                 range_ipv4: tuple[bytes, bytes] | None, first_ipv6: bytes | None,
                 prefix6_len: int, reservations: Iterable[Reservation],
                 domain: str = DEFAULT_DOMAIN, host_names: dict[str, list[bytes]] | None = None,
                 max_leases: int = DEFAULT_MAX_LEASES) -> None:
        self.domain = domain.strip().rstrip(".").lower()
        self.max_leases = max_leases
        self._stats: Counter[str] = Counter()
        self._excluded = {bytes(a) for a in excluded}
        self._host_names = {name.lower(): [bytes(a) for a in addresses]
                            for name, addresses in (host_names or {}).items()}
        if range_ipv4 is not None:
            first, last = (int.from_bytes(a, "big") for a in range_ipv4)
            self._range4 = _Range(first, last, None, 4)
        else:
            self._range4 = _subnet_range(first_ipv4, prefix_len)
        self._range6 = _subnet_range(first_ipv6, prefix6_len) if first_ipv6 else None
        self._subnet4 = ipaddress.ip_network((first_ipv4, prefix_len), strict=False)
        self._subnet6 = (ipaddress.ip_network((first_ipv6, prefix6_len), strict=False)
                         if first_ipv6 else None)
        self._reservations = list(reservations)
        self._reset()

    def _reset(self) -> None:
        """No lease but the reservations."""
        self._entries: dict[bytes, _Entry] = {}
        self._holder: dict[bytes, bytes] = {}  # address (either family) -> MAC
        self._names: dict[str, bytes] = {}  # name -> MAC
        self._reserved: set[bytes] = set()  # reserved addresses
        for reservation in self._reservations:
            self._reserve(reservation)

    # --- reservations ----------------------------------------------------------

    def _reserve(self, reservation: Reservation) -> None:
        mac, address = bytes(reservation.mac), bytes(reservation.address)
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"--dhcp-host {mac_str(mac)}: not a unicast MAC address")
        subnet = self._subnet4 if len(address) == 4 else self._subnet6
        text = str(ipaddress.ip_address(address))
        if subnet is None or ipaddress.ip_address(address) not in subnet:
            raise ValueError(f"--dhcp-host address {text} is outside the guests' "
                             f"{'subnet' if len(address) == 4 else 'IPv6 prefix'}")
        if address in self._excluded:
            raise ValueError(f"--dhcp-host address {text} is one of vhostnet's own addresses")
        holder = self._holder.get(address)
        if holder is not None and holder != mac:
            raise ValueError(f"--dhcp-host address {text} is reserved twice")
        entry = self._entries.setdefault(mac, _Entry(mac))
        family = "ipv4" if len(address) == 4 else "ipv6"
        if getattr(entry, family) not in (None, address):
            raise ValueError(f"--dhcp-host {mac_str(mac)} has two addresses of one family")
        setattr(entry, family, address)
        entry.reserved = True
        self._reserved.add(address)
        self._holder[address] = mac
        if reservation.name is not None:
            name = sanitise_name(reservation.name)
            if name is None or name != reservation.name.lower():
                raise ValueError(f"--dhcp-host name {reservation.name!r} is not one DNS label")
            if self._names.get(name, mac) != mac or name in self._host_names or (
                    entry.name not in (None, name)):
                raise ValueError(f"--dhcp-host name {name!r} is given to two guests")
            entry.name, entry.reserved_name = name, True
            self._names[name] = mac

    # --- leases --------------------------------------------------------------------

    def lease_for(self, mac: bytes) -> Lease:
        """``mac``'s lease, made on first use (both families); ``PoolExhausted`` when no
        address of a family the pool gives is free or ``max_leases`` MACs hold one."""
        mac = bytes(mac)
        entry = self._entries.get(mac)
        if entry is not None and (entry.ipv4 is not None) and (
                entry.ipv6 is not None or self._range6 is None):
            return entry.view()
        dynamic = sum(not e.reserved for e in self._entries.values())
        if entry is None and dynamic >= self.max_leases:
            self._stats["leases.exhausted"] += 1
            raise PoolExhausted(f"{self.max_leases} guests already hold a lease")
        ipv4 = entry.ipv4 if entry is not None and entry.ipv4 else self._free(self._range4)
        ipv6 = entry.ipv6 if entry is not None else None
        if ipv6 is None and self._range6 is not None:
            ipv6 = self._free(self._range6)
        entry = self._entries.setdefault(mac, _Entry(mac))
        for address in (ipv4, ipv6):
            if address is not None:
                self._holder[address] = mac
        entry.ipv4, entry.ipv6 = ipv4, ipv6
        self._stats["leases.granted"] += 1
        return entry.view()

    def _free(self, candidates: _Range) -> bytes:
        for address in candidates.candidates():
            if address not in self._holder and address not in self._excluded:
                return address
        self._stats["leases.exhausted"] += 1
        raise PoolExhausted(f"no free IPv{4 if candidates.width == 4 else 6} address is left")

    def set_name(self, mac: bytes, name: str) -> None:
        """The guest at ``mac`` calls itself ``name`` (DHCP host name, DHCPv6 FQDN): kept,
        sanitised, unless another MAC (or the host) holds it, ``mac`` has no lease yet, or
        a reservation named it already."""
        entry = self._entries.get(bytes(mac))
        label = sanitise_name(name)
        if entry is None or label is None:
            self._stats["leases.name_invalid" if label is None else "leases.name_no_lease"] += 1
            return
        if entry.reserved_name or entry.name == label:
            return
        if self._names.get(label, entry.mac) != entry.mac or label in self._host_names:
            self._stats["leases.name_refused"] += 1
            return
        if entry.name is not None:
            del self._names[entry.name]
        entry.name = label
        self._names[label] = entry.mac
        self._stats["leases.named"] += 1

    def add_ipv6(self, mac: bytes, address: bytes) -> None:
        """The guest at ``mac`` uses IPv6 ``address`` (learned from its packets, DAD, or
        given by DHCPv6); the oldest learned one goes beyond ``MAX_LEARNED_IPV6``. An address
        another MAC holds is not taken from it (``leases.ipv6_conflict``)."""
        mac, address = bytes(mac), bytes(address)
        entry = self._entries.get(mac)
        if entry is None or len(address) != 16:
            return
        holder = self._holder.get(address)
        if holder is not None and holder != mac:
            self._stats["leases.ipv6_conflict"] += 1
            return
        learned = entry.learned6 = entry.learned6 or []
        if address in learned:
            return
        if len(learned) >= MAX_LEARNED_IPV6:
            old = learned.pop(0)
            if old != entry.ipv6:
                self._holder.pop(old, None)
        learned.append(address)
        self._holder[address] = mac

    # --- questions -------------------------------------------------------------------

    def held_by_other(self, mac: bytes | None, address: bytes) -> bool:
        """True when ``address`` is leased, reserved or in use by a MAC other than ``mac``
        (None: by any MAC): ARP and NDP leave it to that guest."""
        holder = self._holder.get(bytes(address))
        return holder is not None and holder != mac

    def mac_of(self, address: bytes) -> bytes | None:
        """The MAC that holds ``address``, or None."""
        return self._holder.get(bytes(address))

    def resolve(self, qname: str, qtype: int) -> list[bytes] | None:
        """The A (``TYPE_A``) or AAAA (``TYPE_AAAA``) addresses of ``NAME.<domain>`` or of a
        host name (``host.<domain>``): a list, empty for a name without addresses of that
        type (or another type: NOERROR, no data); an empty ``NxDomain`` for a name under
        our domain nobody holds; None for a name outside our domain (ask upstream)."""
        name = qname.strip().rstrip(".").lower()
        if name == self.domain:
            return []
        if not name.endswith("." + self.domain):
            return None
        label = name[: -len(self.domain) - 1]
        addresses = self._host_names.get(label)
        if addresses is None:
            mac = self._names.get(label)
            if mac is None:
                self._stats["leases.resolve.nxdomain"] += 1
                return NxDomain()
            entry = self._entries[mac]
            addresses = [a for a in (entry.ipv4, entry.ipv6)
                         if a is not None and (len(a) == 4 or a in self._reserved)]
            addresses += [a for a in entry.learned6 or () if a not in addresses
                          and not ipaddress.IPv6Address(a).is_link_local]
        self._stats["leases.resolve.answered"] += 1
        width = {TYPE_A: 4, TYPE_AAAA: 16}.get(qtype)
        return [a for a in addresses if len(a) == width]

    def leases(self) -> list[Lease]:
        """Every MAC with a lease or a reservation, in the order they came."""
        return [entry.view() for entry in self._entries.values()]

    def learned_ipv6(self, mac: bytes) -> list[bytes]:
        """The IPv6 addresses the guest at ``mac`` was seen using, oldest first."""
        entry = self._entries.get(bytes(mac))
        return list(entry.learned6 or ()) if entry is not None else []

    def counters(self) -> dict[str, int]:
        """``leases.*`` counters, with the gauge ``leases.count``."""
        return {**self._stats, "leases.count": len(self._entries)}

    # --- state -------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The leases and names, JSON-able (reservations stay the command line's)."""
        return {"leases": [
            {"mac": e.mac.hex(), "ipv4": _hex(e.ipv4), "ipv6": _hex(e.ipv6),
             "name": None if e.reserved_name else e.name,
             "learned6": [a.hex() for a in e.learned6 or ()]}
            for e in self._entries.values()]}

    def restore(self, state: dict) -> None:
        """Take back a ``snapshot`` on top of the reservations (which win: an address
        reserved or held by another MAC meanwhile is left out, ``leases.restore_conflict``);
        ``ValueError`` for a malformed one, and then nothing changes."""
        try:
            records = [(_unhex(r["mac"], 6), _unhex(r["ipv4"], 4), _unhex(r["ipv6"], 16),
                        r["name"], [_unhex(a, 16) for a in r["learned6"]])
                       for r in state["leases"]]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"bad lease pool state: {error!r}") from None
        if any(mac is None or not (name is None or isinstance(name, str))
               for mac, _, _, name, _ in records):
            raise ValueError("bad lease pool state: a MAC or name is malformed")
        self._reset()
        for mac, ipv4, ipv6, name, learned in records:
            assert mac is not None
            entry = self._entries.setdefault(mac, _Entry(mac))
            for family, address in (("ipv4", ipv4), ("ipv6", ipv6)):
                if address is None or getattr(entry, family) is not None:
                    continue
                if address in self._holder or address in self._excluded:
                    self._stats["leases.restore_conflict"] += 1
                    continue
                setattr(entry, family, address)
                self._holder[address] = mac
            for address in learned:
                if address is not None:
                    self.add_ipv6(mac, address)
            if name is not None:
                self.set_name(mac, name)


def _hex(address: bytes | None) -> str | None:
    return None if address is None else address.hex()


def _unhex(text: str | None, width: int) -> bytes | None:
    if text is None:
        return None
    address = bytes.fromhex(text)
    if len(address) != width:
        raise ValueError(f"address of {len(address)} bytes, not {width}")
    return address


# --- command-line values (checked here, turned into one sentence by vhostnet.options) ---


def parse_dhcp_host(text: str) -> Reservation:
    """``MAC,ADDR[,NAME]`` -> ``Reservation``; ``ValueError`` saying what is wrong."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"--dhcp-host {text!r} is not MAC,ADDR[,NAME]")
    try:
        mac = mac_bytes(parts[0].strip())
    except ValueError:
        raise ValueError(f"--dhcp-host {text!r}: {parts[0]!r} is not a MAC address") from None
    if mac[0] & 1:
        raise ValueError(f"--dhcp-host {text!r}: {parts[0]!r} is a multicast MAC address")
    try:
        address = ipaddress.ip_address(parts[1].strip()).packed
    except ValueError:
        raise ValueError(f"--dhcp-host {text!r}: {parts[1]!r} is not an IPv4 or IPv6 "
                         "address") from None
    name = parts[2].strip() if len(parts) == 3 else None
    if name is not None and sanitise_name(name) != name.lower():
        raise ValueError(f"--dhcp-host {text!r}: {name!r} is not one DNS label "
                         "(letters, digits and '-')")
    return Reservation(mac, address, name.lower() if name else None)


def parse_dhcp_range(text: str) -> tuple[bytes, bytes | None]:
    """``FIRST[-LAST]`` (IPv4) -> (first, last or None: to the end of the subnet)."""
    first_text, dash, last_text = text.partition("-")
    try:
        first = ipaddress.IPv4Address(first_text.strip())
        last = ipaddress.IPv4Address(last_text.strip()) if dash else None
    except ValueError:
        raise ValueError(f"--dhcp-range {text!r} is not FIRST[-LAST] of IPv4 addresses") from None
    if last is not None and last < first:
        raise ValueError(f"--dhcp-range {text!r} ends before it starts")
    return first.packed, None if last is None else last.packed


def check_domain(text: str) -> str:
    """A ``--dns-domain``: dot-separated DNS labels, returned lower-case without the final dot."""
    domain = text.strip().rstrip(".").lower()
    labels = domain.split(".")
    if not domain or len(domain) > 253 or any(sanitise_name(label) != label for label in labels):
        raise ValueError(f"--dns-domain {text!r} is not a domain name (labels of letters, "
                         "digits and '-', separated by dots)")
    return domain
