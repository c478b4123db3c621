"""What of the network moves with the guest: export to sections, import from them.

Export reads the engines; import checks every section first and then applies
them, so a blob that fails validation leaves the destination as it was.
TCP connections travel as records with their frozen host sockets
(``tcp_migrate``); one that cannot be re-created is reset toward the guest,
so it notices at once instead of after its retransmission timeout.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from vhostnet.migration.state import StateError, decode_state, encode_state
from vhostnet.migration.tcp_state import parse_records

if TYPE_CHECKING:
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.network import Network

log = logging.getLogger(__name__)


def _mac_text(mac: bytes | None) -> str | None:
    return None if mac is None else bytes(mac).hex(":")


def export_network(network: Network, migration: TcpMigration, now: float,
                   extra: dict[str, object] | None = None) -> bytes:
    """The network's migratable state as one blob (with ``extra`` sections: a guest's
    lease when several guests share the vhostnet)."""
    return encode_state(network_sections(network, migration, now, extra))


def network_sections(network: Network, migration: TcpMigration, now: float,
                     extra: dict[str, object] | None = None) -> dict[str, object]:
    """``export_network``'s sections before encoding (a restart with several guests keeps
    one such set per guest in its state)."""
    stack = network.stack
    config = network.config
    sections: dict[str, object] = {
        "guest": {
            "mac": _mac_text(stack.guest_mac),
            "ipv4": None if stack.guest_ipv4 is None else str(ipaddress.IPv4Address(stack.guest_ipv4)),
            # The guest's IPv6 addresses as learned, oldest first (the newest global one is
            # guest_ipv6 again on import, as learning them in that order makes it).
            "ipv6": [str(ipaddress.IPv6Address(a)) for a in stack.guest_ipv6_addresses],
        },
        "forwards": {
            "tcp": sorted(str(f) for f in config.tcp_forwards),
            "udp": sorted(str(f) for f in config.udp_forwards),
        },
        "counters": network.counters(),
    }
    if stack.dhcp is not None:
        sections["dhcp"] = stack.dhcp.export_lease(now)
    if stack.udp_nat is not None:
        sections["udp"] = stack.udp_nat.export_flows(now)
    if network.tcp is not None:
        if network.tcp_fast is not None:
            network.tcp_fast.sync_all(now)  # Flow fields must include what the C path wrote
        # Freezes the connections that can move (tcp_migrate): the caller must
        # later release them (the state was handed over) or thaw them (abandoned).
        sections["tcp"] = migration.export_records(now)
    sections.update(extra or {})
    return sections


def import_network(network: Network, migration: TcpMigration, blob: bytes,
                   now: float) -> dict[str, int]:
    """Apply a blob from ``export_network``; raise ``StateError`` and change nothing if it is bad."""
    return import_sections(network, migration, decode_state(blob), now)


def import_sections(network: Network, migration: TcpMigration, sections: dict[str, object],
                    now: float) -> dict[str, int]:
    """Apply ``network_sections``' output; ``StateError`` and nothing changed if it is bad."""
    stack = network.stack
    try:
        guest = sections["guest"]
        if not isinstance(guest, dict):
            raise ValueError("guest section is not an object")
        mac = None if guest.get("mac") is None else bytes.fromhex(str(guest["mac"]).replace(":", ""))
        if mac is not None and len(mac) != 6:
            raise ValueError("guest MAC is not 6 bytes")
        ipv4 = None if guest.get("ipv4") is None else ipaddress.IPv4Address(str(guest["ipv4"])).packed
        ipv6 = guest.get("ipv6", [])
        if not isinstance(ipv6, list) or len(ipv6) > 64:
            raise ValueError("guest IPv6 addresses are not a short list")
        ipv6_addresses = [ipaddress.IPv6Address(str(a)).packed for a in ipv6]
        counters = sections.get("counters", {})
        if not isinstance(counters, dict):
            raise ValueError("counters section is not an object")
        udp = sections.get("udp", [])
        tcp = sections.get("tcp", [])
        if not isinstance(udp, list) or not isinstance(tcp, list):
            raise ValueError("flow sections are not lists")
        dhcp = sections.get("dhcp")
        if dhcp is not None and not isinstance(dhcp, dict):
            raise ValueError("dhcp section is not an object")
        tcp_records = parse_records(tcp)
        # Engines validate their own records before changing anything.
        if stack.dhcp is not None:
            saved = (stack.dhcp.lease_holder, stack.dhcp.lease_expiry)
            try:
                stack.dhcp.import_lease(dhcp, now)
            except (KeyError, TypeError, ValueError):
                stack.dhcp.lease_holder, stack.dhcp.lease_expiry = saved
                raise
        udp_flows = stack.udp_nat.import_flows(udp, now) if stack.udp_nat is not None else 0
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"state content is invalid: {exc}") from None
    stack.restore_guest(mac, ipv4)
    if mac is not None:
        for address in ipv6_addresses:
            stack.learn_guest_ipv6(mac, address)
    carried = {k: v for k, v in counters.items() if not k.endswith(("flows_open", ".flows"))}
    stack.restore_counters({k: v for k, v in carried.items() if not k.startswith("tcp.")})
    if network.tcp is not None:
        network.tcp.stats.restore({k: v for k, v in carried.items() if k.startswith("tcp.")})
    tcp_restored = tcp_reset = 0
    if network.tcp is not None and tcp_records:
        tcp_restored, tcp_reset = migration.restore(tcp_records, now)
    migration.migration_over()  # a repair helper is let go, as passt does
    forwards = sections.get("forwards")
    mine = {"tcp": sorted(str(f) for f in network.config.tcp_forwards),
            "udp": sorted(str(f) for f in network.config.udp_forwards)}
    if forwards != mine:
        log.warning("port forwards differ from the migration source's (%s); keeping ours", forwards)
    network.flush()
    log.info("network state loaded: guest %s %s, %d UDP flow(s), %d TCP connection(s) "
             "restored, %d reset", _mac_text(mac), guest.get("ipv4"), udp_flows, tcp_restored,
             tcp_reset)
    return {"udp_flows": udp_flows, "tcp_restored": tcp_restored, "tcp_reset": tcp_reset}
