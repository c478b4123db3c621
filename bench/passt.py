"""passt as the reference back-end: Debian trixie's build, run through trixie's loader.

The command gives the guest the same network as vhostnet: vhost-user mode, MTU
``{mtu}``, vhostnet's gateway MAC (``-M``; passt's own default is
9a:55:9a:55:9a:55), the host's loopback reached at the gateway address
(``--map-host-loopback 10.0.2.2``, as vhostnet maps it), the same forwarded
ports, and vhostnet's IPv6 plan: prefix fec0::/64 in its Router Advertisements
(``-a fec0::15``), the host's ::1 reached at fec0::2 (a second
``--map-host-loopback``), no DHCPv6. In a namespace with only loopback passt
says "No external interface as template, switch to local mode" and offers the
guest 169.254.2.1 by DHCP whatever ``-a`` says (its IPv6 plan it keeps, with
fe80::1 as the router); the benchmark guests configure 10.0.2.15 statically,
take their IPv6 address by SLAAC, and passt follows the addresses the guest uses.
"""

from __future__ import annotations

import shlex
import subprocess

from bench.runner import BenchError
from vhostnet.stack.config import StackConfig

PASST = "passt"


def gateway_mac_text() -> str:
    """vhostnet's default gateway MAC as aa:bb:.. (passt is told to use the same)."""
    return StackConfig().gateway_mac.hex(":")


def passt_template() -> str:
    """The command template (bench.runner.Backend) that starts trixie's passt; BenchError
    with the reason when it cannot be had (downloaded into the kit cache by ``make kit``)."""
    try:
        from tools.guestkit import KitError, fetch_passt_repair
    except ImportError:
        raise BenchError("the passt comparison needs the tools/ folder of a vhostnet source "
                         "tree: run it from the clone's top folder") from None
    try:
        package = fetch_passt_repair()
    except (KitError, OSError, subprocess.SubprocessError) as error:
        raise BenchError(f"trixie's passt is not available "
                         f"({str(error).strip().splitlines()[-1]})") from None
    argv = package.passt_command(
        "--vhost-user", "-f", "-q", "-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2",
        "-a", "fec0::15", "--map-host-loopback", "10.0.2.2", "--map-host-loopback", "fec0::2",
        "-M", gateway_mac_text(), "--dns", "10.0.2.3", "--no-dhcpv6")
    return " ".join(shlex.quote(a) for a in argv) + \
        " -s {socket} -m {mtu} -t {tcp_fwd} -u {udp_fwd}"
