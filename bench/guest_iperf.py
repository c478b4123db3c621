"""``python -m bench --guest``: iperf3 in a real TCG guest through vhostnet, against iperf3 over loopback.

One iperf3 server runs on the host's 127.0.0.1 (the kit's own iperf3, run
through its own loader, so both ends and the baseline use the same binary).
The baseline is that iperf3 as a client over host loopback; then a QEMU
guest booted with the kit's kernel and the iperf3 archive reaches the same
server through vhostnet at the gateway address (vhostnet maps it to the
host's 127.0.0.1) and runs, every round of every direction in one boot:
TCP guest->host, TCP host->guest (``-R``), the same two over IPv6 (a second
iperf3 server on ::1, reached at the gateway fec0::2 once the guest has its SLAAC
address; the rows name ``tcp6`` and note their ratio to the IPv4 row, ``vs_ipv4``),
UDP both ways at a fixed offered rate. The guest boots once per MTU in
``GuestSettings.mtus`` (``--guest-mtu``; the back-end gets the same ``-m``, the guest's
link is set to it and checked), rows past 1500 named ``CASE-mtuN``. Figures come from iperf3's JSON (``-J``) printed on the serial console
between marker lines; vhostnet's counters are recorded beside them as a
cross-check (every byte iperf3 moved must have passed through vhostnet).

The guest kit (kernel, QEMU 10.0, iperf3) must already be in the cache:
``make kit`` builds it outside the private namespace, where downloads work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.output import Progress, Row
from bench.runner import Backend, BenchError, Usage, stop_process

GUEST_CASE = "guest"
QEMU_VERSIONS = ("10.0", "7.2")
GUEST_ADDRESS = "10.0.2.15/24"
GATEWAY = "10.0.2.2"  # vhostnet maps it to the host's 127.0.0.1
HOST_LOOPBACK = {False: "127.0.0.1", True: "::1"}  # by Direction.ipv6
# The guest's link MTU, the back-end's -m too: 1500, and passt's default 65520 (the
# setting issue 14 compared at). Rows at another MTU than the first carry "-mtuN".
GUEST_MTUS = (1500, 65520)
MTU_SUFFIX = re.compile(r"^(.*?)(?:-mtu(\d+))?$")
# One datagram per 1500-byte frame, on loopback too, so the baseline compares; the same
# length at every MTU, so the UDP rows measure the same per-datagram work at each.
UDP_LENGTH = 1400
# Lowest: a UDP datagram in one IPv4 packet (no fragments, which passt drops); highest: passt's.
MTU_LIMITS = (UDP_LENGTH + 8 + 20, 65520)
UDP_RATE_PATTERN = re.compile(r"^\d+(\.\d+)?[KMG]?$")
BOOT_TIMEOUT = 180.0  # TCG boot is ~10 s; a loaded 2-core machine needs far more room
# iperf3's words when its server is between two tests: not listening yet, or still
# ending the previous test (seen with 1-second runs back to back on loopback).
REFUSED_MESSAGES = ("unable to connect to server", "the server is busy")
RUN_SLACK = 45.0  # per iperf3 run beyond its -t: connection setup and teardown under TCG
SERVER_START_TIMEOUT = 10.0
# iperf3's server closes its listening socket after each test and opens it again
# (iperf_run_server), so a client that follows another at once may be refused.
# Such a run is tried again, a bounded number of times.
CONNECT_ATTEMPTS = 3
REFUSED_PAUSE = 1.0
POLL_INTERVAL = 0.25

GUEST_MTU_RESULT = re.compile(r"^RESULT mtu=(\d*)\s*$", re.MULTILINE)
RUN_BEGIN = re.compile(r"^IPERF-BEGIN (\S+) (\d+)$", re.MULTILINE)
# The guest's own counters before and after each run (``guest_stat_lines``): the UDP receive
# path's (/proc/net/snmp), eth0's receive (/proc/net/dev), virtio-net's RX interrupts and the
# guest's CPU time, busy and all (/proc/stat, in ticks; reported as ``guest_cpu_pct``: near
# 100 the guest's own CPU, not the back-end, is what limits the row).
GUEST_STAT = re.compile(r"^GSTAT (\S+) (\d+) (before|after) ((?:\d+ ?){8})$", re.MULTILINE)
GUEST_STAT_NAMES = ("guest_udp_in", "guest_udp_in_errors", "guest_udp_rcvbuf_errors",
                    "guest_eth_rx", "guest_eth_rx_dropped", "guest_rx_irqs",
                    "guest_cpu_busy", "guest_cpu_all")
RUN_JSON = re.compile(r"^IPERF-JSON-BEGIN (\S+) (\d+) rc=(\d+)\n(.*?)^IPERF-JSON-END$",
                      re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Direction:
    """One iperf3 test: the table's case name, which way data flows, the counter that sees it."""

    case: str
    udp: bool
    reverse: bool  # -R: the host sends, the guest receives
    counter: str  # vhostnet counter of the data direction (bytes for TCP, datagrams for UDP)
    ipv6: bool = False  # iperf3 -6 to the gateway's IPv6 address (the host's ::1)


DIRECTIONS = (
    Direction("guest-tcp-tx", udp=False, reverse=False, counter="tcp.bytes_to_host"),
    Direction("guest-tcp-rx", udp=False, reverse=True, counter="tcp.bytes_to_guest"),
    Direction("guest-tcp6-tx", udp=False, reverse=False, counter="tcp.bytes_to_host", ipv6=True),
    Direction("guest-tcp6-rx", udp=False, reverse=True, counter="tcp.bytes_to_guest", ipv6=True),
    Direction("guest-udp-tx", udp=True, reverse=False, counter="udp.tx_host"),
    Direction("guest-udp-rx", udp=True, reverse=True, counter="udp.rx_host"),
)


@dataclass
class GuestSettings:
    rounds: int = 3
    seconds: int = 3  # iperf3 -t takes whole seconds
    qemu: str = "10.0"
    udp_rate: str = "1G"
    progress: Progress = field(default_factory=Progress)
    # Also boot the guest with -netdev stream (virtio-net, no offloads) on the same
    # back-end socket: rows named "<back-end>-stream".
    stream: bool = False
    # Only the -netdev stream boot (--guest-stream-only): no vhost-user guest rows.
    stream_only: bool = False
    # Every guest row at each of these MTUs (guest link and back-end's -m), one boot each.
    mtus: tuple[int, ...] = GUEST_MTUS[:1]
    # --guest-cases: the directions run (``select_directions``); all of them by default.
    directions: tuple[Direction, ...] = DIRECTIONS


def select_directions(text: str) -> tuple[Direction, ...]:
    """``--guest-cases`` (e.g. ``udp`` or ``guest-udp-rx,tcp-tx``): the directions whose case
    name is a word of the list, with or without its ``guest-`` prefix, or holds one as a
    dash-separated part (``udp``, ``rx``, ``tcp6``); BenchError when a word matches none."""
    words = [word.strip() for word in text.split(",") if word.strip()]

    def named(direction: Direction, word: str) -> bool:
        name = direction.case.removeprefix("guest-")
        return word in (direction.case, name) or word in name.split("-")

    if not words or any(not any(named(d, word) for d in DIRECTIONS) for word in words):
        raise BenchError(f"--guest-cases {text!r} names no guest case (known: "
                         f"{', '.join(d.case for d in DIRECTIONS)}, or a part like udp, rx)")
    return tuple(d for d in DIRECTIONS if any(named(d, word) for word in words))


def row_case(direction: Direction, mtu: int) -> str:
    """The table's name for ``direction`` at ``mtu``: the bare name at 1500 (as rows were
    named before the MTU was a setting, so old JSON compares), ``NAME-mtuN`` otherwise."""
    return direction.case if mtu == GUEST_MTUS[0] else f"{direction.case}-mtu{mtu}"


def parse_mtus(text: str) -> tuple[int, ...]:
    """``--guest-mtu`` (e.g. ``1500,65520``) as MTUs in the order given; BenchError otherwise."""
    try:
        mtus = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        mtus = ()
    low, high = MTU_LIMITS
    if not mtus or not all(low <= mtu <= high for mtu in mtus):
        raise BenchError(f"--guest-mtu {text!r} is not a list of MTUs {low}..{high} like 1500,65520")
    return mtus


@dataclass(frozen=True)
class IperfResult:
    """What the receiving end of one iperf3 run saw."""

    bits_per_second: float
    bytes: int
    datagrams: int | None = None  # UDP: datagrams that arrived
    lost_percent: float | None = None  # UDP

    @property
    def mbit_s(self) -> float:
        return self.bits_per_second / 1e6


def check_udp_rate(rate: str) -> str:
    """The rate as iperf3's -b takes it (e.g. 500M); BenchError otherwise."""
    if not UDP_RATE_PATTERN.match(rate):
        raise BenchError(f"--guest-udp-rate {rate!r} is not a rate like 200M or 1G")
    return rate


def iperf_client_args(direction: Direction, seconds: int, udp_rate: str) -> list[str]:
    """iperf3 client options after ``-c HOST -p PORT`` for one run of ``direction``."""
    args = ["-t", str(seconds), "-J", "-i", "0", "-6" if direction.ipv6 else "-4"]
    if direction.udp:
        args += ["-u", "-b", udp_rate, "-l", str(UDP_LENGTH)]
    if direction.reverse:
        args.append("-R")
    return args


def parse_iperf_json(text: str, udp: bool) -> IperfResult:
    """The receiver's figures from iperf3 ``-J`` output; BenchError for an error report."""
    try:
        data = json.loads(text)
    except ValueError:
        raise BenchError(f"iperf3 printed something that is not JSON: {text[:120]!r}") from None
    if data.get("error"):
        raise BenchError(f"iperf3 failed: {data['error']}")
    try:
        received = data["end"]["sum_received"]
        if udp:
            arrived = int(received["packets"]) - int(received["lost_packets"])
            return IperfResult(float(received["bits_per_second"]), int(received["bytes"]),
                               arrived, float(received["lost_percent"]))
        return IperfResult(float(received["bits_per_second"]), int(received["bytes"]))
    except (KeyError, TypeError, ValueError):
        raise BenchError("iperf3's JSON has no end.sum_received figures") from None


# --- the host side ---------------------------------------------------------------


def proc_net_address(host: str, port: int) -> str:
    """``host:port`` as /proc/net/tcp and tcp6 print a local address: each 32-bit word of
    the address in the host's (little-endian) order, in hex, then the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    words = "".join(packed[i:i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"


def _listening(host: str, port: int) -> bool:
    """True once a TCP socket listens on host:port in this namespace (/proc/net/tcp{,6})."""
    wanted = proc_net_address(host, port)
    table = "tcp6" if ":" in host else "tcp"
    try:
        lines = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in lines)


def _refused(iperf_output: str) -> bool:
    """iperf3 -J reported that the server refused the connection (see CONNECT_ATTEMPTS)."""
    return any(message in iperf_output for message in REFUSED_MESSAGES)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class HostIperf:
    """An iperf3 server on the host's loopback (127.0.0.1, or ::1 for the IPv6 rows; one test
    at a time, as iperf3 serves) and loopback clients."""

    def __init__(self, command: list[str], log_path: Path, host: str = HOST_LOOPBACK[False]):
        self.command = command
        self.host = host
        self.port = _free_port(host)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([*command, "-s", "-B", host, "-p", str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _listening(host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BenchError(f"the host iperf3 server did not start (log: {log_path})")
            time.sleep(0.05)

    def loopback(self, direction: Direction, s: GuestSettings) -> IperfResult:
        argv = [*self.command, "-c", self.host, "-p", str(self.port),
                *iperf_client_args(direction, s.seconds, s.udp_rate)]
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            self._wait_listening()
            try:
                done = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=s.seconds + RUN_SLACK)
            except subprocess.TimeoutExpired:
                raise BenchError(f"the loopback iperf3 run {direction.case} did not end") from None
            if attempt == CONNECT_ATTEMPTS or not _refused(done.stdout):
                break
            time.sleep(REFUSED_PAUSE)
        return parse_iperf_json(done.stdout, direction.udp)

    def _wait_listening(self) -> None:
        """Until the server listens again after the previous test (bounded)."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _listening(self.host, self.port) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the host iperf3 server exited (log: {self.log_path})")
            time.sleep(0.05)

    def close(self) -> None:
        stop_process(self.proc)


class HostIperfs:
    """The host's two iperf3 servers, on 127.0.0.1 and on ::1: each direction runs against the
    one of its family, in the guest and for its loopback baseline."""

    def __init__(self, command: list[str], workdir: Path, name: str) -> None:
        self.by_family: dict[bool, HostIperf] = {}
        try:
            for ipv6, host in HOST_LOOPBACK.items():
                log = workdir / f"iperf3-server{'6' if ipv6 else ''}-{name}.log"
                self.by_family[ipv6] = HostIperf(command, log, host)
        except BenchError:
            self.close()
            raise

    def serving(self, direction: Direction) -> HostIperf:
        return self.by_family[direction.ipv6]

    def close(self) -> None:
        for server in self.by_family.values():
            server.close()


# --- the guest -------------------------------------------------------------------


def guest_script(ports: dict[bool, int], s: GuestSettings, mtu: int = GUEST_MTUS[0]) -> str:
    """/test.sh: the link at ``mtu`` (the script ends there if the driver refuses it), a
    static IPv4 address and the wait for the SLAAC one, then every round of every direction
    (against ``ports[direction.ipv6]``), JSON between markers."""
    from tools.guest_ipv6 import GATEWAY6, WAIT_FOR_SLAAC

    lines = [
        # No VIRTIO_NET_F_MTU (QEMU offers it only with host_mtu=): set by hand, as a
        # guest of passt does from its DHCP or RA; virtio-net allows up to 65535.
        f"ip link set eth0 mtu {mtu}",
        "ip link set eth0 up",
        'echo "RESULT mtu=$(cat /sys/class/net/eth0/mtu)"',
        f'[ "$(cat /sys/class/net/eth0/mtu)" = {mtu} ] || exit 1',
        f"ip addr add {GUEST_ADDRESS} dev eth0",
        f"ip route add default via {GATEWAY} dev eth0",
        WAIT_FOR_SLAAC.strip(),
        GUEST_STAT_FUNCTION,
    ]
    refused = " ".join(f"-e '{message}'" for message in REFUSED_MESSAGES)
    for direction in s.directions:
        args = " ".join(iperf_client_args(direction, s.seconds, s.udp_rate))
        target, port = (GATEWAY6 if direction.ipv6 else GATEWAY), ports[direction.ipv6]
        for index in range(1, s.rounds + 1):
            tag = f"{direction.case} {index}"
            lines += [
                f"echo 'IPERF-BEGIN {tag}'",
                f"gstat {tag} before",
                # timeout: a run that hangs must not hold the guest forever; a refused
                # one (the server between two tests) is tried again (CONNECT_ATTEMPTS).
                f"for attempt in {' '.join(str(n) for n in range(1, CONNECT_ATTEMPTS + 1))}; do",
                f"  timeout {s.seconds + int(RUN_SLACK)} iperf3 -c {target} -p {port} "
                f"--connect-timeout 10000 {args} > /tmp/iperf.json 2> /tmp/iperf.err",
                "  rc=$?",
                f"  grep -q {refused} /tmp/iperf.json || break",
                f"  sleep {int(REFUSED_PAUSE)}",
                "done",
                f"gstat {tag} after",
                f"echo \"IPERF-JSON-BEGIN {tag} rc=$rc\"",
                "cat /tmp/iperf.json /tmp/iperf.err",
                "echo IPERF-JSON-END",
            ]
    return "\n".join(lines) + "\n"


# gstat CASE ROUND before|after: one GSTAT line of the counters GUEST_STAT_NAMES names, in
# that order (busybox awk; a counter the guest lacks prints 0).
GUEST_STAT_FUNCTION = """gstat() {
  echo "GSTAT $1 $2 $3 $(awk '/^Udp:/ { if (seen++) print $2, $4, $6 }' /proc/net/snmp) \\
$(awk '/eth0:/ { sub(/.*eth0:/, ""); print $2, $4 }' /proc/net/dev) \\
$(awk '/virtio.*input/ { s += $2 } END { print s + 0 }' /proc/interrupts) \\
$(awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)"
}"""


def parse_guest_stats(text: str, case: str, rounds: int) -> dict[str, float]:
    """What the guest's counters (GUEST_STAT_NAMES) grew by over ``case``'s first ``rounds``
    runs, summed, with the CPU ticks as ``guest_cpu_pct`` (busy over all); {} when a run
    lacks its two GSTAT lines (an older script, a lost line)."""
    seen = {(m.group(1), int(m.group(2)), m.group(3)): [int(v) for v in m.group(4).split()]
            for m in GUEST_STAT.finditer(text)}
    totals = dict.fromkeys(GUEST_STAT_NAMES, 0)
    for index in range(1, rounds + 1):
        before, after = seen.get((case, index, "before")), seen.get((case, index, "after"))
        if before is None or after is None:
            return {}
        for name, old, new in zip(GUEST_STAT_NAMES, before, after, strict=True):
            totals[name] += new - old
    busy, ticks = totals.pop("guest_cpu_busy"), totals.pop("guest_cpu_all")
    result: dict[str, float] = dict(totals)
    if ticks > 0:
        result["guest_cpu_pct"] = round(100 * busy / ticks, 1)
    return result


def host_udp_counters() -> dict[str, int]:
    """This namespace's UDP receive-buffer drops (/proc/net/snmp), {} if unreadable."""
    try:
        lines = [line.split() for line in Path("/proc/self/net/snmp").read_text().splitlines()
                 if line.startswith("Udp:")]
        return {"host.udp.rcvbuf_errors": int(dict(zip(lines[0], lines[1], strict=True))
                                               ["RcvbufErrors"])}
    except (OSError, IndexError, KeyError, ValueError):
        return {}


def check_guest_mtu(text: str, mtu: int, console: Path) -> None:
    """BenchError unless the guest's console says its link ran at ``mtu``."""
    found = GUEST_MTU_RESULT.search(text)
    if found is None or found.group(1) != str(mtu):
        seen = (found.group(1) if found is not None else "") or "unknown"
        raise BenchError(f"the guest's link MTU is {seen}, not {mtu} "
                         f"(console: {console})")


def parse_guest_output(text: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(case, round) -> (iperf3 exit status, its output) for every run the console shows."""
    return {(m.group(1), int(m.group(2))): (int(m.group(3)), m.group(4))
            for m in RUN_JSON.finditer(text)}


@dataclass
class GuestKits:
    """The kernel/QEMU kit with the iperf3 archive appended to its initrd, and the host iperf3 argv."""

    kit: Any  # tools.guestkit.Kit, initramfs replaced by base + iperf3 archive
    host_iperf: list[str]
    workdir: Path

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def load_kits(qemu: str) -> GuestKits:
    """The cached guest kit plus iperf3; BenchError with what to run when it is not there."""
    try:
        from tools.guestkit import KitError, build_kit
        from tools.guestkit_iperf import build_iperf_kit
    except ImportError:
        raise BenchError("--guest needs the tools/ folder of a vhostnet source tree: "
                         "run it from the clone's top folder") from None
    try:
        kit = build_kit(want_qemu10=qemu == "10.0")
        iperf = build_iperf_kit()
    except (KitError, OSError, subprocess.SubprocessError) as error:
        raise BenchError(f"the guest kit is not ready ({str(error).strip().splitlines()[-1]}); "
                         "run `make kit` outside the namespace first") from None
    if qemu == "10.0" and kit.qemu10 is None:
        raise BenchError(f"QEMU 10.0 is unavailable ({kit.qemu10_reason}); try --qemu 7.2")
    workdir = Path(tempfile.mkdtemp(prefix="vhn-iperf-", dir="/tmp"))
    initrd = workdir / "initrd-iperf3.cpio"
    initrd.write_bytes(kit.initramfs.read_bytes() + iperf.archive.read_bytes())
    return GuestKits(dataclasses.replace(kit, initramfs=initrd), iperf.host_command(), workdir)


@dataclass
class GuestBaselines:
    """Loopback figures per direction, measured once per run and shared by every back-end."""

    results: dict[str, list[IperfResult]] = field(default_factory=dict)
    # 0: as many as the guest's rounds (a comparison boots the guest once per round)
    rounds: int = 0

    def measure(self, servers: HostIperfs, s: GuestSettings) -> None:
        rounds = self.rounds or s.rounds
        for direction in s.directions:
            if direction.case in self.results:
                continue
            found = []
            for index in range(1, rounds + 1):
                s.progress.update(f"baseline iperf3 {direction.case}: round {index}/{rounds}")
                found.append(servers.serving(direction).loopback(direction, s))
            self.results[direction.case] = found


def _watch(guest: Any, s: GuestSettings, name: str, backend: Backend) -> dict[str, Usage]:
    """Show which run the guest is in until it powers off; bounded by a deadline.

    The back-end's usage is noted as each run begins and when the guest ends: run ``tag``
    ("case round") is ``usage[tag]`` to the next note (polled: a quarter second late at most).
    """
    from tools.qemu import GuestError

    usage: dict[str, Usage] = {}

    limit = BOOT_TIMEOUT + len(s.directions) * s.rounds * (s.seconds + RUN_SLACK)
    deadline = time.monotonic() + limit
    shown = ""
    while guest.running():
        begins = RUN_BEGIN.findall(guest.output())
        for case, index in begins[len(usage):]:
            if (now := backend.usage()) is not None:
                usage[f"{case} {index}"] = now
        if begins:
            case, index = begins[-1]
            text = f"{case} [{name}, QEMU {s.qemu}] round {index}/{s.rounds}"
        else:
            text = f"guest [{name}]: booting QEMU {s.qemu} (TCG)"
        if text != shown:
            s.progress.update(text)
            shown = text
        if time.monotonic() > deadline:
            raise BenchError(f"the iperf3 guest did not finish within {limit:.0f} s "
                             f"(console: {guest.serial_log})")
        time.sleep(POLL_INTERVAL)
    try:
        guest.wait_exit(10)
    except GuestError:
        raise BenchError(f"QEMU did not exit (console: {guest.serial_log})") from None
    if (now := backend.usage()) is not None:
        usage["end"] = now
    return usage


def guest_rows(kits: GuestKits, template: str, name: str, s: GuestSettings,
               baselines: GuestBaselines, stream: bool = False,
               mtu: int = GUEST_MTUS[0]) -> list[Row]:
    """The guest rows for one back-end: iperf3 in a TCG guest, loopback baselines beside.

    ``stream``: QEMU's -netdev stream instead of vhost-user (rows named ``NAME-stream``).
    ``mtu``: the back-end's -m and the guest's link MTU (rows named by ``row_case``).
    """
    from tools.qemu import QemuGuest

    if stream:
        name = f"{name}-stream"
    run_name = f"{name}-mtu{mtu}"  # logs and console of this boot
    console = kits.workdir / f"guest-{run_name}.serial"

    servers = HostIperfs(kits.host_iperf, kits.workdir, run_name)
    try:
        baselines.measure(servers, s)
        backend = Backend(template, mtu, name)
        try:
            before = backend.counters() | host_udp_counters()
            guest = QemuGuest(kits.kit, s.qemu, socket_path=backend.socket,
                              script=guest_script({ipv6: server.port for ipv6, server
                                                   in servers.by_family.items()}, s, mtu),
                              serial_log=console, stream=stream)
            started = time.monotonic()
            with guest:
                usage = _watch(guest, s, f"{name}, MTU {mtu}", backend)
            elapsed = time.monotonic() - started
            after = backend.counters() | host_udp_counters()
            output = guest.output()
        finally:
            backend.close()
    finally:
        servers.close()
    check_guest_mtu(output, mtu, console)
    runs = parse_guest_output(output)
    rows = []
    for direction in s.directions:
        results = []
        for index in range(1, s.rounds + 1):
            if (direction.case, index) not in runs:
                raise BenchError(f"the guest printed no result for {direction.case} round {index} "
                                 f"(console: {console})")
            code, text = runs[(direction.case, index)]
            try:
                results.append(parse_iperf_json(text, direction.udp))
            except BenchError as error:
                raise BenchError(f"{direction.case} round {index} in the guest (exit {code}): "
                                 f"{error}") from None
        row = _row(direction, name, results, baselines.results[direction.case],
                   before, after, s, elapsed)
        row.case = row_case(direction, mtu)
        row.extra.update(_cost(direction, results, usage))
        row.extra.update(parse_guest_stats(output, direction.case, s.rounds))
        rows.append(row)
    return rows


def ipv4_sibling(direction: Direction) -> Direction | None:
    """The IPv4 direction an IPv6 one is compared with (same protocol and way); None for an
    IPv4 direction."""
    if not direction.ipv6:
        return None
    return next(d for d in DIRECTIONS
                if not d.ipv6 and (d.udp, d.reverse) == (direction.udp, direction.reverse))


def compare_families(rows: list[Row]) -> None:
    """Note on each IPv6 guest row ``vs_ipv4``: its median over the same back-end's IPv4 row
    at the same MTU (rows whose rounds are merged: call after ``merge_rounds``)."""
    directions = {d.case: d for d in DIRECTIONS}
    by_key = {(row.case, row.backend): row for row in rows}
    for row in rows:
        case, mtu = MTU_SUFFIX.match(row.case).groups()  # always matches
        sibling = ipv4_sibling(directions[case]) if case in directions else None
        if sibling is None:
            continue
        ipv4 = by_key.get((row_case(sibling, int(mtu or GUEST_MTUS[0])), row.backend))
        if ipv4 is not None and row.rounds and ipv4.rounds and ipv4.median:
            row.extra["vs_ipv4"] = row.median / ipv4.median


def _cost(direction: Direction, results: list[IperfResult],
          usage: dict[str, Usage]) -> dict[str, float]:
    """The back-end's CPU and wake-ups per MB (TCP) or per datagram (UDP) over ``direction``'s
    runs, from the usage noted as each run began to the next note; {} without notes."""
    notes = list(usage.items())
    cpu, wakeups, units = 0.0, 0, 0.0
    for index, result in enumerate(results, 1):
        tags = [tag for tag, _ in notes]
        tag = f"{direction.case} {index}"
        if tag not in tags or tags.index(tag) + 1 >= len(notes):
            return {}
        start, end = notes[tags.index(tag)][1], notes[tags.index(tag) + 1][1]
        cpu += end.cpu_s - start.cpu_s
        wakeups += end.wakeups - start.wakeups
        units += (result.datagrams or 0) if direction.udp else result.bytes / 1e6
    unit = "pkt" if direction.udp else "MB"
    return Usage(0.0, 0).per_unit(Usage(cpu, wakeups), units, unit)


def _row(direction: Direction, name: str, results: list[IperfResult],
         base: list[IperfResult], before: dict[str, int], after: dict[str, int],
         s: GuestSettings, elapsed: float) -> Row:
    row = Row(direction.case, "Mbit/s", [r.mbit_s for r in results], [r.mbit_s for r in base],
              "loopback Mbit/s", backend=name)
    # The counters cover the whole boot (iperf3's control connections too), so they can
    # only be larger than what iperf3 reports for the data direction.
    counted = after[direction.counter] - before.get(direction.counter, 0) \
        if direction.counter in after else None
    if direction.udp:
        row.extra.update(
            loss_pct=statistics.median(r.lost_percent or 0.0 for r in results),
            loopback_loss_pct=statistics.median(r.lost_percent or 0.0 for r in base),
            offered=s.udp_rate,
            iperf_datagrams=sum(r.datagrams or 0 for r in results),
            vhostnet_datagrams=counted)
        # Over the whole boot (so only a boot that runs this one case measures just it):
        # datagrams the host's sockets dropped (receive buffer full: the back-end read too
        # slowly), frames into the RX ring and interrupts raised for them (vhostnet's rings).
        row.extra.update({name: after[key] - before.get(key, 0) for name, key in (
            ("host_udp_rcvbuf_errors", "host.udp.rcvbuf_errors"),
            ("backend_rx_frames", "vq0.rx_frames"), ("backend_rx_notifies", "vq0.notifications"),
            # Stream mode: frames sent, sendmsg calls, waits for a full socket; both modes:
            # host reading paused for a guest backlog, frames dropped from that backlog.
            ("backend_stream_frames", "stream.rx.frames"),
            ("backend_stream_sends", "stream.rx.sends"),
            ("backend_stream_waits", "stream.rx.send_waits"),
            ("backend_rx_paused", "udp.rx_paused"),
            ("backend_backlog_dropped", "guest.rx_backlog_dropped"))
            if key in after})
    else:
        row.extra.update(iperf_bytes=sum(r.bytes for r in results), vhostnet_bytes=counted)
    row.extra.update(qemu=s.qemu, guest_s=round(elapsed, 1))
    return row
