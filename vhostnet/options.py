"""vhostnet's command line: passt's options with passt's meaning, and vhostnet's own.

Every option of passt's man page is either accepted here or refused through
``REFUSED`` (option -> the one sentence saying why vhostnet has no such thing);
README's option table and tests/test_cli_passt.py follow that table.
``config_from_args`` turns the parsed options into a ``StackConfig``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import NoReturn

from vhostnet import __version__
from vhostnet.options_guests import add_guest_options, check_lease_pool, guest_config

DESCRIPTION = """\
A user-mode network back-end for QEMU guests over vhost-user, a drop-in for passt.

vhostnet listens on a UNIX socket for QEMU's vhost-user net device and gives
the guest a NATed network like QEMU's user networking or passt: DHCP, DNS
forwarding, ICMP echo, UDP and TCP to the host and beyond, ports forwarded
into the guest. No root, no tap device. As passt, it forks into the background
once its socket listens, unless -f is given. Start QEMU with:

  -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem
  -chardev socket,id=c0,path=SOCKET,reconnect-ms=1000
  -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0

IPv6: -a/-g/-D/--dns-forward/--dns-host/--map-host-loopback take one address per
family; the IPv6 ones set the guest's IPv6 plan (SLAAC or DHCPv6, NDP, RA, ICMPv6
echo); -4/-6 switch a family off. UDP and TCP over IPv6 are not translated yet;
-o/--outbound-if6/--map-guest-addr for IPv6 are checked and kept.
"""

EPILOG = """\
port forwarding specs (-t/-u), as in passt:
  8080            host port 8080 to guest port 8080
  2222:22         host port 2222 to guest port 22
  8000-8010       a range, same ports in the guest
  8000-8010:9000-9010   a range mapped onto another range
  127.0.0.1/8080  only on this host address; %eth0/8080 or ADDR%eth0/8080: only on eth0
  ~8005           exclude a port (or range) from a list or from 'all'
  all             every port outside the ephemeral range (ip_local_port_range) that
                  the host does not already use, as far as the fd limit allows
  none            nothing (the default)
"""

PASTA_ONLY = "{option} is a pasta option: vhostnet, like passt, serves a guest, not a namespace"
# Option -> the one sentence vhostnet prints (exit 2) instead of running.
REFUSED: dict[tuple[str, ...], str] = {
    ("--userns",): PASTA_ONLY,
    ("--netns",): PASTA_ONLY,
    ("--netns-only",): PASTA_ONLY,
    ("--no-netns-quit",): PASTA_ONLY,
    ("-I", "--ns-ifname"): PASTA_ONLY,
    ("--ns-mac-addr",): PASTA_ONLY,
    ("--config-net",): PASTA_ONLY,
    ("--no-copy-routes",): PASTA_ONLY,
    ("--no-copy-addrs",): PASTA_ONLY,
    ("--no-splice",): PASTA_ONLY,
    ("-T", "--tcp-ns"): PASTA_ONLY,
    ("-U", "--udp-ns"): PASTA_ONLY,
    ("--host-lo-to-ns-lo",): PASTA_ONLY,
    ("-c", "--conf-path"): ("{option} is passt's configuration socket for pesto, which vhostnet "
                            "does not speak: use vhostnet's --control PATH (JSON lines)"),
}
# Refused options that take a value (so `-T 8080` is refused as a whole).
REFUSED_WITH_VALUE = {"--userns", "--netns", "-I", "--ns-ifname", "--ns-mac-addr", "-T",
                      "--tcp-ns", "-U", "--udp-ns", "-c", "--conf-path"}

CAPABILITIES = '{\n  "type": "net"\n}'
DEFAULT_LOG_SIZE = 1 << 20
MIN_LOG_SIZE = 4096
DEFAULT_PCAP_SIZE = 32 << 20
MIN_PCAP_SIZE = 4096


class UsageError(Exception):
    """A command-line mistake; str() is the one sentence shown to the user."""


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        print(f"vhostnet: {self.help_sentence.format(option=option_string)}", file=sys.stderr)
        sys.exit(2)

    help_sentence = ""


class _PrintCapabilities(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        print(CAPABILITIES)
        sys.exit(0)


def refused_sentence(option: str) -> str | None:
    """The sentence printed for a refused option, or None when the option is accepted."""
    for names, sentence in REFUSED.items():
        if option in names:
            return sentence.format(option=option)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostnet", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    group = p.add_argument_group("front-end (passt mode)")
    group.add_argument("-s", "--socket", "--socket-path", metavar="PATH", default=None,
                       help="UNIX socket to listen on (default: /tmp/vhostnet_N.socket, "
                            "the first free N, printed at start)")
    group.add_argument("-F", "--fd", metavar="FD", type=int, default=None,
                       help="serve this already connected UNIX socket instead (QEMU's "
                            "-netdev passt passes --fd 3); implies --one-off")
    group.add_argument("-1", "--one-off", action="store_true",
                       help="exit when the front-end goes away")
    group.add_argument("--vhost-user", action="store_true",
                       help="speak vhost-user only on the socket (as passt --vhost-user)")
    group.add_argument("--print-capabilities", nargs=0, action=_PrintCapabilities,
                       help="print the vhost-user back-end capabilities (JSON) and exit")
    group.add_argument("--repair-path", metavar="PATH|none", default=None,
                       help="UNIX socket where a TCP_REPAIR helper run with CAP_NET_ADMIN "
                            "(passt-repair PATH, or vhostnet repair PATH) connects for a "
                            "migration (default: SOCKET.repair, as passt; 'none': no such socket)")

    group = p.add_argument_group("process (as passt)")
    group.add_argument("-f", "--foreground", action="store_true",
                       help="do not fork into the background; log to stderr")
    group.add_argument("-P", "--pid", metavar="FILE", default=None,
                       help="write the process id to FILE (removed at exit)")
    group.add_argument("-l", "--log-file", metavar="PATH", default=None,
                       help="log to PATH (truncated at start)")
    group.add_argument("--log-size", metavar="SIZE", default=None,
                       help="log file size limit in bytes, K/M/G suffixes allowed (default 1M); "
                            "when full, the oldest 30%% of the file is dropped, as passt does")
    group.add_argument("-p", "--pcap", metavar="FILE", default=None,
                       help="capture every frame both ways to FILE (pcap, nanosecond "
                            "timestamps), without ever holding up the data path")
    group.add_argument("--pcap-size", metavar="SIZE", default=None,
                       help="stop the capture once FILE reaches SIZE bytes, K/M/G suffixes "
                            "allowed (default 32M); the file keeps the start of the session")
    group.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    group.add_argument("-d", "--debug", action="store_true", help="log every protocol message")
    group.add_argument("--trace", action="store_true", help="the same as --debug")
    group.add_argument("-e", "--stderr", action="store_true",
                       help="accepted for passt compatibility (a no-op, as in passt)")
    group.add_argument("--stats", metavar="DELAY", type=int, default=None,
                       help="log the counters every DELAY seconds")
    group.add_argument("--runas", metavar="UID[:GID]", default=None,
                       help="switch to this user (and group), by number or name, once the "
                            "sockets are open (default when started as root: nobody)")
    group.add_argument("--keep-cap-net-admin", action="store_true",
                       help="keep CAP_NET_ADMIN (and only it) after dropping root, so that "
                            "TCP connections migrate with TCP_REPAIR without a helper; passt "
                            "never keeps it (default: keep no capability)")
    group.add_argument("--version", action="version", version=f"vhostnet {__version__}")

    group = p.add_argument_group("the guest's network (passt's options)")
    group.add_argument("-m", "--mtu", metavar="MTU", type=int, default=1500,
                       help="MTU given to the guest, 576 to 65520 (default 1500; "
                            "0: do not tell the guest, as passt)")
    group.add_argument("-a", "--address", metavar="ADDR[/PREFIX]", action="append", default=[],
                       help="guest address given by DHCP, one per family (default 10.0.2.15)")
    group.add_argument("-n", "--netmask", metavar="MASK", default=None,
                       help="IPv4 netmask, dotted or prefix length (default 255.255.255.0)")
    group.add_argument("-M", "--mac-addr", metavar="MAC", default=None,
                       help="vhostnet's own (the gateway's) MAC address (default 52:56:00:00:00:02)")
    group.add_argument("-g", "--gateway", metavar="ADDR", action="append", default=[],
                       help="gateway address, one per family (default 10.0.2.2)")
    group.add_argument("-i", "--interface", metavar="NAME", default=None,
                       help="host interface (checked; vhostnet does not copy host addresses, "
                            "its defaults are QEMU's)")
    group.add_argument("-o", "--outbound", metavar="ADDR", action="append", default=[],
                       help="source address of outbound connections, one per family")
    group.add_argument("--outbound-if4", metavar="NAME", default=None,
                       help="host interface for outbound IPv4 traffic")
    group.add_argument("--outbound-if6", metavar="NAME", default=None,
                       help="host interface for outbound IPv6 traffic")
    group.add_argument("-D", "--dns", metavar="ADDR|none", action="append", default=[],
                       help="DNS server offered by DHCP; repeatable; 'none': offer none "
                            "(default: the DNS forwarder address, 10.0.2.3)")
    group.add_argument("--dns-forward", metavar="ADDR", action="append", default=[],
                       help="the guest-side DNS forwarder address, one per family "
                            "(default 10.0.2.3); queries to it go to --dns-host")
    group.add_argument("--dns-host", metavar="ADDR", action="append", default=[],
                       help="host-side resolver queries to --dns-forward go to, one per family "
                            "(default: the nameservers of /etc/resolv.conf)")
    group.add_argument("-S", "--search", metavar="LIST|none", action="append", default=[],
                       help="DNS search domains given by DHCP (space-separated); repeatable")
    group.add_argument("--no-dhcp-dns", action="store_true", help="offer no DNS server by DHCP")
    group.add_argument("--dhcp-dns", action="store_false", dest="no_dhcp_dns",
                       help="offer DNS servers by DHCP (the default)")
    group.add_argument("--no-dhcp-search", action="store_true",
                       help="offer no search domains by DHCP")
    group.add_argument("--dhcp-search", action="store_false", dest="no_dhcp_search",
                       help="offer search domains by DHCP (the default)")
    group.add_argument("--no-tcp", action="store_true", help="do not translate TCP")
    group.add_argument("--no-udp", action="store_true", help="do not translate UDP")
    group.add_argument("--no-icmp", action="store_true", help="do not forward or answer ICMP echo")
    group.add_argument("--no-dhcp", action="store_true", help="do not answer DHCP")
    group.add_argument("--no-ndp", action="store_true", help="do not answer NDP (IPv6)")
    group.add_argument("--no-dhcpv6", action="store_true", help="do not answer DHCPv6 (IPv6)")
    group.add_argument("--no-ra", action="store_true",
                       help="send no router advertisements (IPv6)")
    group.add_argument("--freebind", action="store_true",
                       help="bind forwarded ports on addresses the host does not have (yet)")
    group.add_argument("--map-host-loopback", metavar="ADDR|none", action="append", default=[],
                       help="guest-side address that reaches the host's loopback, one per family "
                            "(default: the gateway); 'none' turns the mapping off")
    group.add_argument("--no-map-gw", action="store_true",
                       help="the same as --map-host-loopback none")
    group.add_argument("--map-guest-addr", metavar="ADDR|none", action="append", default=[],
                       help="guest-side address that reaches the guest's own address on the host")
    group.add_argument("-4", "--ipv4-only", action="store_true", help="IPv4 only")
    group.add_argument("-6", "--ipv6-only", action="store_true", help="IPv6 only")
    group.add_argument("-H", "--hostname", metavar="NAME", default=None,
                       help="host name given to the guest by DHCP (option 12)")
    group.add_argument("--fqdn", metavar="NAME", default=None,
                       help="fully qualified name given to the guest by DHCP (option 81)")
    group.add_argument("-t", "--tcp-ports", metavar="SPEC", action="append", default=[],
                       help="forward host TCP ports into the guest (see below); repeatable")
    group.add_argument("-u", "--udp-ports", metavar="SPEC", action="append", default=[],
                       help="forward host UDP ports into the guest (see below); repeatable")

    group = p.add_argument_group("vhostnet's own")
    group.add_argument("--dns-upstream", metavar="ADDR[:PORT]", action="append", default=None,
                       help="resolvers the DNS forwarder asks, after --dns-host; repeatable")
    group.add_argument("--tftp", metavar="DIR", default=None,
                       help="serve this folder read-only by TFTP on the gateway address")
    group.add_argument("--bootfile", metavar="NAME", default=None,
                       help="boot file offered by DHCP for PXE (needs --tftp)")
    group.add_argument("--bootfile-ipxe", metavar="NAME", default=None,
                       help="boot file offered instead when the DHCP client is iPXE")
    group.add_argument("--lease-time", metavar="SECONDS", type=int, default=86400,
                       help="DHCP lease time offered to the guest (default 86400, one day)")
    group.add_argument("--flow-limit", metavar="N", type=int, default=None,
                       help="most UDP (and ICMP) flows open at once (default: what the fd limit, "
                            "raised to its hard value at start, can hold; at most 65536)")
    group.add_argument("--queues", metavar="N", type=int, default=1,
                       help="queue pairs the vhost-user device offers (multiqueue; default 1, "
                            "at most the number of CPUs); start QEMU with queues=N on the "
                            "netdev and mq=on,vectors=2N+2 on the device")
    group.add_argument("--control", metavar="PATH", default=None,
                       help="UNIX socket for run-time control: JSON lines, "
                            "e.g. {\"command\": \"stats\"}")
    group.add_argument("--incoming", action="store_true",
                       help="migration destination on the same host: forwarded ports the source "
                            "still holds are bound as soon as it releases them")
    group.add_argument("--state-file", metavar="PATH", default=None,
                       help="on SIGTERM, freeze the TCP connections and save the whole network "
                            "state here; started again with it, restore it and carry on "
                            "(the guest reconnects through QEMU's reconnect-ms)")
    add_guest_options(p)
    add("--discard-tx", action="store_true", help=argparse.SUPPRESS)  # for `vhostnet bench`
    # For the soak benchmark: UDP flows expire after this many idle seconds (default 180).
    add("--udp-idle-timeout", metavar="SECONDS", type=float, default=None, help=argparse.SUPPRESS)

    for names, sentence in REFUSED.items():
        action = p.add_argument(*names, action=_Refuse, help=argparse.SUPPRESS,
                                nargs="?" if names[0] in REFUSED_WITH_VALUE else 0,
                                dest=f"refused_{names[-1].lstrip('-').replace('-', '_')}")
        action.help_sentence = sentence
    return p


# --- checks and conversions --------------------------------------------------------


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


def _forwards(specs: list[str], ephemeral: range, what: str):  # -> list[PortForward]
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


def config_from_args(args: argparse.Namespace, fd_limit: int, reserve: int,
                     flow_limit_for):  # -> tuple[StackConfig, list[str]]
    """Turn parsed options into the stack's configuration, checking each one.

    Returns the configuration and warnings to log. ``flow_limit_for(fds)``: the flows
    that ``fds`` descriptors hold (the default flow limit).
    """
    from vhostnet.stack.config import StackConfig, ip4, ip6

    warnings: list[str] = []
    socket_source(args)
    if args.ipv4_only and args.ipv6_only:
        raise UsageError("-4 and -6 exclude each other")
    if args.mtu != 0 and not 576 <= args.mtu <= 65520:
        raise UsageError(f"MTU {args.mtu} is outside 576..65520 (or 0: do not assign)")
    if not 60 <= args.lease_time < 0xFFFFFFFF:
        raise UsageError(f"--lease-time {args.lease_time} is outside 60..4294967294 seconds")
    if args.bootfile and not args.tftp:
        raise UsageError("--bootfile needs --tftp DIR to serve the file from")
    if args.tftp and not os.path.isdir(args.tftp):
        raise UsageError(f"TFTP folder {args.tftp} does not exist or is not a folder")
    from vhostnet.device import MAX_QUEUE_PAIRS

    cpus = os.cpu_count() or 1
    if not 1 <= args.queues <= min(cpus, MAX_QUEUE_PAIRS):
        raise UsageError(f"--queues {args.queues} is outside 1..{min(cpus, MAX_QUEUE_PAIRS)} "
                         f"(this machine has {cpus} CPUs)")
    if args.stats is not None and args.stats < 1:
        raise UsageError("--stats needs a delay of at least 1 second")
    args.log_size = byte_size(args.log_size, "--log-size", DEFAULT_LOG_SIZE, MIN_LOG_SIZE)
    args.pcap_size = byte_size(args.pcap_size, "--pcap-size", DEFAULT_PCAP_SIZE, MIN_PCAP_SIZE)

    address4 = address6 = None
    prefix4 = prefix6 = None
    for text in args.address:
        head, slash, prefix = text.partition("/")
        address = ip_address(head, "-a/--address")
        if slash:
            try:
                prefix = int(prefix)
                ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            except ValueError:
                raise UsageError(f"prefix length in -a {text!r} is out of range") from None
        if (address4 if address.version == 4 else address6) not in (None, str(address)):
            raise UsageError(f"-a/--address is given twice for IPv{address.version}; passt takes "
                             "one address per family")
        if address.version == 4:
            address4, prefix4 = str(address), prefix if slash else prefix4
        else:
            address6, prefix6 = str(address), prefix if slash else prefix6
    gateway4, gateway6 = per_family(args.gateway, "-g/--gateway")
    outbound4, outbound6 = per_family(args.outbound, "-o/--outbound")
    forward4, forward6 = per_family(args.dns_forward, "--dns-forward")
    host4, host6 = per_family(args.dns_host, "--dns-host")
    if args.no_map_gw:
        args.map_host_loopback.append("none")
    loopback4, loopback6 = per_family(args.map_host_loopback, "--map-host-loopback", True)
    guest_addr4, guest_addr6 = per_family(args.map_guest_addr, "--map-guest-addr", True)
    # Per family: None (offer the forwarder's address), or the -D list ([] for none).
    dns4: list[str] | None = None
    dns6: list[str] | None = None
    for text in args.dns:
        if text == "none":
            dns4, dns6 = [], []
            continue
        address = ip_address(text, "-D/--dns")
        if address.version == 4:
            dns4 = [*(dns4 or []), str(address)]
        else:
            dns6 = [*(dns6 or []), str(address)]
    if args.no_dhcp_dns:
        dns4, dns6 = [], []
    search = [] if args.no_dhcp_search else [
        domain for text in args.search if text != "none" for domain in text.replace(",", " ").split()]

    ephemeral = ephemeral_ports()
    tcp = _forwards(args.tcp_ports, ephemeral, "-t/--tcp-ports")
    udp = _forwards(args.udp_ports, ephemeral, "-u/--udp-ports")
    # Several guests: ``:toaddr/`` may name another guest's IPv4 address (its Network is
    # made at start, guests.py checks the address is in the subnet).
    several = str(args.max_guests) != "1"
    for forward in tcp + udp:
        own = (None, address4 or "10.0.2.15", address6)
        if forward.guest_addr not in own and not (several and "." in forward.guest_addr):
            raise UsageError(f"port {forward.host_port} goes to {forward.guest_addr}, which is not "
                             "the guest's address (vhostnet's guest has one per family)")
        interface(forward.host_if, "port forwarding")
    tcp, udp, warning = fit_forwards(tcp, udp, fd_limit, reserve)
    if warning:
        warnings.append(warning)
    listeners = len(tcp) + len(udp)
    fitting = flow_limit_for(fd_limit - listeners)
    if args.flow_limit is None:
        args.flow_limit = fitting
    elif args.flow_limit < 1:
        raise UsageError("--flow-limit must be at least 1")
    elif args.flow_limit > fitting:
        warnings.append(f"--flow-limit {args.flow_limit} is more than the fd limit ({fd_limit}) "
                        f"can hold; flows beyond about {fitting} will fail to open")

    upstreams = [(host, 53) for host in (host4, host6) if host]
    if args.dns_upstream:
        upstreams += [upstream(x) for x in args.dns_upstream]
    elif not upstreams:
        upstreams = resolv_conf_nameservers()
    netmask4 = netmask(args.netmask) if args.netmask else (
        netmask(str(prefix4)) if prefix4 is not None else "255.255.255.0")
    kwargs = dict(
        guest_ipv4=ip4(address4 or "10.0.2.15"),
        netmask=ip4(netmask4),
        gateway=ip4(gateway4 or "10.0.2.2"),
        dns=ip4(forward4 or "10.0.2.3"),
        dhcp_dns=None if dns4 is None else [ip4(x) for x in dns4],
        mtu=args.mtu or 1500,
        assign_mtu=args.mtu != 0,
        map_host_loopback="gateway" if loopback4 is None else (
            None if loopback4 == "none" else ip4(loopback4)),
        map_guest_addr=None if guest_addr4 in (None, "none") else ip4(guest_addr4),
        dhcp=not args.no_dhcp,
        icmp=not args.no_icmp,
        tcp=not args.no_tcp,
        udp=not args.no_udp,
        hostname=args.hostname,
        fqdn=args.fqdn,
        search_domains=search,
        dns_upstream=upstreams,
        tcp_forwards=tcp,
        udp_forwards=udp,
        tftp_root=os.path.abspath(args.tftp) if args.tftp else None,
        bootfile=args.bootfile,
        bootfile_ipxe=args.bootfile_ipxe,
        flow_limit=args.flow_limit,
        lease_time=args.lease_time,
        outbound_ipv4=ip4(outbound4) if outbound4 else None,
        outbound_if4=interface(args.outbound_if4, "--outbound-if4"),
        interface=interface(args.interface, "-i/--interface"),
        freebind=args.freebind,
        ipv4=not args.ipv6_only,
        ipv6=not args.ipv4_only,
        ndp=not args.no_ndp,
        ra=not args.no_ra,
        dhcpv6=not args.no_dhcpv6,
        dhcp_dns6=None if dns6 is None else [ip6(x) for x in dns6],
        outbound_ipv6=ip6(outbound6) if outbound6 else None,
        outbound_if6=interface(args.outbound_if6, "--outbound-if6"),
        map_guest_addr6=None if guest_addr6 in (None, "none") else ip6(guest_addr6),
        map_host_loopback6="gateway" if loopback6 is None else (
            None if loopback6 == "none" else ip6(loopback6)),
    )
    if address6 is not None:
        # The address DHCPv6 gives; its prefix (/64 unless given) is the one RA advertises.
        kwargs.update(guest_ipv6=ip6(address6), prefix6=ip6(address6),
                      prefix6_len=64 if prefix6 is None else prefix6)
    if gateway6 is not None:
        kwargs["gateway6"] = ip6(gateway6)
    if forward6 is not None:
        kwargs["dns6"] = ip6(forward6)
    if args.mac_addr:
        kwargs["gateway_mac"] = mac(args.mac_addr)
    if args.udp_idle_timeout is not None:
        kwargs["udp_idle_timeout"] = args.udp_idle_timeout
    try:
        kwargs.update(guest_config(args))
        config = StackConfig(**kwargs)
        check_lease_pool(config)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return config, warnings
