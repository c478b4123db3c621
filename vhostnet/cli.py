"""Command line: ``vhostnet --socket PATH [options]``.

Option names follow passt where passt has the same option, so that a user
switching from passt keeps their command line. Every mistake is reported in
one sentence on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import resource
import signal
import sys

from vhostnet import __version__

log = logging.getLogger("vhostnet")

# --incoming: how long to wait for the migration source to free forwarded ports.
INCOMING_LISTEN_SECONDS = 600.0
# Fds kept out of the flow budget: the vhost-user and control sockets and their
# clients, memory regions, kick/call eventfds, forwarded-port listeners, logs.
FD_RESERVE = 256
MAX_FLOW_LIMIT = 65536


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one (as passt does); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def flow_limit_for(fd_limit: int) -> int:
    """Flows per engine that the fd limit can hold: UDP and ICMP flows each take one
    socket and are limited separately, TCP connections take one each too."""
    return max(1, min(MAX_FLOW_LIMIT, (fd_limit - FD_RESERVE) // 2))

DESCRIPTION = """\
A user-mode network back-end for QEMU guests over vhost-user.

vhostnet listens on a UNIX socket for QEMU's vhost-user net device and gives
the guest a NATed network like QEMU's user networking or passt: DHCP, DNS
forwarding, ICMP echo, UDP and TCP to the host and beyond, ports forwarded
into the guest. No root, no tap device. Start QEMU with:

  -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem
  -chardev socket,id=c0,path=SOCKET,reconnect-ms=1000
  -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0
"""

EPILOG = """\
port forwarding specs (-t/-u), as in passt:
  8080            host port 8080 to guest port 8080
  2222:22         host port 2222 to guest port 22
  8000-8010       a range, same ports in the guest
  8000-8010:9000-9010   a range mapped onto another range
  127.0.0.1/8080  only on this host address
  ~8005           exclude a port (or range) from a list or from 'all'
  all             every port below 32768 not excluded
"""


class UsageError(Exception):
    """A command-line mistake; str() is the one sentence shown to the user."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostnet",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-s", "--socket", required=True, metavar="PATH",
                   help="UNIX socket to listen on for QEMU's vhost-user connection (required)")
    p.add_argument("-a", "--address", metavar="ADDR[/PREFIX]", action="append", default=None,
                   help="guest address, once per family: IPv4 given by DHCP (default 10.0.2.15), "
                        "IPv6 given by DHCPv6 (default: SLAAC in fec0::/64)")
    p.add_argument("-n", "--netmask", metavar="MASK", default="255.255.255.0",
                   help="netmask, dotted or prefix length (default 255.255.255.0)")
    p.add_argument("-g", "--gateway", metavar="ADDR", action="append", default=None,
                   help="gateway address, once per family; traffic to it reaches the host's "
                        "loopback (default 10.0.2.2 and fec0::2)")
    p.add_argument("-D", "--dns", metavar="ADDR", action="append", default=None,
                   help="DNS forwarder address offered to the guest, once per family "
                        "(default 10.0.2.3 and fec0::3)")
    p.add_argument("--dns-upstream", metavar="ADDR[:PORT]", action="append", default=None,
                   help="resolver the DNS forwarder asks; repeatable "
                        "(default: the nameservers of /etc/resolv.conf)")
    p.add_argument("-m", "--mtu", metavar="MTU", type=int, default=1500,
                   help="MTU given to the guest, 576 to 65520 (default 1500)")
    p.add_argument("-M", "--mac-addr", metavar="MAC", default=None,
                   help="MAC address vhostnet uses as the gateway's")
    p.add_argument("-H", "--hostname", metavar="NAME", default=None,
                   help="host name given to the guest by DHCP (option 12)")
    p.add_argument("-S", "--search", metavar="DOMAIN", action="append", default=[],
                   help="DNS search domain given by DHCP (options 15 and 119); repeatable")
    p.add_argument("-t", "--tcp-ports", metavar="SPEC", action="append", default=[],
                   help="forward host TCP ports into the guest (see below); repeatable")
    p.add_argument("-u", "--udp-ports", metavar="SPEC", action="append", default=[],
                   help="forward host UDP ports into the guest (see below); repeatable")
    p.add_argument("--map-host-loopback", metavar="ADDR|none", action="append", default=None,
                   help="guest address that reaches the host's 127.0.0.1 (an IPv6 one: ::1), "
                        "once per family (default: the gateway); 'none' turns the mapping off")
    p.add_argument("-4", "--ipv4-only", action="store_true", help="IPv4 only: drop all IPv6")
    p.add_argument("-6", "--ipv6-only", action="store_true",
                   help="IPv6 only: drop all IPv4 and ARP, no DHCP")
    p.add_argument("--no-ndp", action="store_true", help="do not answer IPv6 neighbour discovery")
    p.add_argument("--no-ra", action="store_true", help="send no IPv6 Router Advertisements")
    p.add_argument("--no-dhcpv6", action="store_true", help="do not answer DHCPv6")
    p.add_argument("--no-dhcp", action="store_true", help="do not answer DHCP")
    p.add_argument("--no-icmp", action="store_true", help="do not forward or answer ICMP echo")
    p.add_argument("--no-tcp", action="store_true", help="do not translate TCP")
    p.add_argument("--no-udp", action="store_true", help="do not translate UDP")
    p.add_argument("--tftp", metavar="DIR", default=None,
                   help="serve this folder read-only by TFTP on the gateway address")
    p.add_argument("--bootfile", metavar="NAME", default=None,
                   help="boot file offered by DHCP for PXE (needs --tftp)")
    p.add_argument("--bootfile-ipxe", metavar="NAME", default=None,
                   help="boot file offered instead when the DHCP client is iPXE")
    p.add_argument("--lease-time", metavar="SECONDS", type=int, default=86400,
                   help="DHCP lease time offered to the guest (default 86400, one day)")
    p.add_argument("--flow-limit", metavar="N", type=int, default=None,
                   help="most UDP (and ICMP) flows open at once (default: what the fd limit, "
                        "raised to its hard value at start, can hold; at most 65536)")
    p.add_argument("--control", metavar="PATH", default=None,
                   help="UNIX socket for run-time control: JSON lines, e.g. {\"command\": \"stats\"}")
    p.add_argument("--repair-path", metavar="PATH|none", default=None,
                   help="UNIX socket where a TCP_REPAIR helper run with CAP_NET_ADMIN "
                        "(passt-repair PATH, or vhostnet repair PATH) connects for a migration, "
                        "so TCP connections move with the guest when vhostnet itself lacks "
                        "CAP_NET_ADMIN (default: SOCKET.repair, as passt; 'none': no such socket)")
    p.add_argument("--incoming", action="store_true",
                   help="migration destination on the same host: forwarded ports the source "
                        "still holds are bound as soon as it releases them")
    p.add_argument("--discard-tx", action="store_true", help=argparse.SUPPRESS)  # for `vhostnet bench`
    p.add_argument("-d", "--debug", action="store_true", help="log every protocol message")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    p.add_argument("--version", action="version", version=f"vhostnet {__version__}")
    return p


def _netmask(text: str) -> str:
    # ipaddress takes both forms after the slash: "24" and "255.255.255.0".
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").netmask)
    except ValueError:
        raise UsageError(f"netmask {text!r} is neither a dotted mask nor a prefix length") from None


def _per_family(values: list[str] | None, what: str,
                with_prefix: bool = False) -> dict[int, tuple[str, int | None]]:
    """Options given once per family -> {4 or 6: (address, prefix length or None)}."""
    found: dict[int, tuple[str, int | None]] = {}
    for text in values or []:
        address, slash, prefix = text.partition("/")
        try:
            parsed = ipaddress.ip_address(address)
            length = int(prefix) if slash else None
        except ValueError:
            raise UsageError(f"{what} {text!r} is not an IPv4 address, nor an IPv6 one") from None
        if slash and not with_prefix:
            raise UsageError(f"{what} {text!r} takes no prefix length")
        if length is not None and not 1 <= length <= parsed.max_prefixlen:
            raise UsageError(f"prefix length in {what} {text!r} is out of range")
        if parsed.version in found:
            raise UsageError(f"{what} given twice for IPv{parsed.version}")
        found[parsed.version] = (str(parsed), length)
    return found


def _upstream(text: str) -> tuple[str, int]:
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


def _mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(x) == 2 for x in parts):
        raise UsageError(f"MAC address {text!r} is not of the form 52:54:00:12:34:56")
    try:
        return bytes(int(x, 16) for x in parts)
    except ValueError:
        raise UsageError(f"MAC address {text!r} is not of the form 52:54:00:12:34:56") from None


def config_from_args(args: argparse.Namespace, fd_limit: int | None = None):  # -> StackConfig
    """Turn parsed options into the stack's configuration, checking each one.

    ``fd_limit``: the fd limit in force (default: as it is now); the default flow limit follows it.
    """
    from vhostnet.stack.config import StackConfig, ip4, parse_port_spec

    if not args.socket:
        raise UsageError("--socket needs a path (an empty one is an unreachable abstract address)")
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fitting = flow_limit_for(fd_limit)
    if args.flow_limit is None:
        args.flow_limit = fitting
    elif args.flow_limit > fitting:
        log.warning("--flow-limit %d is more than the fd limit (%d) can hold; flows beyond about %d "
                    "will fail to open", args.flow_limit, fd_limit, fitting)

    if not 576 <= args.mtu <= 65520:
        raise UsageError(f"MTU {args.mtu} is outside 576..65520")
    if not 60 <= args.lease_time < 0xFFFFFFFF:
        raise UsageError(f"--lease-time {args.lease_time} is outside 60..4294967294 seconds")
    if args.flow_limit < 1:
        raise UsageError("--flow-limit must be at least 1")
    if args.bootfile and not args.tftp:
        raise UsageError("--bootfile needs --tftp DIR to serve the file from")
    if args.tftp and not os.path.isdir(args.tftp):
        raise UsageError(f"TFTP folder {args.tftp} does not exist or is not a folder")
    if args.ipv4_only and args.ipv6_only:
        raise UsageError("-4 and -6 exclude each other")
    addresses = _per_family(args.address, "-a/--address", with_prefix=True)
    gateways = _per_family(args.gateway, "-g/--gateway")
    dns_addresses = _per_family(args.dns, "-D/--dns")
    # passt's meaning: this guest-side address reaches the host's loopback.
    loopback_given = [x for x in args.map_host_loopback or [] if x != "none"]
    maps = _per_family(loopback_given, "--map-host-loopback")
    map_off = "none" in (args.map_host_loopback or [])
    map_loopback: str | None = None if map_off else maps.get(4, ("gateway",))[0]
    map_loopback6: str | None = None if map_off else maps.get(6, ("gateway",))[0]
    address4, prefix4 = addresses.get(4, ("10.0.2.15", None))
    netmask = _netmask(str(prefix4) if prefix4 is not None else args.netmask)
    ipv6_kwargs: dict[str, object] = dict(
        ipv4=not args.ipv6_only, ipv6=not args.ipv4_only, ndp=not args.no_ndp,
        ra=not args.no_ra, dhcpv6=not args.no_dhcpv6, map_host_loopback6=map_loopback6)
    if 6 in addresses:
        address6, prefix6 = addresses[6]
        ipv6_kwargs.update(guest_ipv6=address6, prefix6=address6,
                           prefix6_len=64 if prefix6 is None else prefix6)
    if 6 in gateways:
        ipv6_kwargs["gateway6"] = gateways[6][0]
    if 6 in dns_addresses:
        ipv6_kwargs["dns6"] = dns_addresses[6][0]
    tcp_forwards = []
    udp_forwards = []
    try:
        for spec in args.tcp_ports:
            if spec != "none":
                tcp_forwards.extend(parse_port_spec(spec))
        for spec in args.udp_ports:
            if spec != "none":
                udp_forwards.extend(parse_port_spec(spec))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    upstream = [_upstream(x) for x in args.dns_upstream] if args.dns_upstream else resolv_conf_nameservers()
    kwargs = dict(
        guest_ipv4=ip4(address4),
        netmask=ip4(netmask),
        gateway=ip4(gateways.get(4, ("10.0.2.2",))[0]),
        dns=ip4(dns_addresses.get(4, ("10.0.2.3",))[0]),
        mtu=args.mtu,
        map_host_loopback=map_loopback,
        dhcp=not args.no_dhcp,
        icmp=not args.no_icmp,
        tcp=not args.no_tcp,
        udp=not args.no_udp,
        hostname=args.hostname,
        search_domains=list(args.search),
        dns_upstream=upstream,
        tcp_forwards=tcp_forwards,
        udp_forwards=udp_forwards,
        tftp_root=os.path.abspath(args.tftp) if args.tftp else None,
        bootfile=args.bootfile,
        bootfile_ipxe=args.bootfile_ipxe,
        flow_limit=args.flow_limit,
        lease_time=args.lease_time,
        **ipv6_kwargs,
    )
    if args.mac_addr:
        kwargs["gateway_mac"] = _mac(args.mac_addr)
    try:
        return StackConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def repair_socket_path(args: argparse.Namespace) -> str | None:
    """Where a TCP_REPAIR helper connects: SOCKET.repair unless --repair-path says
    otherwise (passt's default in vhost-user mode); None for --repair-path none."""
    if args.repair_path is None:
        return f"{args.socket}.repair"
    if args.repair_path == "none":
        return None
    if not args.repair_path:
        raise UsageError("--repair-path needs a path, or 'none'")
    return args.repair_path


async def _serve(args: argparse.Namespace, config) -> int:
    from vhostnet.network import Network
    from vhostnet.server import Server, SocketPathError, open_listening_socket

    loop = asyncio.get_running_loop()
    try:
        listener = open_listening_socket(args.socket)
    except SocketPathError as exc:
        raise UsageError(str(exc)) from None
    try:
        network = Network(config, loop, listen_retry=INCOMING_LISTEN_SECONDS if args.incoming else 0.0)
    except OSError as exc:
        listener.close()
        os.unlink(args.socket)
        raise UsageError(f"cannot set up the network: {exc.strerror or exc}") from None
    if args.discard_tx:
        # Benchmarks only (the ring case times the TX ring alone): guest frames are
        # dropped unseen instead of reaching the stack, counted as guest.tx_to_sink.
        network.set_tx_sink(_discard)
    from vhostnet.migration.repair_helper import HelperLink, RepairAccess
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.migration.transfer import DeviceStateTransfer

    # Created whether or not we have CAP_NET_ADMIN, as passt does: whoever starts
    # passt-repair for a migration (KubeVirt's virt-handler, a script written for
    # passt) does not know our privileges, and passt-repair fails on a missing path.
    helper = None
    repair_path = repair_socket_path(args)
    if repair_path is not None:
        try:
            helper = HelperLink(repair_path, loop)
        except OSError as exc:
            if args.repair_path is None:  # not asked for: TCP_REPAIR may still be ours
                log.warning("cannot listen on the repair socket %s (%s): no helper can connect",
                            repair_path, exc.strerror or exc)
            else:
                network.close()
                listener.close()
                os.unlink(args.socket)
                raise UsageError(f"cannot listen on --repair-path {repair_path}: "
                                 f"{exc.strerror or exc}") from None
    repair = RepairAccess.probe(helper)
    migration = TcpMigration.attach(network, repair)
    log.info("%s", repair.describe())
    server = Server(loop, listener, network,
                    device_state=lambda: DeviceStateTransfer(loop, network, migration))
    control = None
    if args.control:
        from vhostnet.control import ControlServer

        try:
            control_listener = open_listening_socket(args.control)
        except SocketPathError as exc:
            server.close()
            raise UsageError(str(exc)) from None
        control = ControlServer(args.control)
        control.commands["stats"] = lambda _request: {"counters": server.counters()}
        from vhostnet.migration.commands import register_state_commands

        register_state_commands(control.commands, network, migration)
        await control.start(control_listener)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.close)
    log.info("vhostnet %s listening on %s", __version__, args.socket)
    await server.closed.wait()
    if control is not None:
        control.close()
    repair.close()
    log.info("stopped")
    return 0


def _discard(_batch: object, _count: int, _now: float) -> None:
    """A TX sink that drops every frame (``--discard-tx``)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repair"]:
        from vhostnet.migration.repair_helper import main as repair_main

        return repair_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="vhostnet: %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args, raise_fd_limit())
        repair_socket_path(args)  # a mistake in it is reported before anything is opened
        import uvloop

        return uvloop.run(_serve(args, config))
    except UsageError as exc:
        print(f"vhostnet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
