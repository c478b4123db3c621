"""Several guests on one vhostnet (``--max-guests N``, N > 1): one switch, one router per guest.

Each front-end (vhost-user or stream) is a port of one Ethernet switch
(``virtqueue.switch.Switch``, in C: MAC learning, flooding, copies between ports'
batches). Every guest has its own private router, a whole ``Network``, as if it had
its own passt: NAT, DHCP, DNS and forwards are per guest by construction.

A ``GuestPort`` is what the port's device talks to (``network.GuestSide`` and
``network.SwitchedFrames``). Its TX batches go through ``Switch.switch_batch``,
which copies frames for other guests into their ports' batches and leaves in place
the frames for this guest's own router (gateway MAC, broadcast, multicast); those go
to the port's ``Network``. The port is bound to its Network on its first frame: the
source MAC gets a lease from the ``LeasePool`` and the port gets the Network of that
address (kept by IPv4 address; made then if needed). A guest that comes back with the
same MAC gets the same lease and so the same Network, with its connections.

With ``--max-guests 1`` none of this exists: the device talks to the one Network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vhostnet.guest_queue import GuestFrameQueue
from vhostnet.network import DirectRx, Network
from vhostnet.stack.config import PortForward, StackConfig, ip4_str, ip6_str, mac_str
from vhostnet.vhost_user.ratelimit import limiter
from vhostnet.virtqueue.switch import ROUTE6_SLOTS

if TYPE_CHECKING:
    from vhostnet.stack.leases import Lease, LeasePool
    from vhostnet.virtqueue import FrameBatch
    from vhostnet.virtqueue.switch import Switch

log = logging.getLogger(__name__)

NetworkFactory = Callable[[StackConfig], Network]
"""Builds the Network of one guest from its configuration (the CLI gives it the pool)."""


def guest_key(address: bytes) -> bytes:
    """How Networks are kept: by the guest's IPv4 address."""
    return bytes(address)


def address_text(address: bytes) -> str:
    return ip4_str(address) if len(address) == 4 else ip6_str(address)


def forwards_by_guest(config: StackConfig) -> dict[str | None, tuple[list[PortForward],
                                                                    list[PortForward]]]:
    """Command-line forwards (TCP, UDP) by the guest address their ``:toaddr/`` names; None:
    the first guest (no address, or the first guest's own)."""
    own = {ip4_str(config.guest_ipv4)}
    if config.guest_ipv6:
        own.add(ip6_str(config.guest_ipv6))
    split: dict[str | None, tuple[list[PortForward], list[PortForward]]] = {None: ([], [])}
    for index, forwards in enumerate((config.tcp_forwards, config.udp_forwards)):
        for forward in forwards:
            target = None if forward.guest_addr in own else forward.guest_addr
            split.setdefault(target, ([], []))[index].append(forward)
    return split


class GuestPort:
    """One front-end's port on the switch, bound to its guest's Network on the first frame.

    Implements ``network.GuestSide`` (what the device uses of a network) and
    ``network.SwitchedFrames`` (frames other guests sent here).
    """

    def __init__(self, guests: Guests, port: int) -> None:
        self.guests = guests
        self.port = port
        self.label = f"guest{port + 1}"
        self.network: Network | None = None
        self.mac: bytes | None = None
        self.connected = True
        self._listeners: list[Callable[[], None]] = []
        self._offloads = (False, False, False)
        self._direct_rx: DirectRx | None = None  # the device's ring, for the TCP fast path
        self._unbound = GuestFrameQueue()  # frames_to_guest until bound: always empty
        self._routed6 = 0  # how many IPv6 addresses the stack knew at the last publish_route

    # ---- GuestSide ----------------------------------------------------------------

    @property
    def config(self) -> StackConfig:
        return self.guests.config

    @property
    def frames_to_guest(self) -> GuestFrameQueue:
        return self._unbound if self.network is None else self.network.frames_to_guest

    def receive_batch(self, batch: FrameBatch, count: int, now: float,
                      udp_taken: int | None = None) -> None:
        """Switch the batch: frames for other guests to their ports, the rest (for this
        guest's router) to its Network. (``udp_taken`` is always None: no ``tx_kick`` here.)"""
        if self.network is None and count:
            self._bind_to_sender(batch)
        guests = self.guests
        kept = guests.switch.switch_batch(self.port, batch, count, now)
        guests.wake_others(self)
        if not kept:
            return
        network = self.network
        if network is None:
            guests.counts["unbound_dropped"] += kept  # no unicast MAC seen yet
            return
        network.receive_batch(batch, kept, now)
        if len(network.stack.guest_ipv6_addresses) != self._routed6:
            self.publish_route()  # the guest took a new IPv6 address

    def flush(self) -> None:
        if self.network is not None:
            self.network.flush()

    def tx_kick(self, fd: int, batch: FrameBatch, max_frames: int, **callbacks: Any) -> None:
        """No C kick reader behind a switch port: every frame is switched first."""
        return None

    def add_output_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)
        if self.network is not None:
            self.network.add_output_listener(listener)

    def remove_output_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if self.network is not None:
            self.network.remove_output_listener(listener)

    def set_guest_offloads(self, csum: bool, tso4: bool, tso6: bool = False) -> None:
        self._offloads = (csum, tso4, tso6)
        self.guests.switch.set_port_offloads(self.port, csum=csum, tso4=csum and tso4,
                                             tso6=csum and tso6)
        if self.network is not None:
            self.network.set_guest_offloads(csum, tso4, tso6)

    def set_direct_rx(self, rx: DirectRx | None, owner: DirectRx | None = None) -> None:
        """The device's RX ring for host TCP data written straight into it: kept until the
        port is bound, then handed to its guest's Network (``Network.set_direct_rx``)."""
        if owner is not None and self._direct_rx is not owner:
            return
        self._direct_rx = rx
        if self.network is not None:
            self.network.set_direct_rx(rx, owner)

    def learn_guest_mac(self, mac: bytes) -> None:
        """SEND_RARP after a migration: the guest is at ``mac``."""
        if self.network is None:
            self.bind(mac)
        if self.network is not None:
            self.network.learn_guest_mac(mac)

    def device_started(self, now: float) -> None:
        if self.network is not None:
            self.network.device_started(now)

    # ---- SwitchedFrames ---------------------------------------------------------------

    def outgoing(self) -> FrameBatch | None:
        return self.guests.switch.outgoing(self.port)

    def taken(self, count: int) -> None:
        self.guests.switch.taken(self.port, count)

    # ---- binding ------------------------------------------------------------------------

    def _bind_to_sender(self, batch: FrameBatch) -> None:
        source = bytes(batch.frame(0)[6:12])
        if len(source) == 6 and not source[0] & 1 and any(source):
            self.bind(source)

    def bind(self, mac: bytes) -> Network | None:
        """Bind this port to the Network of ``mac``'s lease (None: refused, logged, counted)."""
        network = self.guests.network_for_mac(mac, self)
        if network is None:
            return None
        self.mac = bytes(mac)
        self.network = network
        network.serve_port(self.mac)
        network.set_guest_offloads(*self._offloads)
        for listener in self._listeners:
            network.add_output_listener(listener)
        if self._direct_rx is not None:
            network.set_direct_rx(self._direct_rx)
        log.info("%s: MAC %s bound to guest %s", self.label, mac_str(mac),
                 address_text(network.config.guest_ipv4))
        self.publish_route()
        return network

    def publish_route(self) -> None:
        """Tell the switch this guest's MAC and addresses: frames other guests send to the
        gateway MAC for them are routed here (in C) instead of NATed by their routers."""
        network = self.network
        if network is None or self.mac is None:
            return
        learned = network.stack.guest_ipv6_addresses
        self._routed6 = len(learned)
        ipv6 = [address for address in dict.fromkeys((network.config.guest_ipv6, *learned))
                if address is not None and not ipaddress.IPv6Address(address).is_link_local]
        self.guests.switch.set_port_route(self.port, self.mac, network.config.guest_ipv4,
                                          ipv6[-ROUTE6_SLOTS:])

    # ---- migration (migration.transfer.PortLeases) ------------------------------------------

    def export_lease(self) -> dict[str, object] | None:
        """This guest's lease, to go with its state to a migration's destination."""
        return None if self.mac is None else self.guests.lease_record(self.mac)

    def import_lease(self, record: dict[str, object]) -> Network | None:
        """A migrated guest arrives: its lease goes into the pool, the port binds to the
        Network of that address (None: refused, logged)."""
        mac = self.guests.take_lease(record)
        if mac is None:
            return None
        if self.network is not None:
            return self.network if mac == self.mac else None
        return self.bind(mac)

    def wake(self) -> None:
        """Frames from other guests wait for this port: tell its device."""
        for listener in self._listeners:
            listener()

    def close(self) -> None:
        """The front-end went away: the Network stays (for a reconnect), the port goes."""
        if not self.connected:
            return
        self.connected = False
        if self.network is not None:
            for listener in self._listeners:
                self.network.remove_output_listener(listener)
            if self._direct_rx is not None:
                self.network.set_direct_rx(None, self._direct_rx)
        self._direct_rx = None
        self._listeners.clear()
        self.guests.port_closed(self)


class Guests:
    """The lease pool, the switch, every guest's Network (by address) and the ports."""

    def __init__(self, config: StackConfig, first: Network, pool: LeasePool, switch: Switch,
                 max_guests: int, build_network: NetworkFactory) -> None:
        self.config = config
        self.first = first
        self.pool = pool
        self.switch = switch
        self.max_guests = max_guests
        self._build_network = build_network
        self.networks: dict[bytes, Network] = {guest_key(first.config.guest_ipv4): first}
        # Networks that must stay: the first, and those command-line forwards go to.
        self._kept: set[bytes] = {guest_key(first.config.guest_ipv4)}
        self._idle_since: dict[bytes, float] = {}
        self.ports: dict[int, GuestPort] = {}
        self._bound: dict[bytes, GuestPort] = {}  # network key -> its connected port
        self.counts: Counter[str] = Counter()

    @classmethod
    def start(cls, config: StackConfig, pool: LeasePool, switch: Switch, max_guests: int,
              build_network: NetworkFactory) -> Guests:
        """The first guest's Network, and one for each other guest address the command
        line's forwards name (so that they listen from the start)."""
        split = forwards_by_guest(config)
        tcp, udp = split.pop(None)
        first = build_network(dataclasses.replace(config, tcp_forwards=tcp, udp_forwards=udp))
        guests = cls(config, first, pool, switch, max_guests, build_network)
        try:
            for address, (tcp, udp) in split.items():
                guests.add_forwarded_guest(address, tcp, udp)
        except BaseException:
            guests.close()
            raise
        return guests

    def add_forwarded_guest(self, address: str, tcp: list[PortForward],
                            udp: list[PortForward]) -> Network:
        parsed = ipaddress.ip_address(address)
        if parsed.version != 4 or not self.config.in_guest_subnet(parsed.packed):
            raise ValueError(f"forwards go to {address}, which is neither the first guest's "
                             "address nor an IPv4 address of the guest subnet")
        key = guest_key(parsed.packed)
        network = self._build_network(self.config_for(key, tcp, udp))
        self.networks[key] = network
        self._kept.add(key)
        return network

    def config_for(self, address: bytes, tcp: list[PortForward] = (),
                   udp: list[PortForward] = (), lease: Lease | None = None) -> StackConfig:
        """The configuration of the guest at ``address``: the first guest's, with its
        address, its IPv6 lease if any, and only its own forwards."""
        changes: dict[str, object] = {"guest_ipv4": address, "tcp_forwards": list(tcp),
                                      "udp_forwards": list(udp)}
        if lease is not None and lease.ipv6 is not None:
            changes["guest_ipv6"] = lease.ipv6
        return dataclasses.replace(self.config, **changes)

    # ---- ports ------------------------------------------------------------------------

    def open_port(self) -> GuestPort | None:
        """A port for a new front-end; None when all ``max_guests`` are in use."""
        if len(self.ports) >= self.max_guests:
            return None
        port = GuestPort(self, self.switch.add_port())
        self.ports[port.port] = port
        return port

    def port_closed(self, port: GuestPort) -> None:
        self.switch.remove_port(port.port)  # forgets its MACs
        self.ports.pop(port.port, None)
        for key, bound in list(self._bound.items()):
            if bound is port:
                del self._bound[key]
                self._idle_since[key] = time.monotonic()

    def wake_others(self, sender: GuestPort) -> None:
        """After ``sender``'s batch: wake every other port the switch queued frames for."""
        outgoing = self.switch.outgoing
        for port in self.ports.values():
            if port is not sender and outgoing(port.port) is not None:
                port.wake()

    # ---- networks ---------------------------------------------------------------------

    def network_for_mac(self, mac: bytes, port: GuestPort) -> Network | None:
        """The Network of ``mac``'s lease, made if needed; None (logged, counted) when the
        pool is exhausted or another connected port already is that guest."""
        try:
            lease = self.pool.lease_for(bytes(mac))
        except Exception as error:  # PoolExhausted, whatever the pool calls it
            self.counts["pool_exhausted"] += 1
            limiter.log(log, logging.ERROR, "guest_pool_exhausted",
                        "no address for a guest with MAC %s: %s", mac_str(mac), error)
            return None
        address = lease.ipv4
        if address is None:  # Networks are kept by IPv4 address
            self.counts["pool_exhausted"] += 1
            return None
        key = guest_key(address)
        holder = self._bound.get(key)
        if holder is not None and holder is not port:
            self.counts["mac_in_use"] += 1
            limiter.log(log, logging.ERROR, "guest_mac_in_use",
                        "%s: MAC %s is already the guest on %s; its frames for the router are "
                        "dropped", port.label, mac_str(mac), holder.label)
            return None
        network = self.networks.get(key)
        if network is None:
            network = self._build_network(self.config_for(address, lease=lease))
            self.networks[key] = network
            self.counts["networks_made"] += 1
        self._bound[key] = port
        self._idle_since.pop(key, None)
        self._close_idle_networks()
        return network

    def lease_record(self, mac: bytes) -> dict[str, object] | None:
        """``mac``'s entry of the pool's snapshot (``LeasePool.snapshot``)."""
        wanted = bytes(mac).hex()
        return next((record for record in self.pool.snapshot()["leases"]
                     if record["mac"] == wanted), None)

    def take_lease(self, record: dict[str, object]) -> bytes | None:
        """Put a migrated guest's lease record into the pool (the guests here keep theirs:
        an address one of them holds is not given to it); its MAC, or None if malformed."""
        try:
            mac = bytes.fromhex(str(record["mac"]))
            if len(mac) != 6:
                raise ValueError("not 6 bytes")
            others = [entry for entry in self.pool.snapshot()["leases"]
                      if entry["mac"] != mac.hex()]
            self.pool.restore({"leases": [*others, record]})
        except (KeyError, TypeError, ValueError) as error:
            log.error("migrated guest's lease refused: %s", error)
            return None
        return mac

    # ---- restart (migration.restart.GuestNetworks) ----------------------------------------

    def leases_snapshot(self) -> dict:
        return self.pool.snapshot()

    def restore_leases(self, snapshot: dict) -> None:
        """The pool as a previous run left it (``ValueError``, nothing changed, if malformed)."""
        self.pool.restore(snapshot)

    def network_at(self, address: bytes) -> Network:
        """The Network of the guest leased ``address``, made if needed (a restart brings it
        back before its guest reconnects with its MAC); ``ValueError`` if ``address`` is not
        an IPv4 address of the guest subnet."""
        if len(address) != 4 or not self.config.in_guest_subnet(address):
            raise ValueError(f"{address.hex()} is not an IPv4 address of the guest subnet")
        key = guest_key(address)
        network = self.networks.get(key)
        if network is None:
            lease = next((lease for lease in self.pool.leases() if lease.ipv4 == key), None)
            network = self._build_network(self.config_for(key, lease=lease))
            self.networks[key] = network
            self.counts["networks_made"] += 1
            self._idle_since[key] = time.monotonic()
        return network

    def _close_idle_networks(self) -> None:
        """At most 2*N Networks: the one idle longest (no port), with no flow if possible,
        goes first; the first guest's and those forwards go to stay."""
        while len(self.networks) > 2 * self.max_guests:
            idle = [key for key in self.networks
                    if key not in self._bound and key not in self._kept]
            if not idle:
                return
            idle.sort(key=lambda key: (_open_flows(self.networks[key]) > 0,
                                       self._idle_since.get(key, 0.0)))
            key = idle[0]
            self.networks.pop(key).close()
            self._idle_since.pop(key, None)
            self.counts["networks_closed"] += 1
            log.info("closed the network of idle guest %s (more than %d kept)",
                     address_text(key), 2 * self.max_guests)

    def network_for_address(self, address: str | None) -> Network:
        """The Network a forward's ``GUESTADDR`` names (None: the first guest's);
        ``ValueError`` (one sentence) when no guest has that address."""
        if address is None:
            return self.first
        parsed = ipaddress.ip_address(address)
        for network in self.networks.values():
            config, stack = network.config, network.stack
            if parsed.version == 4 and (parsed.packed == config.guest_ipv4
                                        or parsed.packed == stack.guest_ipv4):
                return network
            if parsed.version == 6 and (parsed.packed == config.guest_ipv6
                                        or parsed.packed in stack.guest_ipv6_addresses):
                return network
        raise ValueError(f"no guest has address {address}")

    def all_networks(self) -> list[Network]:
        return list(self.networks.values())

    def port_of(self, network: Network) -> GuestPort | None:
        return self._bound.get(guest_key(network.config.guest_ipv4))

    # ---- listing, counters, life cycle ----------------------------------------------------

    def describe(self, port_counters: Callable[[GuestPort], dict[str, int]]
                 ) -> list[dict[str, object]]:
        """Every guest (a Network, connected or not), for the control socket's ``guests``."""
        names = {lease.mac: lease.name for lease in self.pool.leases()}
        macs: dict[int, list[str]] = {}
        for mac, port, _age in self.switch.macs():
            macs.setdefault(port, []).append(mac_str(mac))
        records = []
        for key, network in self.networks.items():
            port = self._bound.get(key)
            stack = network.stack
            mac = port.mac if port is not None else stack.guest_mac
            counts = network.counters()
            device = port_counters(port) if port is not None else {}
            records.append({
                "port": None if port is None else port.label,
                "connected": port is not None,
                "mac": None if mac is None else mac_str(mac),
                "macs": macs.get(port.port, []) if port is not None else [],
                "ipv4": address_text(key) if len(key) == 4 else None,
                "ipv6": [ip6_str(address) for address in stack.guest_ipv6_addresses],
                "name": names.get(mac) if mac is not None else None,
                **traffic_record(counts, device),
            })
        return records

    def counters(self) -> dict[str, int]:
        """``guests.*``, ``switch.*`` and the pool's ``leases.*``."""
        merged = {f"guests.{name}": count for name, count in self.counts.items()}
        merged["guests.ports"] = len(self.ports)
        merged["guests.networks"] = len(self.networks)
        merged.update(self.switch.counters())
        merged.update(self.pool.counters())  # the shared pool: no Network counts it
        return merged

    def close(self) -> None:
        for port in list(self.ports.values()):
            port.close()
        for network in self.networks.values():
            network.close()
        self.networks.clear()


def traffic_record(network_counts: dict[str, int], device_counts: dict[str, int]
                   ) -> dict[str, int]:
    """A guest's frames each way (its device's, rings or stream) and open flows (its
    network's), as the control socket's ``guests`` lists them."""
    return {
        "frames_from_guest": device_counts.get("device.tx.frames",
                                               device_counts.get("stream.tx.frames", 0)),
        "frames_to_guest": device_counts.get("device.rx.frames",
                                             device_counts.get("stream.rx.frames", 0)),
        "tcp_flows": network_counts.get("tcp.flows_open", 0),
        "udp_flows": network_counts.get("udp.flows", 0),
    }


def _open_flows(network: Network) -> int:
    counts = network.counters()
    return counts.get("tcp.flows_open", 0) + counts.get("udp.flows", 0)
