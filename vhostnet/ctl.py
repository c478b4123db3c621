"""``vhostnet ctl SOCKET COMMAND [ARGS]``: drive a running vhostnet through its control socket.

Commands: ``list`` (forwarded ports), ``add tcp|udp SPEC``, ``remove tcp|udp SPEC``
(SPEC in passt's ``-t``/``-u`` syntax; ``HOSTPORT:GUESTADDR/GUESTPORT`` picks a guest),
``leases``, ``guests``, ``stats``. Tables for
people; ``--json`` prints the control socket's answer as it came. A refused command
prints its one-sentence reason on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vhostnet.control import control_request

# Command line word -> (control command, the fields its arguments fill).
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "list": ("forwards", ()),
    "add": ("forward-add", ("protocol", "spec")),
    "remove": ("forward-remove", ("protocol", "spec")),
    "leases": ("leases", ()),
    "guests": ("guests", ()),
    "stats": ("stats", ()),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostnet ctl", description="Query and change a running vhostnet (--control PATH).")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (5)")
    parser.add_argument("socket", metavar="SOCKET", help="the control socket (--control PATH)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", help="forwarded ports")
    for word, verb in (("add", "forward"), ("remove", "stop forwarding")):
        sub = commands.add_parser(word, help=f"{verb} ports now")
        sub.add_argument("protocol", choices=("tcp", "udp"))
        sub.add_argument("spec", metavar="SPEC", help="ports in passt's -t/-u syntax")
    commands.add_parser("leases", help="the DHCP lease and what DHCPv6 hands out (several "
                        "guests: the lease pool)")
    commands.add_parser("guests", help="the guests: port, MAC, addresses, name, counters")
    commands.add_parser("stats", help="every counter")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command, fields = COMMANDS[args.command]
    try:
        reply = control_request(args.socket, command, args.timeout,
                                **{name: getattr(args, name) for name in fields})
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"vhostnet ctl: cannot connect to {args.socket}: {reason}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"vhostnet ctl: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(render(command, reply))
    return 0


def render(command: str, reply: dict[str, Any]) -> str:
    """A control answer as text for people."""
    if command in ("forwards", "forward-add", "forward-remove"):
        return _forwards_table(reply["forwards"])
    if command == "leases":
        return _leases_text(reply)
    if command == "guests":
        return _guests_table(reply["guests"])
    counters = reply.get("counters", {})
    return table(["COUNTER", "VALUE"], [[name, counters[name]] for name in sorted(counters)])


def _forwards_table(forwards: list[dict[str, Any]]) -> str:
    rows = []
    for f in forwards:
        bind = f["bind"] + (f"%{f['interface']}" if f["interface"] else "")
        rows.append([f["protocol"], bind, f["host_port"], f["guest_address"] or f.get("guest") or "guest",
                     f["guest_port"], f["source"], "listening" if f["listening"] else "off"])
    return table(["PROTO", "BIND", "HOST PORT", "TO", "GUEST PORT", "SOURCE", "STATE"],
                 rows) or "no forwarded ports"


def _guests_table(guests: list[dict[str, Any]]) -> str:
    counted = ["FRAMES IN", "FRAMES OUT", "TCP", "UDP"]
    if guests and "port" in guests[0]:  # several guests: the switch's ports
        return table(["PORT", "MAC", "IPV4", "IPV6", "NAME", "CONNECTED", *counted],
                     [[g["port"] or "-", g["mac"] or "-", g["ipv4"] or "-",
                       " ".join(g["ipv6"]) or "-", g["name"] or "-",
                       "yes" if g["connected"] else "no", *_guest_counts(g)]
                      for g in guests])
    return table(["MAC", "IPV4", "IPV6", *counted],
                 [[g["mac"], g["ipv4"] or "-", " ".join(g["ipv6"]) or "-", *_guest_counts(g)]
                  for g in guests]) or "no guest seen yet"


def _guest_counts(guest: dict[str, Any]) -> list[Any]:
    return [guest["frames_from_guest"], guest["frames_to_guest"], guest["tcp_flows"],
            guest["udp_flows"]]


def _leases_text(reply: dict[str, Any]) -> str:
    if "leases" in reply:  # several guests: the lease pool
        return table(["MAC", "IPV4", "IPV6", "NAME", "RESERVED", "CONNECTED"],
                     [[lease["mac"], lease["ipv4"] or "-", lease["ipv6"] or "-",
                       lease["name"] or "-", "yes" if lease["reserved"] else "no",
                       "yes" if lease["connected"] else "no"] for lease in reply["leases"]]
                     ) or "no lease"
    lines = [table(["MAC", "IPV4", "HOST NAME", "EXPIRES IN"],
                   [[lease["mac"], lease["address"], lease["hostname"] or "-",
                     f"{lease['expires_in']}s"] for lease in reply["dhcp"]]) or "no DHCP lease"]
    binding = reply.get("dhcpv6")
    if binding is None:
        lines.append("DHCPv6 off")
    elif binding["address"] is None:
        lines.append("DHCPv6: stateless, addresses by SLAAC only")
    else:
        lines.append(f"DHCPv6: {binding['address']} to every client, "
                     f"lifetime {binding['lifetime']}s")
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Rows in left-aligned columns under ``headers``; "" for no rows."""
    if not rows:
        return ""
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in cells)
