"""The command line of several guests on one vhostnet (issue 16): ``--max-guests``,
``--dhcp-range``, ``--dhcp-host``, ``--dns-domain``.

Kept apart from ``vhostnet.options`` (which calls ``add_guest_options`` and
``guest_config``); a mistake is a ``ValueError`` whose text is the one sentence shown.
"""

from __future__ import annotations

import argparse

from vhostnet.stack.config import MAX_GUESTS, StackConfig
from vhostnet.stack.leases import DEFAULT_DOMAIN, check_domain, parse_dhcp_host, parse_dhcp_range


def add_guest_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several guests (vhostnet's own)")
    group.add_argument("--max-guests", metavar="N", default="1",
                       help=f"front-ends served at once, 1..{MAX_GUESTS} (default 1); with more "
                            "than one, each is a port of one switch and gets its own lease")
    group.add_argument("--dhcp-range", metavar="FIRST[-LAST]", default=None,
                       help="IPv4 addresses leased to guests (default: the -a address, then "
                            "the next ones of the subnet)")
    group.add_argument("--dhcp-host", metavar="MAC,ADDR[,NAME]", action="append", default=[],
                       help="reserve ADDR (IPv4 or IPv6) and NAME for the guest at MAC; "
                            "repeatable, twice for one MAC gives both families")
    group.add_argument("--dns-domain", metavar="DOMAIN", default=DEFAULT_DOMAIN,
                       help="guests' names resolve as NAME.DOMAIN, the host's loopback "
                            f"mapping as host.DOMAIN (default {DEFAULT_DOMAIN})")


def guest_config(args: argparse.Namespace) -> dict[str, object]:
    """``StackConfig`` fields from the options above; ``ValueError`` for a mistake."""
    text = str(args.max_guests)
    if not text.isdigit() or not 1 <= int(text) <= MAX_GUESTS:
        raise ValueError(f"--max-guests {text!r} is not a number of guests 1..{MAX_GUESTS}")
    return {"max_guests": int(text),
            "dhcp_range": None if args.dhcp_range is None else parse_dhcp_range(args.dhcp_range),
            "dhcp_hosts": [parse_dhcp_host(text) for text in args.dhcp_host],
            "dns_domain": check_domain(args.dns_domain)}


def check_lease_pool(config: StackConfig) -> None:
    """Build the lease pool once, so that a reservation that cannot be (outside the subnet,
    an address or name twice...) is a command-line mistake; ``ValueError``."""
    if config.uses_lease_pool:
        config.lease_pool()
